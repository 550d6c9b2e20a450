"""Survey terminals when the world misbehaves: long Cyrillic text and big doctor
lists (the sheet's 16 KB frames), an RS-232 unit configured by port that
never sees the daemon restart, a terminal stuck on a record the host
refuses, and a second process opening the port.  Black box: the simulator on
a real pty, the daemon process, a real Mosquitto."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.server import control
from tests.conftest import Broker, Proc, Subscriber, wait_for
from tests.terminal_fixtures import COMMENT_RU, SERIAL, TerminalSite, sixty_doctors

PHONE = "+79161234567"


def _unique(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for e in events:
        seen.setdefault(e["event_id"], e)
    return list(seen.values())


def test_a_500_character_cyrillic_comment_arrives_whole_and_holds_nothing_behind_it(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber], validate: Callable[[str, Any], None]) -> None:
    site = TerminalSite(tmp_path, broker, procs, [])
    sub = subscribe("feedback/+/+/+/event/#")
    site.power_on()
    site.start()
    site.connected()
    site.answer(doctor="dr-petrov", q1="no", q2="yes", phone=PHONE, comment=COMMENT_RU,
                lang="ru")
    site.answer(doctor="dr-petrov", q1="yes")  # the next patient: must not wait behind it
    wait_for(lambda: len(sub.events()) >= 2, 15, "both answers delivered")
    for m in sub.snapshot():
        validate(m.topic, m.json())
    first, second = sub.events()[:2]
    assert first["answer"]["comment"] == COMMENT_RU
    assert first["answer"]["phone"] == PHONE
    assert second["answer"]["q1"] == "yes"
    st = site.state()
    assert st["naks"] == []
    assert st["unacked"] == 0
    log = site.daemon.log()  # type: ignore[union-attr]
    assert PHONE not in log
    assert COMMENT_RU[:30] not in log
    assert "Регистраторы" not in log


def test_sixty_doctors_reach_the_terminal_and_a_list_too_big_for_a_frame_is_refused(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber], validate: Callable[[str, Any], None]) -> None:
    doctors = sixty_doctors(rev=7)
    site = TerminalSite(tmp_path, broker, procs, [], doctors=doctors)
    results = subscribe("feedback/+/+/+/cmd/+/result")
    site.power_on()
    site.start()
    st = wait_for(lambda: (s := site.state())["doctors_rev"] == 7 and s, 15,
                  "DOCTORS rev 7 on the terminal")
    assert st["doctors"] == 60
    sent = json.dumps(doctors["doctors"], sort_keys=True, ensure_ascii=False)
    assert st["doctors_sha256"] == hashlib.sha256(sent.encode()).hexdigest()
    assert st["naks"] == []
    # A list that no DOCTORS frame can carry is refused at the command, with the
    # reason, instead of going out to be dropped by every terminal.
    huge = {"rev": 8, "doctors": [{"id": f"dr-{i}", "name": "Щ" * 128, "specialty": "Ж" * 128,
                                   "photo": None} for i in range(40)]}  # 21 KB
    results.client.publish("feedback/v1/clinic-3/reception-1/cmd/doctors",
                           json.dumps({"request_id": "big", **huge}, ensure_ascii=False), qos=1)
    got = wait_for(results.snapshot, 10, "the command's result")
    validate(got[0].topic, got[0].json())
    assert got[0].json()["ok"] is False
    assert "at most 16384" in got[0].json()["error"]
    assert site.state()["doctors_rev"] == 7


def test_an_rs232_terminal_configured_by_port_is_named_and_heard_after_a_daemon_restart(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber], validate: Callable[[str, Any], None]) -> None:
    """The unit says HELLO only at power-up (before the daemon ran, so nobody
    heard it) and when asked: the daemon asks with WHO each time it opens the port."""
    site = TerminalSite(tmp_path, broker, procs, [], serial_in_config=False, rs232=True)
    sub = subscribe("feedback/#")
    site.power_on()
    site.answer(doctor="dr-petrov", q1="yes")  # waits in flash: no host yet
    site.start()
    site.connected()

    def listed() -> list[dict[str, Any]]:
        return [d for m in sub.snapshot("/devices") for d in m.json()["devices"]
                if d["serial"] == SERIAL]

    wait_for(listed, 10, "the HELLO's serial on the devices topic")
    for m in sub.snapshot("/devices"):
        validate(m.topic, m.json())
    dev = site.device()
    assert dev["serial"] == SERIAL
    assert dev["model"] == "ST-3000"
    assert dev["id"] == "terminal-1"
    wait_for(lambda: len(_unique(sub.events())) == 1, 10, "the record made before the daemon")

    assert site.daemon is not None
    site.daemon.kill(signal.SIGKILL)  # the unit does not see it: it never says HELLO again
    wait_for(lambda: not site.state()["host_attached"], 10, "port closed")
    for q1 in ("yes", "unsure", "no"):
        site.answer(doctor="dr-petrov", q1=q1, q2="no" if q1 == "no" else None)
    whos = site.state()["whos"]
    started = time.monotonic()
    site.start()
    wait_for(lambda: len(_unique(sub.events())) == 4, 10, "records made while the daemon was down")
    took = time.monotonic() - started
    events = _unique(sub.events())
    assert [e["answer"]["record_id"] for e in events] == [1, 2, 3, 4]
    assert {e["device"]["serial"] for e in events} == {SERIAL}
    st = site.state()
    assert st["whos"] > whos  # asked again after the restart
    assert st["unacked"] == 0
    assert st["naks"] == []
    assert site.device()["serial"] == SERIAL
    # Not waiting for a retransmission per record: stored as soon as HELLO named it.
    assert took < 6, took


def test_a_terminal_stuck_on_a_refused_record_raises_device_stuck_until_one_is_stored(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber]) -> None:
    site = TerminalSite(tmp_path, broker, procs, [])
    sub = subscribe("feedback/+/+/+/event/#")
    site.power_on()
    site.start()
    site.connected()
    # A firmware bug: q2 after "yes".  The host NAKs it (schema), the terminal sends
    # it again every 2 s, and the next patient's answer waits behind it.
    reply = control(site.ctl, b"A", json.dumps({"kind": "answer", "doctor": "dr-petrov",
                                                "q1": "yes", "q2": "yes",
                                                "force": True}).encode())
    assert reply["ok"]
    site.answer(doctor="dr-petrov", q1="unsure")

    def stuck_alarms() -> list[str]:
        return [a for a in site.status().get("alarms", []) if a.startswith("device_stuck:")]

    alarm = wait_for(stuck_alarms, 20, "the device_stuck alarm")[0]
    assert "st3-00c0ffee0001" in alarm
    assert "(schema)" in alarm
    errors = site.device()["decode_errors"]
    assert errors["stuck"] == 1
    assert errors["schema"] >= 5
    assert sub.events() == []
    # The service technician removes the record: the answer behind it is stored,
    # and that clears the alarm.
    assert control(site.ctl, b"D", b"")["dropped"] == 1
    wait_for(lambda: len(sub.events()) == 1, 10, "the answer that waited")
    assert sub.events()[0]["answer"]["q1"] == "unsure"
    wait_for(lambda: not stuck_alarms(), 5, "device_stuck cleared")
    assert site.device()["decode_errors"]["stuck"] == 1


def _probe_open(path: str) -> str:
    """Open `path` from another process without CAP_SYS_ADMIN (which would
    override the exclusive mode, as it does for root); its errno, or 0."""
    code = ("import os, sys\n"
            "try:\n    os.close(os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY))\n"
            "except OSError as e:\n    print(e.errno)\nelse:\n    print(0)\n")
    cmd = [sys.executable, "-c", code, path]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and no setpriv to drop CAP_SYS_ADMIN")
        cmd = [setpriv, "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def test_the_daemon_holds_the_port_exclusively_and_lets_go_when_it_stops(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc]) -> None:
    site = TerminalSite(tmp_path, broker, procs, [])
    site.power_on()
    pty = site.state()["pty"]
    assert _probe_open(pty) == "0"  # nobody holds it yet
    wait_for(lambda: not site.state()["host_attached"], 5, "the probe closed it")
    site.start()
    site.connected()
    # A getty, ModemManager or a second daemon opening the port gets EBUSY.
    assert _probe_open(pty) == str(errno.EBUSY)
    assert _probe_open(str(site.link)) == str(errno.EBUSY)
    assert site.daemon is not None
    site.daemon.kill(signal.SIGTERM)
    wait_for(lambda: not site.state()["host_attached"], 10, "the daemon closed the port")
    assert _probe_open(pty) == "0"
