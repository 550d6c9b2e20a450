"""Operator on duty: precedence of badge, command, roster and config; expiry;
time zones and daylight-saving days.  Times are injected, nothing sleeps."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from edge.contract.timefmt import parse_days, parse_hhmm
from edge.events import OperatorTag
from edge.operators import Operators, Shift

H = 3600 * 10**9


def utc(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp() * 10**9)


@pytest.fixture
def ops(tmp_path: Path) -> Operators:
    o = Operators(tmp_path, {"desk-1": "op-fixed"}, max_login_s=10 * 3600)
    # Mon-Fri 08:00-16:00 in Berlin: op-anna; evenings op-boris.
    o.add_shift(Shift("desk-1", "op-anna", parse_days("mon-fri"), "08:00", "16:00",
                      "Europe/Berlin"))
    o.add_shift(Shift("desk-1", "op-boris", parse_days("mon-fri"), "16:00", "20:00",
                      "Europe/Berlin"))
    return o


def test_parsing() -> None:
    assert parse_days("mon-fri") == (0, 1, 2, 3, 4)
    assert parse_days("sat,sun") == (5, 6)
    assert parse_days("fri-mon") == (0, 4, 5, 6)
    assert parse_hhmm("24:00") == dt.time(0, 0)
    for bad in ("monday", "x-y"):
        with pytest.raises(ValueError, match="weekdays"):
            parse_days(bad)
    with pytest.raises(ValueError, match="08:00"):
        parse_hhmm("8am")


def test_precedence_roster_then_badge_then_command_then_logout(ops: Operators) -> None:
    tue_9 = utc("2026-11-24T08:00:00")  # 09:00 in Berlin (CET)
    assert ops.who("desk-1", tue_9) == OperatorTag("op-anna", "schedule")
    assert ops.who("desk-1", utc("2026-11-24T15:30:00")) == OperatorTag("op-boris", "schedule")
    assert ops.who("desk-1", utc("2026-11-24T20:00:00")) == OperatorTag("op-fixed", "config")
    assert ops.who("desk-2", tue_9) == OperatorTag.nobody()
    # A badge scan overrides the roster; a later command overrides the badge.
    assert ops.badge("desk-1", "op-carl", tue_9 + 60 * 10**9) is True
    assert ops.who("desk-1", tue_9 + 61 * 10**9) == OperatorTag("op-carl", "badge")
    ops.login("desk-1", "op-dana", "command", tue_9 + 120 * 10**9)
    assert ops.who("desk-1", tue_9 + 121 * 10**9) == OperatorTag("op-dana", "command")
    # "Nobody" by command is explicit: it overrides the roster too.
    ops.login("desk-1", None, "command", tue_9 + 180 * 10**9)
    assert ops.who("desk-1", tue_9 + 181 * 10**9) == OperatorTag(None, "none")
    ops.logout("desk-1", tue_9 + 240 * 10**9)
    assert ops.who("desk-1", tue_9 + 241 * 10**9) == OperatorTag("op-anna", "schedule")
    # Earlier moments keep the operator they had (replayed presses).
    assert ops.who("desk-1", tue_9 + 90 * 10**9) == OperatorTag("op-carl", "badge")


def test_same_badge_again_logs_out_and_unknown_badge_is_source_badge(ops: Operators) -> None:
    t = utc("2026-11-24T18:00:00")  # 19:00 Berlin: op-boris's shift
    ops.badge("desk-1", "op-carl", t)
    assert ops.badge("desk-1", "op-carl", t + 10**9) is False
    assert ops.who("desk-1", t + 2 * 10**9) == OperatorTag("op-boris", "schedule")
    ops.badge("desk-1", None, t + 3 * 10**9)
    assert ops.who("desk-1", t + 4 * 10**9) == OperatorTag(None, "badge")


def test_a_login_without_logout_ends_with_the_shift_or_the_limit(ops: Operators) -> None:
    t = utc("2026-11-24T09:00:00")  # 10:00 Berlin, op-anna's shift until 15:00 UTC
    ops.badge("desk-1", "op-anna", t)
    assert ops.who("desk-1", utc("2026-11-24T14:59:00")) == OperatorTag("op-anna", "badge")
    assert ops.who("desk-1", utc("2026-11-24T15:01:00")) == OperatorTag("op-boris", "schedule")
    # Someone with no shift at this desk: the 10 hour limit.
    ops.login("desk-1", "op-eve", "command", utc("2026-11-28T06:00:00"))  # a Saturday
    assert ops.who("desk-1", utc("2026-11-28T15:59:00")) == OperatorTag("op-eve", "command")
    assert ops.who("desk-1", utc("2026-11-28T16:01:00")) == OperatorTag("op-fixed", "config")


def test_time_zones_decide_the_shift(tmp_path: Path) -> None:
    o = Operators(tmp_path, {})
    o.add_shift(Shift("front", "op-tokyo", parse_days("mon-fri"), "09:00", "17:00",
                      "Asia/Tokyo"))
    # Monday 09:00 in Tokyo is Monday 00:00 UTC; Sunday 23:59 UTC is Monday 08:59 there.
    assert o.who("front", utc("2026-11-23T00:00:00")).id == "op-tokyo"
    assert o.who("front", utc("2026-11-22T23:59:00")).id is None
    assert o.who("front", utc("2026-11-23T07:59:00")).id == "op-tokyo"
    assert o.who("front", utc("2026-11-23T08:00:00")).id is None


def test_daylight_saving_changes_keep_the_local_hours(tmp_path: Path) -> None:
    o = Operators(tmp_path, {})
    # A night shift over the spring change (Berlin, 2026-03-29 02:00 -> 03:00):
    # Sat 22:00 CET = 21:00 UTC to Sun 06:00 CEST = 04:00 UTC, seven hours.
    o.add_shift(Shift("night", "op-owl", parse_days("sat"), "22:00", "06:00",
                      "Europe/Berlin"))
    assert o.who("night", utc("2026-03-28T20:59:00")).id is None
    assert o.who("night", utc("2026-03-28T21:00:00")).id == "op-owl"
    assert o.who("night", utc("2026-03-29T03:59:00")).id == "op-owl"
    assert o.who("night", utc("2026-03-29T04:01:00")).id is None
    # Autumn change (2026-10-25 03:00 CEST -> 02:00 CET): Sunday 08:00-16:00 CET.
    o.add_shift(Shift("sunday", "op-sun", parse_days("sun"), "08:00", "16:00",
                      "Europe/Berlin"))
    assert o.who("sunday", utc("2026-10-25T06:59:00")).id is None
    assert o.who("sunday", utc("2026-10-25T07:00:00")).id == "op-sun"
    assert o.who("sunday", utc("2026-10-25T14:59:00")).id == "op-sun"
    assert o.who("sunday", utc("2026-10-25T15:00:00")).id is None


def test_roster_and_logins_survive_a_restart_and_roster_edits_are_seen(tmp_path: Path) -> None:
    t = utc("2026-11-24T09:00:00")
    first = Operators(tmp_path, {})
    first.login("desk-1", "op-carl", "command", t)
    first.close()
    daemon_view = Operators(tmp_path, {})
    assert daemon_view.who("desk-1", t + 10**9) == OperatorTag("op-carl", "command")
    # The CLI adds a shift with its own instance; the daemon's notices the file changed.
    cli = Operators(tmp_path, {})
    sid = cli.add_shift(Shift("desk-2", "op-anna", parse_days("tue"), "08:00", "16:00",
                              "Europe/Berlin"))
    assert daemon_view.reload_roster() is True
    assert daemon_view.who("desk-2", t).id == "op-anna"
    assert cli.remove_shift(sid) is True
    assert daemon_view.reload_roster() is True
    assert daemon_view.who("desk-2", t).id is None


def test_state_files_that_are_json_but_not_ours_are_skipped_and_reported(
        tmp_path: Path) -> None:
    (tmp_path / "logins.json").write_text('{"desks": {"1": {"desk": "desk-1"}}}')
    (tmp_path / "roster.json").write_text(
        '{"shifts": {"1": {"desk": "desk-1", "operator": "op-1"}}}')
    faults: list[tuple[str, str, str | None]] = []
    o = Operators(tmp_path, {"desk-1": "op-fixed"}, on_fault=lambda *f: faults.append(f))
    assert o.who("desk-1", 0).id == "op-fixed"  # nothing usable: the config decides
    assert {(code, name) for code, name, text in faults if text} == {
        ("state_unreadable", "logins.json"), ("state_unreadable", "roster.json")}
    o.login("desk-1", "op-23", "command", 10)
    assert o.who("desk-1", 11).id == "op-23"
    o.close()


def test_the_operator_of_any_past_moment_survives_many_changes_and_a_restart(
        tmp_path: Path) -> None:
    """24 operator commands at one desk; a record replayed from the time of the
    4th login is tagged with that login's operator (20 changes used to be kept)."""
    o = Operators(tmp_path, {"desk-1": "op-fixed"})
    start = utc("2026-11-24T08:00:00")
    for i in range(24):
        o.login("desk-1", f"op-{i}", "command", start + i * 60 * 10**9)
    during_4th = start + 3 * 60 * 10**9 + 30 * 10**9
    assert o.who("desk-1", during_4th).id == "op-3"
    o.close()
    o = Operators(tmp_path, {"desk-1": "op-fixed"})  # persisted
    assert o.who("desk-1", during_4th).id == "op-3"
    o.close()


def test_a_login_made_on_an_unsynchronised_clock_moves_to_its_true_time(
        tmp_path: Path) -> None:
    """Issue 14: a Pi without RTC reads 1970 until NTP answers; an operator who
    logged in then is still on duty after the sync, and after a restart."""
    from edge.clock import ManualClock

    clock = ManualClock(wall_ns=0, mono_ns=50 * 10**9, synced=False)
    o = Operators(tmp_path, {"desk-1": "op-fixed"}, clock=clock)
    o.add_shift(Shift("desk-1", "op-anna", parse_days("mon-fri"), "08:00", "16:00",
                      "Europe/Berlin"))
    o.login("desk-1", "op-cmd", "command", clock.wall_ns())
    clock.advance(60)
    assert o.who("desk-1", clock.wall_ns()) == OperatorTag("op-cmd", "command")
    # NTP: Friday 2026-11-27 10:01 UTC (11:01 in Berlin, op-anna's shift by the roster).
    clock.step_wall((utc("2026-11-27T10:01:00") - clock.wall_ns()) / 1e9)
    clock.set_synced(True)
    assert o.who("desk-1", clock.wall_ns()) == OperatorTag("op-anna", "schedule")  # the fault
    assert o.retime(clock.boot_id, clock.mono_ns(), clock.wall_ns()) == 1
    assert o.who("desk-1", clock.wall_ns()) == OperatorTag("op-cmd", "command")
    assert o.since("desk-1", clock.wall_ns()) == utc("2026-11-27T10:00:00")
    # Its expiry is decided at the true time: 10 h after 10:00.
    assert o.who("desk-1", utc("2026-11-27T19:59:00")) == OperatorTag("op-cmd", "command")
    assert o.who("desk-1", utc("2026-11-27T20:01:00")).source != "command"
    o.close()
    again = Operators(tmp_path, {"desk-1": "op-fixed"}, clock=clock)
    assert again.who("desk-1", clock.wall_ns()) == OperatorTag("op-cmd", "command")
    assert again.retime(clock.boot_id, clock.mono_ns(), clock.wall_ns()) == 0  # once only
    again.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="an admin's sudo edit: needs root")
def test_a_roster_edit_made_as_root_stays_readable_to_the_service_user(
        request: pytest.FixtureRequest) -> None:
    """`sudo feedback-edge operator add` on the Pi: the state directory is the
    service user's (here `nobody`); a roster written root:root 0600 was
    unreadable to the daemon, which then applied no shift and said nothing."""
    # Not under tmp_path: pytest's own directories are root's alone (0700).
    top = Path(tempfile.mkdtemp(prefix="roster-"))
    request.addfinalizer(lambda: shutil.rmtree(top, ignore_errors=True))
    top.chmod(0o755)
    state = top / "state"
    state.mkdir(mode=0o750)
    os.chown(state, 65534, 65534)
    cli = Operators(state, {})
    cli.add_shift(Shift("desk-1", "op-17", parse_days("mon-sun"), "00:00", "23:59", "UTC"))
    assert (state / "roster.json").stat().st_uid == 65534
    # What the daemon, as the service user, reads (the checkout itself may be
    # out of that user's reach: the file is read with the standard library).
    probe = "import json, sys; print(len(json.load(open(sys.argv[1]))['shifts']))"
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          shutil.which("python3", path="/usr/bin:/bin") or sys.executable,
                          "-c", probe, str(state / "roster.json")],
                         capture_output=True, text=True, check=False)
    assert out.stdout.strip() == "1", out.stderr


def test_an_unreadable_roster_keeps_its_alarm(tmp_path: Path) -> None:
    (tmp_path / "roster.json").mkdir()  # read() fails with an OSError, as EACCES does
    faults: list[tuple[str, str, str | None]] = []
    o = Operators(tmp_path, {"desk-1": "op-fixed"}, on_fault=lambda *f: faults.append(f))
    o.reload_roster()
    assert o.shifts == []
    assert faults, "no alarm for an unreadable roster"
    assert faults[-1][0] == "state_unreadable"
    assert "cannot be read" in (faults[-1][2] or ""), faults
