"""The outbox's files: open, check, recover, and keep seq from ever repeating.

Everything here is about the files on disk rather than about events: opening
the SQLite database with its pragmas, telling a busy, full, read-only or
failing disk from real corruption, moving a corrupt store aside, the seq
watermark and reservation, and reading the figures without the daemon.  The
outbox proper (opening, faults, pending) is `edge.store`, its write path
(commit, limits, removal) `edge.store_write`, the fault classes
`edge.store_faults`.

Files, all in the store's directory::

    outbox.sqlite (+ -wal, -shm)
        SQLite in WAL mode, synchronous=FULL, `user_version` SCHEMA_VERSION.
    outbox.sqlite.state.json
        `{"seq_reserved": N}` in TinyDB with crash-safe writes (`edge.state`):
        every seq up to N may have been used.  Mirrored in the outbox's meta.
    outbox.sqlite.corrupt-<UTC time> (+ -wal, -shm)
        a store that failed its integrity check, moved aside for inspection.

Tables::

    outbox(seq INTEGER PRIMARY KEY, topic, payload, created_ms)
        pending events in publishing order.
    dedup(source, key, at)
        the last keys seen per source (a console's (dev_seq, uptime), a
        terminal's record id), written in the same transaction as the event.
    meta(name, value)
        `born` (when this store was created: a store without it and without
        any seq is new, even if its file existed, e.g. zero-length), `high_seq` (the highest seq
        ever removed, dropped or lost), `seq_reserved` (the reservation's
        mirror), drop counters `drops.<reason>`.

Fault model, the store's one fault table (errors are classified by
`edge.store_faults.classify`; the alarm code is the error class's `code`):

============================  =========================================  ==================
condition (any store file)    what happens                               alarm
============================  =========================================  ==================
busy / locked                 open or commit fails after BUSY_TIMEOUT_S;  store_busy
                              nothing written, devices not ACKed; retried
full (SQLITE_FULL, ENOSPC)    open writes nothing when the schema exists; disk_full
                              a commit is rolled back whole; retried
read-only (EROFS, READONLY,   the store is closed and opened again every  store_read_only
EACCES, EPERM)                REOPEN_S, so a repaired mount is picked up
I/O error (EIO, IOERR)        as read-only                                store_io_error
missing, zero-length          a new store (no `born`): it continues after store_replaced
                              every seq that could have been used and
                              announces 1..N as dropped (store_replaced)
not a database, truncated,    integrity check (quick_check) fails: moved  store_corrupt
corrupt pages, unknown        aside, its readable seqs taken into
schema version                account, then as missing
state file unreadable         the outbox's own watermark and mirror are   state_unreadable
(missing/zero/garbage)        trusted and the file written again; with
                              the outbox lost too: seq_state_lost
state file unwritable         the commit that needed a new block is        disk_full /
                              refused before anything is written           store_read_only /
                                                                           store_io_error
============================  =========================================  ==================

Only an integrity failure moves a store aside: a busy, full, read-only or
failing disk never does, and the daemon never exits for any of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edge.state import StateFile
from edge.store_check import SYNC_CHECK_BYTES, partial_check, quick_check, totals
from edge.store_faults import StoreBusyError, StoreCorruptError, classify

__all__ = [
    "BUSY_TIMEOUT_S",
    "REOPEN_S",
    "SCHEMA_VERSION",
    "SEQ_BLOCK",
    "OpenedOutbox",
    "SeqReservation",
    "StoreStats",
    "connect",
    "drop_counts",
    "file_bytes",
    "high_seq",
    "move_aside",
    "open_outbox",
    "raise_high_seq",
    "read_stats",
    "state_path",
]

# The store's logger, whichever module of it speaks.
log = logging.getLogger("edge.store")

SCHEMA_VERSION: Final = 1
SEQ_BLOCK: Final = 10_000
# Long enough to ride out a checkpoint by another reader, short enough that a
# held lock never stalls the main loop near the watchdog's limit.
BUSY_TIMEOUT_S: Final = 0.2
REOPEN_S: Final = 2.0

_DDL: Final = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dedup (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    at INTEGER NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
"""


# -- opening and recovery ---------------------------------------------------------

def state_path(path: Path) -> Path:
    """The seq reservation file of the store at `path`: `<name>.state.json` beside it."""
    return path.with_name(path.name + ".state.json")


def connect(path: Path, page_size: int, max_page_count: int | None, *,
            full_check: bool = True) -> tuple[sqlite3.Connection, bool]:
    """Open the store at `path` in WAL mode, synchronous=FULL, and check it.

    `page_size` is in bytes (it applies to a new file only); `max_page_count`
    caps the file at that many pages (None: no cap).  Nothing is written when
    the schema exists already (so a full disk can still be opened); a new file
    gets the schema.  Autocommit connection, usable from any thread, with a
    busy timeout of BUSY_TIMEOUT_S.  Raises StoreCorruptError when the file
    is not a usable store (not a database, quick_check not ok, unknown schema
    version), else the classified StoreError; the connection is closed then.

    Returns the connection and whether the whole file was checked: always
    with `full_check`, else only a file of up to SYNC_CHECK_BYTES; a larger
    one gets `edge.store_check.partial_check` here and the whole check in the
    background (`edge.store_check.BackgroundCheck`), so opening does not
    grow with the backlog.
    """
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                             timeout=BUSY_TIMEOUT_S)
    except (sqlite3.Error, OSError) as e:
        raise classify(e, "opening the store") from e
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise StoreCorruptError(f"unknown store schema version {version}")
        if version == 0:
            db.execute(f"PRAGMA page_size={int(page_size)}")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreBusyError(f"cannot use WAL journal (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        # Bound the WAL file on disk after checkpoints (SD card space).
        db.execute("PRAGMA journal_size_limit=4194304")
        if max_page_count is not None:
            db.execute(f"PRAGMA max_page_count={int(max_page_count)}")
        size = db.execute("PRAGMA page_count").fetchone()[0] * \
            db.execute("PRAGMA page_size").fetchone()[0]
        full = full_check or version == 0 or size <= SYNC_CHECK_BYTES
        problem = quick_check(db) if full else partial_check(db)
        if problem is not None:
            raise StoreCorruptError(problem)
        if version == 0:
            db.executescript(_DDL)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException as e:
        db.close()
        if isinstance(e, sqlite3.Error | OSError):
            raise classify(e, "opening the store") from e
        raise
    return db, full


def _salvage_seq(path: Path) -> int:
    """The highest seq a damaged store still shows (best effort, read-only; 0 if none)."""
    best = 0
    with contextlib.suppress(sqlite3.Error, OSError, ValueError, TypeError):
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
        try:
            for sql in ("SELECT max(seq) FROM outbox",
                        "SELECT max(value) FROM meta WHERE name IN ('high_seq', 'seq_reserved')"):
                with contextlib.suppress(sqlite3.Error, ValueError, TypeError):
                    best = max(best, int(db.execute(sql).fetchone()[0] or 0))
        finally:
            db.close()
    return best


def move_aside(path: Path, reason: str) -> tuple[str, int]:
    """Rename the store and its -wal/-shm to `<name>.corrupt-<UTC time>`.

    Returns (the alarm sentence, the highest seq still readable in it).
    Raises the classified StoreError when a file cannot be renamed.
    """
    salvaged = _salvage_seq(path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(path) + suffix)
            if src.exists():
                os.replace(src, Path(str(target) + suffix))
    except OSError as e:
        raise classify(e, "moving the damaged store aside") from e
    text = f"the event store was damaged ({reason}); moved aside to {target.name}"
    log.error("store_corrupt: %s; starting a fresh store", text)
    return text, salvaged


class SeqReservation:
    """Seqs reserved ahead of use, in blocks of SEQ_BLOCK, in the small state file.

    The file is rewritten (atomically, fsync'ed) only when a seq beyond the
    reservation is about to be used: one small write per SEQ_BLOCK events.
    """

    def __init__(self, path: Path) -> None:
        self._file = StateFile(path)
        doc = self._file.db.get(doc_id=1)
        value = doc.get("seq_reserved", 0) if isinstance(doc, dict) else 0
        used = doc.get("seq_used", 0) if isinstance(doc, dict) else 0
        # What the file says: every seq up to here may have been used.
        self.on_file: int = int(value) if isinstance(value, int) else 0
        # A seq known to have been used (written at close and once a minute): an
        # outbox whose own watermark is below it was rolled back (a restored copy).
        self.used: int = int(used) if isinstance(used, int) else 0
        self.damaged = self._file.damaged  # the file was there but unreadable
        self.upto = self.on_file

    def cover(self, seq: int) -> None:
        """Count seqs up to `seq` as reserved without writing (the outbox vouches for them)."""
        self.upto = max(self.upto, seq)

    def needs(self, seq: int) -> int | None:
        """The new reservation needed before `seq` may be used, or None."""
        return (seq // SEQ_BLOCK + 1) * SEQ_BLOCK if seq > self.upto else None

    def write(self, upto: int) -> None:
        """Reserve every seq up to `upto` on disk.  Raises the classified StoreError."""
        try:
            self._file.replace({"seq_reserved": upto, "seq_used": self.used})
        except OSError as e:
            raise classify(e, f"writing {self._file.path.name}") from e
        self.upto = max(self.upto, upto)
        self.on_file = upto

    def note_used(self, seq: int) -> None:
        """Record that seqs up to `seq` have been used (best effort: a failed write is
        only a weaker guard against a rolled-back outbox)."""
        if seq <= self.used:
            return
        try:
            self._file.replace({"seq_reserved": max(self.on_file, seq), "seq_used": seq})
        except OSError as e:
            log.warning("could not note the last seq used in %s: %s", self._file.path.name,
                        e.strerror)
            return
        self.used = seq

    def close(self) -> None:
        self._file.close()


@dataclass(slots=True)
class OpenedOutbox:
    db: sqlite3.Connection
    seqs: SeqReservation
    # The seq watermark: the highest seq stored, removed or dropped.
    last_seq: int
    # Seqs (first, last) that may have been lost: set for a new store when a
    # reservation (or a damaged store) shows seqs were used before; the store
    # announces them and writes `born` in one transaction.
    lost: tuple[int, int] | None
    # (code, sentence) alarms to raise: store_corrupt, state_unreadable, seq_state_lost.
    alarms: list[tuple[str, str]]
    # A new store (no birth marker, no seq): the store writes `born` first.
    new: bool = False
    # Why `lost`: store_replaced (a new store), store_rolled_back (an older copy).
    lost_reason: str = "store_replaced"
    # Whether the whole file passed quick_check (else it is checked in the background).
    checked: bool = True


def open_outbox(path: Path, *, page_size: int = 1024, max_page_count: int | None = None,
                full_check: bool = True) -> OpenedOutbox:
    """Open the store at `path` and its seq reservation, recovering from corruption.

    Creates the directory and a new store when missing.  A store that fails its
    integrity check is moved aside and a new one started; a new store (no
    `born` marker) continues after every seq that could have been used and
    reports that range as `lost`.  `page_size` and `max_page_count` as for
    `connect`.  Raises the classified StoreError (busy, full, read-only, I/O)
    with nothing changed; the caller retries later.  `full_check` False: a
    large store is checked whole only in the background (`connect`), and
    `OpenedOutbox.checked` is False.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise classify(e, f"creating {path.parent}") from e
    alarms: list[tuple[str, str]] = []
    salvaged = 0
    try:
        db, checked = connect(path, page_size, max_page_count, full_check=full_check)
    except StoreCorruptError as e:
        text, salvaged = move_aside(path, str(e))
        alarms.append(("store_corrupt", text))
        db, checked = connect(path, page_size, max_page_count)
    try:
        seqs = SeqReservation(state_path(path))
    except OSError as e:
        db.close()
        raise classify(e, "reading the seq reservation") from e
    try:
        born = db.execute("SELECT value FROM meta WHERE name='born'").fetchone() is not None
        high = high_seq(db)
        mirror = db.execute("SELECT value FROM meta WHERE name='seq_reserved'").fetchone()
    except sqlite3.Error as e:
        db.close()
        seqs.close()
        raise classify(e, "reading the store") from e
    known = max(seqs.on_file, int(mirror[0]) if mirror else 0, salvaged)
    if seqs.damaged:
        alarms.append(("state_unreadable", f"the seq reservation file was unreadable "
                       f"({seqs.damaged}); kept aside as .corrupt"))
    # A store is new when it has neither its birth marker nor any seq: a
    # store of an older version with events in it is not.
    new = not born and high == 0
    # Evidence that this is not a first installation: then a new store with
    # no reservation means the seq history is gone with both files.
    earlier = bool(seqs.damaged or alarms or (path.parent / "logins.json").exists())
    if new and known == 0 and earlier:
        alarms.append(("seq_state_lost", "the event store and its seq reservation are both "
                       "gone: new seq numbers may repeat ones the collector already has"))
    lost: tuple[int, int] | None = None
    last = high
    reason = "store_replaced"
    if new and known > 0:
        # A store that had to start again continues after every seq that
        # could have been used before, so no seq is ever reused.
        lost = (1, known)
        last = known
    elif not new and seqs.used > high:
        # An outbox older than what it has already used (a backup put back, a
        # copy from elsewhere): continue above, and announce what it lacks.
        lost = (high + 1, seqs.used)
        last = seqs.used
        reason = "store_rolled_back"
        alarms.append(("store_rolled_back", f"the event store is older than the seqs it has "
                       f"used ({high} < {seqs.used}); seq {high + 1}..{seqs.used} are announced "
                       "as lost"))
    seqs.cover(max(last, known))
    return OpenedOutbox(db, seqs, last, lost, alarms, new, reason, checked)


# -- the seq watermark and figures ------------------------------------------------

def high_seq(db: sqlite3.Connection) -> int:
    """The seq watermark: the highest seq pending or ever removed (0 for a new store)."""
    top = db.execute("SELECT max(seq) FROM outbox").fetchone()[0]
    removed = db.execute("SELECT value FROM meta WHERE name='high_seq'").fetchone()
    return max(int(top or 0), int(removed[0]) if removed else 0)


def raise_high_seq(db: sqlite3.Connection, seq: int, name: str = "high_seq") -> None:
    """Inside the caller's transaction: raise meta `name` to `seq` (never lowers it)."""
    db.execute("INSERT INTO meta(name, value) VALUES (?, ?) ON CONFLICT(name) "
               "DO UPDATE SET value = max(value, excluded.value)", (name, seq))


def drop_counts(db: sqlite3.Connection) -> dict[str, int]:
    """Events dropped so far, by reason (e.g. "store_full")."""
    return {str(name)[6:]: int(value) for name, value in
            db.execute("SELECT name, value FROM meta WHERE name LIKE 'drops.%'")}


def file_bytes(path: Path) -> int:
    """What the store takes on disk: the database and its WAL, in bytes."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.stat(str(path) + suffix).st_size
    return total


@dataclass(frozen=True, slots=True)
class StoreStats:
    depth: int  # pending events
    payload_bytes: int
    file_bytes: int  # database and WAL on disk
    oldest_created_ms: int | None  # when the oldest pending event was stored (Unix ms)
    last_seq: int
    drops: dict[str, int]  # events dropped, by reason


def read_stats(path: Path) -> StoreStats | None:
    """Read a store's figures without the daemon (for `status` when it is down).

    Read-only: changes nothing, creates nothing.  None when there is no store
    at `path` or it cannot be read.
    """
    if not path.exists():
        return None
    uri = f"file:{path}?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error:
        return None
    try:
        count, total = totals(db)
        row = db.execute("SELECT created_ms FROM outbox ORDER BY seq LIMIT 1").fetchone()
        high = high_seq(db)
        drops = drop_counts(db)
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return StoreStats(count, total, file_bytes(path), int(row[0]) if row else None,
                      high, drops)
