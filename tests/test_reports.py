"""Report figures checked against values worked out by hand on small fixtures."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

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


# -- issue 14: no stored row stops a report -------------------------------------------------

# Times the old schema let in: 9999-12-31T23:59:60Z (year 10000 once the leap second is
# added), 0001-01-01T00:00:00Z, an answer on 9999-12-15, a correction into year 10146.
YEAR_10000_MS = 253_402_300_800_000
YEAR_1_MS = -62_135_596_800_000
DEC_9999_MS = 253_400_918_400_000
YEAR_10146_MS = 258_000_000_000_000_000 // 1000


def _far(row: dict[str, Any], **times: int) -> dict[str, Any]:
    return {**row, **times}


FAR = [{"wall_ms": YEAR_10000_MS}, {"wall_ms": YEAR_1_MS}, {"wall_ms": DEC_9999_MS},
       {"wall_ms": ms("2026-11-23 09:00"), "corrected_ms": YEAR_10146_MS},
       {"wall_ms": 0, "corrected_ms": -(2**62)}]


@pytest.mark.parametrize("tz", ["UTC", "America/New_York", "Pacific/Kiritimati",
                                "Etc/GMT+12"])
def test_every_report_skips_rows_outside_the_time_range_and_counts_them(tz: str) -> None:
    presses = [press("2026-11-23 09:00", "good"), press("2026-11-23 10:00", "bad")]
    presses += [_far(press("2026-11-23 09:00", "bad"), **t) for t in FAR]
    answers = [answer("2026-11-23 09:00", "no", phone="+4915112345")]
    answers += [_far(answer("2026-11-23 09:00", "no", phone="+4915112346"), **t) for t in FAR]
    nov = {"start": date(2026, 11, 1), "end": date(2026, 11, 30)}
    for kw in ({}, nov):
        got = figures(loyalty_index(presses, by="operator", period="month", tz=tz, **kw))
        assert got == [("op-1", "2026-11", 1, 0, 1, 2, "0.0")]
        for period in ("day", "week", "month"):
            rows = doctor_index(answers, period=period, tz=tz, **kw)
            assert sum(r.minus for r in rows) == 1
            assert sum(r.answers for r in answer_rate(answers, period=period, tz=tz,
                                                      **kw)) == 1
    got_cb = callback_list(answers, {}, now_ms=ms("2026-11-23 12:00"), stale_after_s=3600,
                           tz=tz)
    assert [r.phone for r in got_cb] == ["+4915112345"]
    from collector.reports import out_of_range

    assert out_of_range(presses) == len(FAR)


def test_the_report_commands_run_on_such_rows_and_say_what_they_left_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack's commands, on a database holding what the old schema let in."""
    from collector import cli, queries, store
    from collector.intake import classify
    from collector.store import Item
    from tests.collector_fixtures import Backend, press_event

    backend = Backend("sqlite", tmp_path, None)
    db = backend.open()
    items = [classify(*press_event(i, wall_ns=1_795_424_400_000_000_000 + i * 10**9))
             for i in range(1, 7)]
    assert all(isinstance(i, Item) and i.kind == "event" for i in items)
    store.ingest(db, [i for i in items if i is not None])
    with db.transaction() as cur:
        for seq, t in enumerate(FAR, start=2):
            cur.execute("UPDATE events SET wall_ms = ?, corrected_ms = ? WHERE seq = ?",
                        (t["wall_ms"], t.get("corrected_ms"), seq))
    db.close()
    cfg = tmp_path / "collector.toml"
    cfg.write_text(f'id = "c1"\n[broker]\nhost = "localhost"\n{backend.toml()}'
                   '[reports]\ntz = "America/New_York"\n')
    asked: list[tuple[int | None, int | None]] = []
    events = queries.events

    def spy(db: Any, kinds: Any, start_ms: int | None = None,
            end_ms: int | None = None) -> list[dict[str, Any]]:
        asked.append((start_ms, end_ms))
        return events(db, kinds, start_ms, end_ms)

    monkeypatch.setattr(queries, "events", spy)
    for args in (["report", "loyalty"], ["report", "doctors", "--period", "month"],
                 ["report", "answer-rate"], ["callbacks"]):
        assert cli.main([*args, "--config", str(cfg)]) == 0
        err = capsys.readouterr().err
        if args[-1] == "loyalty":
            assert "5 event(s) left out: their time is outside 1960-01-01..2099-12-31" in err
    assert asked == [(None, None)] * 4
    # Asked for November: the database gives only what can be in it (a day's margin
    # either side for the zone), so nothing out of range is even read.
    assert cli.main(["report", "loyalty", "--from", "2026-11-01", "--to", "2026-11-30",
                     "--by", "desk", "--period", "month", "--csv", "-",
                     "--config", str(cfg)]) == 0
    out, err = capsys.readouterr()
    assert "left out" not in err
    assert out.splitlines()[1] == '"clinic-3/desk-1","2026-11","1","0","0","1","100.0"'
    (start_ms, end_ms), = asked[4:]
    assert start_ms is not None
    assert end_ms is not None
    assert ms("2026-10-31 00:00") <= start_ms <= ms("2026-11-01 05:00")
    assert ms("2026-12-01 05:00") <= end_ms <= ms("2026-12-02 00:00")
    # Dates outside the range are a usage error, not a traceback.
    for bad in (["--from", "9999-12-01", "--to", "9999-12-31"],
                ["--from", "0001-01-01", "--to", "0001-01-31"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["report", "doctors", "--period", "month", *bad, "--config", str(cfg)])
        assert exit_.value.code == 2
        assert "1960-01-01" in capsys.readouterr().err
