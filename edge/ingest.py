"""Devices -> store: readings decided by their kinds, committed together,
acknowledged only once durable.

Per main-loop turn, every reading is decided in arrival order by its device
(`edge.kinds`), all resulting events and dedup keys are committed in one
transaction with one fsync (group commit), and only then does each device
acknowledge its part of the batch (console ACK and LED, terminal ACK).  A
failed commit acknowledges nothing: the devices keep their events and send
them again (the store raises the fault's alarm).  Events the store drops to
stay within its limits it announces itself, in the same transaction.

With the fsync in its own thread (`edge.committer`), "durable" arrives later
as a `Synced` message: the batch's acknowledgements wait for it, and readings
that arrive meanwhile are held, undecided, and committed together once it
came (one fsync in flight, group commit).  So each device still sees
`decide`, then `committed` or `commit_failed`, batch after batch, as with a
synchronous commit; and a known duplicate of an event still waiting for its
fsync is not acknowledged before that fsync either.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edge.clock import Clock
from edge.committer import Synced
from edge.events import DeviceRef, Dropped, Event, EventTime, OperatorTag, new_event_id
from edge.kinds.base import Context, Decision, Device, Reading
from edge.reporting import Recent
from edge.store import Append, Store, StoreError

__all__ = ["Intake", "drop_event"]

log = logging.getLogger(__name__)


def drop_event(clock: Clock, edge: str, first: int, last: int, reason: str) -> Event:
    """The `dropped` event announcing seqs first..last (the store writes it with the
    drop, edge.store): from the edge itself, nobody's operator, timed now."""
    t = EventTime(clock.wall_ns(), clock.synced(), clock.boot_id, clock.mono_ns())
    return Event(new_event_id(), edge, DeviceRef(edge, "edge", None),
                 Dropped(first, last, reason), OperatorTag(None, "none"), t)


@dataclass(slots=True)
class _Waiting:
    """A committed batch waiting for its fsync: a Synced with gen >= `gen` settles it
    (generations grow across store openings)."""

    gen: int
    plan: list[tuple[Device, Decision, int]]
    seqs: list[int | None]


class Intake:
    """Owned by the main loop.  `write_errors` counts failed commits by reason
    (the StoreError code: disk_full, store_busy ...); `recent` gets every stored event."""

    def __init__(self, store: Store, devices: dict[str, Device], ctx: Context, recent: Recent,
                 edge: str) -> None:
        self._store = store
        self._devices = devices
        self._ctx = ctx
        self._recent = recent
        self._edge = edge
        self.write_errors: dict[str, int] = {}
        self._waiting: _Waiting | None = None
        self._held: list[Reading] = []

    @property
    def settling(self) -> bool:
        """A commit awaits its fsync, or readings wait for the next commit."""
        return self._waiting is not None or bool(self._held)

    def ingest(self, readings: list[Reading], remove: list[int]) -> bool:
        """Decide, commit (deleting the delivered seqs in `remove` in the same
        transaction) and acknowledge once durable; True if `remove` was carried
        out with it (False: the commit failed, there was nothing to write, or
        the readings are held until the batch before them is durable)."""
        if self._waiting is not None:
            self._held.extend(readings)
            return False
        readings, self._held = [*self._held, *readings], []
        if not readings:
            return False
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
        seqs: list[int | None] = []
        wrote = bool(appends or forget)  # badge scans and known duplicates write nothing
        if wrote:
            try:
                result = self._store.commit(appends, forget, remove=remove)
            except StoreError as e:
                self.write_errors[e.code] = self.write_errors.get(e.code, 0) + 1
                log.error("store: %s; devices keep their events and will send them again", e)
                for dev in {id(d): d for d, _, _ in plan}.values():
                    dev.commit_failed()
                return False
            seqs = result.seqs
            if result.dropped:
                log.warning("store full: dropped and announced %s", result.dropped)
            if result.gen:
                self._waiting = _Waiting(result.gen, plan, seqs)
                return wrote
        self._acknowledge(plan, seqs)
        return wrote

    def synced(self, msg: Synced) -> None:
        """WalSync's word: the waiting batch is acknowledged once durable, or its
        devices told it failed (they send their events again)."""
        self._store.synced(msg)
        w = self._waiting
        if w is None or msg.gen < w.gen:
            return
        self._waiting = None
        if msg.error is None:
            self._acknowledge(w.plan, w.seqs)
            return
        self.write_errors["store_io_error"] = self.write_errors.get("store_io_error", 0) + 1
        log.error("store: %s; devices keep their events and will send them again", msg.error)
        for dev in {id(d): d for d, _, _ in w.plan}.values():
            dev.commit_failed()

    def _acknowledge(self, plan: list[tuple[Device, Decision, int]],
                     seqs: list[int | None]) -> None:
        """Durable now: count, then let each device acknowledge its batch."""
        outcomes: dict[str, list[tuple[Decision, list[bool]]]] = {}
        for dev, decision, first in plan:
            stored = [s is not None for s in seqs[first:first + len(decision.appends)]]
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
