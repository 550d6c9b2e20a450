"""Burst, after-hours and test flags: the rules, and on published events."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.config import GuardsConfig, load_config
from edge.contract.timefmt import parse_days
from edge.daemon import Daemon
from edge.guards import Guards
from firmware_sim.console import ConsoleFirmware
from firmware_sim.link import MemoryTransport
from tests.conftest import Broker, Subscriber, wait_for, write_config
from tests.test_daemon import _uptime
from tests.test_operators import utc

S = 10**9


def guards(after_hours: str = "flag") -> Guards:
    return Guards(GuardsConfig(5, 10.0, parse_days("mon-fri"), "08:00", "18:00",
                               "Europe/Berlin", after_hours))


def test_the_sixth_press_in_ten_seconds_and_later_ones_are_a_burst() -> None:
    g = guards()
    open_wall = utc("2026-11-24T10:00:00")
    flags = [g.press("desk-1", i * S, open_wall, False)[0] for i in range(8)]
    assert flags == [[], [], [], [], [], ["burst"], ["burst"], ["burst"]]
    # Another desk is not affected, and after a quiet 10 s the desk is calm again.
    assert g.press("desk-2", 8 * S, open_wall, False)[0] == []
    assert g.press("desk-1", 30 * S, open_wall, False)[0] == []


def test_after_hours_by_local_time_flag_or_drop() -> None:
    g = guards()
    assert g.press("d", 0, utc("2026-11-24T16:59:00"), False) == ([], False)  # 17:59 Berlin
    assert g.press("d", 100 * S, utc("2026-11-24T17:01:00"), False) == (["after_hours"], False)
    assert g.press("d", 200 * S, utc("2026-11-28T10:00:00"), False) == (["after_hours"], False)
    dropping = guards("drop")
    assert dropping.press("d", 0, utc("2026-11-24T17:01:00"), False) == ([], True)


def test_hold_is_a_test_and_does_not_count_towards_a_burst() -> None:
    g = guards()
    wall = utc("2026-11-24T10:00:00")
    assert g.press("d", 0, wall, True) == (["test"], False)
    assert all(g.press("d", i * S, wall, False)[0] == [] for i in range(1, 6))


def test_flags_on_published_events(tmp_path: Path, broker: Broker,
                                   subscribe: Callable[[str], Subscriber],
                                   validate: Callable[[str, Any], None]) -> None:
    cfg = write_config(tmp_path / "edge.toml", port=broker.port, store=tmp_path / "o.sqlite",
                       devices=[])
    cfg.write_text(cfg.read_text() + "[guards]\nburst_presses = 3\nburst_window_s = 60\n"
                   '[[devices]]\nkind = "console"\nserial = "00A1B2C3D4E5"\ndesk = "desk-1"\n')
    fw = ConsoleFirmware("00A1B2C3D4E5", uptime_ms=_uptime)
    daemon = Daemon(load_config(cfg), openers={"console": lambda c: MemoryTransport(fw)},
                    sysfs=tmp_path / "nosys")
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.005):
            fw.tick()

    ticker = threading.Thread(target=tick)
    runner = threading.Thread(target=daemon.run)
    sub = subscribe("feedback/+/+/+/event/#")
    runner.start()
    ticker.start()
    try:
        fw.press(0, hold_ms=2500)  # held: PRESS, then HOLD (an installer's test)
        for i in range(4):
            fw.press(1, delay_ms=3000 + i * 300)
        events = wait_for(lambda: (e := sub.events()) and len(e) >= 6 and e, 15, "six events")
    finally:
        daemon.request_stop()
        stop.set()
        runner.join(10)
        ticker.join(10)
    for m in sub.snapshot():
        validate(m.topic, m.json())
    assert [(e["press"]["button"], e["press"]["hold"], e["flags"]) for e in events] == [
        (0, False, []), (0, True, ["test"]),
        (1, False, []), (1, False, []), (1, False, ["burst"]), (1, False, ["burst"]),
    ]


def test_a_flood_keeps_only_what_the_burst_rule_needs() -> None:
    g = guards()
    wall = utc("2026-11-24T10:00:00")
    flags = [g.press("d", i, wall, False)[0] for i in range(10_000)]  # all within 10 s
    assert flags[:5] == [[]] * 5
    assert all(f == ["burst"] for f in flags[5:])
    assert len(g._recent["d"]) == 5
