"""The outbox's tail cache, and reading pending events in seq order.

Freshly committed events are kept in memory too, so the publisher does not
read back what was just written (the common case: nothing is queued); a
backlog is read ahead in chunks into the same cache.  Reads stop at a seq
the caller names: with the fsync in its own thread (`edge.committer`) a
committed event is offered for publishing only once it is durable, since a
published event that a power cut then takes from the store would be stored
again, under a new event_id, when its device sends it again.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import Final

from edge.store_write import Pending

__all__ = ["READ_AHEAD", "TAIL_CACHE", "Tail"]

log = logging.getLogger("edge.store")

TAIL_CACHE: Final = 2048
READ_AHEAD: Final = 256


class Tail(dict[int, Pending]):
    """Pending events by seq, the newest TAIL_CACHE of those committed or read."""

    def trim(self) -> None:
        while len(self) > TAIL_CACHE:
            del self[next(iter(self))]

    def read(self, db: sqlite3.Connection, after_seq: int, limit: int,
             top: int) -> list[Pending]:
        """Up to `limit` pending events with after_seq < seq <= top, in seq order."""
        if after_seq >= top:
            return []
        limit = min(limit, top - after_seq)
        if after_seq + 1 in self:
            out: list[Pending] = []
            seq = after_seq + 1
            while len(out) < limit and seq in self:
                out.append(self[seq])
                seq += 1
            return out
        # sqlite3.Error goes to the store, which tells damage from a busy moment.
        rows = db.execute(
            "SELECT seq, topic, payload FROM outbox WHERE seq > ? AND seq <= ? "
            "ORDER BY seq LIMIT ?", (after_seq, top, max(limit, READ_AHEAD))).fetchall()
        got = [Pending(int(s), str(t), bytes(p)) for s, t, p in rows]
        for p in got:
            self[p.seq] = p
        self.trim()
        return got[:limit]
