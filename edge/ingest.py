"""Devices -> store: readings decided by their kinds, committed together,
acknowledged only once durable.

Per main-loop turn, every reading is decided in arrival order by its device
(`edge.kinds`), all resulting events and dedup keys are committed in one
transaction with one fsync (group commit), and only then does each device
acknowledge its part of the batch (console ACK and LED, terminal ACK).  A
failed commit acknowledges nothing: the devices keep their events and send
them again.  Events the store dropped to stay within its limits are
announced as `dropped` events, so the collector's watermark can pass the gap
and the loss is on record centrally (mqtt-contract.md, "dropped").
"""

from __future__ import annotations

import logging

from edge.events import DeviceRef, Dropped, Event, OperatorTag, new_event_id
from edge.kinds.base import Context, Decision, Device, Reading
from edge.reporting import Recent
from edge.store import Append, Store, StoreDiskFullError, StoreError

__all__ = ["Intake"]

log = logging.getLogger(__name__)


class Intake:
    """Owned by the main loop.  `write_errors` counts failed commits by reason
    (disk_full, write_failed); `recent` gets every stored event."""

    def __init__(self, store: Store, devices: dict[str, Device], ctx: Context, recent: Recent,
                 edge: str) -> None:
        self._store = store
        self._devices = devices
        self._ctx = ctx
        self._recent = recent
        self._edge = edge
        self.write_errors: dict[str, int] = {}

    def ingest(self, readings: list[Reading], remove: list[int]) -> bool:
        """Decide, commit (deleting the delivered seqs in `remove` in the same
        transaction) and acknowledge; False if the commit failed."""
        plan: list[tuple[Device, Decision, int]] = []  # (device, decision, first append)
        appends: list[Append] = []
        forget: list[str] = []
        for r in readings:
            dev = self._devices.get(r.device_id)
            if dev is None:
                continue
            dev.last_seen_ns = r.host_wall_ns
            decision = dev.decide(r, self._ctx)
            plan.append((dev, decision, len(appends)))
            appends.extend(decision.appends)
            forget.extend(decision.forget)
        try:
            result = self._store.commit(appends, forget, remove=remove)
        except StoreError as e:
            name = "disk_full" if isinstance(e, StoreDiskFullError) else "write_failed"
            self.write_errors[name] = self.write_errors.get(name, 0) + 1
            log.error("store: %s; devices keep their events and will send them again", e)
            for dev in {id(d): d for d, _, _ in plan}.values():
                dev.commit_failed()
            return False
        # Durable now: count, then let each device acknowledge its batch.
        outcomes: dict[str, list[tuple[Decision, list[bool]]]] = {}
        for dev, decision, first in plan:
            stored = [s is not None for s in result.seqs[first:first + len(decision.appends)]]
            for a, ok in zip(decision.appends, stored, strict=True):
                if a.event is None:
                    continue
                if ok:
                    dev.stored += 1
                    self._recent.add(a.event)
                else:
                    dev.duplicates += 1
            dev.duplicates += decision.duplicate
            outcomes.setdefault(dev.cfg.id, []).append((decision, stored))
        for dev_id, done in outcomes.items():
            self._devices[dev_id].committed(done, self._ctx)
        if result.dropped:
            log.warning("store full: dropped %s", result.dropped)
            self.announce_drops(result.dropped, "store_full")
        return True

    def announce_drops(self, ranges: list[tuple[int, int]], reason: str) -> None:
        """A `dropped` event per lost range of seqs (first, last)."""
        clock = self._ctx.clock
        now = self._ctx.event_time(clock.mono_ns(), clock.wall_ns())
        ref = DeviceRef(self._edge, "edge", None)
        appends = [Append(Event(new_event_id(), self._edge, ref, Dropped(first, last, reason),
                                OperatorTag(None, "none"), now))
                   for first, last in ranges]
        try:
            self._store.commit(appends)
        except StoreError as e:
            log.error("store: could not record dropped range(s) %s: %s", ranges, e)
