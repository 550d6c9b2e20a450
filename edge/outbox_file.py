"""The outbox's files: open, check, recover, and the seq watermark and reservation.

Everything here is about the files on disk rather than about events: opening
the SQLite database with its pragmas, checking it, moving an unreadable one
aside, keeping seq from ever repeating, and reading the figures without the
daemon.  The outbox proper (commit, limits, removal, pending) is `edge.store`.

Files, all in the store's directory::

    outbox.sqlite (+ -wal, -shm)
        SQLite in WAL mode, synchronous=FULL, `user_version` SCHEMA_VERSION.
    outbox.sqlite.state.json
        `{"seq_reserved": N}` in TinyDB with crash-safe writes (`edge.state`):
        every seq up to N may have been used.
    outbox.sqlite.corrupt-<UTC time> (+ -wal, -shm)
        an unreadable store, moved aside at start for inspection.

Tables::

    outbox(seq INTEGER PRIMARY KEY, topic, payload, created_ms)
        pending events in publishing order.
    dedup(source, key, at)
        the last keys seen per source (a console's (seq, uptime), a terminal's
        record id), written in the same transaction as the event, so "stored"
        and "known as stored" can never disagree after a crash.  One B-tree,
        no index on `at`: pruning scans a source's few thousand keys once
        every few hundred inserts, which is cheaper than a second index page
        written on every insert.
    meta(name, value)
        drop counters (`drops.<reason>`), and `high_seq`: the seq watermark,
        the highest seq ever removed, so a seq is never reused even when the
        outbox has been emptied.  (It is written with the removals, which are
        batched, instead of on every insert as AUTOINCREMENT's sqlite_sequence
        would be.)

Recovery: an unreadable store at start (it fails to open, to switch to WAL,
`PRAGMA quick_check`, or has an unknown schema version) is moved aside, an
alarm is raised and a fresh store started.  The highest seq is also reserved
in blocks of SEQ_BLOCK in the state file, written before any seq of a new
block is committed, so even a store lost to corruption does not make seq
numbers repeat: the fresh store continues after the reservation, and the
range it may have lost is reported (`OpenedOutbox.lost`).
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

from edge.state import open_state

__all__ = [
    "SCHEMA_VERSION",
    "SEQ_BLOCK",
    "OpenedOutbox",
    "SeqReservation",
    "StoreDiskFullError",
    "StoreError",
    "StoreStats",
    "connect",
    "drop_counts",
    "file_bytes",
    "high_seq",
    "is_disk_full",
    "move_aside",
    "open_outbox",
    "raise_high_seq",
    "read_stats",
    "state_path",
    "totals",
]

# The store's logger, whichever module of it speaks.
log = logging.getLogger("edge.store")

SCHEMA_VERSION: Final = 1
SEQ_BLOCK: Final = 10_000

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


# -- faults -------------------------------------------------------------------

class StoreError(Exception):
    """The store could not do what was asked; nothing was changed."""


class StoreDiskFullError(StoreError):
    """The file system (or the store's page quota) is full."""


def is_disk_full(e: sqlite3.Error) -> bool:
    """Whether an SQLite error means the disk or the page quota is full (SQLITE_FULL)."""
    return getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or \
        "full" in str(e).lower()


# -- opening and recovery ---------------------------------------------------------

def state_path(path: Path) -> Path:
    """The seq reservation file of the store at `path`: `<name>.state.json` beside it."""
    return path.with_name(path.name + ".state.json")


def connect(path: Path, page_size: int, max_page_count: int | None) -> sqlite3.Connection:
    """Open (or create) the store at `path` in WAL mode, synchronous=FULL, and check it.

    `page_size` is in bytes (it applies to a new file only); `max_page_count`
    caps the file at that many pages (None: no cap).  The schema is created
    when missing.  Autocommit connection (isolation_level None), usable from
    any thread.  Raises sqlite3.DatabaseError when the file is not a usable
    store: not a database, no WAL, `quick_check` not ok, or an unknown schema
    version; the connection is closed then.
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute(f"PRAGMA page_size={int(page_size)}")
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.DatabaseError(f"cannot use WAL journal (got {mode})")
        db.execute("PRAGMA synchronous=FULL")
        # Bound the WAL file on disk after checkpoints (SD card space).
        db.execute("PRAGMA journal_size_limit=4194304")
        if max_page_count is not None:
            db.execute(f"PRAGMA max_page_count={int(max_page_count)}")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError(f"unknown store schema version {version}")
        db.executescript(_DDL)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.close()
        raise
    return db


def move_aside(path: Path, reason: str) -> str:
    """Rename the store and its -wal/-shm to `<name>.corrupt-<UTC time>`; returns the alarm.

    Raises OSError when a file cannot be renamed.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            os.replace(src, Path(str(target) + suffix))
    alarm = f"store_corrupt: unreadable store moved aside to {target.name} ({reason})"
    log.error("%s; starting a fresh store", alarm)
    return alarm


class SeqReservation:
    """Seqs reserved ahead of use, in blocks of SEQ_BLOCK, in the small state file.

    The file is rewritten (atomically, fsync'ed) only when a seq beyond the
    reservation is about to be used: one small write per SEQ_BLOCK events.
    """

    def __init__(self, path: Path) -> None:
        self._state = open_state(path)
        doc = self._state.get(doc_id=1)
        # What the file says: every seq up to here may have been used.
        self.on_file: int = int(doc.get("seq_reserved", 0)) if doc else 0
        self._upto = self.on_file

    def cover(self, seq: int) -> None:
        """Count seqs up to `seq` (already used, in the store) as reserved, without writing."""
        self._upto = max(self._upto, seq)

    def reserve(self, seq: int) -> None:
        """Make sure seqs up to `seq` are reserved on disk before any of them is committed.

        Raises OSError when the state file cannot be written.
        """
        if seq > self._upto:
            self._upto = (seq // SEQ_BLOCK + 1) * SEQ_BLOCK
            if self._state.get(doc_id=1) is None:
                self._state.insert({"seq_reserved": self._upto})
            else:
                self._state.update({"seq_reserved": self._upto}, doc_ids=[1])

    def close(self) -> None:
        self._state.close()


@dataclass(frozen=True, slots=True)
class OpenedOutbox:
    db: sqlite3.Connection
    seqs: SeqReservation
    # The seq watermark: the highest seq stored, removed, or lost with a replaced store.
    last_seq: int
    # Seqs (first, last) that may have been lost with a replaced store, else None.
    lost: tuple[int, int] | None
    # Alarms to raise (a store moved aside).
    alarms: list[str]


def open_outbox(path: Path, *, page_size: int = 1024,
                max_page_count: int | None = None) -> OpenedOutbox:
    """Open the store at `path` and its seq reservation, recovering from a corrupt store.

    Creates the directory and a fresh store when missing.  An unreadable store
    is moved aside (an alarm in `alarms`) and a fresh one started; a fresh
    store continues after every reserved seq and reports those as `lost`.
    `page_size` and `max_page_count` as for `connect`.  Raises OSError or
    sqlite3.Error when even a fresh store cannot be opened.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    seqs = SeqReservation(state_path(path))
    fresh = not path.exists()
    alarms: list[str] = []
    try:
        db = connect(path, page_size, max_page_count)
    except sqlite3.DatabaseError as e:
        alarms.append(move_aside(path, str(e)))
        fresh = True
        db = connect(path, page_size, max_page_count)
    high = high_seq(db)
    # Seqs up to here that the collector has not got were lost with a
    # replaced store; the daemon announces them as dropped.
    lost: tuple[int, int] | None = None
    if fresh and seqs.on_file > high:
        # A store that had to start again continues after every seq that
        # could have been used before, so no seq is ever reused.
        high = seqs.on_file
        db.execute("INSERT INTO meta(name, value) VALUES ('high_seq', ?)", (high,))
        lost = (1, high)
    seqs.cover(high)
    return OpenedOutbox(db, seqs, high, lost, alarms)


# -- the seq watermark and figures ------------------------------------------------

def high_seq(db: sqlite3.Connection) -> int:
    """The seq watermark: the highest seq pending or ever removed (0 for a new store)."""
    top = db.execute("SELECT max(seq) FROM outbox").fetchone()[0]
    removed = db.execute("SELECT value FROM meta WHERE name='high_seq'").fetchone()
    return max(int(top or 0), int(removed[0]) if removed else 0)


def raise_high_seq(db: sqlite3.Connection, seq: int) -> None:
    """Inside the caller's transaction: raise the watermark to `seq` (never lowers it)."""
    db.execute("INSERT INTO meta(name, value) VALUES ('high_seq', ?) ON CONFLICT(name) "
               "DO UPDATE SET value = max(value, excluded.value)", (seq,))


def totals(db: sqlite3.Connection) -> tuple[int, int]:
    """(pending events, their payload bytes)."""
    count, total = db.execute(
        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
    return int(count), int(total)


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
        db = sqlite3.connect(uri, uri=True)
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
