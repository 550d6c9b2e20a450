"""Which dedup keys the outbox keeps: the newest DEDUP_KEEP of each source.

A key's `at` is the seq it was stored with, so a source's keys in `at` order
are its keys in the order they were stored.  Pruning used to find the cut-off
with `ORDER BY at DESC LIMIT 1 OFFSET 4095` every 256 keys, a sort of all of
the source's keys in a temporary B-tree (5% of the daemon's time per event).
`DedupKeys` keeps the `at` of each source's newest DEDUP_KEEP keys in memory
instead, read once per source from the table (at its first pruning since the
store was opened) and then extended by every key a commit inserted, so a
pruning is one range delete below a known cut-off.

It only ever deletes keys the old query deleted too: the cut-off is the
DEDUP_KEEP-th newest `at` of keys that are in the table (inserted by a commit
that succeeded, never a duplicate that was ignored, reset when a source's
keys are forgotten), so at least DEDUP_KEEP keys stay, ties at the cut-off
included.  An index on (source, at) would have done it in SQL, at the price
of one more B-tree written in every fsync'ed insert.
"""

from __future__ import annotations

import collections
import logging
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = ["DEDUP_KEEP", "PRUNE_EVERY", "DedupKeys"]

# The store's logger, whichever module of it speaks.
log = logging.getLogger("edge.store")

DEDUP_KEEP: Final = 4096
PRUNE_EVERY: Final = 256


class DedupKeys:
    """The newest keys' `at` per source, for one open store (`reset` on each open)."""

    def __init__(self) -> None:
        self._newest: dict[str, collections.deque[int]] = {}
        self._since: dict[str, int] = {}

    def reset(self) -> None:
        self._newest.clear()
        self._since.clear()

    def committed(self, forget: Iterable[str], keyed: Sequence[tuple[str, int]]) -> list[str]:
        """A commit that deleted `forget`'s keys, then inserted `keyed` (source, at),
        succeeded; returns the sources due for `prune`."""
        for source in forget:
            self._newest[source] = collections.deque(maxlen=DEDUP_KEEP)
        due: list[str] = []
        for source, at in keyed:
            newest = self._newest.get(source)
            if newest is not None:
                newest.append(at)
            n = self._since.get(source, 0) + 1
            if n >= PRUNE_EVERY:
                n = 0
                if source not in due:
                    due.append(source)
            self._since[source] = n
        return due

    def prune(self, db: sqlite3.Connection, source: str) -> None:
        """Delete `source`'s keys older than its newest DEDUP_KEEP (outside a
        transaction; a failure is logged and the next pruning tries again)."""
        try:
            newest = self._newest.get(source)
            if newest is None:
                rows = db.execute("SELECT at FROM dedup WHERE source=? ORDER BY at DESC LIMIT ?",
                                  (source, DEDUP_KEEP)).fetchall()
                newest = collections.deque((int(r[0]) for r in reversed(rows)),
                                           maxlen=DEDUP_KEEP)
                self._newest[source] = newest
            if len(newest) == DEDUP_KEEP:
                db.execute("DELETE FROM dedup WHERE source=? AND at < ?", (source, newest[0]))
        except sqlite3.Error as e:
            log.warning("dedup pruning failed (will retry): %s", e)
