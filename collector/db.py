"""The collector's database: SQLite by default, PostgreSQL (psycopg 3) with a DSN.

This module is the connection and the dialect: one schema and one set of
statements for both (written with `?` placeholders; PostgreSQL gets `%s`),
the few spellings that differ (`GREATEST`/`MAX`, `FOR UPDATE`), creating the
tables (and adding, on open, the columns a database made by an earlier version
lacks), and one transaction at a time.  What is stored and how lives in
`collector.store` (intake) and `collector.queries` (reports and the CLI).

Errors are told apart by class.  An outage (`DatabaseError`: the server is
unreachable, the disk is full or failing, the file is locked, corrupt or
cannot be opened, a table is missing) is the database's fault: intake keeps
the batch unacknowledged and tries again.  A refusal (`RefusedError`: a
value out of a column's range, a constraint, a string the database cannot
hold) is the data's fault: intake quarantines the message at fault and goes
on.  Anything not known to be a refusal is an outage, so a fault of the
database never turns into messages quarantined instead of stored.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Protocol

__all__ = ["EVENT_COLS", "Cursor", "Database", "DatabaseError", "EdgeKey", "RefusedError",
           "open_database"]

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
    """One connection, its dialect, and transactions on it."""

    def __init__(self, conn: Any, dialect: str) -> None:
        self._conn = conn
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

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Cursor]:
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
            if _is_refusal(e):
                raise RefusedError(type(e).__name__) from e
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


def _is_db_error(e: Exception) -> bool:
    if isinstance(e, sqlite3.Error):
        return True
    try:
        import psycopg  # noqa: PLC0415 - optional dependency
    except ImportError:
        return False
    return isinstance(e, psycopg.Error)


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
