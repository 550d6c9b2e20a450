"""The outbox: every accepted event, durable on the Pi until it is delivered.

Engine: SQLite in WAL mode with synchronous=FULL, measured against TinyDB and a
plain append log (see README "Why SQLite").  One `commit()` is one transaction
and one fsync for all events that arrived meanwhile (group commit): on an SD
card an fsync costs milliseconds, and a burst of presses must not cost one
each.  Insert cost does not depend on the backlog: `seq` is the rowid, so an
insert appends to the right edge of one B-tree.

Here: the Store's lifecycle (open, settle, retry, faults, alarms) and
reading (through its tail cache, `edge.store_tail`).  What each transaction
writes, the figures, and the policy when full (`max_events`, `max_bytes`)
are the write path, `edge.store_write`.

A full *disk* is different: the transaction fails with `StoreDiskFullError`,
nothing is half-written, and the caller does not acknowledge the devices,
which keep the events and send them again.  The store refuses new events
already when the file system has less than `min_free_bytes` left, so that
SQLite never meets ENOSPC half-way through a checkpoint and the rest of the
Pi (journald, apt) keeps room to work.

Faults never end the daemon (fault classes: `edge.store_faults`; the fault
table: `edge.outbox_file`): a store that cannot be opened, or whose disk
turned read-only or failing, is closed and opened again every REOPEN_S by
`retry()`; meanwhile commits raise the classified StoreError, `pending()` is
empty and the figures are the last known.  Each fault raises its alarm and a
successful write clears it.  A large store's integrity check finishes in the
background (`edge.store_check`); `retry()` takes a failure as corruption.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from edge.alarms import Alarms
from edge.committer import Durability, Synced
from edge.outbox_file import (
    REOPEN_S,
    OpenedOutbox,
    StoreStats,
    file_bytes,
    open_outbox,
    read_stats,
)
from edge.store_check import BackgroundCheck
from edge.store_faults import (
    StoreBusyError,
    StoreCorruptError,
    StoreDiskFullError,
    StoreError,
    StoreIOError,
    StoreReadOnlyError,
    classify,
    read_only_fs,
    refine,
)
from edge.store_tail import Tail
from edge.store_write import Append, CommitResult, DropEvent, Encoder, Pending, Writer

__all__ = ["Append", "CommitResult", "Pending", "Store", "StoreBusyError", "StoreCorruptError",
           "StoreDiskFullError", "StoreError", "StoreIOError", "StoreReadOnlyError", "StoreStats",
           "read_stats"]

log = logging.getLogger(__name__)

# How often the last seq used is noted in the reservation file (and at close).
USED_EVERY_S: Final = 60.0
# The faults that a failed write raises as alarms, cleared by the next success.
_WRITE_FAULTS: Final = ("store_busy", "disk_full", "store_read_only", "store_io_error",
                        "store_error")


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
    (`available` False) and `retry()` opens it later.  With `post_synced`
    (the daemon's inbox) commits are synced in a thread (`edge.committer`):
    `commit()` returns before the fsync, `synced()` takes its word, and
    `pending()` offers only what is durable.
    """

    def __init__(self, path: Path, encode: Encoder, *, max_events: int = 500_000,
                 max_bytes: int = 500_000_000, page_size: int = 1024,
                 max_page_count: int | None = None, min_free_bytes: int = 0,
                 drop_event: DropEvent | None = None, alarms: Alarms | None = None,
                 wall_ns: Callable[[], int] = time.time_ns,
                 post_synced: Callable[[object], None] | None = None) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._write = Writer(encode, drop_event, max_events, max_bytes, wall_ns)
        self._page_size = page_size
        self._max_page_count = max_page_count
        self.alarms = alarms if alarms is not None else Alarms()
        self._wall_ns = wall_ns
        self._db: sqlite3.Connection | None = None
        self._opened: OpenedOutbox | None = None
        self._retry_at = 0.0
        # Why the store is closed, raised by commits until retry() reopens it.
        self._closed_because = StoreError("the event store is not open yet")
        self._tail = Tail()
        # A write fault met by a commit is over only when a commit succeeds (a
        # reopen can succeed while the path that failed is still failing).
        self._commit_failing = False
        # Delivered seqs whose removal failed: removed with the next commit.
        self._unremoved: list[int] = []
        # (st_dev, st_ino) of the open file: a file deleted or replaced under the
        # daemon is noticed by retry() instead of writing into the void.
        self._ident: tuple[int, int] | None = None
        self._check_at = 0.0
        self._used_at = 0.0
        # The seq of the pending store_replaced announcement (alarm until delivered).
        self.replaced_seq: int | None = None
        # A large store's integrity check runs after it is open (edge.store_check);
        # after corruption was met, the next open checks the whole file first.
        self._check: BackgroundCheck | None = None
        self._check_whole = False
        self._durable = Durability(post_synced) if post_synced is not None else None
        self._open()

    # -- opening and faults ------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether the database is open (else commits raise and nothing is pending)."""
        return self._db is not None

    def _fault(self, err: StoreError) -> StoreError:
        """Raise `err`'s alarm; close the store when only reopening can cure it."""
        err = refine(err, self.disk_free(), self.path.parent)
        self.alarms.raise_(err.code, f"{err.sentence} ({err})", self._wall_ns(),
                           subject="store")
        if isinstance(err, StoreCorruptError):
            self._check_whole = True
        if isinstance(err, StoreReadOnlyError | StoreIOError | StoreCorruptError):
            self._close_db()
        self._closed_because = err
        return err

    def _close_db(self) -> None:
        if self._durable is not None:  # the last sync first: its writes were this db's
            self._durable.stop()
        if self._check is not None:
            self._check.cancel()
            self._check = None
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        if self._opened is not None:
            self._opened.seqs.close()
            self._opened = None
        self._tail.clear()

    def _open(self) -> None:
        try:
            if read_only_fs(self.path.parent):
                raise StoreReadOnlyError(f"{self.path.parent} is on a read-only file system")
            opened = open_outbox(self.path, page_size=self._page_size,
                                 max_page_count=self._max_page_count,
                                 full_check=self._check_whole)
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
            self._write.load(db, opened.last_seq)
            row = db.execute("SELECT value FROM meta WHERE name='replaced_seq'").fetchone()
            if self._durable is not None:  # durable by WalSync's fsync, not inside COMMIT
                self._write.synchronous = self._durable.start(db, self.path,
                                                              self._write.last_seq)
        except (sqlite3.Error, StoreError) as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            db.close()
            opened.seqs.close()
            self._fault(classify(e, "starting the store"))
            return
        self._db, self._opened = db, opened
        self.replaced_seq = int(row[0]) if row and self._has(int(row[0])) else None
        if self.replaced_seq is None:
            self.alarms.clear("store_replaced")
        elif not (self.alarms.has("store_replaced") or self.alarms.has("store_rolled_back")):
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
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            self._ident = (st.st_dev, st.st_ino)
        self._check_whole = False
        if not opened.checked:
            self._check = BackgroundCheck(self.path)
        if not self._commit_failing:
            for code in _WRITE_FAULTS:
                self.alarms.clear(code, "store")

    def _settle(self, opened: OpenedOutbox) -> None:
        """A new store gets its birth marker, and its lost range announced, in one
        transaction; the reservation file is brought up to what is known."""
        seqs = opened.seqs
        if seqs.on_file < seqs.upto:
            with contextlib.suppress(StoreError):
                seqs.write(seqs.upto)  # best effort: the outbox's mirror vouches meanwhile
        if not opened.new and opened.lost is None:
            return  # born, or older than the marker but with seqs: nothing to write
        self._write.birth(opened)
        lost = opened.lost
        if lost is not None and opened.new:
            self.alarms.raise_("store_replaced", f"the event store started again; seq "
                               f"{lost[0]}..{lost[1]} are announced to the collector as lost",
                               self._wall_ns(), subject="store")

    def retry(self, now_s: float) -> None:
        """Open a closed store again if REOPEN_S have passed (`now_s`: monotonic s), and
        notice an open store's file deleted or replaced under it."""
        failure = self._check.failure() if self._check is not None else None
        if failure is not None:
            log.error("store: the background integrity check failed: %s", failure)
            self._fault(StoreCorruptError(failure))
            self._retry_at = now_s
        if self._opened is not None and now_s >= self._used_at:
            self._used_at = now_s + USED_EVERY_S
            self._opened.seqs.note_used(self._write.last_seq)
        if self._db is not None and now_s >= self._check_at:
            self._check_at = now_s + REOPEN_S
            try:
                st = os.stat(self.path)
                ident: tuple[int, int] | None = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                ident = None
            except OSError:
                ident = self._ident  # cannot tell: the next write will
            if ident != self._ident:
                log.error("store: %s was deleted or replaced while open; starting again",
                          self.path)
                self._close_db()
                self._retry_at = now_s
        if self._db is None and now_s >= self._retry_at:
            self._retry_at = now_s + REOPEN_S
            self._open()
            if self._db is not None:
                log.info("store available again")

    def checked(self, timeout: float) -> bool:
        """Whether a background integrity check (if any) finished within `timeout` s."""
        return self._check is None or self._check.wait(timeout)

    def _has(self, seq: int) -> bool:
        assert self._db is not None  # noqa: S101 - callers check
        return self._db.execute("SELECT 1 FROM outbox WHERE seq=?", (seq,)).fetchone() is not None

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
            # Reopening is retry()'s (every REOPEN_S): not a full open and
            # integrity check per press while the disk is failing.
            why = self._closed_because  # a fresh instance: no traceback piles up
            raise type(why)(str(why))
        remove = [*self._unremoved, *remove]
        try:
            result = self._commit(self._db, self._opened, appends, forget, remove)
        except StoreError as e:
            self._commit_failing = True
            raise self._fault(e) from e.__cause__
        self._commit_failing = False
        self._unremoved = []
        for code in _WRITE_FAULTS:
            self.alarms.clear(code, "store")
        self._delivered(remove)
        return result if self._durable is None else CommitResult(
            result.seqs, result.dropped, self._durable.wrote(self._write.last_seq))

    def synced(self, msg: Synced) -> bool | None:
        """WalSync's word (edge.committer.Durability.synced); a failed sync is an
        I/O fault: the store closes and reopens."""
        ok = None if self._durable is None else self._durable.synced(msg)
        if ok is False:
            self._commit_failing = True
            self._fault(StoreIOError(msg.error or "fsync failed"))
        return ok

    def sync_stalled_s(self) -> float:
        """How long a commit has waited for its fsync (0: none waits): a hung disk."""
        return 0.0 if self._durable is None else self._durable.stalled_s()

    def _delivered(self, seqs: Sequence[int]) -> None:
        """Delivered seqs are gone from the store: was the replaced store's
        announcement among them?"""
        if self.replaced_seq is not None and self.replaced_seq in set(seqs):
            # The collector has been told what the replaced store may have lost.
            self.replaced_seq = None
            for code in ("store_replaced", "store_corrupt", "store_rolled_back"):
                self.alarms.clear(code)

    def _commit(self, db: sqlite3.Connection, opened: OpenedOutbox, appends: Sequence[Append],
                forget: Sequence[str], remove: Sequence[int]) -> CommitResult:
        if self.min_free_bytes:
            free = self.disk_free()
            if free is not None and free < self.min_free_bytes:
                raise StoreDiskFullError(f"the disk has {free} bytes free; the store keeps "
                                         f"{self.min_free_bytes} in reserve")
        batch = self._write.commit(db, opened.seqs, appends, forget, remove,
                                   replaced_seq=self.replaced_seq)
        drop = batch.drop
        for gone in remove:
            self._tail.pop(gone, None)
        if drop.ranges:
            self._tail.clear()
            if self.replaced_seq is not None and drop.carried_replaced:
                self.replaced_seq = self._write.last_seq  # the new announcement carries it on
        for seq, (topic, payload) in batch.fresh.items():
            # A batch larger than the limit drops some of its own events.
            if seq > drop.upto:
                self._tail[seq] = Pending(seq, topic, payload)
        self._tail.trim()
        return CommitResult(batch.seqs, drop.ranges)

    def remove(self, seqs: Sequence[int]) -> None:
        """Forget delivered events.  Not fsync'ed: see `edge.store_write`."""
        db = self._db
        if db is None:
            return  # a closed store sends them again after reopening: deduplicated
        seqs = [*self._unremoved, *seqs]
        if not seqs or (self._durable is not None and self._durable.owed):
            self._unremoved = seqs  # not while WalSync may checkpoint: in the next commit
            return
        if not self._write.remove(db, seqs, self.replaced_seq):
            self._unremoved = seqs[-4096:]  # the next commit or removal tries again
            return
        self._unremoved = []
        for seq in seqs:
            self._tail.pop(seq, None)
        self._delivered(seqs)

    def remove_through(self, seq: int) -> None:
        """Forget every event with seq <= `seq` (the collector has committed them)."""
        if self._db is None:
            return
        try:
            seqs = [int(r[0]) for r in self._db.execute(
                "SELECT seq FROM outbox WHERE seq <= ? ORDER BY seq", (seq,))]
        except sqlite3.Error as e:
            self._read_failed(e, "reading the delivered events")
            return
        self.remove(seqs)

    def rewrite_pending(self, fn: Callable[[bytes], bytes | None],
                        skip: set[int] | frozenset[int] = frozenset()) -> int:
        """Replace pending payloads where `fn` returns new bytes; returns how many.

        For rare whole-outbox corrections (the clock became synchronised), so
        it reads every pending row; `skip` are seqs already handed to the broker.
        """
        db = self._db
        if db is None:
            return 0
        try:
            changed = self._write.rewrite(db, fn, skip)
        except sqlite3.Error as e:
            self._read_failed(e, "reading the pending events to correct their times")
            return 0
        for seq, new in changed:
            cached = self._tail.get(seq)
            if cached is not None:
                self._tail[seq] = Pending(seq, cached.topic, new)
        return len(changed)

    # -- reading ---------------------------------------------------------

    def pending(self, after_seq: int = 0, limit: int = 100) -> list[Pending]:
        """Up to `limit` pending durable events with seq > after_seq, in seq order
        (none while the store is closed)."""
        top = self._write.last_seq if self._durable is None else self._durable.durable_seq
        try:
            return [] if self._db is None else self._tail.read(self._db, after_seq, limit, top)
        except sqlite3.Error as e:
            self._read_failed(e, "reading pending events")
            return []

    def keys(self, source: str) -> list[str]:
        """A source's dedup keys, oldest first (none while the store is closed)."""
        try:
            return [] if self._db is None else [str(k) for (k,) in self._db.execute(
                "SELECT key FROM dedup WHERE source=? ORDER BY at", (source,))]
        except sqlite3.Error as e:
            self._read_failed(e, "reading dedup keys")
            return []

    def _read_failed(self, e: sqlite3.Error, doing: str) -> None:
        """A read met damage (a large store opens before its whole check has run:
        edge/store_check.py) or an I/O error: the store closes, and reopens with the
        whole check; anything else (busy) is tried again at the next turn."""
        err = classify(e, doing)
        if isinstance(err, StoreCorruptError | StoreIOError):
            self._fault(err)
        else:
            log.warning("%s failed (will retry): %s", doing, e)

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
        return self._write.count

    @property
    def last_seq(self) -> int:
        """The highest seq used (stored, removed or lost); the next event gets the next one."""
        return self._write.last_seq

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
        w = self._write
        return StoreStats(w.count - len(done), w.payload_bytes, file_bytes(self.path),
                          int(row[0]) if row else None, w.last_seq, dict(w.drops))

    def close(self) -> None:
        """Note the last seq used, close the database and the seq reservation file;
        the Store is unusable after."""
        if self._opened is not None:
            self._opened.seqs.note_used(self._write.last_seq)
        self._close_db()
