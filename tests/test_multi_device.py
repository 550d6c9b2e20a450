"""Several device kinds at once, one unplugged and replugged mid-run: every
event is attributed to the right device and desk, none lost, none twice."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from edge.config import load_config
from edge.daemon import Daemon
from edge.kinds.base import DeviceConfig
from firmware_sim.console import ConsoleFirmware
from firmware_sim.link import MemoryTransport
from firmware_sim.server import control
from tests.conftest import Broker, Proc, Subscriber, wait_for, write_config
from tests.test_daemon import _uptime
from tests.test_keyboard_daemon import MemoryKeyboard, _status


def test_two_consoles_a_terminal_and_a_button_box_with_a_replug(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber]) -> None:
    link, ctl = tmp_path / "st3.tty", tmp_path / "st3.ctl"
    procs(["firmware_sim.cli", "terminal", "run", "--link", str(link), "--flash",
           str(tmp_path / "st3.flash"), "--serial", "00C0FFEE0001", "--control", str(ctl)],
          tmp_path / "terminal.log")
    wait_for(lambda: link.exists() and ctl.exists(), 10, "terminal pty")
    cfg = write_config(tmp_path / "edge.toml", port=broker.port, store=tmp_path / "o.sqlite",
                       devices=[
                           {"kind": "console", "serial": "00A1B2C3D4E1", "desk": "desk-1"},
                           {"kind": "console", "serial": "00A1B2C3D4E2", "desk": "desk-2"},
                           {"kind": "terminal", "serial": "00C0FFEE0001", "port": str(link),
                            "desk": "office-12"},
                       ])
    cfg.write_text(cfg.read_text() + '[[devices]]\nkind = "keyboard"\nvid = 0x1a86\n'
                   'pid = 0xe026\nusb_port = "1-1.4"\ndesk = "desk-3"\n'
                   'keys = { "0x1e" = ["good", 1], "0x20" = ["bad", -1] }\n')
    fws = {s: ConsoleFirmware(s, uptime_ms=_uptime) for s in ("00A1B2C3D4E1", "00A1B2C3D4E2")}
    transports: dict[str, MemoryTransport] = {}

    def open_console(c: DeviceConfig) -> MemoryTransport:
        assert c.serial is not None
        transports[c.serial] = MemoryTransport(fws[c.serial])
        return transports[c.serial]

    keyboard = MemoryKeyboard()
    daemon = Daemon(load_config(cfg), sysfs=tmp_path / "nosys",
                    openers={"console": open_console, "keyboard": lambda c: keyboard})
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(0.005):
            for fw in fws.values():
                fw.tick()

    sub = subscribe("feedback/+/+/+/event/#")
    threads = [threading.Thread(target=daemon.run), threading.Thread(target=ticker)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: [d["state"] for d in _status(daemon)["devices"]] == ["connected"] * 4,
                 15, "all four devices connected")
        a, b = fws["00A1B2C3D4E1"], fws["00A1B2C3D4E2"]
        for i in range(3):
            a.press(0, delay_ms=i * 300)
            b.press(2, delay_ms=i * 300)
            keyboard.tap(0x1E)
        control(ctl, b"A", json.dumps({"kind": "answer", "doctor": "dr-petrov",
                                       "q1": "yes"}).encode())
        wait_for(lambda: len(sub.events()) >= 10, 15, "the first ten events")
        # desk-2's console is unplugged (power gone), the others go on.
        transports["00A1B2C3D4E2"].unplug()
        b.power_cut()
        wait_for(lambda: _status(daemon)["devices"][1]["state"] == "missing", 10, "unplugged")
        for i in range(2):
            a.press(1, delay_ms=i * 300)
            keyboard.tap(0x20)
        control(ctl, b"A", json.dumps({"kind": "presence", "approaches": 2, "engaged": 1,
                                       "period_ms": 60000}).encode())
        b.power_up()
        wait_for(lambda: _status(daemon)["devices"][1]["state"] == "connected", 10, "replugged")
        b.press(0)
        b.press(1, delay_ms=300)
        wait_for(lambda: len(sub.events()) >= 17, 15, "all seventeen events")
        wait_for(lambda: all(fw.unacked == 0 for fw in fws.values()), 10, "consoles ACKed")
    finally:
        daemon.request_stop()
        stop.set()
        for t in threads:
            t.join(10)
    events = sub.events()
    assert len({e["event_id"] for e in events}) == len(events) == 17
    seen: Counter[tuple[str, str, str]] = Counter()
    for e in events:
        label = e["press"]["label"] if e["kind"] == "press" else e["kind"]
        seen[(e["device"]["id"], e["desk"], label)] += 1
    assert seen == Counter({
        ("fc3-00a1b2c3d4e1", "desk-1", "good"): 3,
        ("fc3-00a1b2c3d4e1", "desk-1", "neutral"): 2,
        ("fc3-00a1b2c3d4e2", "desk-2", "bad"): 3,
        ("fc3-00a1b2c3d4e2", "desk-2", "good"): 1,
        ("fc3-00a1b2c3d4e2", "desk-2", "neutral"): 1,
        ("kbd-1-1-4", "desk-3", "good"): 3,
        ("kbd-1-1-4", "desk-3", "bad"): 2,
        ("st3-00c0ffee0001", "office-12", "answer"): 1,
        ("st3-00c0ffee0001", "office-12", "presence"): 1,
    })
    seqs = sorted(e["seq"] for e in events)
    assert seqs == list(range(1, 18))
