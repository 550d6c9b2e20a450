"""A broker that refuses the events (PUBACK reason 0x87): nothing is deleted,
the refusals are counted, and once the broker accepts again every event
arrives, in order, exactly once."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Broker, Proc, Subscriber, wait_for
from tests.test_pipeline import Site


def test_rejected_events_stay_and_go_out_in_order_once_allowed(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber]) -> None:
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
    site = Site(tmp_path, broker, procs)
    site.start()
    site.wait_connected()
    for i in range(3):
        site.press(i, delay_ms=i * 300)
    st = wait_for(lambda: (s := site.status()) and sum(s["rejected"].values()) >= 3 and s, 15,
                  "three refused PUBACKs")
    assert any("authori" in reason.lower() for reason in st["rejected"]), st["rejected"]
    assert st["queue"]["depth"] == 3
    assert sub.events() == []
    # The ACL is fixed and reloaded: the retries (1 s, then 5 s back-off) get through.
    acl.write_text(acl.read_text() + "topic write feedback/v1/clinic-3/reception-1/event/#\n")
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(sub.events()) >= 3, 40, "the events after the ACL allows them")
    events = sub.events()
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert [e["press"]["button"] for e in events] == [0, 1, 2]
    wait_for(lambda: site.status()["queue"]["depth"] == 0, 10, "outbox empty")
