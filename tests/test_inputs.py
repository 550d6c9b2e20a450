"""No input stops or subverts anything (issue): ids from outside follow one
grammar each (edge.contract.ids) wherever they enter (config, MQTT command,
control socket, roster CLI and file, device data), logs escape what they
print (edge.logsafe), and absurd device values are refused or clamped."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drivers.console import UPTIME_MOD, ConsoleReport, ReportType
from drivers.terminal import (
    MAX_AGE_MS,
    Count,
    FrameError,
    FrameType,
    Send,
    StoreRecord,
    TerminalHost,
    encode_frame,
)
from edge import cli as edge_cli
from edge.clock import ManualClock
from edge.commands import Commands
from edge.config import load_config
from edge.contract.ids import DOCTOR_ID_RE, NAME_RE, OPERATOR_RE, valid_operator
from edge.contract.toml import ConfigError
from edge.doctors import DoctorList, validate_doctors
from edge.kinds.console import ConsoleInput
from edge.logsafe import printable
from edge.operators import Login, Operators, Shift
from tests.conftest import Broker, Proc, Subscriber, wait_for, write_config
from tests.terminal_fixtures import SERIAL, TerminalSite
from tests.test_console_kind import Rig

EVIL = ["op-1\nINFO edge.commands: desk desk-1: operator root on duty", "op-1\r",
        "\x1b[31mop-1", "op-1\n", "op-1\u202e", "op-1\x00", "x" * 65, "", " op-1"]
GOOD = ["op-17", "4711", "Анна Петрова", "O'Brien", "José María", "王小明", "op.a_b-c"]
YEAR_MS = 365 * 24 * 3600 * 1000
ANSWER = {"id": 1, "doctor": "dr-petrov", "q1": "yes", "q2": None, "phone": None,
          "comment": None, "lang": "en", "age_ms": 0}
HELLO = {"serial": SERIAL, "model": "ST-3000", "fw": "2", "doctors_rev": 1, "unacked": 0}


# -- grammars and the log helper ------------------------------------------------------

@pytest.mark.parametrize("op", GOOD)
def test_operator_ids_clinics_use_are_valid(op: str) -> None:
    assert valid_operator(op)
    assert OPERATOR_RE.match(op)


@pytest.mark.parametrize("op", EVIL)
def test_operator_ids_with_control_characters_are_not(op: str) -> None:
    assert not valid_operator(op)


def test_no_grammar_takes_a_trailing_newline() -> None:
    # `$` matches before a final "\n": every grammar ends in \Z instead.
    assert not NAME_RE.match("clinic-3\n")
    assert not DOCTOR_ID_RE.match("dr-petrov\n")
    with pytest.raises(ValueError, match="id must be"):
        validate_doctors({"rev": 1, "doctors": [{"id": "dr-a\n", "name": "A",
                                                  "specialty": "", "photo": None}]})
    with pytest.raises(ValueError, match="name must be"):
        validate_doctors({"rev": 1, "doctors": [{"id": "dr-a", "name": "A\nB",
                                                  "specialty": "", "photo": None}]})


def test_printable_escapes_what_could_forge_or_colour_a_log_line() -> None:
    assert printable("a\nb\r\x1b[31m\\n\u202e Анна") == "a\\nb\\r\\x1b[31m\\\\n\\u202e Анна"
    assert printable(None) == "-"
    assert printable("x" * 300).endswith("x...")


# -- the operator command and the control socket ------------------------------------------

def _commands(tmp_path: Path) -> tuple[Commands, Operators]:
    ops = Operators(tmp_path, {"desk-1": None})
    clock = ManualClock()
    return Commands(desks=["desk-1"], operators=ops, clock=clock,
                    doctors=DoctorList(tmp_path / "doctors.json"), devices=list,
                    status=dict), ops


@pytest.mark.parametrize("op", EVIL[:3])
def test_the_operator_command_refuses_ids_with_control_characters_and_logs_none(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, op: str) -> None:
    commands, ops = _commands(tmp_path)
    caplog.set_level(logging.DEBUG)
    body = json.dumps({"request_id": "r1", "desk": "desk-1", "operator": op}).encode()
    result = commands.mqtt("operator", body)
    assert result["request_id"] == "r1"
    assert result["ok"] is False
    assert result["error"].startswith("operator must be an operator id: 1 to 64 letters")
    assert op not in result["error"]
    reply = commands.control({"cmd": "operator", "desk": "desk-1", "operator": op})
    assert reply["ok"] is False
    assert reply["error"] == result["error"]
    assert ops.history == {}  # nobody logged in
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "op-1" not in logged
    assert "\x1b" not in logged
    ops.close()


def test_the_operator_command_still_takes_names_and_logs_them_escaped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    commands, ops = _commands(tmp_path)
    caplog.set_level(logging.INFO)
    for op in GOOD:
        result = commands.mqtt("operator", json.dumps(
            {"request_id": "r", "desk": "desk-1", "operator": op}).encode())
        assert result == {"request_id": "r", "ok": True, "error": None}, op
        assert ops.who("desk-1", ManualClock().wall_ns()).id == op
    assert "operator Анна Петрова on duty by command" in caplog.text
    ops.close()


def test_a_hand_edited_logins_file_cannot_bring_a_forged_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="operator must be"):
        Login("desk-1", "op\nx", "command", 0, None)
    faults: list[tuple[str, str, str | None]] = []
    (tmp_path / "logins.json").write_text(json.dumps({"desks": {"1": {
        "desk": "desk-1", "logins": [{"desk": "desk-1", "operator": "op-1\r\nroot",
                                      "source": "command", "since_ns": 0,
                                      "until_ns": None}]}}}))
    (tmp_path / "roster.json").write_text(json.dumps({"shifts": {"1": {
        "desk": "desk-1", "operator": "op\x1b[2J", "days": [0, 1, 2, 3, 4, 5, 6],
        "start": "00:00", "end": "00:00", "tz": "UTC"}}}))
    ops = Operators(tmp_path, {}, on_fault=lambda c, s, t: faults.append((c, s, t)))
    assert ops.history == {}
    assert ops.shifts == []
    assert {s for c, s, t in faults if t} == {"logins.json", "roster.json"}
    ops.close()


# -- config and roster CLI ---------------------------------------------------------------

@pytest.mark.parametrize("section", ['[desks.desk-1]\noperator = "{op}"',
                                     '[badges]\n04A7F3 = "{op}"'])
@pytest.mark.parametrize("op", ["op-1\\n", "op-1\\nINFO forged", "\\u001b[31mop"])
def test_the_config_refuses_operator_ids_with_control_characters(
        tmp_path: Path, section: str, op: str) -> None:
    cfg = write_config(tmp_path / "edge.toml", port=1883, store=tmp_path / "o.sqlite",
                       devices=[], extra=section.format(op=op))
    with pytest.raises(ConfigError, match="operator id: 1 to 64 letters"):
        load_config(cfg)


def test_the_config_still_takes_names_as_operator_ids(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "edge.toml", port=1883, store=tmp_path / "o.sqlite",
                       devices=[], extra='[desks.desk-1]\noperator = "Анна Петрова"\n'
                                         '[badges]\n04A7F3 = "O\'Brien"')
    loaded = load_config(cfg)
    assert loaded.desks["desk-1"].operator == "Анна Петрова"
    assert loaded.badges == {"04A7F3": "O'Brien"}


def test_the_config_refuses_a_site_with_a_trailing_newline(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "edge.toml", port=1883, store=tmp_path / "o.sqlite",
                       devices=[], site="clinic-3\\n")
    with pytest.raises(ConfigError, match="site"):
        load_config(cfg)


def test_operator_add_refuses_a_forged_id(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "edge.toml", port=1883, store=tmp_path / "o.sqlite",
                       devices=[], extra='[desks.desk-1]\noperator = "op-1"')
    args = ["operator", "add", "--desk", "desk-1", "--days", "mon-fri", "--from", "08:00",
            "--to", "16:00", "--tz", "UTC", "--config", str(cfg)]
    assert edge_cli.main([*args[:4], "--operator", "op-2\nroot", *args[4:]]) == 2
    assert "operator must be an operator id" in capsys.readouterr().err
    assert edge_cli.main([*args[:4], "--operator", "Анна", *args[4:]]) == 0
    with pytest.raises(ValueError, match="operator must be"):
        Shift("desk-1", "op\r", (0,), "08:00", "16:00", "UTC")


# -- terminal device data -----------------------------------------------------------------

def _feed(payloads: list[tuple[FrameType, dict[str, Any]]]) -> list[Any]:
    host = TerminalHost(SERIAL)
    data = b"\x00" + b"".join(encode_frame(t, i + 1, p) for i, (t, p) in enumerate(payloads))
    return host.feed(data, 0, 0)


def _naks(actions: list[Any]) -> list[str]:
    return [a.name for a in actions if isinstance(a, Count)]


@pytest.mark.parametrize(("ftype", "payload"), [
    (FrameType.ANSWER, {**ANSWER, "doctor": "dr-petrov\nINFO forged"}),
    (FrameType.ANSWER, {**ANSWER, "doctor": "dr-petrov\n"}),
    (FrameType.ANSWER, {**ANSWER, "doctor": "\x1b[31m"}),
    (FrameType.ANSWER, {**ANSWER, "lang": "en\n"}),
    (FrameType.ANSWER, {**ANSWER, "age_ms": 300 * YEAR_MS}),
    (FrameType.ANSWER, {**ANSWER, "age_ms": MAX_AGE_MS + 1}),
    (FrameType.ANSWER, {**ANSWER, "id": 2**53}),
    (FrameType.ANSWER, {**ANSWER, "q1": "no", "q2": "yes", "phone": "+4917012\n"}),
    (FrameType.ABANDONED, {"id": 1, "doctor": "dr\r", "step": "q1", "age_ms": 0}),
    (FrameType.PRESENCE, {"id": 1, "approaches": 10**12, "engaged": 0, "period_ms": 60000,
                          "age_ms": 0}),
    (FrameType.PRESENCE, {"id": 1, "approaches": 1, "engaged": 0, "period_ms": 10**12,
                          "age_ms": 0}),
    (FrameType.HELLO, {**HELLO, "serial": "00C0FFEE0001\n"}),
    (FrameType.HELLO, {**HELLO, "fw": "2\x1b[2J"}),
    (FrameType.HELLO, {**HELLO, "doctors_rev": 2**40}),
])
def test_the_terminal_driver_naks_forged_ids_and_absurd_values_as_schema(
        ftype: FrameType, payload: dict[str, Any]) -> None:
    actions = _feed([(ftype, payload)])
    assert _naks(actions) == ["schema"]
    assert not any(isinstance(a, StoreRecord) for a in actions)
    assert any(isinstance(a, Send) for a in actions)  # the NAK


def test_the_terminal_driver_still_takes_a_90_day_old_record() -> None:
    actions = _feed([(FrameType.ANSWER, {**ANSWER, "age_ms": MAX_AGE_MS,
                                         "doctor": "dr-a.b_c", "lang": "pt-BR"})])
    (stored,) = [a for a in actions if isinstance(a, StoreRecord)]
    assert stored.record.age_ms == MAX_AGE_MS
    assert not isinstance(stored, FrameError)


def test_a_300_year_old_answer_over_a_real_pty_is_nakked_counted_and_not_published(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber]) -> None:
    from firmware_sim.server import control

    site = TerminalSite(tmp_path, broker, procs, [])
    sub = subscribe("feedback/+/+/+/event/#")
    site.power_on()
    site.start()
    site.connected()
    old = encode_frame(FrameType.ANSWER, 700, {**ANSWER, "id": 50, "age_ms": 300 * YEAR_MS})
    forged = encode_frame(FrameType.ANSWER, 701, {**ANSWER, "id": 51,
                                                   "doctor": "dr-petrov\nforged"})
    assert control(site.ctl, b"W", old + forged)["ok"]
    naks = wait_for(lambda: len(n := site.state()["naks"]) >= 2 and n, 10, "two NAKs")
    assert naks[-2:] == [{"seq": 700, "reason": "schema"}, {"seq": 701, "reason": "schema"}]
    wait_for(lambda: site.device().get("decode_errors", {}).get("schema") == 2, 10,
             "both counted")
    # The link works on, and only the good answer is published.
    site.answer(doctor="dr-petrov", q1="yes")
    wait_for(lambda: len(sub.events()) == 1, 10, "a good answer after the refused ones")
    # Nothing else was ever stored (so nothing else can still be on its way).
    assert site.status()["queue"]["last_seq"] == 1
    events = sub.events()
    assert len(events) == 1
    assert events[0]["answer"]["doctor"] == "dr-petrov"
    assert events[0]["time"]["wall"].startswith(time.strftime("%Y", time.gmtime()))
    assert "forged" not in (tmp_path / "daemon.log").read_text()


# -- console event time --------------------------------------------------------------------

@pytest.mark.parametrize(("event_uptime", "now_uptime"), [
    (0, 5_000_000),  # 83 min old, the Pi booted 1 s ago
    (4_000, 1_000),  # wrapped: (1000 - 4000) mod 2^32, ~49.7 days
])
def test_a_console_press_from_before_the_boot_is_timed_at_the_boot(
        tmp_path: Path, event_uptime: int, now_uptime: int) -> None:
    rig = Rig(tmp_path)
    report = ConsoleReport(1, ReportType.PRESS, 0, False, False, event_uptime, now_uptime)
    assert report.age_ms == (now_uptime - event_uptime) % UPTIME_MOD
    reading = rig.reading(ConsoleInput(report))
    d = rig.console.decide(reading, rig.ctx)
    event = d.appends[-1].event
    assert event is not None
    assert event.time.mono_ns == 0
    assert event.time.age_ms == reading.host_mono_ns // 1_000_000
    assert event.time.wall_ns == reading.host_wall_ns - reading.host_mono_ns


def test_a_console_press_within_the_boot_keeps_its_age(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.clock.advance(3600)
    report = ConsoleReport(1, ReportType.PRESS, 0, False, False, 1_000, 61_000)  # 60 s old
    reading = rig.reading(ConsoleInput(report))
    event = rig.console.decide(reading, rig.ctx).appends[-1].event
    assert event is not None
    assert event.time.age_ms == 60_000
    assert event.time.mono_ns == reading.host_mono_ns - 60_000_000_000


def test_a_client_trickling_bytes_cannot_hold_the_control_socket() -> None:
    """One request line must arrive within 2 s in all; a local client sending a byte
    every second would otherwise keep `feedback-edge status` from ever answering."""
    import socket
    import tempfile
    import threading

    from edge.control import ControlServer, query

    path = Path(tempfile.mkdtemp(prefix="ctl")) / "c.sock"
    server = ControlServer(path, lambda box, _request: box.put({"ok": True}))
    server.start()
    stop = threading.Event()

    def trickle() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
            for _ in range(30):  # 30 s of one byte a second, never a whole line
                try:
                    s.sendall(b" ")
                except OSError:
                    return  # the server gave up on us: what the test wants
                if stop.wait(1.0):
                    return

    t = threading.Thread(target=trickle)
    t.start()
    try:
        assert query(path, timeout=6.0) == {"ok": True}
    finally:
        stop.set()
        t.join()
        server.stop()
