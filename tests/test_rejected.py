"""A broker that refuses the events (PUBACK reason 0x87): nothing is deleted,
the refusals are counted, and once the broker accepts again every event
arrives, in order, exactly once.  The daemon runs in-process on an injected
clock, so the retry back-off (1 s, 5 s, ...) is stepped through, not waited."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from edge.clock import ManualClock
from tests.conftest import Broker, Subscriber, wait_for
from tests.test_time import Rig


def test_rejected_events_stay_and_go_out_in_order_once_allowed(
        tmp_path: Path, broker: Broker, subscribe: Callable[[str], Subscriber]) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite feedback/v1/clinic-3/reception-1/status\n"
                   "topic readwrite feedback/v1/clinic-3/reception-1/devices\n"
                   "topic readwrite feedback/v1/clinic-3/reception-1/cmd/#\n"
                   "topic readwrite feedback/v1/clinic-3/reception-1/timesync\n"
                   "topic readwrite feedback/v1/clinic-3/reception-1/health\n"
                   "topic read feedback/#\n")
    broker.stop()
    broker.conf.write_text(broker.conf.read_text() + f"acl_file {acl}\n")
    broker.start()
    sub = subscribe("feedback/+/+/+/event/#")
    clock = ManualClock()
    with Rig(tmp_path, broker, clock) as rig:
        wait_for(lambda: rig.status()["broker"]["state"] == "connected", 10, "connected")
        for i in range(3):
            rig.press(i)
        st = wait_for(lambda: (s := rig.status()) and sum(s["rejected"].values()) >= 1 and s,
                      10, "a refused PUBACK")
        assert any("authori" in reason.lower() for reason in st["rejected"]), st["rejected"]
        # The back-off holds the rest: without the clock moving nothing is retried.
        clock.advance(0.5)
        st = rig.status()
        assert st["queue"]["depth"] == 3
        assert st["published"] == 1, "a later seq went out while the first was refused"
        assert sub.events() == []
        # The ACL is fixed and reloaded; the clock steps past the back-off.
        acl.write_text(acl.read_text() + "topic write feedback/v1/clinic-3/reception-1/event/#\n")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)

        def stepped() -> bool:
            clock.advance(5.0)
            return len(sub.events()) >= 3

        wait_for(stepped, 15, "the events after the ACL allows them")
        events = sub.events()
        assert [e["seq"] for e in events] == [1, 2, 3]
        assert [e["press"]["button"] for e in events] == [0, 1, 2]
        wait_for(lambda: (clock.advance(31.0), rig.status()["queue"]["depth"] == 0)[1], 10,
                 "outbox empty")
