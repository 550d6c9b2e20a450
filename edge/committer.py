"""The fsync half of a commit, in its own thread: durability off the main loop.

On an SD card an fsync costs milliseconds to tens of milliseconds.  Were it
taken on the main loop (as SQLite's synchronous=FULL does inside COMMIT),
PUBACKs, new publishes and device ACKs would all wait behind it, and at most
one window would go out per fsync (shared/measured.md).  So the daemon's
store writes its transactions with synchronous=NORMAL (appended to the WAL,
no sync: tens of microseconds) and this thread makes them durable:

    main loop                                 WalSync thread
    ---------                                 --------------
    COMMIT (WAL frames written)  -- want(g) -->
    handles PUBACKs, publishes                fsync(<store>-wal)
    the durable seqs, holds new               checkpoint when the WAL is big
    readings                     <-- Synced(g) -- (posted to the inbox)
    ACK/LED for batch g; seqs up to g may be published; commit the held readings

Why this is as durable as synchronous=FULL: in WAL mode FULL differs from
NORMAL only by a sync of the WAL file after each commit (sqlite.org/pragma,
"synchronous"); an fsync of the same file, started after COMMIT returned,
covers every frame of that commit.  One fsync covers every commit written
before it started (group commit), and syncs complete in order, so "durable
through generation g" implies every earlier generation.

Checkpoints (copying the WAL into the database file, two syncs) run here
too, on this thread's own connection: the main connection has
wal_autocheckpoint=0.  After a complete checkpoint this thread also writes
the transaction that restarts the WAL from its start, because SQLite syncs
the WAL header at a restart, on whichever connection writes first; done
here, no main-loop write meets that sync.  The checkpoint runs before
`Synced` is posted: the main loop writes nothing of its own meanwhile (it
holds new readings until `Synced`), so the checkpoint completes.

A failed fsync is posted with its error: the store treats it as an I/O
fault (closes, reopens later), and the devices of that batch are not
acknowledged; they keep their events and send them again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["CHECKPOINT_BYTES", "Durability", "Synced", "WalSync", "sync_files"]

log = logging.getLogger("edge.store")

# The WAL is checkpointed once its file has grown past this (the main
# connection's journal_size_limit truncates it back to 4 MiB at a restart):
# about a thousand events per cycle, so the restart's header sync is rare.
CHECKPOINT_BYTES: Final = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Synced:
    """Posted by WalSync: generation `gen` of store opening `epoch` is durable
    (error None), or its fsync failed with `error` (then nothing after the last
    good sync is known durable)."""

    epoch: int
    gen: int
    error: str | None = None


class WalSync:
    """fsyncs the WAL of the store at `path` on request, in a thread.

    `epoch` tells this store opening's messages from an earlier one's; `post`
    receives each `Synced` (the daemon's inbox).  The owner calls `want(gen)`
    after each write it needs durable, and `close()` once (that may sync on
    the caller's thread, once, for what was still owed).
    """

    def __init__(self, path: Path, epoch: int, post: Callable[[object], None]) -> None:
        self._path = path
        self.epoch = epoch
        self._post = post
        # The WAL exists once the connection is open in WAL mode; O_CREAT gives
        # SQLite the same (empty) file should it not.
        self._fd = os.open(str(path) + "-wal", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._cond = threading.Condition()
        self._wanted = 0
        self._synced = 0
        self._syncing_since: float | None = None
        self._closing = False
        self._failed = False
        # Seconds per fsync, the newest last (benchmarks print their percentiles).
        self.fsync_s: collections.deque[float] = collections.deque(maxlen=8192)
        self.checkpoints = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name="wal-sync")
        self._thread.start()

    def want(self, gen: int) -> None:
        """Make every write done before this call durable, and post Synced(gen)."""
        with self._cond:
            self._wanted = max(self._wanted, gen)
            if self._syncing_since is None:
                self._syncing_since = time.monotonic()
            self._cond.notify()

    def stalled_s(self) -> float:
        """How long a requested sync has been outstanding (0: none): a hung disk."""
        since = self._syncing_since
        return 0.0 if since is None else time.monotonic() - since

    def _run(self) -> None:
        ckpt: sqlite3.Connection | None = None
        try:
            while True:
                with self._cond:
                    while self._wanted <= self._synced and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        return
                    gen = self._wanted
                error = self._fsync()
                if error is None:
                    ckpt = self._checkpoint(ckpt)
                with self._cond:
                    if error is None:
                        self._synced = gen
                    else:
                        self._failed = True
                    if self._wanted <= self._synced:
                        self._syncing_since = None
                self._post(Synced(self.epoch, gen, error))
                if error is not None:
                    return  # the store closes and reopens; its next WalSync goes on
        finally:
            if ckpt is not None:
                with contextlib.suppress(sqlite3.Error):
                    ckpt.close()

    def _fsync(self) -> str | None:
        t0 = time.perf_counter()
        try:
            os.fsync(self._fd)
        except OSError as e:
            log.error("store: fsync of the WAL failed: %s", e.strerror)
            return f"fsync of the WAL failed: {e.strerror}"
        finally:
            self.fsync_s.append(time.perf_counter() - t0)
        return None

    def _checkpoint(self, ckpt: sqlite3.Connection | None) -> sqlite3.Connection | None:
        """Checkpoint once the WAL file is big; restart it when that completed."""
        try:
            if os.fstat(self._fd).st_size <= CHECKPOINT_BYTES:
                return ckpt
            if ckpt is None:
                ckpt = sqlite3.connect(self._path, isolation_level=None, timeout=5.0)
                ckpt.execute("PRAGMA synchronous=FULL")
                ckpt.execute("PRAGMA journal_size_limit=4194304")
            busy, frames, done = ckpt.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self.checkpoints += 1
            if not busy and frames == done:
                # The first frame written after a complete checkpoint restarts the
                # WAL (and syncs its header): here, not in a main-loop commit.
                ckpt.execute("BEGIN IMMEDIATE")
                ckpt.execute("INSERT INTO meta(name, value) VALUES ('wal_restarts', 1) "
                             "ON CONFLICT(name) DO UPDATE SET value = value + 1")
                ckpt.execute("COMMIT")
        except sqlite3.Error as e:
            # Not a durability matter (the frames are synced); the next sync tries again.
            log.warning("store: checkpoint failed (will retry): %s", e)
            if ckpt is not None:
                with contextlib.suppress(sqlite3.Error):
                    ckpt.execute("ROLLBACK")
        except OSError as e:
            log.warning("store: checkpoint skipped: %s", e.strerror)
        return ckpt

    def close(self) -> Synced | None:
        """Stop the thread; sync here what was still owed.  The outcome for that
        last part (None when nothing was owed)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        # At most the fsync or checkpoint in progress.
        self._thread.join()
        try:
            if self._wanted <= self._synced:
                return None
            gen = self._wanted
            if self._failed:  # what was written after the failed fsync is not durable
                return Synced(self.epoch, gen, "an earlier fsync of the WAL failed")
            error = self._fsync()
            if error is None:
                self._synced = gen
            return Synced(self.epoch, gen, error)
        finally:
            self._syncing_since = None
            with contextlib.suppress(OSError):
                os.close(self._fd)


def sync_files(path: Path) -> None:
    """fsync the store's database and WAL once at opening: what a killed daemon
    left in the page cache may be published now, so it must be on disk first."""
    for name in (str(path), str(path) + "-wal"):
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class Durability:
    """The store's side of WalSync: which writes still owe a sync, and the
    highest seq known durable (the publisher reads nothing above it).

    `post` receives the `Synced` messages (and the last one at `stop`).
    Owned by the main loop, like the store.
    """

    def __init__(self, post: Callable[[object], None]) -> None:
        self._post = post
        self.epoch = 0
        self._gen = 0
        self._owed: collections.deque[tuple[int, int]] = collections.deque()  # (gen, last seq)
        self.durable_seq = 0
        self.sync: WalSync | None = None

    def start(self, db: sqlite3.Connection, path: Path, last_seq: int) -> str:
        """The store at `path` was just opened on `db` (seqs up to `last_seq` in
        it); returns the connection's synchronous setting now: FULL (commits
        sync themselves) when the WAL cannot be opened for syncing."""
        self.epoch += 1
        self.durable_seq = last_seq
        try:
            # After a failed fsync the kernel may have marked the WAL's pages clean
            # without writing them, and a later fsync returns 0 (fsyncgate): the
            # WAL is copied into the database file, that file fsynced, and the WAL
            # emptied, so what this store now holds is written again, not trusted.
            busy = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            if busy:
                log.warning("store: the WAL could not be checkpointed at opening (busy)")
            sync_files(path)
            self.sync = WalSync(path, self.epoch, self._post)
        except OSError as e:
            log.warning("store: syncing in a thread is not possible (%s); commits sync "
                        "themselves", e.strerror)
            return "FULL"
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints are WalSync's
        return "NORMAL"

    def wrote(self, last_seq: int) -> int:
        """A write through `last_seq` was committed (not synced): its generation."""
        if self.sync is None:  # synchronous=FULL: durable already
            self.durable_seq = last_seq
            return 0
        self._gen += 1
        self._owed.append((self._gen, last_seq))
        self.sync.want(self._gen)
        return self._gen

    @property
    def owed(self) -> bool:
        """Whether a write is still waiting for its sync."""
        return bool(self._owed)

    def synced(self, msg: Synced) -> bool | None:
        """A Synced message: True (durable now), False (the sync failed), None (an
        earlier opening's, or a repeat)."""
        if self.sync is None or msg.epoch != self.epoch:
            return None
        if msg.error is not None:
            return False
        while self._owed and self._owed[0][0] <= msg.gen:
            self.durable_seq = max(self.durable_seq, self._owed.popleft()[1])
        return True

    def stalled_s(self) -> float:
        return 0.0 if self.sync is None else self.sync.stalled_s()

    def stop(self) -> None:
        """The store is closing: the last sync is made here and its outcome posted."""
        if self.sync is None:
            return
        final = self.sync.close()
        self.sync = None
        self._owed.clear()
        if final is not None:
            self._post(final)
