"""The outbox's write path: every transaction that writes on the open connection.

A new store's first transaction (birth marker, lost range announced), the
commit transaction (seqs reserved first, delivered seqs deleted, dedup keys,
events inserted), the limits and their drop announcements, removal of
delivered events, rewriting pending payloads and dedup pruning (which keys:
`edge.store_dedup`); and the figures the writes keep (pending events and
bytes, drops, the seq watermark), which outlive the connection and are kept
in meta by every transaction (`edge.store_check.save_totals`).  `Writer` is handed the connection
on each call: `edge.store.Store` owns it and its lifecycle, the fault alarms,
the store_replaced announcement's seq and the tail cache, which it brings up
to date from what `Writer.commit` returns.

Policy when full (`max_events` or `max_bytes`): the oldest pending events are
dropped in the same transaction as the insert that overflowed, in chunks of
about 1% of `max_events` (so announcements stay rare), counted under
`store_full`, and announced in that same transaction by a `dropped` event
(`drop_event`), for which room is kept: an announcement can never cause
another, unannounced drop, and no crash can separate a drop from its
announcement.  When an older announcement is among the dropped rows, the new
one's range starts where the old one's did, so no dropped seq is ever left
unannounced (a range may then also span seqs that were delivered; the
collector only needs every gap covered).

Removal after PUBACK runs with synchronous=NORMAL: losing a removal to a power
cut only means publishing that event again, which the collector drops by
event_id, so it is not worth an fsync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from edge.events import Event
from edge.outbox_file import (
    OpenedOutbox,
    SeqReservation,
    drop_counts,
    raise_high_seq,
)
from edge.store_check import save_totals, totals
from edge.store_dedup import DEDUP_KEEP, DedupKeys
from edge.store_faults import classify

__all__ = [
    "DEDUP_KEEP",
    "Append",
    "Batch",
    "CommitResult",
    "Drop",
    "DropEvent",
    "Encoder",
    "Pending",
    "Writer",
]

# The store's logger, whichever module of it speaks.
log = logging.getLogger("edge.store")


@dataclass(frozen=True, slots=True)
class Append:
    """One event to store with `Store.commit`."""

    # None records only the dedup key (a device session marker, say).
    event: Event | None
    # (source, key): if this key was seen before for this source, the event is
    # a duplicate and is not stored again.
    dedup: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Pending:
    """A stored event awaiting delivery: its seq, MQTT topic and encoded payload."""

    seq: int
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What `Store.commit` did."""

    # One entry per Append: its seq, or None when it was a known duplicate.
    seqs: list[int | None]
    # Ranges (first, last) of seqs dropped to stay within the limits.
    dropped: list[tuple[int, int]]
    # 0: durable already; else the generation whose `Synced` makes it durable.
    gen: int = 0


Encoder = Callable[[Event, int], tuple[str, bytes]]
# (first seq, last seq, reason) -> the `dropped` event announcing them.
DropEvent = Callable[[int, int, str], Event]
_ANNOUNCE_BYTES: Final = 1024  # room kept for an announcement's payload under max_bytes
_DROPPED_KIND: Final = b'"kind":"dropped"'


def _ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous (first, last) runs of the given seqs."""
    out: list[tuple[int, int]] = []
    for q in sorted(set(seqs)):
        if out and out[-1][1] == q - 1:
            out[-1] = (out[-1][0], q)
        else:
            out.append((q, q))
    return out


def _reserve(seqs: SeqReservation, upto: int) -> None:
    """Seqs up to `upto` reserved on disk first (raises the classified StoreError)."""
    need = seqs.needs(upto)
    if need is not None:
        seqs.write(need)


@dataclass(frozen=True, slots=True)
class Drop:
    """What `Writer.commit` dropped to stay within the limits: the announced
    range(s), the rows and payload bytes deleted, how many of them were events
    (not announcements), the last seq dropped, the announcement (topic,
    payload) and whether it carries the store_replaced announcement on."""

    ranges: list[tuple[int, int]] = field(default_factory=list)
    rows: int = 0
    size: int = 0
    events: int = 0
    upto: int = 0
    announcement: tuple[str, bytes] | None = None
    carried_replaced: bool = False


@dataclass(frozen=True, slots=True)
class Batch:
    """What `Writer.commit` wrote."""

    # One entry per Append: its seq, or None when it was a known duplicate.
    seqs: list[int | None]
    # (topic, payload) by seq of every row inserted, the announcement included.
    fresh: dict[int, tuple[str, bytes]]
    drop: Drop


class Writer:
    """The write path of one Store and the figures it keeps: `encode`,
    `drop_event`, `max_events` and `max_bytes` as for `edge.store.Store`,
    `wall_ns` the clock that times stored events."""

    def __init__(self, encode: Encoder, drop_event: DropEvent | None, max_events: int,
                 max_bytes: int, wall_ns: Callable[[], int]) -> None:
        self._encode = encode
        self._drop_event = drop_event
        self.max_events = max_events
        self.max_bytes = max_bytes
        # Dropping in chunks keeps announcements to about one per 1% of the store.
        self._chunk = max(1, min(max(10, max_events // 100), max_events // 10))
        self._wall_ns = wall_ns
        # The figures: the highest seq used (stored, removed or lost), pending
        # events and their payload bytes, events dropped by reason.  The last
        # known while the store is closed.
        self.last_seq = 0
        self.count = self.payload_bytes = 0
        self.drops: dict[str, int] = {}
        self._keys = DedupKeys()
        # The connection's own setting; NORMAL when a thread syncs (edge.committer).
        self.synchronous = "FULL"

    def load(self, db: sqlite3.Connection, last_seq: int) -> None:
        """Take the figures of a store just opened, whose seq watermark is `last_seq`."""
        self.last_seq = last_seq
        self._keys.reset()
        self.count, self.payload_bytes = totals(db)
        self.drops = drop_counts(db)

    def birth(self, opened: OpenedOutbox) -> None:
        """A new store's first transaction: its birth marker and, when seqs may have
        been used before (`opened.lost`), that range announced as lost (store_replaced)."""
        db = opened.db
        seqs = opened.seqs
        lost = opened.lost
        db.execute("BEGIN IMMEDIATE")
        count, size = totals(db)
        if opened.new:
            db.execute("INSERT INTO meta(name, value) VALUES ('born', ?)",
                       (self._wall_ns() // 1_000_000,))
        if lost is not None:
            raise_high_seq(db, lost[1])
            raise_high_seq(db, lost[1], "seq_reserved")
            if self._drop_event is not None:
                seq = lost[1] + 1
                _reserve(seqs, seq)
                topic, payload = self._encode(self._drop_event(lost[0], lost[1],
                                                               opened.lost_reason), seq)
                db.execute("INSERT INTO outbox(seq, topic, payload, created_ms) "
                           "VALUES (?, ?, ?, ?)", (seq, topic, payload, self._wall_ns() // 10**6))
                db.execute("INSERT INTO meta(name, value) VALUES ('replaced_seq', ?) "
                           "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (seq,))
                opened.last_seq = seq
                count, size = count + 1, size + len(payload)
        save_totals(db, count, size)
        db.execute("COMMIT")

    def commit(self, db: sqlite3.Connection, reservation: SeqReservation,
               appends: Sequence[Append], forget: Sequence[str], remove: Sequence[int], *,
               replaced_seq: int | None) -> Batch:
        """One transaction: `remove` deleted, `forget`'s dedup keys cleared, `appends`
        stored, the limits kept; `replaced_seq` as `edge.store.Store.replaced_seq`.
        Raises the classified StoreError with nothing changed."""
        seqs: list[int | None] = []
        fresh: dict[int, tuple[str, bytes]] = {}
        keyed: list[tuple[str, int]] = []  # (source, at) of each dedup key inserted
        added_bytes = 0
        next_seq = self.last_seq
        # One more for a possible drop announcement.
        reserved_before = reservation.upto
        _reserve(reservation, next_seq + len(appends) + 1)
        now_ms = self._wall_ns() // 1_000_000
        try:
            db.execute("BEGIN IMMEDIATE")
            if reservation.upto != reserved_before:
                raise_high_seq(db, reservation.upto, "seq_reserved")
            removed, removed_bytes = _delete(db, remove, replaced_seq)
            for source in forget:
                db.execute("DELETE FROM dedup WHERE source=?", (source,))
            for a in appends:
                seq = next_seq + 1
                if a.dedup is not None:
                    cur = db.execute("INSERT OR IGNORE INTO dedup(source, key, at) "
                                     "VALUES (?, ?, ?)", (a.dedup[0], a.dedup[1], seq))
                    if cur.rowcount == 1:
                        keyed.append((a.dedup[0], seq))
                    if cur.rowcount == 0 or a.event is None:
                        seqs.append(None)
                        continue
                if a.event is None:
                    seqs.append(None)
                    continue
                topic, payload = self._encode(a.event, seq)
                fresh[seq] = (topic, payload)
                db.execute("INSERT INTO outbox(seq, topic, payload, created_ms) "
                           "VALUES (?, ?, ?, ?)", (seq, topic, payload, now_ms))
                next_seq = seq
                added_bytes += len(payload)
                seqs.append(seq)
            added = sum(s is not None for s in seqs)
            drop = self._enforce_limits(db, self.count - removed + added,
                                        self.payload_bytes - removed_bytes + added_bytes,
                                        next_seq, replaced_seq)
            if drop.announcement is not None:
                next_seq += 1
                topic, payload = drop.announcement
                fresh[next_seq] = drop.announcement
                db.execute("INSERT INTO outbox(seq, topic, payload, created_ms) "
                           "VALUES (?, ?, ?, ?)", (next_seq, topic, payload, now_ms))
                added += 1
                added_bytes += len(payload)
            count = self.count + added - drop.rows - removed
            size = self.payload_bytes + added_bytes - drop.size - removed_bytes
            save_totals(db, count, size)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise classify(e, "storing events") from e
        self.last_seq = next_seq
        self.count, self.payload_bytes = count, size
        if drop.events:
            self.drops["store_full"] = self.drops.get("store_full", 0) + drop.events
        for source in self._keys.committed(forget, keyed):
            self._keys.prune(db, source)
        return Batch(seqs, fresh, drop)

    def _enforce_limits(self, db: sqlite3.Connection, count: int, total: int, top: int,
                        replaced_seq: int | None) -> Drop:
        """Inside the open transaction: drop the oldest rows until within limits, with
        room for the announcement, which is built here (seq `top` + 1)."""
        if count <= self.max_events and total <= self.max_bytes:
            return Drop()
        announce = self._drop_event is not None
        # With announcements: room for one, and a chunk dropped at once so that
        # a full store does not add an announcement per event.
        max_count = self.max_events - (self._chunk if announce else 0)
        max_total = self.max_bytes - (_ANNOUNCE_BYTES if announce else 0)
        rows = events = size_sum = 0
        first: int | None = None
        last = 0
        lo: int | None = None
        carried = False
        for seq, size, is_ann in db.execute(
                "SELECT seq, length(payload), instr(payload, ?) > 0 FROM outbox ORDER BY seq",
                (_DROPPED_KIND,)):
            if count - rows <= max_count and total - size_sum <= max_total:
                break
            first = seq if first is None else first
            last = seq
            rows += 1
            size_sum += size
            if is_ann:
                # An older announcement goes too: the new one starts where it did.
                old = _announced_from(db, seq)
                lo = old if lo is None else min(lo, old)
                carried = carried or seq == replaced_seq
            else:
                events += 1
        if first is None:
            return Drop()
        db.execute("DELETE FROM outbox WHERE seq <= ?", (last,))
        raise_high_seq(db, last)
        if events:
            db.execute("INSERT INTO meta(name, value) VALUES ('drops.store_full', ?) "
                       "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                       (events,))
        if carried:
            db.execute("DELETE FROM meta WHERE name='replaced_seq'")
        low = first if lo is None else min(lo, first)
        log.warning("store full: dropped %d oldest events (seq %d..%d)", events, first, last)
        announcement = None
        if self._drop_event is not None:
            announcement = self._encode(self._drop_event(low, last, "store_full"), top + 1)
            if carried:
                db.execute("INSERT INTO meta(name, value) VALUES ('replaced_seq', ?)",
                           (top + 1,))
        return Drop([(low, last)], rows, size_sum, events, last, announcement, carried)

    def remove(self, db: sqlite3.Connection, seqs: Sequence[int],
               replaced_seq: int | None) -> bool:
        """Delete delivered seqs, not fsync'ed (see the module docstring).  False
        when it failed (logged: they will be sent again)."""
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            removed, removed_bytes = _delete(db, seqs, replaced_seq)
            save_totals(db, self.count - removed, self.payload_bytes - removed_bytes)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            log.warning("removing delivered events failed (they will be sent again): %s", e)
            return False
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute(f"PRAGMA synchronous={self.synchronous}")
        self.count -= removed
        self.payload_bytes -= removed_bytes
        return True

    def rewrite(self, db: sqlite3.Connection, fn: Callable[[bytes], bytes | None],
                skip: set[int] | frozenset[int]) -> list[tuple[int, bytes]]:
        """Replace pending payloads where `fn` returns new bytes, in one transaction;
        the (seq, payload) rewritten (none when the transaction failed: logged).

        Reads every pending row but those in `skip`.
        """
        changed: list[tuple[int, bytes]] = []
        for seq, payload in db.execute("SELECT seq, payload FROM outbox ORDER BY seq"):
            if seq in skip:
                continue
            new = fn(bytes(payload))
            if new is not None:
                changed.append((int(seq), new))
        if not changed:
            return []
        grown = 0
        try:
            db.execute("BEGIN IMMEDIATE")
            for seq, new in changed:
                old = db.execute("SELECT length(payload) FROM outbox WHERE seq=?",
                                 (seq,)).fetchone()
                db.execute("UPDATE outbox SET payload=? WHERE seq=?", (new, seq))
                if old is not None:
                    grown += len(new) - int(old[0])
            save_totals(db, self.count, self.payload_bytes + grown)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            log.warning("could not rewrite pending events: %s", e)
            return []
        self.payload_bytes += grown  # only once the rewrite is durable
        return changed


def _announced_from(db: sqlite3.Connection, seq: int) -> int:
    """The first seq an announcement row (seq `seq`) declared lost."""
    row = db.execute("SELECT payload FROM outbox WHERE seq=?", (seq,)).fetchone()
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return int(json.loads(row[0])["dropped"]["from_seq"])
    return seq


def _delete(db: sqlite3.Connection, seqs: Sequence[int],
            replaced_seq: int | None) -> tuple[int, int]:
    """Inside an open transaction: delete delivered seqs; (rows, payload bytes)."""
    if not seqs:
        return 0, 0
    removed = removed_bytes = 0
    # Deliveries come back in seq order, so they are nearly always one
    # contiguous range: two statements instead of one per event.
    for first, last in _ranges(seqs):
        n, size = db.execute(
            "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox "
            "WHERE seq BETWEEN ? AND ?", (first, last)).fetchone()
        db.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (first, last))
        removed += int(n)
        removed_bytes += int(size)
    raise_high_seq(db, max(seqs))
    if replaced_seq is not None and replaced_seq in set(seqs):
        db.execute("DELETE FROM meta WHERE name='replaced_seq'")
    return removed, removed_bytes
