"""Survey terminals as a black box: the simulator on a real pty, the daemon
process reading it with pyserial, a real Mosquitto, SIGKILL as power cut."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from drivers.terminal import FrameType, encode_frame
from firmware_sim.server import control
from firmware_sim.terminal_server import scripted_day
from tests.conftest import Broker, Proc, Subscriber, wait_for
from tests.terminal_fixtures import TerminalSite


def _unique(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for e in events:
        seen.setdefault(e["event_id"], e)
    return list(seen.values())


def _expected(script: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for step in script:
        fields = {k: v for k, v in step.items() if k not in ("kind", "after_ms")}
        if step["kind"] == "answer":
            fields = {"q2": None, "phone": None, "comment": None, **fields}
        out.append((step["kind"], fields))
    return out


def _as_step(e: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    body = dict(e[e["kind"]])
    body.pop("record_id")
    return e["kind"], body


def test_a_scripted_day_arrives_complete_schema_valid_and_once(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber], validate: Callable[[str, Any], None]) -> None:
    script = scripted_day(150)
    site = TerminalSite(tmp_path, broker, procs, script)
    sub = subscribe("feedback/+/+/+/event/#")
    site.power_on()
    site.start()
    wait_for(lambda: len(sub.events()) >= len(script), 30, "the whole day")
    wait_for(lambda: site.state()["unacked"] == 0, 10, "terminal flash empty")
    for m in sub.snapshot():
        validate(m.topic, m.json())
    events = sub.events()
    assert len(events) == len(_unique(events)) == len(script)
    assert [e[e["kind"]]["record_id"] for e in events] == list(range(1, len(script) + 1))
    assert [_as_step(e) for e in events] == _expected(script)
    assert {e["device"]["id"] for e in events} == {"st3-00c0ffee0001"}
    assert {e["desk"] for e in events} == {"office-12"}
    st = site.state()
    assert st["doctors_rev"] == 4  # DOCTORS went out after HELLO (rev 0 != 4)
    assert st["naks"] == []
    # Personal data never reaches the daemon's log.
    log = site.daemon.log()  # type: ignore[union-attr]
    assert "+74951234567" not in log
    assert "Waited 40 minutes" not in log


def test_power_cut_daemon_restart_and_broker_outage_lose_nothing_and_double_nothing(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber]) -> None:
    script = [{**step, "after_ms": (i + 1) * 120} for i, step in
              enumerate(scripted_day(120) * 3)]
    site = TerminalSite(tmp_path, broker, procs, script)
    sub = subscribe("feedback/+/+/+/event/#")
    site.power_on()
    site.start()
    wait_for(lambda: len(sub.events()) >= 5, 20, "the first records")
    assert site.daemon is not None
    site.daemon.kill(signal.SIGKILL)  # the daemon dies: records pile up in flash
    wait_for(lambda: site.state()["unacked"] >= 5, 20, "unacknowledged records in flash")
    site.power_cut()  # with records unacknowledged
    broker.stop()
    site.power_on()  # HELLO, then the flash replays
    site.start()
    wait_for(lambda: site.state()["script_done"] == len(script), 30, "the script played out")
    wait_for(lambda: site.state()["unacked"] == 0, 30, "every record stored at the edge")
    st = wait_for(lambda: (s := site.status()) and s.get("queue", {}).get("depth", 0) > 0 and s,
                  10, "records waiting for the broker")
    assert st["broker"]["state"] == "disconnected"
    broker.start()
    wait_for(lambda: len(_unique(sub.events())) >= len(script), 40, "everything delivered")
    events = _unique(sub.events())
    ids = [e[e["kind"]]["record_id"] for e in events]
    assert Counter(ids) == Counter(range(1, len(script) + 1)), "a record lost or stored twice"
    assert sorted(_as_step(e)[0] for e in events) == sorted(k for k, _ in _expected(script))
    seqs = sorted(e["seq"] for e in events)
    assert seqs == list(range(1, len(script) + 1))


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\x05\x01\x02\x00", "cobs"),
    (bytes([0x03, 0x01, 0x02, 0x00]), "schema"),
    (b"\x01" * 16_600 + b"\x00", "too_long"),  # over the sheet's 16,500 bytes on the wire
    # A len over 16384 is too_long too, though the frame fits the wire limit.
    (encode_frame(FrameType.ANSWER, 80, b"{" + b" " * 16_383 + b"}"), "too_long"),
    (encode_frame(FrameType.ANSWER, 77, b'{"id": 1,'), "json"),
    (encode_frame(0x44, 78, {}), "unknown_type"),
    (encode_frame(FrameType.ANSWER, 79, {"id": 900, "doctor": "d", "q1": "yes", "q2": "yes",
                                         "phone": None, "comment": None, "lang": "en",
                                         "age_ms": 0}), "schema"),
])
def test_bad_frames_are_nacked_counted_and_the_link_keeps_working(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber], raw: bytes, reason: str) -> None:
    site = TerminalSite(tmp_path, broker, procs, [])
    sub = subscribe("feedback/+/+/+/event/#")
    site.power_on()
    site.start()
    site.connected()
    bad = bytearray(encode_frame(FrameType.PING, 5, {}))
    bad[3] ^= 0x10  # a flipped bit: CRC
    reply = control(site.ctl, b"W", bytes(bad) + raw)
    assert reply["ok"]
    naks = wait_for(lambda: (s := site.state())["naks"] and len(s["naks"]) >= 2 and s["naks"],
                    10, "two NAKs")
    assert naks[0] == {"seq": None, "reason": "crc"}
    assert naks[1]["reason"] == reason
    control(site.ctl, b"A", json.dumps({"kind": "answer", "doctor": "dr-petrov",
                                        "q1": "yes"}).encode())
    wait_for(lambda: len(sub.events()) == 1, 10, "a good answer after the bad frames")
    errors = site.status()["devices"][0]["decode_errors"]
    assert errors.get("crc") == 1
    assert sum(errors.values()) == 2


def test_doctors_command_reaches_the_terminal_and_survives_a_restart(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber], validate: Callable[[str, Any], None]) -> None:
    site = TerminalSite(tmp_path, broker, procs, [])
    sub = subscribe("feedback/+/+/+/cmd/+/result")
    site.power_on()
    site.start()
    wait_for(lambda: site.state()["doctors_rev"] == 4, 10, "the file's list (rev 4)")
    topic = "feedback/v1/clinic-3/reception-1/cmd/doctors"
    doctors = [{"id": "dr-new", "name": "Dr New", "specialty": "Cardiology",
                "photo": "ab" * 32}]

    def send(request_id: str, body: dict[str, Any]) -> dict[str, Any]:
        sub.client.publish(topic, json.dumps({"request_id": request_id, **body}), qos=1)
        got = wait_for(lambda: [m for m in sub.snapshot()
                                if m.json()["request_id"] == request_id], 10, request_id)
        validate(got[0].topic, got[0].json())
        result: dict[str, Any] = got[0].json()
        return result

    assert send("d1", {"rev": 9, "doctors": doctors})["ok"] is True
    wait_for(lambda: site.state()["doctors_rev"] == 9, 10, "rev 9 on the terminal")
    stale = send("d2", {"rev": 5, "doctors": doctors})
    assert stale["ok"] is False
    assert "not newer" in stale["error"]
    bad = send("d3", {"rev": 10, "doctors": [{"id": "x y", "name": ""}]})
    assert bad["ok"] is False
    assert "doctors[0].id" in bad["error"]
    assert site.daemon is not None
    site.daemon.kill(signal.SIGKILL)
    site.start()
    wait_for(lambda: (s := site.status()) and s["broker"]["state"] == "connected", 20, "back")
    # The daemon kept rev 9 across the restart (the file still says 4).
    again = send("d4", {"rev": 9, "doctors": doctors})
    assert again["ok"] is False
    assert "current rev 9" in again["error"]
