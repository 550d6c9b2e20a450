"""Alarms for conditions that need a person once they have lasted (edge/conditions.py),
on a fake clock: a device missing, the clock unsynchronised, the collector offline,
events waiting too long."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from edge.alarms import Alarms
from edge.conditions import (
    CLOCK_GRACE_S,
    COLLECTOR_GRACE_S,
    DEVICE_GRACE_S,
    QUEUE_OLD_S,
    Conditions,
)


def device(state: str) -> Any:
    return SimpleNamespace(state=state, error=None, cfg=SimpleNamespace(
        id="fc3-a", kind="console", desk="desk-1"))


def codes(alarms: Alarms) -> set[str]:
    return {a.code for a in alarms.active(0)}


def test_each_condition_raises_after_its_grace_time_and_clears_when_over() -> None:
    alarms = Alarms()
    c = Conditions(alarms)
    c.check(0.0, 0, [device("missing")], False, collector_online=False,
            oldest_pending_s=10.0)
    assert codes(alarms) == set()  # nothing has lasted yet
    c.check(DEVICE_GRACE_S, 0, [device("missing")], False, collector_online=False,
            oldest_pending_s=10.0)
    assert codes(alarms) == {"device_missing"}
    c.check(COLLECTOR_GRACE_S, 0, [device("missing")], False, collector_online=False,
            oldest_pending_s=QUEUE_OLD_S)
    assert codes(alarms) == {"device_missing", "collector_offline", "queue_old"}
    c.check(CLOCK_GRACE_S, 0, [device("missing")], False, collector_online=False,
            oldest_pending_s=QUEUE_OLD_S)
    assert codes(alarms) == {"device_missing", "collector_offline", "queue_old",
                             "clock_unsynced"}
    c.check(CLOCK_GRACE_S + 1, 0, [device("connected")], True, collector_online=True,
            oldest_pending_s=None)
    assert codes(alarms) == set()


def test_broker_delivery_has_no_collector_alarm() -> None:
    alarms = Alarms()
    c = Conditions(alarms)
    for t in (0.0, COLLECTOR_GRACE_S * 2):
        c.check(t, 0, [], True, collector_online=None, oldest_pending_s=None)
    assert codes(alarms) == set()
