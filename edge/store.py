"""The outbox: every accepted event, durable on the Pi until it is delivered.

Engine: SQLite in WAL mode with synchronous=FULL, measured against TinyDB and a
plain append log (see README "Why SQLite").  One `commit()` is one transaction
and one fsync for all events that arrived meanwhile (group commit): on an SD
card an fsync costs milliseconds, and a burst of presses must not cost one
each.  Insert cost does not depend on the backlog: `seq` is the rowid, so an
insert appends to the right edge of one B-tree.

Policy when full (`max_events` or `max_bytes`): the oldest pending events are
dropped in the same transaction as the insert that overflowed, counted under
`store_full`, and reported by the caller; an insert never fails for lack of
quota.  A full *disk* is different: the transaction fails with
`StoreDiskFullError`, nothing is half-written, and the caller does not
acknowledge the devices, which keep the events and send them again.  The
store refuses new events already when the file system has less than
`min_free_bytes` left, so that SQLite never meets ENOSPC half-way through a
checkpoint and the rest of the Pi (journald, apt) keeps room to work.

Removal after PUBACK runs with synchronous=NORMAL: losing a removal to a power
cut only means publishing that event again, which the collector drops by
event_id, so it is not worth an fsync.

Opening the file, recovering from a corrupt one, the tables and the seq
watermark and reservation (seq never repeats) are `edge.outbox_file`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edge.events import Event
from edge.outbox_file import (
    StoreDiskFullError,
    StoreError,
    StoreStats,
    drop_counts,
    file_bytes,
    is_disk_full,
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
    "StoreDiskFullError",
    "StoreError",
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

    `path` is the SQLite file (created with its directory when missing; an
    unreadable one is moved aside, see `alarms` and `lost`).  `encode` turns
    an event and its seq into (topic, payload).  Limits: `max_events` pending
    events and `max_bytes` of their payloads (oldest dropped beyond them);
    `min_free_bytes` of free disk below which commits are refused;
    `page_size` (bytes) and `max_page_count` as for `edge.outbox_file.connect`.
    Raises OSError or sqlite3.Error when even a fresh store cannot be opened.
    """

    def __init__(self, path: Path, encode: Encoder, *, max_events: int = 500_000,
                 max_bytes: int = 500_000_000, page_size: int = 1024,
                 max_page_count: int | None = None, min_free_bytes: int = 0) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._encode = encode
        self.max_events = max_events
        self.max_bytes = max_bytes
        opened = open_outbox(path, page_size=page_size, max_page_count=max_page_count)
        self._db = opened.db
        self._seqs = opened.seqs
        self.alarms: list[str] = opened.alarms
        # Seqs that may have been lost with a replaced store; the daemon
        # announces them as dropped.
        self.lost: tuple[int, int] | None = opened.lost
        self._last_seq = opened.last_seq
        self._count, self._bytes = totals(self._db)
        self._drops: dict[str, int] = drop_counts(self._db)
        self._since_prune: dict[str, int] = {}
        self._tail: dict[int, Pending] = {}

    # -- writing ---------------------------------------------------------

    def commit(self, appends: Sequence[Append], forget: Sequence[str] = (),
               remove: Sequence[int] = ()) -> CommitResult:
        """Store `appends` durably (one fsync); `forget` clears sources' dedup keys first.

        `remove` are delivered seqs to delete in the same transaction (it is
        fsync'ed anyway, so they ride along for free).
        Raises StoreDiskFullError or StoreError with nothing changed, and
        OSError when the seq reservation file cannot be written.
        """
        if self.min_free_bytes:
            free = self.disk_free()
            if free is not None and free < self.min_free_bytes:
                raise StoreDiskFullError(f"the disk has {free} bytes free; the store keeps "
                                         f"{self.min_free_bytes} in reserve")
        db = self._db
        seqs: list[int | None] = []
        fresh: dict[int, tuple[str, bytes]] = {}
        added_bytes = 0
        next_seq = self._last_seq
        self._seqs.reserve(next_seq + len(appends))
        now_ms = time.time_ns() // 1_000_000
        try:
            db.execute("BEGIN IMMEDIATE")
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
            dropped, drop_rows, drop_bytes = self._enforce_limits(
                self._count - removed + added, self._bytes - removed_bytes + added_bytes)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if is_disk_full(e):
                raise StoreDiskFullError(f"store is full: {e}") from e
            raise StoreError(f"store write failed: {e}") from e
        self._last_seq = next_seq
        for gone in remove:
            self._tail.pop(gone, None)
        dropped_upto = dropped[-1][1] if dropped else 0
        if dropped:
            self._tail.clear()
        for a, new in zip(appends, seqs, strict=True):
            # A batch larger than the limit drops some of its own events.
            if new is not None and new > dropped_upto and a.event is not None:
                topic, payload = fresh[new]
                self._tail[new] = Pending(new, topic, payload)
        while len(self._tail) > TAIL_CACHE:
            del self._tail[next(iter(self._tail))]
        self._count += added - drop_rows - removed
        self._bytes += added_bytes - drop_bytes - removed_bytes
        if drop_rows:
            self._drops["store_full"] = self._drops.get("store_full", 0) + drop_rows
        for a in appends:
            if a.dedup is not None:
                self._maybe_prune(a.dedup[0])
        return CommitResult(seqs, dropped)

    def _enforce_limits(self, count: int, total: int) -> tuple[list[tuple[int, int]], int, int]:
        """Inside the open transaction: drop oldest rows until within limits.

        Returns the dropped seq range (rows already delivered inside it are
        simply absent), the number of rows and their payload bytes.
        """
        if count <= self.max_events and total <= self.max_bytes:
            return [], 0, 0
        db = self._db
        drop_rows = 0
        drop_bytes = 0
        last = 0
        first: int | None = None
        for seq, size in db.execute("SELECT seq, length(payload) FROM outbox ORDER BY seq"):
            if count - drop_rows <= self.max_events and total - drop_bytes <= self.max_bytes:
                break
            first = seq if first is None else first
            last = seq
            drop_rows += 1
            drop_bytes += size
        if first is None:
            return [], 0, 0
        db.execute("DELETE FROM outbox WHERE seq <= ?", (last,))
        raise_high_seq(db, last)
        db.execute("INSERT INTO meta(name, value) VALUES ('drops.store_full', ?) "
                   "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                   (drop_rows,))
        log.warning("store full: dropped %d oldest events (seq %d..%d)", drop_rows, first, last)
        return [(first, last)], drop_rows, drop_bytes

    def _maybe_prune(self, source: str) -> None:
        n = self._since_prune.get(source, 0) + 1
        if n < _PRUNE_EVERY:
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
        removed = removed_bytes = 0
        # Deliveries come back in seq order, so they are nearly always one
        # contiguous range: two statements instead of one per event.
        for first, last in _ranges(seqs):
            n, size = self._db.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox "
                "WHERE seq BETWEEN ? AND ?", (first, last)).fetchone()
            self._db.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (first, last))
            removed += int(n)
            removed_bytes += int(size)
        raise_high_seq(self._db, max(seqs))
        return removed, removed_bytes

    def remove(self, seqs: Sequence[int]) -> None:
        """Forget delivered events.  Not fsync'ed: see the module docstring."""
        if not seqs:
            return
        db = self._db
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

    def remove_through(self, seq: int) -> None:
        """Forget every event with seq <= `seq` (the collector has committed them)."""
        rows = self._db.execute("SELECT seq FROM outbox WHERE seq <= ? ORDER BY seq", (seq,))
        self.remove([int(r[0]) for r in rows])

    def rewrite_pending(self, fn: Callable[[bytes], bytes | None],
                        skip: set[int] | frozenset[int] = frozenset()) -> int:
        """Replace pending payloads where `fn` returns new bytes; returns how many.

        For rare whole-outbox corrections (the clock became synchronised), so
        it reads every pending row; `skip` are seqs already handed to the broker.
        """
        db = self._db
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
        """Up to `limit` pending events with seq > after_seq, in seq order."""
        if after_seq + 1 in self._tail:
            out: list[Pending] = []
            seq = after_seq + 1
            while len(out) < limit and seq in self._tail:
                out.append(self._tail[seq])
                seq += 1
            return out
        rows = self._db.execute(
            "SELECT seq, topic, payload FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after_seq, max(limit, READ_AHEAD))).fetchall()
        got = [Pending(int(s), str(t), bytes(p)) for s, t, p in rows]
        for p in got:
            self._tail[p.seq] = p
        while len(self._tail) > TAIL_CACHE:
            del self._tail[next(iter(self._tail))]
        return got[:limit]

    def keys(self, source: str) -> list[str]:
        """A source's dedup keys, oldest first."""
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
        """Pending events."""
        return self._count

    @property
    def last_seq(self) -> int:
        """The highest seq used (stored, removed or lost); the next event gets the next one."""
        return self._last_seq

    def stats(self, delivered: Sequence[int] = ()) -> StoreStats:
        """Figures for status and health; `delivered` seqs await deletion and do not count."""
        done = set(delivered)
        row = None
        for seq, created in self._db.execute(
                "SELECT seq, created_ms FROM outbox ORDER BY seq LIMIT ?", (len(done) + 1,)):
            if seq not in done:
                row = (created,)
                break
        return StoreStats(self._count - len(done), self._bytes, file_bytes(self.path),
                          int(row[0]) if row else None, self._last_seq, dict(self._drops))

    def close(self) -> None:
        """Close the database and the seq reservation file; the Store is unusable after."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._seqs.close()

