"""Trustworthy time with an injected clock: anchors, corrections, clock steps."""

from __future__ import annotations

import datetime as dt
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge.clock import ManualClock
from edge.commands import ControlRequest
from edge.config import load_config
from edge.daemon import Daemon
from firmware_sim.console import ConsoleFirmware
from firmware_sim.link import MemoryTransport
from tests.conftest import Broker, Subscriber, wait_for, write_config
from tests.test_daemon import _uptime
from tests.test_operators import utc

S = 10**9


class Rig:
    def __init__(self, tmp: Path, broker: Broker, clock: ManualClock,
                 config_tail: str = "") -> None:
        cfg = write_config(tmp / "edge.toml", port=broker.port, store=tmp / "o.sqlite",
                           devices=[{"kind": "console", "serial": "00A1B2C3D4E5",
                                     "desk": "desk-1"}])
        cfg.write_text(cfg.read_text() + config_tail)
        self.clock = clock
        # The console's uptime runs with real time and with every advance of the
        # injected clock, so the device clock agrees with the host's (a report
        # read 120 s of injected time after it was sent would have waited 120 s).
        mono0 = clock.mono_ns()
        self.fw = ConsoleFirmware("00A1B2C3D4E5", uptime_ms=lambda: _uptime() + (
            clock.mono_ns() - mono0) // 1_000_000)
        self.daemon = Daemon(load_config(cfg), clock=clock,
                             openers={"console": lambda c: MemoryTransport(self.fw)},
                             sysfs=tmp / "nosys")
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self.daemon.run),
                         threading.Thread(target=self._tick)]

    def _tick(self) -> None:
        while not self._stop.wait(0.005):
            self.fw.tick()

    def status(self) -> dict[str, Any]:
        box: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.daemon.inbox.put(ControlRequest(box))
        return box.get(timeout=5)

    def press(self, button: int) -> None:
        before = self.status()["devices"][0]["presses"]
        self.fw.press(button)
        wait_for(lambda: self.status()["devices"][0]["presses"] == before + 1, 10, "stored")
        wait_for(lambda: self.fw.idle, 5, "the button released")

    def __enter__(self) -> Rig:
        for t in self._threads:
            t.start()
        wait_for(lambda: self.status()["devices"][0]["state"] == "connected", 10, "console")
        return self

    def __exit__(self, *_: object) -> None:
        self.daemon.request_stop()
        self._stop.set()
        for t in self._threads:
            t.join(10)


@pytest.fixture
def events_and_anchors(subscribe: Callable[[str], Subscriber]) -> Subscriber:
    return subscribe("feedback/+/+/+/#")


def _wall_ns(text: str) -> int:
    return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * S)


def test_unsynced_events_are_corrected_in_the_store_when_the_clock_syncs(
        tmp_path: Path, broker: Broker, events_and_anchors: Subscriber,
        validate: Callable[[str, Any], None]) -> None:
    true_start = utc("2026-11-24T09:00:00")
    # The Pi booted without network: its clock says 2025-01-01 and is not synced.
    clock = ManualClock(wall_ns=utc("2025-01-01T00:00:00"), mono_ns=50 * S, synced=False)
    broker.stop()  # the events have to wait in the store
    with Rig(tmp_path, broker, clock) as rig:
        for b in range(3):
            rig.press(b)
            clock.advance(60)
        # NTP reaches the Pi: the clock is stepped to the truth and synchronised.
        mono_now = clock.mono_ns()
        clock.step_wall((true_start + 180 * S - clock.wall_ns()) / 1e9)
        clock.set_synced(True)
        st = wait_for(lambda: (s := rig.status()) and s["clock"]["corrected_events"] == 3 and s,
                      10, "three stored events corrected")
        assert st["clock"]["synced"] is True
        broker.start()
        sub = events_and_anchors
        wait_for(lambda: len(sub.events()) == 3, 20, "three events")
        anchors = wait_for(lambda: [m.json() for m in sub.snapshot("/timesync")], 10, "anchor")
    for m in sub.snapshot():
        validate(m.topic, m.json())
    anchor = anchors[0]
    assert anchor["boot_id"] == clock.boot_id
    assert _wall_ns(anchor["wall"]) - (anchor["mono_ns"] - mono_now) == true_start + 180 * S
    for i, e in enumerate(sub.events()):
        assert e["time"]["synced"] is True
        assert "time_corrected" in e["flags"]
        # Pressed i minutes after 09:00 (less the 30 ms debounce), by the true clock.
        expected = true_start + i * 60 * S - e["time"]["age_ms"] * 10**6
        assert abs(_wall_ns(e["time"]["wall"]) - expected) < 2 * 10**6, e["time"]


def test_a_clock_stepped_back_an_hour_keeps_seq_and_is_explained_by_an_anchor(
        tmp_path: Path, broker: Broker, events_and_anchors: Subscriber) -> None:
    clock = ManualClock(wall_ns=utc("2026-11-24T09:00:00"), mono_ns=50 * S, synced=True)
    sub = events_and_anchors
    with Rig(tmp_path, broker, clock) as rig:
        for b in range(3):
            rig.press(b)
            clock.advance(5)
        clock.step_wall(-3600)
        for b in range(3):
            rig.press(b)
            clock.advance(5)
        wait_for(lambda: len(sub.events()) == 6, 20, "six events")
        anchors = wait_for(lambda: (a := [m.json() for m in sub.snapshot("/timesync")])
                           and any(x["reason"] == "stepped" for x in a) and a, 10, "anchors")
    events = sub.events()
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    walls = [_wall_ns(e["time"]["wall"]) for e in events]
    assert walls[3] < walls[2]  # the wall clock went back
    monos = [e["time"]["mono_ns"] for e in events]
    assert monos == sorted(monos)  # the monotonic clock did not
    stepped = next(a for a in anchors if a["reason"] == "stepped")
    for e in events[3:]:
        explained = _wall_ns(stepped["wall"]) - (stepped["mono_ns"] - e["time"]["mono_ns"])
        assert abs(explained - _wall_ns(e["time"]["wall"])) < 2 * 10**6


def test_after_hours_flag_lands_on_the_presses_after_closing_time(
        tmp_path: Path, broker: Broker, events_and_anchors: Subscriber) -> None:
    # Friday 2026-11-27, 17:59:00 in Berlin (16:59 UTC); the clinic closes at 18:00.
    clock = ManualClock(wall_ns=utc("2026-11-27T16:59:00"), mono_ns=50 * S, synced=True)
    hours = ('[guards.opening_hours]\ndays = "mon-fri"\nfrom = "08:00"\nto = "18:00"\n'
             'tz = "Europe/Berlin"\n')
    sub = events_and_anchors
    with Rig(tmp_path, broker, clock, "[guards]\n" + hours) as rig:
        rig.press(0)
        clock.advance(120)  # 18:01
        rig.press(1)
        wait_for(lambda: len(sub.events()) == 2, 10, "two events")
    assert [e["flags"] for e in sub.events()] == [[], ["after_hours"]]


def test_presses_on_a_clock_that_reads_1970_are_not_dropped_as_after_hours(
        tmp_path: Path, broker: Broker, events_and_anchors: Subscriber) -> None:
    """A Pi without a real-time clock boots in 1970, unsynchronised.  With
    after_hours = "drop", presses made before NTP arrives must not be dropped on
    that clock: once the time is corrected they are presses in opening hours."""
    # 1970-01-01 00:00 is a Thursday at 01:00 in Berlin: "after hours" by that clock.
    clock = ManualClock(wall_ns=0, mono_ns=50 * S, synced=False)
    hours = ('[guards.opening_hours]\ndays = "mon-fri"\nfrom = "08:00"\nto = "18:00"\n'
             'tz = "Europe/Berlin"\n')
    true_start = utc("2026-11-27T10:00:00")  # a Friday, 11:00 in Berlin: open
    broker.stop()
    with Rig(tmp_path, broker, clock, '[guards]\nafter_hours = "drop"\n' + hours) as rig:
        for b in range(3):
            rig.press(b)
            clock.advance(10)
        assert rig.status()["drops"].get("after_hours", 0) == 0
        clock.step_wall((true_start + 30 * S - clock.wall_ns()) / 1e9)
        clock.set_synced(True)
        wait_for(lambda: rig.status()["clock"]["corrected_events"] == 3, 10, "corrected")
        broker.start()
        sub = events_and_anchors
        wait_for(lambda: len(sub.events()) == 3, 20, "the three presses")
    for e in sub.events():
        assert "after_hours" not in e["flags"], e["flags"]
        assert "time_corrected" in e["flags"]
        assert e["time"]["synced"] is True


def test_presses_and_logins_on_a_1970_clock_are_decided_at_their_true_time_before_leaving(
        tmp_path: Path, broker: Broker, events_and_anchors: Subscriber) -> None:
    """Issue 14, with the broker reachable all along (the presses would otherwise leave
    before the sync): events whose opening-hours and operator decisions were taken on
    an unsynchronised clock are held in the store until the clock syncs, then re-timed
    and decided again; a login made before the sync holds at its true time."""
    clock = ManualClock(wall_ns=0, mono_ns=50 * S, synced=False)
    hours = ('[guards.opening_hours]\ndays = "mon-fri"\nfrom = "08:00"\nto = "18:00"\n'
             'tz = "Europe/Berlin"\n')
    true_start = utc("2026-11-27T10:00:00")  # a Friday, 11:00 in Berlin: open
    sub = events_and_anchors
    with Rig(tmp_path, broker, clock, '[guards]\nafter_hours = "drop"\n' + hours) as rig:
        wait_for(lambda: rig.status()["broker"]["state"] == "connected", 10, "the broker")
        reply: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        rig.daemon.inbox.put(ControlRequest(reply, {"cmd": "operator", "desk": "desk-1",
                                                    "operator": "op-cmd"}))
        assert reply.get(timeout=5)["ok"] is True
        clock.advance(1)  # the presses come after the login
        for b in range(3):
            rig.press(b)
            clock.advance(10)
        held = rig.status()
        assert held["queue"]["depth"] == 3
        assert held["queue"]["in_flight"] == 0  # the pump ran on every turn since
        assert sub.events() == []
        clock.step_wall((true_start + 30 * S - clock.wall_ns()) / 1e9)
        clock.set_synced(True)
        wait_for(lambda: len(sub.events()) == 3, 20, "the three presses, after the sync")
        rig.press(0)  # on the synced clock: the login made at 1970 still holds
        wait_for(lambda: len(sub.events()) == 4, 20, "the fourth press")
    events = sub.events()
    for e in events:
        assert "after_hours" not in e["flags"], e["flags"]
        assert e["time"]["synced"] is True
        assert e["operator"] == {"id": "op-cmd", "source": "command"}, e["operator"]
    assert all("time_corrected" in e["flags"] for e in events[:3])
