"""The outbox: every accepted event, durable on the Pi until it is delivered.

Engine: SQLite in WAL mode with synchronous=FULL, measured against TinyDB and a
plain append log (see README "Why SQLite").  One `commit()` is one transaction
and one fsync for all events that arrived meanwhile (group commit): on an SD
card an fsync costs milliseconds, and a burst of presses must not cost one
each.  Insert cost does not depend on the backlog: `seq` is the rowid, so an
insert appends to the right edge of one B-tree.

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

A full *disk* is different: the transaction fails with `StoreDiskFullError`,
nothing is half-written, and the caller does not acknowledge the devices,
which keep the events and send them again.  The store refuses new events
already when the file system has less than `min_free_bytes` left, so that
SQLite never meets ENOSPC half-way through a checkpoint and the rest of the
Pi (journald, apt) keeps room to work.

Faults never end the daemon (fault table: `edge.outbox_file`): a store that
cannot be opened, or whose disk turned read-only or failing, is closed and
opened again every REOPEN_S by `retry()`; meanwhile commits raise the
classified StoreError, `pending()` is empty and the figures are the last
known.  Each fault raises its alarm and a successful write clears it.

Removal after PUBACK runs with synchronous=NORMAL: losing a removal to a power
cut only means publishing that event again, which the collector drops by
event_id, so it is not worth an fsync.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from edge.alarms import Alarms
from edge.events import Event
from edge.outbox_file import (
    REOPEN_S,
    OpenedOutbox,
    SeqReservation,
    StoreBusyError,
    StoreCorruptError,
    StoreDiskFullError,
    StoreError,
    StoreIOError,
    StoreReadOnlyError,
    StoreStats,
    classify,
    drop_counts,
    file_bytes,
    open_outbox,
    raise_high_seq,
    read_stats,
    totals,
)

__all__ = [
    "Append",
    "CommitResult",
    "Pending",
    "Store",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreDiskFullError",
    "StoreError",
    "StoreIOError",
    "StoreReadOnlyError",
    "StoreStats",
    "read_stats",
]

log = logging.getLogger(__name__)

# Freshly committed events are kept in memory too, so the publisher does not
# read back what was just written (the common case: nothing is queued); a
# backlog is read ahead in chunks into the same cache.
TAIL_CACHE: Final = 2048
READ_AHEAD: Final = 256
DEDUP_KEEP: Final = 4096
_PRUNE_EVERY: Final = 256

Encoder = Callable[[Event, int], tuple[str, bytes]]
# (first seq, last seq, reason) -> the `dropped` event announcing them.
DropEvent = Callable[[int, int, str], Event]
# The faults that a failed write raises as alarms, cleared by the next success.
_WRITE_FAULTS: Final = ("store_busy", "disk_full", "store_read_only", "store_io_error",
                        "store_error")
_ANNOUNCE_BYTES: Final = 1024  # room kept for an announcement's payload under max_bytes
_NEARLY_FULL: Final = 64 * 1024  # bytes free below which an open/I/O error means full
_DROPPED_KIND: Final = b'"kind":"dropped"'


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


def _ranges(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous (first, last) runs of the given seqs."""
    out: list[tuple[int, int]] = []
    for q in sorted(set(seqs)):
        if out and out[-1][1] == q - 1:
            out[-1] = (out[-1][0], q)
        else:
            out.append((q, q))
    return out


class Store:
    """The outbox.  Not thread-safe: the daemon's main loop owns it.

    `path` is the SQLite file (created with its directory when missing).
    `encode` turns an event and its seq into (topic, payload); `drop_event`
    makes the `dropped` event announcing lost seqs (None: drops are only
    counted, for tools and tests that publish nothing).  Limits: `max_events`
    pending events and `max_bytes` of their payloads (oldest dropped beyond
    them); `min_free_bytes` of free disk below which commits are refused;
    `page_size` (bytes) and `max_page_count` as for `edge.outbox_file.connect`.
    `alarms` receives the fault alarms, timed by `wall_ns`.  Never raises for a
    fault of the disk: a store that cannot be opened starts closed
    (`available` False) and `retry()` opens it later.
    """

    def __init__(self, path: Path, encode: Encoder, *, max_events: int = 500_000,
                 max_bytes: int = 500_000_000, page_size: int = 1024,
                 max_page_count: int | None = None, min_free_bytes: int = 0,
                 drop_event: DropEvent | None = None, alarms: Alarms | None = None,
                 wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._encode = encode
        self._drop_event = drop_event
        self.max_events = max_events
        self.max_bytes = max_bytes
        # Dropping in chunks keeps announcements to about one per 1% of the store.
        self._chunk = max(1, min(max(10, max_events // 100), max_events // 10))
        self._page_size = page_size
        self._max_page_count = max_page_count
        self.alarms = alarms if alarms is not None else Alarms()
        self._wall_ns = wall_ns
        self._db: sqlite3.Connection | None = None
        self._opened: OpenedOutbox | None = None
        self._retry_at = 0.0
        self._last_seq = 0
        self._count = self._bytes = 0
        self._drops: dict[str, int] = {}
        self._since_prune: dict[str, int] = {}
        self._tail: dict[int, Pending] = {}
        # The seq of the pending store_replaced announcement (alarm until delivered).
        self.replaced_seq: int | None = None
        self._open()

    # -- opening and faults ------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether the database is open (else commits raise and nothing is pending)."""
        return self._db is not None

    def _fault(self, err: StoreError) -> StoreError:
        """Raise `err`'s alarm; close the store when only reopening can cure it."""
        free = self.disk_free()
        if not isinstance(err, StoreDiskFullError | StoreBusyError) and free is not None \
                and free < _NEARLY_FULL:
            # SQLite reports a full disk met while making its -shm or -wal file
            # as an open or I/O error: the free space tells the truth.
            err = StoreDiskFullError(f"{err} ({free} bytes free)")
        elif isinstance(err, StoreIOError) and self._read_only_fs():
            # A file system the kernel turned read-only (ext4 errors=remount-ro)
            # reaches SQLite as an I/O error.
            err = StoreReadOnlyError(f"{err} (the file system is read-only)")
        self.alarms.raise_(err.code, f"{err.sentence} ({err})", self._wall_ns(),
                           subject="store")
        if isinstance(err, StoreReadOnlyError | StoreIOError | StoreCorruptError):
            self._close_db()
        return err

    def _close_db(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        if self._opened is not None:
            self._opened.seqs.close()
            self._opened = None
        self._tail.clear()

    def _read_only_fs(self) -> bool:
        try:
            return bool(os.statvfs(self.path.parent).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    def _open(self) -> None:
        try:
            if self._read_only_fs():
                raise StoreReadOnlyError(f"{self.path.parent} is on a read-only file system")
            opened = open_outbox(self.path, page_size=self._page_size,
                                 max_page_count=self._max_page_count)
        except StoreError as e:
            self._fault(e)
            log.error("store: %s; retrying every %.0f s", e, REOPEN_S)
            return
        db = opened.db
        now = self._wall_ns()
        for code, text in opened.alarms:
            self.alarms.raise_(code, text, now, subject="store")
        try:
            self._settle(opened)
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            db.close()
            opened.seqs.close()
            self._fault(classify(e, "starting the store"))
            return
        except StoreError as e:
            db.close()
            opened.seqs.close()
            self._fault(e)
            return
        self._db, self._opened = db, opened
        self._last_seq = opened.last_seq
        self._count, self._bytes = totals(db)
        self._drops = drop_counts(db)
        row = db.execute("SELECT value FROM meta WHERE name='replaced_seq'").fetchone()
        self.replaced_seq = int(row[0]) if row and self._has(int(row[0])) else None
        if self.replaced_seq is None:
            self.alarms.clear("store_replaced")
        elif not self.alarms.has("store_replaced"):
            self.alarms.raise_("store_replaced", "the event store started again; the seqs it "
                               f"may have lost are announced (seq {self.replaced_seq}), not "
                               "yet delivered", now, subject="store")
        try:
            # Opening may succeed read-only; only a write shows the fault is over.
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            self._fault(classify(e, "checking that the store can be written"))
            return
        for code in _WRITE_FAULTS:
            self.alarms.clear(code, "store")

    def _settle(self, opened: OpenedOutbox) -> None:
        """A new store gets its birth marker, and its lost range announced, in one
        transaction; the reservation file is brought up to what is known."""
        db = opened.db
        seqs = opened.seqs
        if seqs.on_file < seqs.upto:
            with contextlib.suppress(StoreError):
                seqs.write(seqs.upto)  # best effort: the outbox's mirror vouches meanwhile
        if not opened.new:
            return  # born, or older than the marker but with seqs: nothing to write
        lost = opened.lost
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT INTO meta(name, value) VALUES ('born', ?)",
                   (self._wall_ns() // 1_000_000,))
        if lost is not None:
            raise_high_seq(db, lost[1])
            raise_high_seq(db, lost[1], "seq_reserved")
            if self._drop_event is not None:
                seq = lost[1] + 1
                self._reserve(seqs, seq)
                topic, payload = self._encode(self._drop_event(lost[0], lost[1],
                                                               "store_replaced"), seq)
                db.execute("INSERT INTO outbox(seq, topic, payload, created_ms) "
                           "VALUES (?, ?, ?, ?)", (seq, topic, payload, self._wall_ns() // 10**6))
                db.execute("INSERT INTO meta(name, value) VALUES ('replaced_seq', ?)", (seq,))
                opened.last_seq = seq
        db.execute("COMMIT")
        if lost is not None:
            self.alarms.raise_("store_replaced", f"the event store started again; seq "
                               f"{lost[0]}..{lost[1]} are announced to the collector as lost",
                               self._wall_ns(), subject="store")

    def retry(self, now_s: float) -> None:
        """Open a closed store again if REOPEN_S have passed (`now_s`: monotonic s)."""
        if self._db is None and now_s >= self._retry_at:
            self._retry_at = now_s + REOPEN_S
            self._open()
            if self._db is not None:
                log.info("store available again")

    def _has(self, seq: int) -> bool:
        assert self._db is not None  # noqa: S101 - callers check
        return self._db.execute("SELECT 1 FROM outbox WHERE seq=?", (seq,)).fetchone() is not None

    @staticmethod
    def _reserve(seqs: SeqReservation, upto: int) -> None:
        """Seqs up to `upto` reserved on disk first (raises the classified StoreError)."""
        need = seqs.needs(upto)
        if need is not None:
            seqs.write(need)

    # -- writing ---------------------------------------------------------

    def commit(self, appends: Sequence[Append], forget: Sequence[str] = (),
               remove: Sequence[int] = ()) -> CommitResult:
        """Store `appends` durably (one fsync); `forget` clears sources' dedup keys first.

        `remove` are delivered seqs to delete in the same transaction (it is
        fsync'ed anyway, so they ride along for free).  Raises the classified
        StoreError (busy, disk full, read-only, I/O) with nothing changed; its
        alarm is raised, and cleared by the next commit that succeeds.
        """
        if self._db is None or self._opened is None:
            self._open()
            if self._db is None or self._opened is None:
                raise StoreError("the event store is not available")
        try:
            result = self._commit(self._db, self._opened, appends, forget, remove)
        except StoreError as e:
            raise self._fault(e) from e.__cause__
        for code in _WRITE_FAULTS:
            self.alarms.clear(code, "store")
        self._delivered(remove)
        return result

    def _delivered(self, seqs: Sequence[int]) -> None:
        """Delivered seqs are gone from the store: was the replaced store's
        announcement among them?"""
        if self.replaced_seq is not None and self.replaced_seq in set(seqs):
            # The collector has been told what the replaced store may have lost.
            self.replaced_seq = None
            self.alarms.clear("store_replaced")
            self.alarms.clear("store_corrupt")

    def _commit(self, db: sqlite3.Connection, opened: OpenedOutbox, appends: Sequence[Append],
                forget: Sequence[str], remove: Sequence[int]) -> CommitResult:
        if self.min_free_bytes:
            free = self.disk_free()
            if free is not None and free < self.min_free_bytes:
                raise StoreDiskFullError(f"the disk has {free} bytes free; the store keeps "
                                         f"{self.min_free_bytes} in reserve")
        seqs: list[int | None] = []
        fresh: dict[int, tuple[str, bytes]] = {}
        added_bytes = 0
        next_seq = self._last_seq
        # One more for a possible drop announcement.
        reserved_before = opened.seqs.upto
        self._reserve(opened.seqs, next_seq + len(appends) + 1)
        now_ms = self._wall_ns() // 1_000_000
        try:
            db.execute("BEGIN IMMEDIATE")
            if opened.seqs.upto != reserved_before:
                raise_high_seq(db, opened.seqs.upto, "seq_reserved")
            removed, removed_bytes = self._delete(remove)
            for source in forget:
                db.execute("DELETE FROM dedup WHERE source=?", (source,))
            for a in appends:
                seq = next_seq + 1
                if a.dedup is not None:
                    cur = db.execute("INSERT OR IGNORE INTO dedup(source, key, at) "
                                     "VALUES (?, ?, ?)", (a.dedup[0], a.dedup[1], seq))
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
            drop = self._enforce_limits(self._count - removed + added,
                                        self._bytes - removed_bytes + added_bytes, next_seq)
            if drop.announcement is not None:
                next_seq += 1
                topic, payload = drop.announcement
                fresh[next_seq] = drop.announcement
                db.execute("INSERT INTO outbox(seq, topic, payload, created_ms) "
                           "VALUES (?, ?, ?, ?)", (next_seq, topic, payload, now_ms))
                added += 1
                added_bytes += len(payload)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise classify(e, "storing events") from e
        self._last_seq = next_seq
        for gone in remove:
            self._tail.pop(gone, None)
        if drop.ranges:
            self._tail.clear()
            if self.replaced_seq is not None and drop.carried_replaced:
                self.replaced_seq = next_seq  # the new announcement carries it on
        for seq, (topic, payload) in fresh.items():
            # A batch larger than the limit drops some of its own events.
            if seq > drop.upto:
                self._tail[seq] = Pending(seq, topic, payload)
        while len(self._tail) > TAIL_CACHE:
            del self._tail[next(iter(self._tail))]
        self._count += added - drop.rows - removed
        self._bytes += added_bytes - drop.size - removed_bytes
        if drop.events:
            self._drops["store_full"] = self._drops.get("store_full", 0) + drop.events
        for a in appends:
            if a.dedup is not None:
                self._maybe_prune(a.dedup[0])
        return CommitResult(seqs, drop.ranges)

    def _enforce_limits(self, count: int, total: int, top: int) -> _Drop:
        """Inside the open transaction: drop the oldest rows until within limits, with
        room for the announcement, which is built here (seq `top` + 1)."""
        if count <= self.max_events and total <= self.max_bytes:
            return _Drop()
        db = self._db
        assert db is not None  # noqa: S101 - inside a commit
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
                old = self._announced_from(seq)
                lo = old if lo is None else min(lo, old)
                carried = carried or seq == self.replaced_seq
            else:
                events += 1
        if first is None:
            return _Drop()
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
        return _Drop([(low, last)], rows, size_sum, events, last, announcement, carried)

    def _announced_from(self, seq: int) -> int:
        """The first seq an announcement row (seq `seq`) declared lost."""
        assert self._db is not None  # noqa: S101 - inside a commit
        row = self._db.execute("SELECT payload FROM outbox WHERE seq=?", (seq,)).fetchone()
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(row[0])["dropped"]["from_seq"])
        return seq

    def _maybe_prune(self, source: str) -> None:
        n = self._since_prune.get(source, 0) + 1
        if n < _PRUNE_EVERY or self._db is None:
            self._since_prune[source] = n
            return
        self._since_prune[source] = 0
        try:
            self._db.execute(
                "DELETE FROM dedup WHERE source=? AND at < (SELECT at FROM dedup WHERE "
                "source=? ORDER BY at DESC LIMIT 1 OFFSET ?)", (source, source, DEDUP_KEEP - 1))
        except sqlite3.Error as e:
            log.warning("dedup pruning failed (will retry): %s", e)

    def _delete(self, seqs: Sequence[int]) -> tuple[int, int]:
        """Inside an open transaction: delete delivered seqs; (rows, payload bytes)."""
        if not seqs:
            return 0, 0
        db = self._db
        assert db is not None  # noqa: S101 - inside a transaction
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
        if self.replaced_seq is not None and self.replaced_seq in set(seqs):
            db.execute("DELETE FROM meta WHERE name='replaced_seq'")
        return removed, removed_bytes

    def remove(self, seqs: Sequence[int]) -> None:
        """Forget delivered events.  Not fsync'ed: see the module docstring."""
        db = self._db
        if not seqs or db is None:
            return  # a closed store sends them again after reopening: deduplicated
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")
            removed, removed_bytes = self._delete(seqs)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            log.warning("removing delivered events failed (they will be sent again): %s", e)
            return
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA synchronous=FULL")
        for seq in seqs:
            self._tail.pop(seq, None)
        self._count -= removed
        self._bytes -= removed_bytes
        self._delivered(seqs)

    def remove_through(self, seq: int) -> None:
        """Forget every event with seq <= `seq` (the collector has committed them)."""
        if self._db is None:
            return
        rows = self._db.execute("SELECT seq FROM outbox WHERE seq <= ? ORDER BY seq", (seq,))
        self.remove([int(r[0]) for r in rows])

    def rewrite_pending(self, fn: Callable[[bytes], bytes | None],
                        skip: set[int] | frozenset[int] = frozenset()) -> int:
        """Replace pending payloads where `fn` returns new bytes; returns how many.

        For rare whole-outbox corrections (the clock became synchronised), so
        it reads every pending row; `skip` are seqs already handed to the broker.
        """
        db = self._db
        if db is None:
            return 0
        changed: list[tuple[int, bytes]] = []
        for seq, payload in db.execute("SELECT seq, payload FROM outbox ORDER BY seq"):
            if seq in skip:
                continue
            new = fn(bytes(payload))
            if new is not None:
                changed.append((int(seq), new))
        if not changed:
            return 0
        try:
            db.execute("BEGIN IMMEDIATE")
            for seq, new in changed:
                old = db.execute("SELECT length(payload) FROM outbox WHERE seq=?",
                                 (seq,)).fetchone()
                db.execute("UPDATE outbox SET payload=? WHERE seq=?", (new, seq))
                if old is not None:
                    self._bytes += len(new) - int(old[0])
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            log.warning("could not rewrite pending events: %s", e)
            return 0
        for seq, new in changed:
            cached = self._tail.get(seq)
            if cached is not None:
                self._tail[seq] = Pending(seq, cached.topic, new)
        return len(changed)

    # -- reading ---------------------------------------------------------

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[Pending]:
        """Up to `limit` pending events with seq > after_seq, in seq order
        (none while the store is closed)."""
        if self._db is None:
            return []
        if after_seq + 1 in self._tail:
            out: list[Pending] = []
            seq = after_seq + 1
            while len(out) < limit and seq in self._tail:
                out.append(self._tail[seq])
                seq += 1
            return out
        try:
            rows = self._db.execute(
                "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, max(limit, READ_AHEAD))).fetchall()
        except sqlite3.Error as e:
            log.warning("reading pending events failed (will retry): %s", e)
            return []
        got = [Pending(int(s), str(t), bytes(p)) for s, t, p in rows]
        for p in got:
            self._tail[p.seq] = p
        while len(self._tail) > TAIL_CACHE:
            del self._tail[next(iter(self._tail))]
        return got[:limit]

    def keys(self, source: str) -> list[str]:
        """A source's dedup keys, oldest first (none while the store is closed)."""
        if self._db is None:
            return []
        return [str(k) for (k,) in self._db.execute(
            "SELECT key FROM dedup WHERE source=? ORDER BY at", (source,))]

    def disk_free(self) -> int | None:
        """Bytes free to unprivileged users on the store's file system; None if unknown."""
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    @property
    def depth(self) -> int:
        """Pending events (the last known count while the store is closed)."""
        return self._count

    @property
    def last_seq(self) -> int:
        """The highest seq used (stored, removed or lost); the next event gets the next one."""
        return self._last_seq

    def stats(self, delivered: Sequence[int] = ()) -> StoreStats:
        """Figures for status and health; `delivered` seqs await deletion and do not count."""
        done = set(delivered)
        row = None
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                for seq, created in self._db.execute(
                        "SELECT seq, created_ms FROM outbox ORDER BY seq LIMIT ?",
                        (len(done) + 1,)):
                    if seq not in done:
                        row = (created,)
                        break
        return StoreStats(self._count - len(done), self._bytes, file_bytes(self.path),
                          int(row[0]) if row else None, self._last_seq, dict(self._drops))

    def close(self) -> None:
        """Close the database and the seq reservation file; the Store is unusable after."""
        self._close_db()


@dataclass(frozen=True, slots=True)
class _Drop:
    """What `_enforce_limits` dropped: the announced range(s), the rows and payload
    bytes deleted, how many of them were events (not announcements), the last
    seq dropped, the announcement (topic, payload) and whether it carries the
    store_replaced announcement on."""

    ranges: list[tuple[int, int]] = field(default_factory=list)
    rows: int = 0
    size: int = 0
    events: int = 0
    upto: int = 0
    announcement: tuple[str, bytes] | None = None
    carried_replaced: bool = False
