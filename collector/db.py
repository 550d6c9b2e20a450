"""The collector's database: SQLite by default, PostgreSQL (psycopg 3) with a DSN.

This module is the connection and the dialect: one schema and one set of
statements for both (written with `?` placeholders; PostgreSQL gets `%s`),
the few spellings that differ (`GREATEST`/`MAX`, `FOR UPDATE`), creating the
tables (and adding, on open, the columns a database made by an earlier version
lacks), and one transaction at a time.  What is stored and how lives in
`collector.store` (intake), `collector.queries` (reports and the CLI) and
`collector.rollup` (the dashboards' press counts per day: `press_rollup*`,
`rollup_*`).

Errors are told apart by class.  An outage (`DatabaseError`: the server is
unreachable, the disk is full or failing, the file is locked, corrupt or
cannot be opened, a table is missing) is the database's fault: intake keeps
the batch unacknowledged and tries again.  A refusal (`RefusedError`: a
value out of a column's range, a constraint, a string the database cannot
hold) is the data's fault: intake quarantines the message at fault and goes
on.  Anything not known to be a refusal is an outage, so a fault of the
database never turns into messages quarantined instead of stored.

A connection the outage closed (PostgreSQL restarted or the backend
terminated, a network cut; an SQLite connection closed) is dropped, and the
next transaction opens a new one.  Until that succeeds every transaction
raises DatabaseError at once; attempts to reconnect are at least
`RECONNECT_MIN_S` apart, doubling to `RECONNECT_MAX_S` while they fail, so a
caller retrying in a loop does not hammer a server that is down.  Callers
back off themselves (intake: 0.5 s doubling to 30 s).

`savepoint` runs a part of a transaction that fails alone: intake stores a
refused batch's messages one by one inside one transaction, so an outage
half-way leaves nothing done twice when the batch is tried again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Protocol

__all__ = ["EVENT_COLS", "EVENT_TYPES", "RECONNECT_MAX_S", "RECONNECT_MIN_S", "Cursor", "Database",
           "DatabaseError", "EdgeKey", "RefusedError", "open_database"]

log = logging.getLogger(__name__)

RECONNECT_MIN_S: Final = 0.2
RECONNECT_MAX_S: Final = 5.0
# libpq waits for ever by default for a server that does not answer.
_PG_CONNECT_TIMEOUT_S: Final = 10

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
    payload TEXT NOT NULL, received_ms BIGINT NOT NULL, lost BIGINT,
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
    reason TEXT NOT NULL, received_ms BIGINT NOT NULL, digest TEXT);
CREATE TABLE IF NOT EXISTS callbacks (
    site TEXT NOT NULL, edge TEXT NOT NULL, event_id TEXT NOT NULL,
    status TEXT NOT NULL, handled_by TEXT, handled_ms BIGINT,
    PRIMARY KEY (site, edge, event_id));
CREATE TABLE IF NOT EXISTS visits (
    doctor TEXT NOT NULL, period_start TEXT NOT NULL, period_end TEXT NOT NULL,
    patients INTEGER NOT NULL,
    PRIMARY KEY (doctor, period_start, period_end));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS press_rollup (
    tz TEXT NOT NULL, day TEXT NOT NULL, site TEXT NOT NULL, desk TEXT NOT NULL,
    operator_id TEXT NOT NULL, mood TEXT NOT NULL, burst INTEGER NOT NULL, n BIGINT NOT NULL,
    PRIMARY KEY (tz, day, site, desk, operator_id, mood, burst));
CREATE TABLE IF NOT EXISTS press_rollup_hours (
    tz TEXT NOT NULL, day TEXT NOT NULL, hour INTEGER NOT NULL, mood TEXT NOT NULL,
    burst INTEGER NOT NULL, n BIGINT NOT NULL,
    PRIMARY KEY (tz, day, hour, mood, burst));
CREATE TABLE IF NOT EXISTS rollup_days (
    tz TEXT NOT NULL, day TEXT NOT NULL, presses BIGINT NOT NULL,
    PRIMARY KEY (tz, day));
CREATE TABLE IF NOT EXISTS rollup_state (tz TEXT PRIMARY KEY, received_ms BIGINT);
CREATE TABLE IF NOT EXISTS rollup_anchors (
    tz TEXT NOT NULL, site TEXT NOT NULL, edge TEXT NOT NULL, boot_id TEXT NOT NULL,
    PRIMARY KEY (tz, site, edge, boot_id));
"""

# The columns of `events`, in the schema's order.
EVENT_COLS: Final = (
    "site", "edge", "event_id", "seq", "kind", "desk", "device_id", "device_kind",
    "operator_id", "operator_source", "wall_ms", "corrected_ms", "synced", "boot_id",
    "mono_ns", "flags", "label", "score", "hold", "button", "doctor", "q1", "q2",
    "phone", "comment", "approaches", "engaged", "from_seq", "to_seq", "reason",
    "payload", "received_ms", "lost")

# Columns added since a database could first have been created: (table, column,
# type).  CREATE TABLE IF NOT EXISTS leaves an existing table as it is, so
# opening a database adds any of these it lacks (`Database._migrate`).
_ADDED_COLUMNS: Final = (
    ("events", "lost", "BIGINT"),  # device_lost events (event schema 1, minor revision)
    ("quarantine", "digest", "TEXT"),  # a message quarantined once (`collector.store`)
)
# The SQL type of each column of `events` (TEXT, BIGINT, INTEGER), from the schema.
EVENT_TYPES: Final = {
    **dict(re.findall(r"(\w+) (TEXT|BIGINT|INTEGER)\b",
                      _SCHEMA[_SCHEMA.index("TABLE IF NOT EXISTS events"):
                              _SCHEMA.index("TABLE IF NOT EXISTS edges")])),
    **{column: sqltype for table, column, sqltype in _ADDED_COLUMNS if table == "events"}}
# Indexes on added columns, created (after them) when missing: (name, statement).
# Rows from before have a NULL digest, which a unique index lets repeat.
_ADDED_INDEXES: Final = (
    ("quarantine_by_digest", "CREATE UNIQUE INDEX IF NOT EXISTS quarantine_by_digest "
                             "ON quarantine (digest)"),
    # `collector.rollup`: the events received since its last refresh, and the
    # presses of a day by corrected time (few rows have one: partial).  On a
    # database from before they are built once, when it is first opened.
    ("events_by_received", "CREATE INDEX IF NOT EXISTS events_by_received "
                           "ON events (received_ms)"),
    # With `kind` first: SQLite, without statistics, would rather scan every
    # press by `events_by_time` than use an index on a range alone.
    ("events_by_corrected", "CREATE INDEX IF NOT EXISTS events_by_corrected "
                            "ON events (kind, corrected_ms) WHERE corrected_ms IS NOT NULL"),
)


class DatabaseError(Exception):
    """The database is unreachable or failing (an outage); the batch is not acknowledged."""


class RefusedError(DatabaseError):
    """The database refused the data of a statement (DataError, IntegrityError, a
    value it cannot bind): the message is at fault, not the database.

    `error` is the class name of the driver's exception; the text is not
    kept, as it may quote a value (a phone number).
    """

    def __init__(self, error: str) -> None:
        super().__init__(f"refused: {error}")
        self.error = error


class Cursor(Protocol):
    """A cursor inside `Database.transaction`: `?` placeholders on both databases."""

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: Any, params: Sequence[Any] = ...) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Database:
    """One connection, its dialect, and transactions on it.

    `connect` opens a new connection (raising DatabaseError) when an outage
    has closed this one; without it a closed connection stays closed.
    """

    def __init__(self, conn: Any, dialect: str,
                 connect: Callable[[], Any] | None = None) -> None:
        self._conn: Any = conn
        self._connect = connect
        self._reconnect_at = 0.0  # time.monotonic()
        self._reconnect_delay = 0.0
        self._lost_at: float | None = None
        self.dialect = dialect
        # The larger of two values (PostgreSQL's MAX is only an aggregate).
        self.greatest = "GREATEST" if dialect == "postgres" else "MAX"
        # Appended to a SELECT to lock its rows (SQLite's BEGIN IMMEDIATE locks
        # the whole database already).
        self.for_update = " FOR UPDATE" if dialect == "postgres" else ""
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
                    self._migrate(cur)
                break
            except DatabaseError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _migrate(self, cur: Cursor) -> None:
        """Add the columns a database created by an earlier version lacks.

        Only when one is missing: ALTER TABLE locks the table (on PostgreSQL
        against readers too), which every CLI command's open would otherwise
        do.  PostgreSQL's IF NOT EXISTS settles two instances migrating at once
        (the second waits for the first's lock, then finds the column).
        """
        for table, column, sqltype in _ADDED_COLUMNS:
            if self.dialect == "sqlite":
                cur.execute(f"PRAGMA table_info({table})")
                have = {str(r[1]) for r in cur.fetchall()}
            else:
                cur.execute("SELECT column_name FROM information_schema.columns WHERE "
                            "table_schema = current_schema() AND table_name = ?", (table,))
                have = {str(r[0]) for r in cur.fetchall()}
            if column not in have:
                exists = " IF NOT EXISTS" if self.dialect == "postgres" else ""
                cur.execute(f"ALTER TABLE {table} ADD COLUMN{exists} {column} {sqltype}")
        for name, create in _ADDED_INDEXES:
            if self.dialect == "sqlite":
                cur.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?",
                            (name,))
            else:
                cur.execute("SELECT 1 FROM pg_indexes WHERE schemaname = current_schema() "
                            "AND indexname = ?", (name,))
            if cur.fetchone() is None:
                cur.execute(create)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Cursor]:
        """One transaction; DatabaseError (rolled back) if the database refuses."""
        conn = self._connection()
        cur = None
        try:
            cur = conn.cursor()
            if self.dialect == "sqlite":
                # IMMEDIATE: take the write lock up front, so two instances
                # wait for each other instead of failing at their first write.
                cur.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield _Adapted(cur, self._sql)
            conn.commit()
        except Exception as e:
            # The connection may be gone; `e` says why, the rollback adds nothing.
            with contextlib.suppress(Exception):
                conn.rollback()
            error = _classified(e)
            if _is_outage(error) and _closed(conn):
                self._drop(conn)
            if error is e:
                raise
            raise error from e
        finally:
            if cur is not None:
                # On a closed connection this raises too, and would hide `e`.
                with contextlib.suppress(Exception):
                    cur.close()

    @contextmanager
    def savepoint(self, cur: Cursor) -> Iterator[None]:
        """A part of the transaction of `cur` that fails alone.

        If the part raises anything but an outage, what it did is undone and the
        transaction goes on: the error is raised as RefusedError (the driver
        refused its data) or as it is (a ValueError, say).  An outage raises
        DatabaseError, and the transaction is lost.
        """
        cur.execute("SAVEPOINT part")
        try:
            yield
        except Exception as e:
            error = _classified(e)
            if not _is_outage(error):
                # If these fail, the connection is at fault: `transaction` sees an outage.
                cur.execute("ROLLBACK TO SAVEPOINT part")
                cur.execute("RELEASE SAVEPOINT part")
            if error is e:
                raise
            raise error from e
        cur.execute("RELEASE SAVEPOINT part")

    def _connection(self) -> Any:
        """The open connection; a new one if an outage closed it (DatabaseError if
        that fails, or if the last attempt was too recent to try again)."""
        if self._conn is not None:
            return self._conn
        if self._connect is None:
            raise DatabaseError("the connection is closed")
        now = time.monotonic()
        if now < self._reconnect_at:
            raise DatabaseError("the connection was lost; reconnecting in "
                                f"{self._reconnect_at - now:.1f} s")
        try:
            self._conn = self._connect()
        except Exception as e:  # an sqlite3.DatabaseError too: an outage, never raised raw
            self._reconnect_delay = min(RECONNECT_MAX_S,
                                        max(RECONNECT_MIN_S, self._reconnect_delay * 2))
            self._reconnect_at = now + self._reconnect_delay
            why = e if isinstance(e, DatabaseError) else f"{type(e).__name__}: {e}"
            raise DatabaseError(f"cannot reconnect: {why}") from e
        lost = 0.0 if self._lost_at is None else now - self._lost_at
        log.warning("database: reconnected (the connection was lost %.1f s ago)", lost)
        self._reconnect_delay, self._reconnect_at, self._lost_at = 0.0, 0.0, None
        return self._conn

    def _drop(self, conn: Any) -> None:
        """Forget a connection an outage closed; the next transaction opens another."""
        with contextlib.suppress(Exception):
            conn.close()
        if self._conn is conn:
            self._conn = None
            self._lost_at = time.monotonic()
            self._reconnect_at = time.monotonic() + RECONNECT_MIN_S

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self.transaction(write=False) as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._connect = None, None


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


def _is_refusal(e: Exception) -> bool:
    """Whether the driver refused a statement's data (not an outage).

    SQLite: IntegrityError (constraints), DataError (too big), and the
    binding errors (InterfaceError, ProgrammingError: a value of a type it
    cannot bind).  PostgreSQL: DataError (a number out of a column's range,
    NUL in text, a character the encoding lacks) and IntegrityError.  The
    rest (sqlite3 OperationalError: locked, disk I/O error, disk full, unable
    to open, no such table; DatabaseError: corrupt; psycopg
    OperationalError: connection, disk full, deadlock; InterfaceError;
    InternalError; ProgrammingError: a missing table, no privilege) is an outage.
    """
    if isinstance(e, sqlite3.Error):
        if isinstance(e, (sqlite3.InterfaceError, sqlite3.ProgrammingError)):
            # Not "Cannot operate on a closed database": only a value it cannot bind.
            return str(e).startswith("Error binding parameter")
        return isinstance(e, (sqlite3.IntegrityError, sqlite3.DataError))
    try:
        import psycopg  # noqa: PLC0415 - optional dependency
    except ImportError:
        return False
    return isinstance(e, (psycopg.DataError, psycopg.IntegrityError))


def _classified(e: Exception) -> Exception:
    """`e` as this module tells errors apart: a driver's error becomes RefusedError
    or DatabaseError (an outage); anything else (DatabaseError included) is kept."""
    if isinstance(e, DatabaseError):
        return e
    if _is_refusal(e):
        return RefusedError(type(e).__name__)
    if _is_db_error(e):
        return DatabaseError(f"{type(e).__name__}: {e}")
    return e


def _is_outage(e: Exception) -> bool:
    return isinstance(e, DatabaseError) and not isinstance(e, RefusedError)


def _closed(conn: Any) -> bool:
    """Whether `conn` can no longer be used (psycopg: closed or broken; SQLite: closed)."""
    try:
        return bool(conn.closed)
    except Exception:  # noqa: BLE001 - a connection that cannot say is not known closed
        return False


def _is_db_error(e: Exception) -> bool:
    if isinstance(e, sqlite3.Error):
        return True
    try:
        import psycopg  # noqa: PLC0415 - optional dependency
    except ImportError:
        return False
    return isinstance(e, psycopg.Error)


def open_database(path: Path | None = None, dsn: str | None = None) -> Database:
    """The database at `dsn` (PostgreSQL) or `path` (SQLite), tables created; it
    reconnects by itself after an outage closed its connection."""
    if dsn is not None:
        def connect_pg() -> Any:
            return _connect_pg(dsn)

        return Database(connect_pg(), "postgres", connect_pg)
    assert path is not None  # noqa: S101 - config guarantees one of them
    path.parent.mkdir(parents=True, exist_ok=True)

    def connect_sqlite() -> Any:
        return _connect_sqlite(path)

    return Database(connect_sqlite(), "sqlite", connect_sqlite)


def _connect_pg(dsn: str) -> Any:
    try:
        import psycopg  # noqa: PLC0415 - only PostgreSQL sites need it
        from psycopg.conninfo import conninfo_to_dict  # noqa: PLC0415
    except ImportError as e:
        raise DatabaseError("a dsn needs psycopg 3: pip install 'feedback-edge[postgres]'"
                            ) from e
    try:
        extra: dict[str, Any] = {}
        if "connect_timeout" not in conninfo_to_dict(dsn) \
                and "PGCONNECT_TIMEOUT" not in os.environ:
            extra["connect_timeout"] = _PG_CONNECT_TIMEOUT_S
        return psycopg.connect(dsn, **extra)
    except psycopg.Error as e:
        raise DatabaseError(f"cannot connect to PostgreSQL: {e}") from e


def _connect_sqlite(path: Path) -> _SqliteConn:
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
    return _SqliteConn(conn)


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

    @property
    def closed(self) -> bool:
        try:
            self._c.total_changes  # noqa: B018 - raises once the connection is closed
        except sqlite3.ProgrammingError:
            return True
        return False

    def close(self) -> None:
        self._c.close()
