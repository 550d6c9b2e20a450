"""The collector's database: SQLite by default, PostgreSQL (psycopg 3) with a DSN.

One schema, one set of statements for both (written with `?` placeholders;
PostgreSQL gets `%s`).  What makes intake exactly-once:

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
  cannot deadlock each other on PostgreSQL.

Timesync: an event recorded while the edge's clock was not synchronised
(`time.synced` false) gets `corrected_ms` = anchor wall + (event mono_ns -
anchor mono_ns) as soon as an anchor for the same boot is known, whichever
arrives first.  Reports use corrected_ms when present, else wall_ms.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Database", "DatabaseError", "EdgeKey", "IngestResult", "open_database",
           "wall_ms"]

EdgeKey = tuple[str, str]  # (site, edge)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    site TEXT NOT NULL, edge TEXT NOT NULL, event_id TEXT NOT NULL,
    seq BIGINT NOT NULL, kind TEXT NOT NULL, desk TEXT NOT NULL,
    device_id TEXT NOT NULL, device_kind TEXT NOT NULL,
    operator_id TEXT, operator_source TEXT NOT NULL,
    wall_ms BIGINT NOT NULL, corrected_ms BIGINT, synced INTEGER NOT NULL,
    boot_id TEXT NOT NULL, mono_ns BIGINT NOT NULL, flags TEXT NOT NULL,
    label TEXT, score INTEGER, hold INTEGER, button INTEGER,
    doctor TEXT, q1 TEXT, q2 TEXT, phone TEXT, comment TEXT,
    approaches INTEGER, engaged INTEGER,
    from_seq BIGINT, to_seq BIGINT, reason TEXT,
    payload TEXT NOT NULL, received_ms BIGINT NOT NULL,
    PRIMARY KEY (site, edge, event_id));
CREATE INDEX IF NOT EXISTS events_by_seq ON events (site, edge, seq);
CREATE INDEX IF NOT EXISTS events_by_time ON events (kind, wall_ms);
CREATE TABLE IF NOT EXISTS edges (
    site TEXT NOT NULL, edge TEXT NOT NULL,
    watermark BIGINT NOT NULL DEFAULT 0, max_seq BIGINT NOT NULL DEFAULT 0,
    state TEXT, state_since TEXT, version TEXT, boot_id TEXT,
    last_seen_ms BIGINT, health TEXT, health_ms BIGINT, devices TEXT,
    PRIMARY KEY (site, edge));
CREATE TABLE IF NOT EXISTS anchors (
    site TEXT NOT NULL, edge TEXT NOT NULL, boot_id TEXT NOT NULL,
    mono_ns BIGINT NOT NULL, wall_ms BIGINT NOT NULL,
    PRIMARY KEY (site, edge, boot_id));
CREATE TABLE IF NOT EXISTS quarantine (
    id {serial} PRIMARY KEY, topic TEXT NOT NULL, payload {blob} NOT NULL,
    reason TEXT NOT NULL, received_ms BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS callbacks (
    site TEXT NOT NULL, edge TEXT NOT NULL, event_id TEXT NOT NULL,
    status TEXT NOT NULL, handled_by TEXT, handled_ms BIGINT,
    PRIMARY KEY (site, edge, event_id));
CREATE TABLE IF NOT EXISTS visits (
    doctor TEXT NOT NULL, period_start TEXT NOT NULL, period_end TEXT NOT NULL,
    patients INTEGER NOT NULL,
    PRIMARY KEY (doctor, period_start, period_end));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
"""

_EVENT_COLS = ("site", "edge", "event_id", "seq", "kind", "desk", "device_id", "device_kind",
               "operator_id", "operator_source", "wall_ms", "corrected_ms", "synced", "boot_id",
               "mono_ns", "flags", "label", "score", "hold", "button", "doctor", "q1", "q2",
               "phone", "comment", "approaches", "engaged", "from_seq", "to_seq", "reason",
               "payload", "received_ms")


_INSERT_EVENT = (f"INSERT INTO events ({', '.join(_EVENT_COLS)}) VALUES "
                 f"({', '.join('?' * len(_EVENT_COLS))}) "
                 "ON CONFLICT (site, edge, event_id) DO NOTHING")


class DatabaseError(Exception):
    """The database refused or is unreachable; the batch is not acknowledged."""


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Sequence[Any] = ...) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


def wall_ms(text: str) -> int:
    """RFC 3339 UTC ('...Z') to milliseconds since the epoch."""
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


@dataclass(slots=True)
class IngestResult:
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    watermarks: dict[EdgeKey, int] = field(default_factory=dict)  # the ones that moved
    dropped_ranges: list[tuple[str, str, int, int, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Item:
    """One message for `Database.ingest`: an event, a side message, or a quarantine."""

    kind: str  # event | status | devices | health | timesync | quarantine
    site: str = ""
    edge: str = ""
    body: Any = None
    topic: str = ""
    raw: bytes = b""
    reason: str = ""


class Database:
    def __init__(self, conn: Any, dialect: str) -> None:
        self._conn = conn
        self.dialect = dialect
        self._greatest = "GREATEST" if dialect == "postgres" else "MAX"
        schema = _SCHEMA.format(serial="BIGSERIAL" if dialect == "postgres" else "INTEGER",
                                blob="BYTEA" if dialect == "postgres" else "BLOB")
        # Instances starting together race to create the tables; PostgreSQL
        # can then fail one CREATE ... IF NOT EXISTS.  Trying again settles it.
        for attempt in range(5):
            try:
                with self.transaction() as cur:
                    for stmt in schema.split(";"):
                        if stmt.strip():
                            cur.execute(stmt)
                break
            except DatabaseError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    # -- plumbing ------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[_Cursor]:
        """One transaction; DatabaseError (rolled back) if the database refuses."""
        cur = self._conn.cursor()
        try:
            if self.dialect == "sqlite":
                # IMMEDIATE: take the write lock up front, so two instances
                # wait for each other instead of failing at their first write.
                cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield _Adapted(cur, self._sql)
            self._conn.commit()
        except Exception as e:
            # The connection may be gone; `e` says why, the rollback adds nothing.
            with contextlib.suppress(Exception):
                self._conn.rollback()
            if isinstance(e, DatabaseError):
                raise
            if _is_db_error(e):
                raise DatabaseError(f"{type(e).__name__}: {e}") from e
            raise
        finally:
            cur.close()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self.transaction(write=False) as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def close(self) -> None:
        self._conn.close()

    # -- intake -------------------------------------------------------------------

    def ingest(self, items: Sequence[Item], now_ms: int | None = None) -> IngestResult:
        """Store a batch in one transaction.  Re-running it changes nothing."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        res = IngestResult()
        top_seq: dict[EdgeKey, int] = {}
        events = sorted((i for i in items if i.kind == "event"),
                        key=lambda i: (i.site, i.edge, i.body["seq"]))
        # By edge (a stable sort keeps each edge's own order): every transaction
        # locks edges rows in the same order.
        others = sorted((i for i in items if i.kind != "event"), key=lambda i: (i.site, i.edge))
        with self.transaction() as cur:
            anchors: dict[tuple[str, str, str], tuple[int, int] | None] = {}
            for key in sorted({(i.site, i.edge) for i in items if i.site}):
                cur.execute("INSERT INTO edges (site, edge) VALUES (?, ?) "
                            "ON CONFLICT (site, edge) DO NOTHING", key)
            for it in others:
                self._side(cur, it, now, res)
            for it in events:
                row = _event_row(it.body, now)
                if not row["synced"]:
                    akey = (it.site, it.edge, row["boot_id"])
                    if akey not in anchors:
                        cur.execute("SELECT mono_ns, wall_ms FROM anchors WHERE site = ? AND "
                                    "edge = ? AND boot_id = ?", akey)
                        found = cur.fetchone()
                        anchors[akey] = None if found is None else (int(found[0]),
                                                                    int(found[1]))
                    anchor = anchors[akey]
                    if anchor is not None:
                        row["corrected_ms"] = anchor[1] + (row["mono_ns"] - anchor[0]) // 10**6
                cur.execute(_INSERT_EVENT, [row[c] for c in _EVENT_COLS])
                if cur.rowcount == 1:
                    res.stored += 1
                    if row["kind"] == "dropped":
                        res.dropped_ranges.append((it.site, it.edge, row["from_seq"],
                                                   row["to_seq"], row["reason"]))
                else:
                    res.duplicates += 1
                key = (it.site, it.edge)
                top_seq[key] = max(top_seq.get(key, 0), row["seq"])
            for key in sorted(top_seq):
                cur.execute(f"UPDATE edges SET max_seq = {self._greatest}(max_seq, ?), "
                            "last_seen_ms = ? WHERE site = ? AND edge = ?",
                            (top_seq[key], now, *key))
                moved = self._advance(cur, key)
                if moved is not None:
                    res.watermarks[key] = moved
            if res.duplicates:
                self._count(cur, "duplicates", res.duplicates)
        return res

    def _side(self, cur: _Cursor, it: Item, now: int, res: IngestResult) -> None:
        key = (it.site, it.edge)
        if it.kind == "quarantine":
            cur.execute("INSERT INTO quarantine (topic, payload, reason, received_ms) "
                        "VALUES (?, ?, ?, ?)", (it.topic, it.raw, it.reason, now))
            self._count(cur, f"quarantined:{it.reason.split(':')[0]}", 1)
            res.quarantined += 1
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
            cur.execute("INSERT INTO anchors (site, edge, boot_id, mono_ns, wall_ms) VALUES "
                        "(?, ?, ?, ?, ?) ON CONFLICT (site, edge, boot_id) DO NOTHING",
                        (*key, b["boot_id"], b["mono_ns"], anchor_wall))
            if cur.rowcount == 1:
                cur.execute("UPDATE events SET corrected_ms = ? + (mono_ns - ?) / 1000000 "
                            "WHERE site = ? AND edge = ? AND boot_id = ? AND synced = 0 "
                            "AND corrected_ms IS NULL",
                            (anchor_wall, b["mono_ns"], *key, b["boot_id"]))

    def _count(self, cur: _Cursor, name: str, n: int) -> None:
        cur.execute("INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) "
                    "DO UPDATE SET value = counters.value + excluded.value", (name, n))

    def _advance(self, cur: _Cursor, key: EdgeKey) -> int | None:
        """Move the edge's watermark over every committed or declared-dropped seq."""
        cur.execute("SELECT watermark FROM edges WHERE site = ? AND edge = ?"
                    + (" FOR UPDATE" if self.dialect == "postgres" else ""), key)
        start = wm = int(cur.fetchone()[0])
        cur.execute("SELECT from_seq, to_seq FROM events WHERE site = ? AND edge = ? AND "
                    "kind = 'dropped' AND to_seq > ?", (*key, wm))
        ranges = sorted((int(a), int(b)) for a, b in cur.fetchall())
        while True:
            cur.execute("SELECT seq FROM events WHERE site = ? AND edge = ? AND seq > ? "
                        "ORDER BY seq LIMIT 2000", (*key, wm))
            seqs = [int(r[0]) for r in cur.fetchall()]
            before = wm
            i = 0
            while True:
                while i < len(seqs) and seqs[i] <= wm:
                    i += 1
                if i < len(seqs) and seqs[i] == wm + 1:
                    wm += 1
                    continue
                cover = next((b for a, b in ranges if a <= wm + 1 <= b), None)
                if cover is None:
                    break
                wm = cover
            if wm == before or len(seqs) < 2000:
                break
        if wm == start:
            return None
        cur.execute(f"UPDATE edges SET watermark = {self._greatest}(watermark, ?) "
                    "WHERE site = ? AND edge = ?", (wm, *key))
        return wm

    def sweep(self) -> dict[EdgeKey, int]:
        """Advance every edge whose events arrived through another instance meanwhile."""
        moved: dict[EdgeKey, int] = {}
        for site, edge in self.query("SELECT site, edge FROM edges WHERE max_seq > watermark "
                                     "ORDER BY site, edge"):
            with self.transaction() as cur:
                wm = self._advance(cur, (site, edge))
            if wm is not None:
                moved[(site, edge)] = wm
        return moved

    # -- reading ----------------------------------------------------------------

    def watermarks(self) -> dict[EdgeKey, int]:
        return {(s, e): int(w) for s, e, w in self.query("SELECT site, edge, watermark "
                                                         "FROM edges")}

    def gaps(self) -> list[dict[str, Any]]:
        """Per edge: seq ranges the edge declared dropped, and ranges still missing."""
        out = []
        for site, edge, wm, top in self.query("SELECT site, edge, watermark, max_seq FROM edges "
                                              "ORDER BY site, edge"):
            dropped = [(int(a), int(b), str(r)) for a, b, r in self.query(
                "SELECT from_seq, to_seq, reason FROM events WHERE site = ? AND edge = ? "
                "AND kind = 'dropped' ORDER BY from_seq", (site, edge))]
            have = {int(r[0]) for r in self.query(
                "SELECT seq FROM events WHERE site = ? AND edge = ? AND seq > ?",
                (site, edge, wm))}
            missing: list[tuple[int, int]] = []
            q = int(wm) + 1
            while q <= int(top):
                covered = next((b for a, b, _ in dropped if a <= q <= b), None)
                if q in have:
                    q += 1
                elif covered is not None:
                    q = covered + 1
                else:
                    lo = q
                    while q <= int(top) and q not in have and not any(
                            a <= q <= b for a, b, _ in dropped):
                        q += 1
                    missing.append((lo, q - 1))
            out.append({"site": site, "edge": edge, "watermark": int(wm), "max_seq": int(top),
                        "dropped": dropped, "missing": missing})
        return out

    def counters(self) -> dict[str, int]:
        return {str(n): int(v) for n, v in self.query("SELECT name, value FROM counters")}

    def quarantined(self, limit: int = 50) -> list[tuple[int, str, str, int]]:
        return [(int(i), str(t), str(r), int(ms)) for i, t, r, ms in self.query(
            "SELECT id, topic, reason, received_ms FROM quarantine ORDER BY id DESC LIMIT ?",
            (limit,))]

    def edges(self) -> list[dict[str, Any]]:
        cols = ("site", "edge", "watermark", "max_seq", "state", "state_since", "version",
                "boot_id", "last_seen_ms", "health", "health_ms", "devices")
        out = []
        for row in self.query(f"SELECT {', '.join(cols)} FROM edges ORDER BY site, edge"):
            d = dict(zip(cols, row, strict=True))
            d["health"] = json.loads(d["health"]) if d["health"] else None
            d["devices"] = json.loads(d["devices"]) if d["devices"] else None
            out.append(d)
        return out

    def events(self, kinds: Iterable[str], start_ms: int | None = None,
               end_ms: int | None = None) -> list[dict[str, Any]]:
        """Events of these kinds whose (corrected) time is in [start_ms, end_ms)."""
        kinds = list(kinds)
        cols = [c for c in _EVENT_COLS if c != "payload"]
        sql = (f"SELECT {', '.join(cols)} FROM events WHERE kind IN "
               f"({', '.join('?' * len(kinds))})")
        params: list[Any] = list(kinds)
        t = "COALESCE(corrected_ms, wall_ms)"
        if start_ms is not None:
            sql += f" AND {t} >= ?"
            params.append(start_ms)
        if end_ms is not None:
            sql += f" AND {t} < ?"
            params.append(end_ms)
        sql += " ORDER BY site, edge, seq"
        return [dict(zip(cols, r, strict=True)) for r in self.query(sql, params)]

    def callbacks_state(self) -> dict[tuple[str, str, str], tuple[str, str | None, int | None]]:
        return {(s, e, i): (st, by, ms) for s, e, i, st, by, ms in self.query(
            "SELECT site, edge, event_id, status, handled_by, handled_ms FROM callbacks")}

    def set_callback(self, site: str, edge: str, event_id: str, *, status: str, who: str,
                     now_ms: int) -> bool:
        with self.transaction() as cur:
            cur.execute("SELECT 1 FROM events WHERE site = ? AND edge = ? AND event_id = ? "
                        "AND kind = 'answer' AND phone IS NOT NULL", (site, edge, event_id))
            if cur.fetchone() is None:
                return False
            cur.execute("INSERT INTO callbacks (site, edge, event_id, status, handled_by, "
                        "handled_ms) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (site, edge, "
                        "event_id) DO UPDATE SET status = excluded.status, handled_by = "
                        "excluded.handled_by, handled_ms = excluded.handled_ms",
                        (site, edge, event_id, status, who, now_ms))
        return True

    def import_visits(self, rows: Iterable[tuple[str, str, str, int]]) -> int:
        n = 0
        with self.transaction() as cur:
            for doctor, start, end, patients in rows:
                cur.execute("INSERT INTO visits (doctor, period_start, period_end, patients) "
                            "VALUES (?, ?, ?, ?) ON CONFLICT (doctor, period_start, period_end) "
                            "DO UPDATE SET patients = excluded.patients",
                            (doctor, start, end, patients))
                n += 1
        return n

    def visits(self) -> list[tuple[str, str, str, int]]:
        return [(str(d), str(s), str(e), int(p)) for d, s, e, p in self.query(
            "SELECT doctor, period_start, period_end, patients FROM visits")]


class _Adapted:
    """A cursor that takes `?` placeholders on both databases."""

    def __init__(self, cur: Any, sql: Any) -> None:
        self._cur = cur
        self._sql = sql

    @property
    def rowcount(self) -> int:
        return int(self._cur.rowcount)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self._cur.execute(self._sql(sql), tuple(params))

    def fetchone(self) -> Any:
        return self._cur.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self._cur.fetchall())


def _is_db_error(e: Exception) -> bool:
    if isinstance(e, sqlite3.Error):
        return True
    try:
        import psycopg  # noqa: PLC0415 - optional dependency
    except ImportError:
        return False
    return isinstance(e, psycopg.Error)


def _event_row(p: dict[str, Any], now_ms: int) -> dict[str, Any]:
    kind = p["kind"]
    body = p[kind]
    t = p["time"]
    row: dict[str, Any] = dict.fromkeys(_EVENT_COLS)
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
    return row


def open_database(path: Path | None = None, dsn: str | None = None) -> Database:
    if dsn is not None:
        try:
            import psycopg  # noqa: PLC0415 - only PostgreSQL sites need it
        except ImportError as e:
            raise DatabaseError("a dsn needs psycopg 3: pip install 'feedback-edge[postgres]'"
                                ) from e
        try:
            return Database(psycopg.connect(dsn), "postgres")
        except psycopg.Error as e:
            raise DatabaseError(f"cannot connect to PostgreSQL: {e}") from e
    assert path is not None  # noqa: S101 - config guarantees one of them
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = sqlite3.connect(path, timeout=30, isolation_level=None)
            # Switching to WAL needs the file to itself and ignores the busy
            # timeout: two instances starting at once wait for each other here.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            break
        except sqlite3.OperationalError as e:
            if time.monotonic() > deadline:
                raise DatabaseError(f"cannot open {path}: {e}") from e
            time.sleep(0.05)
    # isolation_level=None: transactions are ours (BEGIN IMMEDIATE ... COMMIT).
    return Database(_SqliteConn(conn), "sqlite")


class _SqliteConn:
    """sqlite3 in autocommit mode with explicit BEGIN; commit/rollback as statements."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    def cursor(self) -> sqlite3.Cursor:
        return self._c.cursor()

    def commit(self) -> None:
        if self._c.in_transaction:
            self._c.execute("COMMIT")

    def rollback(self) -> None:
        if self._c.in_transaction:
            self._c.execute("ROLLBACK")

    def close(self) -> None:
        self._c.close()
