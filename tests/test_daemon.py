"""The daemon in-process, with the console firmware behind the in-memory HID
transport (the same report bytes hidraw carries) and a real Mosquitto."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge import reporting
from edge.config import load_config
from edge.daemon import Daemon
from firmware_sim.console import ConsoleFirmware
from firmware_sim.link import MemoryTransport
from tests.conftest import Broker, Subscriber, wait_for, write_config


def _uptime() -> int:
    return time.monotonic_ns() // 1_000_000


class Running:
    def __init__(self, tmp: Path, broker: Broker) -> None:
        self.fw = ConsoleFirmware("00A1B2C3D4E5", uptime_ms=_uptime)
        self.transports: list[MemoryTransport] = []
        cfg = load_config(write_config(
            tmp / "edge.toml", port=broker.port, store=tmp / "outbox.sqlite",
            devices=[{"kind": "console", "desk": "desk-1", "serial": "00A1B2C3D4E5"}],
            extra="health_interval_s = 1"))
        self.sysfs = tmp / "sys"
        self.sysfs.mkdir(exist_ok=True)
        self.daemon = Daemon(cfg, openers={"console": self._open}, sysfs=self.sysfs)
        self.thread = threading.Thread(target=self.daemon.run)
        self._stop_ticks = threading.Event()
        self.ticker = threading.Thread(target=self._tick)

    def _open(self, _cfg: object) -> MemoryTransport:
        t = MemoryTransport(self.fw)
        self.transports.append(t)
        return t

    def _tick(self) -> None:
        while not self._stop_ticks.wait(0.005):
            self.fw.tick()

    def status(self) -> dict[str, Any]:
        import queue

        box: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        from edge.commands import ControlRequest

        self.daemon.inbox.put(ControlRequest(box))
        return box.get(timeout=5)

    def __enter__(self) -> Running:
        self.thread.start()
        self.ticker.start()
        wait_for(lambda: self.status()["devices"][0]["state"] == "connected", 10, "device")
        return self

    def __exit__(self, *_: object) -> None:
        self.daemon.request_stop()
        self.thread.join(10)
        self._stop_ticks.set()
        self.ticker.join()


@pytest.fixture
def running(tmp_path: Path, broker: Broker) -> Iterator[Running]:
    with Running(tmp_path, broker) as r:
        yield r


def test_malformed_reports_are_counted_by_name_and_reading_goes_on(
        running: Running, subscribe: Callable[[str], Subscriber]) -> None:
    sub = subscribe("feedback/+/+/+/event/#")
    inject = running.transports[-1]._in.put
    for bad in (b"\x01\x02", bytes(13), bytes([1, 9, 7, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
                bytes([1, 9, 1, 9, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
                bytes([1, 9, 1, 0, 0x80, 0, 0, 0, 0, 1, 0, 0, 0])):
        inject(bad)
    running.fw.press(1)
    wait_for(lambda: len(sub.events()) == 1, 10, "the good press after the bad reports")
    errors = wait_for(lambda: running.status()["devices"][0]["decode_errors"], 5, "counters")
    assert errors == {"bad_length": 1, "bad_report_id": 1, "unknown_type": 1, "bad_button": 1,
                      "bad_flags": 1}
    health = reporting.health(running.daemon)
    assert health["decode_errors"] == {"fc3-00a1b2c3d4e5": errors}
    assert running.thread.is_alive()


def test_a_press_is_acked_and_lit_only_once_stored_even_when_the_disk_is_full(
        running: Running, subscribe: Callable[[str], Subscriber]) -> None:
    sub = subscribe("feedback/+/+/+/event/#")
    store = running.daemon.store
    store.min_free_bytes = 1 << 62  # more than any disk has: the disk counts as full
    running.fw.press(0)
    wait_for(lambda: running.status()["drops"].get("disk_full", 0) >= 1, 10, "store failure")
    # Not stored, so not acknowledged and no LED: the console keeps it.
    assert running.fw.unacked == 1
    assert running.fw.leds == []
    assert sub.events() == []
    store.min_free_bytes = 0
    # The console's own resend (1 s back-off) brings it in once there is room.
    wait_for(lambda: running.fw.unacked == 0, 10, "ACK after the store recovered")
    wait_for(lambda: len(sub.events()) == 1, 10, "the press delivered")
    assert [led.button for led in running.fw.leds] == [0]
    assert sub.events()[0]["flags"] == ["replayed"]


def test_unplug_and_replug_loses_nothing_already_accepted(
        running: Running, subscribe: Callable[[str], Subscriber]) -> None:
    sub = subscribe("feedback/+/+/+/event/#")
    running.fw.press(0)
    wait_for(lambda: len(sub.events()) == 1, 10, "first press")
    running.transports[-1].unplug()
    running.fw.power_cut()
    wait_for(lambda: running.status()["devices"][0]["state"] == "missing", 10, "unplugged")
    running.fw.power_up()
    wait_for(lambda: running.status()["devices"][0]["state"] == "connected", 10, "replugged")
    running.fw.press(2)
    wait_for(lambda: len(sub.events()) == 2, 10, "press after replug")
    assert [e["press"]["button"] for e in sub.events()] == [0, 2]
    st = running.status()["devices"][0]
    assert st["presses"] == 2


def test_health_is_published_and_matches_the_contract(
        running: Running, subscribe: Callable[[str], Subscriber],
        validate: Callable[[str, Any], None]) -> None:
    sub = subscribe("feedback/+/+/+/health")
    running.fw.press(0)
    health = wait_for(sub.snapshot, 10, "a health message")
    validate(health[0].topic, health[0].json())
    body = health[0].json()
    assert body["queue_depth"] in (0, 1)  # the press may be in flight
    assert body["disk_free_bytes"] > 0
    assert body["clock_synced"] in (True, False)


def test_plugged_in_unconfigured_hardware_is_listed_within_seconds(
        running: Running, subscribe: Callable[[str], Subscriber],
        validate: Callable[[str, Any], None]) -> None:
    from tests.test_discovery import _usb, make_sysfs

    sub = subscribe("feedback/+/+/+/devices")
    make_sysfs(running.sysfs)  # the installer plugs in a terminal and a badge reader
    # A terminal whose firmware states a serial no grammar allows: it is shown
    # escaped, and the inventory still passes the contract (it was quarantined whole).
    _usb(running.sysfs, "1-1.6", "1209", "fb30", "ST\u00e9\n\u202e" + "9" * 80,
         [("02", "02", "01")], ["tty/ttyACM1"], "Survey Terminal ST-3000")

    def unconfigured() -> list[dict[str, Any]]:
        return [d for d in running.status()["devices"] if d["state"] == "unconfigured"]

    found = wait_for(unconfigured, 10, "unconfigured devices in status")
    found = wait_for(lambda: (f := unconfigured()) and len(f) == 3 and f, 10, "all three")
    hostile = next(d for d in found if d["port_path"] == "1-1.6")
    assert hostile["serial"].startswith("ST\\xe9\\n\\u202e")
    assert len(hostile["serial"]) == 64
    assert {(d["kind"], d["serial"], d["port_path"]) for d in found if d is not hostile} == {
        ("terminal", "00C0FFEE0001", "1-1.3"), ("keyboard", None, "1-1.4")}
    # The console at 1-1.2 is configured (by serial), the mouse is not ours.
    inventory = wait_for(lambda: [m for m in sub.snapshot()
                                  if any(d["state"] == "unconfigured"
                                         for d in m.json()["devices"])], 10, "retained list")
    validate(inventory[-1].topic, inventory[-1].json())


def test_a_replaced_store_announces_its_lost_seqs_as_dropped(
        tmp_path: Path, broker: Broker, subscribe: Callable[[str], Subscriber],
        validate: Callable[[str, Any], None]) -> None:
    from edge.outbox_file import SEQ_BLOCK

    sub = subscribe("feedback/+/+/+/event/#")
    with Running(tmp_path, broker) as r:
        r.fw.press(0)
        wait_for(lambda: len(sub.events()) == 1, 10, "a press before the store is lost")
    for suffix in ("-wal", "-shm"):
        Path(str(tmp_path / "outbox.sqlite") + suffix).unlink(missing_ok=True)
    (tmp_path / "outbox.sqlite").write_bytes(b"scribbled over by a failing SD card" * 100)
    with Running(tmp_path, broker):
        wait_for(lambda: len(sub.events()) == 2, 10, "the dropped event")
    msg = sub.snapshot("/event/")[-1]
    validate(msg.topic, msg.json())
    dropped = msg.json()
    assert dropped["kind"] == "dropped"
    assert dropped["dropped"] == {"from_seq": 1, "to_seq": SEQ_BLOCK,
                                  "reason": "store_replaced"}
    assert dropped["seq"] == SEQ_BLOCK + 1  # seqs are still never reused
