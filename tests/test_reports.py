"""Report figures checked against values worked out by hand on small fixtures."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from collector.reports import (
    answer_rate,
    callback_list,
    doctor_index,
    loyalty_index,
    mood,
    periods,
)

TZ = "Europe/Berlin"  # UTC+1 in November


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


_seq = iter(range(1, 10_000))


def press(when: str, label: str, *, op: str | None = "op-1", score: int | None = None,
          button: int | None = None, hold: bool = False, flags: str = "",
          desk: str = "desk-1", device: str = "fc3-a") -> dict[str, Any]:
    scores = {"good": 1, "neutral": 0, "bad": -1, "yes": 1, "no": -1}
    buttons = {"good": 0, "neutral": 1, "bad": 2}
    return {"site": "clinic-3", "edge": "reception-1", "event_id": f"e{next(_seq)}",
            "seq": next(_seq), "kind": "press", "desk": desk, "device_id": device,
            "device_kind": "console", "operator_id": op, "wall_ms": ms(when),
            "corrected_ms": None, "flags": flags, "label": label,
            "score": scores.get(label, score) if score is None else score,
            "button": buttons.get(label, 0) if button is None else button, "hold": hold}


def answer(when: str, q1: str, *, doctor: str = "dr-a", phone: str | None = None,
           comment: str | None = None, device: str = "st-1") -> dict[str, Any]:
    return {"site": "clinic-3", "edge": "office-1", "event_id": f"a{next(_seq)}",
            "seq": next(_seq), "kind": "answer", "desk": "office-12", "device_id": device,
            "wall_ms": ms(when), "corrected_ms": None, "flags": "", "doctor": doctor, "q1": q1,
            "phone": phone, "comment": comment}


def presence(when: str, approaches: int, device: str = "st-1") -> dict[str, Any]:
    return {"site": "clinic-3", "edge": "office-1", "event_id": f"p{next(_seq)}",
            "seq": next(_seq), "kind": "presence", "desk": "office-12", "device_id": device,
            "wall_ms": ms(when), "corrected_ms": None, "flags": "", "approaches": approaches}


def figures(rows: list[Any]) -> list[tuple[Any, ...]]:
    return [tuple(r.as_list()) for r in rows]


def test_loyalty_per_operator_and_local_day_with_tests_and_bursts_left_out() -> None:
    rows = [
        press("2026-11-23 09:00", "good"), press("2026-11-23 09:05", "good"),
        press("2026-11-23 09:10", "bad"), press("2026-11-23 09:15", "neutral"),
        # An installer's test: a PRESS, then a HOLD of the same button flagged test.
        press("2026-11-23 10:00", "bad"),
        press("2026-11-23 10:00", "bad", hold=True, flags="test"),
        press("2026-11-23 11:00", "bad", flags="burst"),
        # 23:30 UTC is 00:30 on the 24th in Berlin.
        press("2026-11-23 23:30", "bad"),
        press("2026-11-24 08:00", "good", op="op-2"),
    ]
    got = figures(loyalty_index(rows, by="operator", period="day", tz=TZ,
                                start=date(2026, 11, 23), end=date(2026, 11, 24)))
    assert got == [
        ("op-1", "2026-11-23", 2, 1, 1, 4, "25.0"),  # (2 - 1) / 4
        ("op-1", "2026-11-24", 0, 0, 1, 1, "-100.0"),
        ("op-2", "2026-11-23", 0, 0, 0, 0, ""),  # an empty period: no index, not 0
        ("op-2", "2026-11-24", 1, 0, 0, 1, "100.0"),
    ]
    with_burst = figures(loyalty_index(rows, by="operator", period="day", tz=TZ,
                                       include_burst=True))
    assert with_burst[0] == ("op-1", "2026-11-23", 2, 1, 2, 5, "0.0")  # (2 - 2) / 5


def test_the_same_day_in_utc_is_two_days_in_tokyo() -> None:
    rows = [press("2026-11-23 14:00", "good"), press("2026-11-23 16:00", "bad")]
    assert figures(loyalty_index(rows, by="desk", period="day", tz="UTC")) == [
        ("clinic-3/desk-1", "2026-11-23", 1, 0, 1, 2, "0.0")]
    assert figures(loyalty_index(rows, by="desk", period="day", tz="Asia/Tokyo")) == [
        ("clinic-3/desk-1", "2026-11-23", 1, 0, 0, 1, "100.0"),  # 23:00 local
        ("clinic-3/desk-1", "2026-11-24", 0, 0, 1, 1, "-100.0")]  # 01:00 local


def test_five_point_and_yes_no_layouts_map_onto_good_neutral_bad() -> None:
    assert [mood(str(s), s) for s in (5, 4, 3, 2, 1)] == \
        ["good", "good", "neutral", "bad", "bad"]
    assert (mood("yes", 1), mood("no", -1), mood("button-7", None)) == ("good", "bad", None)
    rows = [press("2026-11-23 09:00", str(s), score=s, button=5 - s) for s in (5, 4, 3, 2, 1)]
    rows.append(press("2026-11-23 09:30", "button-7", score=None))  # no score: not a vote
    assert figures(loyalty_index(rows, by="site", period="month", tz=TZ)) == [
        ("clinic-3", "2026-11", 2, 1, 2, 5, "0.0")]


def test_doctor_index_by_answers_and_by_imported_visits_with_empty_periods() -> None:
    rows = [answer("2026-11-23 09:00", "yes"), answer("2026-11-24 09:00", "yes"),
            answer("2026-11-25 09:00", "no"), answer("2026-11-26 09:00", "unsure"),
            answer("2026-11-24 12:00", "no", doctor="dr-b")]
    by_answers = figures(doctor_index(rows, period="week", tz=TZ))
    assert by_answers == [("dr-a", "2026-W48", 2, 1, 1, 4, "25.0"),  # (2 - 1) / 4
                          ("dr-b", "2026-W48", 0, 0, 1, 1, "-100.0")]  # a single answer
    visits = [("dr-a", "2026-11-23", "2026-11-29", 10)]  # Monday to Sunday of W48
    assert figures(doctor_index(rows, period="week", tz=TZ, visits=visits))[0] == \
        ("dr-a", "2026-W48", 2, 1, 1, 10, "10.0")  # (2 - 1) / 10 patients
    monthly = figures(doctor_index(rows, period="month", tz=TZ, start=date(2026, 10, 1),
                                   end=date(2026, 11, 30)))
    assert monthly[:2] == [("dr-a", "2026-10", 0, 0, 0, 0, ""),
                           ("dr-a", "2026-11", 2, 1, 1, 4, "25.0")]
    assert doctor_index([], period="week", tz=TZ) == []


def test_answer_rate_is_answers_over_approaches() -> None:
    rows = [presence("2026-11-23 10:00", 4), presence("2026-11-23 15:00", 6),
            answer("2026-11-23 10:01", "yes"), answer("2026-11-23 10:30", "no"),
            answer("2026-11-23 15:05", "unsure"),
            answer("2026-11-24 09:00", "yes")]  # answers but no presence counted that day
    assert figures(answer_rate(rows, period="day", tz=TZ)) == [
        ("clinic-3/office-1/st-1", "2026-11-23", 3, 10, "30.0"),
        ("clinic-3/office-1/st-1", "2026-11-24", 1, 0, "")]


def test_callback_list_newest_first_with_status_and_stale_flag() -> None:
    old = answer("2026-11-20 09:00", "no", phone="+4915112345", comment="waited 2 h")
    new = answer("2026-11-23 09:00", "no", phone="0301234567", doctor="dr-b")
    rows = [old, new, answer("2026-11-22 09:00", "no"),  # no phone: nothing to call
            answer("2026-11-22 10:00", "yes")]
    states = {("clinic-3", "office-1", new["event_id"]): ("called", "anna", ms(
        "2026-11-23 10:00"))}
    got = callback_list(rows, states, now_ms=ms("2026-11-23 12:00"), stale_after_s=24 * 3600,
                        tz=TZ)
    assert [(r.phone, r.doctor, r.status, r.handled_by, r.stale) for r in got] == [
        ("0301234567", "dr-b", "called", "anna", False),
        ("+4915112345", "dr-a", "new", None, True)]  # new for 3 days
    assert got[0].time == "2026-11-23 10:00"  # local time
    assert got[1].comment == "waited 2 h"


def test_period_keys_cover_iso_weeks_across_a_year_end() -> None:
    assert periods(date(2026, 12, 28), date(2027, 1, 4), "week") == ["2026-W53", "2027-W01"]
    assert periods(date(2026, 11, 30), date(2026, 12, 1), "month") == ["2026-11", "2026-12"]


def test_an_unknown_zone_on_the_command_line_is_a_usage_error(tmp_path: Path) -> None:
    cfg = tmp_path / "collector.toml"
    cfg.write_text(f'id = "c1"\n[broker]\nhost = "localhost"\n[database]\n'
                   f'path = "{tmp_path}/c.sqlite"\n')
    for args in (["report", "loyalty", "--tz", "Mars/Olympus"], ["callbacks", "--tz", "Nowhere"]):
        r = subprocess.run([sys.executable, "-m", "collector.cli", *args, "--config", str(cfg)],
                           capture_output=True, text=True, check=False, timeout=60)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert "zone" in r.stderr.lower()
