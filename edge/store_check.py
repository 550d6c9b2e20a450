"""What opening the outbox reads, kept independent of the backlog's size.

A store of 500,000 events took 1.29 s to open against 0.09 s for 10: a
`PRAGMA quick_check` over the whole file and a count and sum over every row.
Now:

- **Integrity.**  A file of up to SYNC_CHECK_BYTES is checked whole at open
  (`quick_check`), as before.  A larger one gets `partial_check` at open (the
  small tables whole, the outbox's B-tree at both ends: the pages every
  insert, read and delete touch first) and the whole `quick_check` in a
  `BackgroundCheck` thread on its own read-only connection after it is
  open.  `edge.store.Store` polls the check; a failure is handled as
  corruption met while running: the store is closed, opened again with the
  whole check, which fails, and is moved aside with store_corrupt.
- **Totals.**  Every write transaction leaves the pending count and payload
  bytes in meta (`save_totals`) with the first and last pending seq they were
  true for; opening reads them back and counts the rows only when they are
  missing or no longer fit (a store written by an older version).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Final

__all__ = ["SYNC_CHECK_BYTES", "BackgroundCheck", "partial_check", "quick_check",
           "save_totals", "totals"]

# The store's logger, whichever module of it speaks.
log = logging.getLogger("edge.store")

# Checked whole at open up to this size: about 15,000 events in 1 KB pages,
# tens of ms here and well under a second on a Pi's SD card.
SYNC_CHECK_BYTES: Final = 16 * 1024 * 1024
_CORRUPT: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def _problem(rows: list[tuple[object, ...]], what: str) -> str | None:
    """None for quick_check's "ok", else its first complaint (and how many more)."""
    lines = [str(r[0]) for r in rows]
    if lines == ["ok"]:
        return None
    more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
    return f"{what}: {lines[0][:200] if lines else 'no answer'}{more}"


def quick_check(db: sqlite3.Connection) -> str | None:
    """The whole file's quick_check: None when ok, else what is wrong."""
    return _problem(db.execute("PRAGMA quick_check").fetchall(), "quick_check")


def partial_check(db: sqlite3.Connection) -> str | None:
    """What can be checked without reading the whole outbox: meta and dedup
    whole (they stay small), the outbox's first and last rows."""
    for table in ("meta", "dedup"):
        problem = _problem(db.execute(f"PRAGMA quick_check({table})").fetchall(),
                           f"quick_check({table})")
        if problem is not None:
            return problem
    _ends(db)  # a damaged page on either edge raises SQLITE_CORRUPT
    return None


class BackgroundCheck:
    """`PRAGMA quick_check` of the store at `path` in a thread, on its own
    read-only connection (a WAL reader: it never blocks the writer).

    `failure()` is None until it has found damage; an error that is not
    damage (a busy or vanished file) leaves it None: the next open checks
    again.  `cancel()` interrupts it (the store is closing).
    """

    def __init__(self, path: Path) -> None:
        self._failure: str | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True,
                                        name="store-check")
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0,
                                 check_same_thread=False)
            with self._lock:
                if self._cancelled:
                    db.close()
                    return
                self._db = db
            try:
                self._failure = quick_check(db)
            finally:
                with self._lock:
                    self._db = None
                db.close()
        except sqlite3.Error as e:
            code = getattr(e, "sqlite_errorcode", 0) & 0xFF
            if code in _CORRUPT:
                self._failure = f"quick_check: {e}"
            elif not self._cancelled:
                log.warning("store: the background integrity check could not run (%s); "
                            "the store is checked again when it is next opened", e)
        finally:
            self._done.set()
        if self._failure is None and not self._cancelled:
            log.debug("store: background integrity check ok")

    def failure(self) -> str | None:
        """What the finished check found wrong (None: running, ok or inconclusive)."""
        return self._failure if self._done.is_set() else None

    def wait(self, timeout: float) -> bool:
        """Whether the check has finished within `timeout` seconds."""
        return self._done.wait(timeout)

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._db.interrupt()
        self._thread.join(5.0)


def totals(db: sqlite3.Connection) -> tuple[int, int]:
    """(pending events, their payload bytes): as the last write transaction left
    them in meta (`save_totals`) while they still fit the outbox's first and
    last seq, else counted over the whole table."""
    row = db.execute("SELECT value FROM meta WHERE name='totals'").fetchone()
    if row is not None:
        with contextlib.suppress(ValueError, TypeError):
            count, size, first, last = (int(x) for x in str(row[0]).split())
            if (first, last) == _ends(db):
                return count, size
    count, size = db.execute(
        "SELECT count(*), coalesce(sum(length(payload)), 0) FROM outbox").fetchone()
    return int(count), int(size)


def save_totals(db: sqlite3.Connection, count: int, size: int) -> None:
    """Inside the caller's write transaction: the pending count and bytes after it."""
    first, last = _ends(db)
    db.execute("INSERT INTO meta(name, value) VALUES ('totals', ?) ON CONFLICT(name) "
               "DO UPDATE SET value = excluded.value", (f"{count} {size} {first} {last}",))


def _ends(db: sqlite3.Connection) -> tuple[int, int]:
    """The first and last pending seq (0, 0 when none): two B-tree descents."""
    first, last = db.execute("SELECT (SELECT min(seq) FROM outbox), "
                             "(SELECT max(seq) FROM outbox)").fetchone()
    return int(first or 0), int(last or 0)
