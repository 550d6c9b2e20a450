"""Intake storage: events and side messages in, watermarks out.

What makes intake exactly-once:

- `events` has the primary key (site, edge, event_id): a second delivery of
  the same event, by re-publish or by another collector instance, inserts
  nothing (`ON CONFLICT DO NOTHING`);
- a batch of messages is committed in one transaction, and the intake
  acknowledges them (PUBACK) only after the commit: a crash before it means
  the broker delivers them again;
- each edge's watermark (every seq <= it is committed, or declared dropped by
  the edge) only grows, and is computed from what is committed, so several
  instances writing the same database agree on it.  Rows are locked in a
  fixed order (edges sorted, events sorted by seq) so concurrent instances
  cannot deadlock each other on PostgreSQL.  The computation itself is
  `advance_watermark`, a pure function.

Losses: `dropped` events (the edge's own store was full) carry seq ranges the
watermark passes; `device_lost` events (a device lost events before the edge
could store them: a console's ring overflowed, a terminal's flash was full)
are ordinary events with their count in `lost`, summed per device by `gaps`.

Poison: a message the database refuses (a value out of a column's range, a
string it cannot hold; schema validation in `collector.intake` keeps these
out, this is the second line) must not hold up everyone else's.  When a
batch fails with anything but an outage, its messages are stored again one
by one, each in a savepoint of one transaction, and the ones that still fail
are quarantined with the error's class and the field at fault if it can be
told (never the value; `collector.poison`), counted under
`quarantined:store`.  An outage (`DatabaseError`, see `collector.db`) is
raised: the batch is not acknowledged and is tried again.  Either way
nothing is done twice: the one-by-one pass commits all or nothing, and a
quarantined message is kept once, by its digest, however often it comes.

Timesync: an event recorded while the edge's clock was not synchronised
(`time.synced` false) gets `corrected_ms` = anchor wall + (event mono_ns -
anchor mono_ns) as soon as an anchor for the same boot is known, whichever
arrives first.  A correction that would leave the contract's wall-time range
(`WALL_MIN_MS`..`WALL_MAX_MS`, edge.contract.timefmt: an anchor read a century
of uptime after the event, say) is not applied: the event keeps its recorded
time, itself in the range (classify quarantines the rest, and `_event_row`
refuses it).  Reports use corrected_ms when present, else wall_ms.

Edges: a row in `edges` is made by a message that was stored (an event, a
side message), never by a quarantined one, whose topic's site and edge may be
anything.  Rows an earlier version made that way (nothing but a name, never
seen) are left out of `watermarks`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from collector.db import (
    EVENT_COLS,
    EVENT_TYPES,
    Cursor,
    Database,
    DatabaseError,
    EdgeKey,
    RefusedError,
)
from collector.poison import (
    INT64,
    digest,
    field_path,
    printable,
    refusal_reason,
    stored_payload,
)
from edge.contract.timefmt import WALL_MAX_MS, WALL_MIN_MS

__all__ = ["IngestResult", "Item", "advance_watermark", "counters", "device_losses",
           "field_path", "gaps", "ingest", "missing_ranges", "quarantined", "sweep", "wall_ms",
           "watermarks"]

_INSERT_EVENT: Final = (f"INSERT INTO events ({', '.join(EVENT_COLS)}) VALUES "
                        f"({', '.join('?' * len(EVENT_COLS))}) "
                        "ON CONFLICT (site, edge, event_id) DO NOTHING")
# Rows per multi-row INSERT and ids per look-up on SQLite: within the 999 bound
# values an SQLite before 3.32 allows a statement.
_ROWS_PER_INSERT: Final = 999 // len(EVENT_COLS)
_IDS_PER_SELECT: Final = 990
# PostgreSQL: a batch as one statement, a column per array, sent in binary
# (`%b`: psycopg's text arrays escape every element in Python).
_INSERT_ARRAYS: Final = (
    f"INSERT INTO events ({', '.join(EVENT_COLS)}) SELECT * FROM unnest("
    + ", ".join(f"%b::{EVENT_TYPES[c].lower()}[]" for c in EVENT_COLS)
    + ") ON CONFLICT (site, edge, event_id) DO NOTHING RETURNING site, edge, event_id")
# Committed seqs above the watermark are read in pages of this many.
_PAGE: Final = 2000

log = logging.getLogger(__name__)

# RFC 3339 in UTC: seconds required, any number of fraction digits, 'Z'.
# ASCII digits only (`\d` would take any script's), `\Z` not `$` (which
# also matches before a trailing newline).
_WALL: Final = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?Z\Z")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def wall_ms(text: str) -> int:
    """RFC 3339 UTC ('...Z', optional fraction of any length) to ms since the epoch.

    The fraction is cut to milliseconds (not rounded: an event stays in its
    second); a leap second (:60) is the first instant of the next second.
    ValueError if `text` is not such a time or not a real date and time.
    """
    m = _WALL.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("not an RFC 3339 UTC time")
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    if s > 60:
        raise ValueError("seconds out of range")
    at = datetime(y, mo, d, h, mi, min(s, 59), tzinfo=UTC)  # ValueError if not a real date
    frac = (m.group(7) or "")[:3].ljust(3, "0")
    return (at - _EPOCH) // _MS + int(frac) + (1000 if s == 60 else 0)


@dataclass(slots=True)
class IngestResult:
    stored: int = 0
    stored_kinds: dict[str, int] = field(default_factory=dict)  # event kind -> new rows
    duplicates: int = 0
    quarantined: int = 0
    watermarks: dict[EdgeKey, int] = field(default_factory=dict)  # the ones that moved
    dropped_ranges: list[tuple[str, str, int, int, str]] = field(default_factory=list)
    # (site, edge, device id, lost, reason) of device_lost events newly stored
    device_losses: list[tuple[str, str, str, int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Item:
    """One message for `ingest`: an event, a side message, or a quarantine."""

    kind: str  # event | status | devices | health | timesync | quarantine
    site: str = ""
    edge: str = ""
    body: Any = None
    topic: str = ""
    raw: bytes = b""
    reason: str = ""


# -- the watermark, pure ------------------------------------------------------------

def advance_watermark(watermark: int, seqs: Iterable[int],
                      dropped: Iterable[tuple[int, int]]) -> int:
    """The watermark after `watermark`, over committed `seqs` and declared-dropped ranges.

    It moves one seq at a time while the next seq is committed, and jumps to
    the end of a dropped range (from_seq, to_seq, inclusive) that covers the
    next seq; it stops at the first seq that is neither.
    """
    wm = watermark
    ordered = sorted(seqs)
    ranges = sorted(dropped)
    i = 0
    while True:
        while i < len(ordered) and ordered[i] <= wm:
            i += 1
        if i < len(ordered) and ordered[i] == wm + 1:
            wm += 1
            continue
        cover = next((b for a, b in ranges if a <= wm + 1 <= b), None)
        if cover is None:
            return wm
        wm = cover


def missing_ranges(watermark: int, max_seq: int, have: Iterable[int],
                   dropped: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Seq ranges above `watermark` up to `max_seq` neither committed (`have`) nor dropped.

    From what is known, not seq by seq: the committed seqs and dropped ranges,
    sorted, leave the gaps between them, so the time is O(n log n) in their
    number whatever the size of the gaps (one event at seq 2^53 - 1 leaves a
    gap of 2^53 - 2).  A range ending before it starts covers nothing.
    """
    covered = sorted([(q, q) for q in have if watermark < q <= max_seq]
                     + [(a, b) for a, b in dropped if a <= b and b > watermark and a <= max_seq])
    missing: list[tuple[int, int]] = []
    q = watermark + 1  # the first seq not known to be covered
    for a, b in covered:
        if q > max_seq:
            break
        if a > q:
            missing.append((q, a - 1))
        q = max(q, b + 1)
    if q <= max_seq:
        missing.append((q, max_seq))
    return missing


# -- intake -------------------------------------------------------------------------

def ingest(db: Database, items: Sequence[Item], now_ms: int | None = None) -> IngestResult:
    """Store a batch in one transaction.  Re-running it changes nothing.

    If the database refuses the batch's data (or storing raises anything
    but an outage), each message is stored on its own, in a savepoint of one
    transaction, and those refused are quarantined: one bad message never
    holds up the rest.  An outage raises DatabaseError, with nothing of the
    batch committed.
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        with db.transaction() as cur:
            return _store(db, cur, items, now)
    except Exception as e:
        if not _poison(e):
            raise
        first = e
    res = IngestResult()
    with db.transaction() as cur:
        if len(items) == 1:
            _quarantine_failed(db, cur, items[0], first, now=now, res=res)
        else:
            # In `_store`'s order, so rows are locked in the same order.
            for it in sorted(items, key=_order):
                part = IngestResult()
                try:
                    with db.savepoint(cur):
                        part = _store(db, cur, [it], now)
                except Exception as e:
                    if not _poison(e):
                        raise
                    _quarantine_failed(db, cur, it, e, now=now, res=part)
                _merge(res, part)
    return res


def _order(it: Item) -> tuple[str, str, int, int]:
    """Side messages before events, by edge; events by seq (any seq: this never raises)."""
    if it.kind != "event":
        return (it.site, it.edge, 0, 0)
    seq = it.body.get("seq") if isinstance(it.body, dict) else None
    return (it.site, it.edge, 1, seq if type(seq) is int else 0)


def _poison(e: Exception) -> bool:
    """Whether `e` is the message's fault (quarantine it), not an outage (retry)."""
    return isinstance(e, RefusedError) or not isinstance(e, DatabaseError)


def _merge(into: IngestResult, part: IngestResult) -> None:
    into.stored += part.stored
    for kind, n in part.stored_kinds.items():
        into.stored_kinds[kind] = into.stored_kinds.get(kind, 0) + n
    into.duplicates += part.duplicates
    into.quarantined += part.quarantined
    for key, wm in part.watermarks.items():  # watermarks only grow
        into.watermarks[key] = max(wm, into.watermarks.get(key, wm))
    into.dropped_ranges.extend(part.dropped_ranges)
    into.device_losses.extend(part.device_losses)


def _quarantine_failed(db: Database, cur: Cursor, it: Item, e: Exception, *, now: int,
                       res: IngestResult) -> None:
    """Quarantine a message the database refused, naming the error and the field."""
    reason = refusal_reason(it.kind, it.body, e)
    log.error("%s message on %s refused by the database (%s): quarantined", it.kind,
              printable(it.topic), reason)
    raw = stored_payload(it.kind, it.body, it.raw)
    topic = it.topic or f"feedback/v1/{it.site}/{it.edge}/{it.kind}"
    try:
        with db.savepoint(cur):
            _quarantine(cur, res, topic=printable(topic), raw=raw, reason=reason,
                        key=digest(topic, raw), now=now)
    except RefusedError as again:
        # Printable ASCII and bytes refused: the database is at fault, not the message.
        raise DatabaseError(f"the quarantine refused a message: {again.error}") from again


def _quarantine(cur: Cursor, res: IngestResult, *, topic: str, raw: bytes, reason: str,
                key: str, now: int) -> None:
    """Keep a message aside, once: the same message again counts as a duplicate."""
    cur.execute("INSERT INTO quarantine (topic, payload, reason, received_ms, digest) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
                (topic, raw, reason, now, key))
    if cur.rowcount == 1:
        _count(cur, f"quarantined:{reason.partition(':')[0]}", 1)
        res.quarantined += 1
    else:
        _count(cur, "duplicates", 1)
        res.duplicates += 1


def _store(db: Database, cur: Cursor, items: Sequence[Item], now: int) -> IngestResult:
    """Store `items` in the transaction of `cur`."""
    res = IngestResult()
    top_seq: dict[EdgeKey, int] = {}
    events = sorted((i for i in items if i.kind == "event"),
                    key=lambda i: (i.site, i.edge, i.body["seq"]))
    # By edge (a stable sort keeps each edge's own order): every transaction
    # locks edges rows in the same order.
    others = sorted((i for i in items if i.kind != "event"), key=lambda i: (i.site, i.edge))
    anchors: dict[tuple[str, str, str], tuple[int, int] | None] = {}
    # Only what is stored makes an edge: a quarantined message's topic may name
    # anything ("CLINIC", a bidi override), and an edge would be listed by
    # `fleet` and sent a retained ack on every reconnect.
    for key in sorted({(i.site, i.edge) for i in items if i.site and i.kind != "quarantine"}):
        cur.execute("INSERT INTO edges (site, edge) VALUES (?, ?) "
                    "ON CONFLICT (site, edge) DO NOTHING", key)
    for it in others:
        _side(cur, it, now, res)
    rows = []
    for it in events:
        row = _event_row(it.body, now)
        if not row["synced"]:
            akey = (it.site, it.edge, row["boot_id"])
            if akey not in anchors:
                cur.execute("SELECT mono_ns, wall_ms FROM anchors WHERE site = ? AND "
                            "edge = ? AND boot_id = ?", akey)
                found = cur.fetchone()
                anchors[akey] = None if found is None else (int(found[0]), int(found[1]))
            anchor = anchors[akey]
            if anchor is not None:
                corrected = anchor[1] + (row["mono_ns"] - anchor[0]) // 10**6
                if WALL_MIN_MS <= corrected <= WALL_MAX_MS:  # else not applied
                    row["corrected_ms"] = corrected
        rows.append(row)
        key = (it.site, it.edge)
        top_seq[key] = max(top_seq.get(key, 0), row["seq"])
    new = _insert_events(db, cur, rows)
    for row in new:
        res.stored_kinds[row["kind"]] = res.stored_kinds.get(row["kind"], 0) + 1
        if row["kind"] == "dropped":
            res.dropped_ranges.append((row["site"], row["edge"], row["from_seq"],
                                       row["to_seq"], row["reason"]))
        elif row["kind"] == "device_lost":
            res.device_losses.append((row["site"], row["edge"], row["device_id"],
                                      row["lost"], row["reason"]))
    res.stored += len(new)
    duplicates = len(rows) - len(new)
    res.duplicates += duplicates
    for key in sorted(top_seq):
        cur.execute(f"UPDATE edges SET max_seq = {db.greatest}(max_seq, ?), "
                    "last_seen_ms = ? WHERE site = ? AND edge = ?",
                    (top_seq[key], now, *key))
        moved = _advance(db, cur, key)
        if moved is not None:
            res.watermarks[key] = moved
    if duplicates:
        _count(cur, "duplicates", duplicates)
    return res


def _insert_events(db: Database, cur: Cursor, rows: list[dict[str, Any]]
                   ) -> list[dict[str, Any]]:
    """Insert `rows` (in their order) and return those that were new; of two rows
    with one event_id the first, as inserting them one by one would.

    A batch goes in with a few statements, not one per row.  On PostgreSQL
    each statement is a round trip to the server.  With SQLite, each statement
    releases the GIL and must take it back from paho's thread, which may hold
    it for a switch interval: one INSERT per row made intake wait on paho
    (measured: most of the main thread's time, though a row costs
    microseconds alone).
    """
    if len(rows) < 2 or not all(map(_text_key, rows)):
        new = []
        for row in rows:
            cur.execute(_INSERT_EVENT, [row[c] for c in EVENT_COLS])
            if cur.rowcount == 1:
                new.append(row)
        return new
    if db.dialect == "postgres":
        # One statement, a column per array: its text is short, so psycopg
        # parses it once (a VALUES list of 500 rows it parsed in Python every
        # time).  RETURNING names the rows inserted, so a row already there (a
        # duplicate, or one another instance committed meanwhile) is told apart.
        cur.execute(_INSERT_ARRAYS, [[row[c] for row in rows] for c in EVENT_COLS])
        inserted = {(str(s), str(e), str(i)) for s, e, i in cur.fetchall()}
        new = []
        for row in rows:
            key = (row["site"], row["edge"], row["event_id"])
            if key in inserted:
                inserted.discard(key)  # a second row with this id was not inserted
                new.append(row)
        return new
    # SQLite: the transaction (BEGIN IMMEDIATE) holds the database's write lock,
    # so what is there now is what the insert would find.  RETURNING is not
    # used: sqlite3 steps (and releases the GIL) once per row it returns.
    seen = _present(cur, rows)
    new = []
    for row in rows:
        key = (row["site"], row["edge"], row["event_id"])
        if key not in seen:
            seen.add(key)
            new.append(row)
    for start in range(0, len(new), _ROWS_PER_INSERT):
        chunk = new[start:start + _ROWS_PER_INSERT]
        cur.execute(_insert_values(len(chunk)), [row[c] for row in chunk for c in EVENT_COLS])
    return new


def _present(cur: Cursor, rows: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """The keys of `rows` already in `events` (by the primary key's index)."""
    by_edge: dict[EdgeKey, list[str]] = {}
    for row in rows:
        by_edge.setdefault((row["site"], row["edge"]), []).append(row["event_id"])
    found: set[tuple[str, str, str]] = set()
    for (site, edge), ids in by_edge.items():
        for start in range(0, len(ids), _IDS_PER_SELECT):
            part = ids[start:start + _IDS_PER_SELECT]
            cur.execute(f"SELECT event_id FROM events WHERE site = ? AND edge = ? AND "
                        f"event_id IN ({', '.join('?' * len(part))})", (site, edge, *part))
            found.update((site, edge, str(r[0])) for r in cur.fetchall())
    return found


@functools.lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_values(n: int) -> str:
    row = f"({', '.join('?' * len(EVENT_COLS))})"
    return (f"INSERT INTO events ({', '.join(EVENT_COLS)}) VALUES {', '.join([row] * n)} "
            "ON CONFLICT (site, edge, event_id) DO NOTHING")


def _text_key(row: dict[str, Any]) -> bool:
    """Whether the row's key is text, which RETURNING gives back unchanged
    (classify lets nothing else through; the store's own line may see more)."""
    return type(row["site"]) is str and type(row["edge"]) is str \
        and type(row["event_id"]) is str


def _side(cur: Cursor, it: Item, now: int, res: IngestResult) -> None:
    key = (it.site, it.edge)
    if it.kind == "quarantine":
        _quarantine(cur, res, topic=it.topic, raw=it.raw, reason=it.reason,
                    key=digest(it.topic, it.raw), now=now)
    elif it.kind == "status":
        b = it.body
        cur.execute("UPDATE edges SET state = ?, state_since = ?, version = ?, boot_id = ?, "
                    "last_seen_ms = ? WHERE site = ? AND edge = ?",
                    (b["state"], b["since"], b["version"], b["boot_id"], now, *key))
    elif it.kind == "devices":
        cur.execute("UPDATE edges SET devices = ?, last_seen_ms = ? WHERE site = ? AND "
                    "edge = ?", (json.dumps(it.body), now, *key))
    elif it.kind == "health":
        cur.execute("UPDATE edges SET health = ?, health_ms = ?, last_seen_ms = ? "
                    "WHERE site = ? AND edge = ?", (json.dumps(it.body), now, now, *key))
    elif it.kind == "timesync":
        b = it.body
        anchor_wall = wall_ms(b["wall"])
        if not WALL_MIN_MS <= anchor_wall <= WALL_MAX_MS:
            raise ValueError("wall is outside the contract's range")  # classify says so first
        cur.execute("UPDATE edges SET last_seen_ms = ? WHERE site = ? AND edge = ?",
                    (now, *key))
        cur.execute("INSERT INTO anchors (site, edge, boot_id, mono_ns, wall_ms) VALUES "
                    "(?, ?, ?, ?, ?) ON CONFLICT (site, edge, boot_id) DO NOTHING",
                    (*key, b["boot_id"], b["mono_ns"], anchor_wall))
        if cur.rowcount == 1:
            # Floor division, as `_store` does in Python: SQL's `/` truncates, so
            # an event 0.5 ms before the anchor would land 1 ms later than when
            # the anchor arrives first.  A correction outside the range is not
            # applied, as in `_store`.  Every term fits 64 bits: mono_ns
            # differences stay below 2^63 (the schema's ranges), in ms far below.
            m = b["mono_ns"]
            corrected = ("(? + CASE WHEN mono_ns >= ? THEN (mono_ns - ?) / 1000000 "
                         "ELSE -((? - mono_ns + 999999) / 1000000) END)")
            terms = (anchor_wall, m, m, m)
            cur.execute(f"UPDATE events SET corrected_ms = {corrected} "
                        "WHERE site = ? AND edge = ? AND boot_id = ? AND synced = 0 "
                        f"AND corrected_ms IS NULL AND {corrected} BETWEEN ? AND ?",
                        (*terms, *key, b["boot_id"], *terms, WALL_MIN_MS, WALL_MAX_MS))


def _count(cur: Cursor, name: str, n: int) -> None:
    cur.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) "
                "DO UPDATE SET value = counters.value + excluded.value", (name, n))


def _advance(db: Database, cur: Cursor, key: EdgeKey) -> int | None:
    """Move the edge's watermark over every committed or declared-dropped seq."""
    cur.execute("SELECT watermark FROM edges WHERE site = ? AND edge = ?" + db.for_update, key)
    start = wm = int(cur.fetchone()[0])
    cur.execute("SELECT from_seq, to_seq FROM events WHERE site = ? AND edge = ? AND "
                "kind = 'dropped' AND to_seq > ?", (*key, wm))
    ranges = sorted((int(a), int(b)) for a, b in cur.fetchall())
    while True:
        cur.execute("SELECT seq FROM events WHERE site = ? AND edge = ? AND seq > ? "
                    f"ORDER BY seq LIMIT {_PAGE}", (*key, wm))
        seqs = [int(r[0]) for r in cur.fetchall()]
        before = wm
        wm = advance_watermark(wm, seqs, ranges)
        if wm == before or len(seqs) < _PAGE:
            break
    if wm == start:
        return None
    cur.execute(f"UPDATE edges SET watermark = {db.greatest}(watermark, ?) "
                "WHERE site = ? AND edge = ?", (wm, *key))
    return wm


def sweep(db: Database) -> dict[EdgeKey, int]:
    """Advance every edge whose events arrived through another instance meanwhile."""
    moved: dict[EdgeKey, int] = {}
    for site, edge in db.query("SELECT site, edge FROM edges WHERE max_seq > watermark "
                               "ORDER BY site, edge"):
        with db.transaction() as cur:
            wm = _advance(db, cur, (site, edge))
        if wm is not None:
            moved[(site, edge)] = wm
    return moved


# -- what intake recorded -------------------------------------------------------------

def watermarks(db: Database) -> dict[EdgeKey, int]:
    """Every edge's watermark (not rows an earlier version made for quarantined
    messages: never seen, so never sent an ack)."""
    return {(s, e): int(w) for s, e, w in db.query(
        "SELECT site, edge, watermark FROM edges WHERE last_seen_ms IS NOT NULL")}


def device_losses(db: Database, since_ms: int | None = None) -> list[dict[str, Any]]:
    """Events lost on devices (`device_lost`), summed per device and reason.

    Each: site, edge, device, kind (the device's), reason, lost, last_ms (the
    latest such event's corrected time); only events from `since_ms` on if given.

    `lost` is exact at any size.  Each event's is at most 2^53 - 1, but 1,025
    of them pass 2^63, where SQLite's SUM stops with "integer overflow"
    (PostgreSQL's is numeric).  So the database sums each value's high and
    low 32 bits apart (`_sum_sql`), and Python adds the two sums.
    """
    t = "COALESCE(corrected_ms, wall_ms)"
    sql = (f"SELECT site, edge, device_id, device_kind, reason, {_sum_sql('lost')}, "
           f"MAX({t}) FROM events WHERE kind = 'device_lost'")
    params: list[Any] = []
    if since_ms is not None:
        sql += f" AND {t} >= ?"
        params.append(since_ms)
    sql += (" GROUP BY site, edge, device_id, device_kind, reason "
            "ORDER BY site, edge, device_id, reason")
    return [{"site": str(s), "edge": str(e), "device": str(d), "kind": str(k),
             "reason": str(r), "lost": _sum_value(hi, lo), "last_ms": int(last)}
            for s, e, d, k, r, hi, lo, last in db.query(sql, params)]


_HALF: Final = 2**32


def _sum_sql(col: str) -> str:
    """Two columns that `_sum_value` adds into SUM(col), exactly, on both databases.

    Integer division truncates alike in SQLite and PostgreSQL, so with
    hi = col / 2^32, col = hi * 2^32 + (col - hi * 2^32) for any 64-bit value
    (`%` would be a placeholder to psycopg).  Each part is below 2^32 in
    magnitude: neither sum overflows 64 bits before 2^31 rows, far more than a
    group can have.
    """
    hi = f"({col} / {_HALF})"
    return f"SUM({hi}), SUM({col} - {hi} * {_HALF})"


def _sum_value(hi: Any, lo: Any) -> int:
    """SUM(col) from `_sum_sql`'s two sums (ints; Decimal on PostgreSQL), exact."""
    return int(hi) * _HALF + int(lo)


def gaps(db: Database) -> list[dict[str, Any]]:
    """Per edge: seq ranges the edge declared dropped, ranges still missing, and
    events its devices lost (`device_losses`, per device and reason)."""
    losses: dict[EdgeKey, list[dict[str, Any]]] = {}
    for d in device_losses(db):
        losses.setdefault((d["site"], d["edge"]), []).append(d)
    out = []
    for site, edge, wm, top in db.query("SELECT site, edge, watermark, max_seq FROM edges "
                                        "ORDER BY site, edge"):
        dropped = [(int(a), int(b), str(r)) for a, b, r in db.query(
            "SELECT from_seq, to_seq, reason FROM events WHERE site = ? AND edge = ? "
            # An inverted range (stored before classify refused them) declares nothing.
            "AND kind = 'dropped' AND from_seq <= to_seq ORDER BY from_seq", (site, edge))]
        have = {int(r[0]) for r in db.query(
            "SELECT seq FROM events WHERE site = ? AND edge = ? AND seq > ?",
            (site, edge, wm))}
        missing = missing_ranges(int(wm), int(top), have, [(a, b) for a, b, _ in dropped])
        out.append({"site": site, "edge": edge, "watermark": int(wm), "max_seq": int(top),
                    "dropped": dropped, "missing": missing,
                    "device_losses": losses.get((site, edge), [])})
    return out


def counters(db: Database) -> dict[str, int]:
    return {str(n): int(v) for n, v in db.query("SELECT name, value FROM counters")}


def quarantined(db: Database, limit: int = 50) -> list[tuple[int, str, str, int]]:
    return [(int(i), str(t), str(r), int(ms)) for i, t, r, ms in db.query(
        "SELECT id, topic, reason, received_ms FROM quarantine ORDER BY id DESC LIMIT ?",
        (limit,))]


_INT_COLS: Final = ("seq", "wall_ms", "mono_ns", "score", "button", "approaches", "engaged",
                    "from_seq", "to_seq", "lost", "received_ms")


def _event_row(p: dict[str, Any], now_ms: int) -> dict[str, Any]:
    kind = p["kind"]
    body = p[kind]
    t = p["time"]
    row: dict[str, Any] = dict.fromkeys(EVENT_COLS)
    row.update(site=p["site"], edge=p["edge"], event_id=p["event_id"], seq=p["seq"], kind=kind,
               desk=p["desk"], device_id=p["device"]["id"], device_kind=p["device"]["kind"],
               operator_id=p["operator"]["id"], operator_source=p["operator"]["source"],
               wall_ms=wall_ms(t["wall"]), synced=1 if t["synced"] else 0,
               boot_id=t["boot_id"], mono_ns=t["mono_ns"], flags=" ".join(p["flags"]),
               payload=json.dumps(p, separators=(",", ":"), ensure_ascii=False),
               received_ms=now_ms)
    if kind == "press":
        row.update(label=body["label"], score=body["score"], hold=1 if body["hold"] else 0,
                   button=body["button"])
    elif kind == "answer":
        row.update(doctor=body["doctor"], q1=body["q1"], q2=body["q2"], phone=body["phone"],
                   comment=body["comment"])
    elif kind == "presence":
        row.update(approaches=body["approaches"], engaged=body["engaged"])
    elif kind == "abandoned":
        row.update(doctor=body["doctor"])
    elif kind == "dropped":
        row.update(from_seq=body["from_seq"], to_seq=body["to_seq"], reason=body["reason"])
    elif kind == "device_lost":
        row.update(lost=body["lost"], reason=body["reason"])
    if not WALL_MIN_MS <= row["wall_ms"] <= WALL_MAX_MS:
        raise ValueError("time/wall is outside the contract's range")  # classify says so first
    for col in _INT_COLS:
        value = row[col]
        # The schema has already said so for classified messages; a value that
        # got here otherwise must not land in the table as a float or a bigint.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not INT64[0] <= value <= INT64[1]):
            raise ValueError(f"{col} is not a 64-bit integer")
    return row
