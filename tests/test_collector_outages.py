"""The collector when the database goes away: real outages, on SQLite and PostgreSQL.

An outage holds the batch unacknowledged and intake retries it; whatever was
done before the outage must not be done twice when the batch comes again,
and a database that comes back is used again without a restart."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from collector import store
from collector.config import load_collector_config
from collector.db import Database, DatabaseError, RefusedError, open_database
from collector.intake import Intake, classify
from collector.store import Item
from tests.collector_fixtures import Backend, Postgres, collector_config, press_event
from tests.conftest import Broker, Subscriber, wait_for
from tests.test_collector import publish_all, wait_collector_online


def _item(topic: str, payload: bytes) -> Item:
    item = classify(topic, payload)
    assert item is not None
    return item


def cut_off(db: Database, backend: Backend) -> None:
    """A real outage of `db`'s connection: SQLite's is closed under it, PostgreSQL's
    backend terminated from a second connection (waiting until it is gone)."""
    if backend.kind == "sqlite":
        db._conn.close()
        return
    import psycopg

    assert backend.dsn is not None
    pid = db._conn.info.backend_pid
    with psycopg.connect(backend.dsn, autocommit=True) as killer:
        (gone,) = killer.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()
    assert gone


class _OutageAt:
    """`db`'s connection, cut off (`cut_off`) just before the event `event_id` is
    inserted in the one-by-one pass (the statements after its first savepoint):
    the batch's transaction, which the poison failed, is behind, and the pass
    is mid-way.  (Counting that event's inserts found the same moment while the
    batch pass inserted row by row up to the poison; it now builds every row
    first, and the poison's is refused before anything is inserted.)"""

    def __init__(self, db: Database, backend: Backend, event_id: str) -> None:
        self._db, self._backend, self._event_id = db, backend, event_id
        self._conn = db._conn
        self.one_by_one = False
        self.fired = False

    def cursor(self) -> Any:
        cur, outer = self._conn.cursor(), self

        class Cursor:
            rowcount = property(lambda _self: cur.rowcount)

            def execute(self, sql: str, params: Any = ()) -> Any:
                if sql.startswith("SAVEPOINT"):
                    outer.one_by_one = True
                if outer.one_by_one and sql.startswith("INSERT INTO events") \
                        and outer._event_id in params and not outer.fired:
                    outer.fired = True
                    cut_off(outer._db, outer._backend)
                return cur.execute(sql, params)

            def __getattr__(self, name: str) -> Any:
                return getattr(cur, name)

        return Cursor()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _poison_batch() -> tuple[list[Item], str]:
    """good 1, a poison (seq 2^63: it skipped classify, the store's own line refuses
    it), a message classify quarantined (not JSON), good 3 and 4; and the event_id
    of good 3, which the one-by-one pass reaches after quarantining the poison."""
    first, third, fourth = (_item(*press_event(i)) for i in (1, 3, 4))
    p = _item(*press_event(2))
    body = {**p.body, "seq": 2**63}
    poison = Item("event", p.site, p.edge, body=body, topic=p.topic,
                  raw=json.dumps(body).encode())
    not_json = _item("feedback/v1/clinic-3/reception-1/event/fc3-a", b"{not json")
    assert not_json.kind == "quarantine"
    return [first, poison, not_json, third, fourth], third.body["event_id"]


def test_an_outage_in_the_one_by_one_pass_stores_and_quarantines_nothing_twice(
        backend: Backend) -> None:
    """The batch failed (the poison), so its messages were stored one by one, each
    committed on its own; the connection died at good 3, after the poison and the
    not-JSON message were quarantined.  The batch, unacknowledged, came again:
    both were quarantined a second time (two rows each, counted twice) and good 1
    was counted as a duplicate though it was delivered once."""
    items, third = _poison_batch()
    db = backend.open()
    outage = _OutageAt(db, backend, third)
    db._conn = outage
    with pytest.raises(DatabaseError) as raised:
        store.ingest(db, items)
    assert outage.fired
    assert not isinstance(raised.value, RefusedError)  # an outage: held, not quarantined
    db = backend.open()  # the batch again (a new connection: as after a restart)
    try:
        res = store.ingest(db, items)
        assert (res.stored, res.quarantined, res.duplicates) == (3, 2, 0)
        assert db.query("SELECT seq FROM events ORDER BY seq") == [(1,), (3,), (4,)]
        assert sorted(r.split(":")[0] for _, _, r, _ in store.quarantined(db)) == [
            "json", "store"]
        assert store.counters(db) == {"quarantined:json": 1, "quarantined:store": 1}
        assert store.watermarks(db) == {("clinic-3", "reception-1"): 1}
    finally:
        db.close()


def test_a_batch_delivered_again_after_its_commit_quarantines_nothing_twice(
        backend: Backend) -> None:
    """Committed, then the collector died before its PUBACKs (or a retained side
    message came to a second instance): the broker delivers the batch again.
    Events were stored once; quarantined messages were kept and counted again."""
    items, _third = _poison_batch()
    status = _item("feedback/v1/clinic-3/reception-1/status", b'{"state": "online"}')
    assert status.kind == "quarantine"  # a retained status missing its fields
    items.append(status)
    db = backend.open()
    try:
        first = store.ingest(db, items)
        assert (first.stored, first.quarantined, first.duplicates) == (3, 3, 0)
        again = store.ingest(db, items)
        assert (again.stored, again.quarantined, again.duplicates) == (0, 0, 6)
        assert len(store.quarantined(db)) == 3
        assert store.counters(db) == {"quarantined:json": 1, "quarantined:store": 1,
                                      "quarantined:invalid": 1, "duplicates": 6}
    finally:
        db.close()


# -- reconnecting ------------------------------------------------------------------------

def _answers(db: Database) -> bool:
    try:
        return db.query("SELECT 1") == [(1,)]
    except DatabaseError:
        return False


def test_a_connection_an_outage_closed_is_opened_again(backend: Backend) -> None:
    """Before, the connection stayed closed: every transaction failed for ever, and
    with a raw driver error (cursor() was outside the error handling), which
    stopped `feedback-collector run` instead of holding the batch."""
    db = backend.open()
    try:
        store.ingest(db, [_item(*press_event(1))])
        cut_off(db, backend)
        with pytest.raises(DatabaseError) as raised:
            store.ingest(db, [_item(*press_event(2))])
        assert not isinstance(raised.value, RefusedError)
        wait_for(lambda: _answers(db), 10, "the database answering again")
        assert store.ingest(db, [_item(*press_event(2))]).stored == 1
        assert db.query("SELECT seq FROM events ORDER BY seq") == [(1,), (2,)]
    finally:
        db.close()


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    """A cluster of its own: the test stops and starts it."""
    pg = Postgres()
    yield pg
    pg.stop()


class _Running:
    """An Intake (as `feedback-collector run` has) in a thread, with the events it
    was delivered and the acknowledgements it sent recorded, as (broker connection
    number, message id)."""

    def __init__(self, cfg_path: Path) -> None:
        cfg = load_collector_config(cfg_path)
        self.intake = Intake(cfg, open_database(cfg.db_path, cfg.dsn))
        self.connections = 0
        self.received: list[int] = []  # the connection of each message, any topic
        self.delivered: list[tuple[int, int]] = []
        self.acked: list[tuple[int, int]] = []
        client = self.intake._client
        ack, on_message, on_connect = client.ack, client.on_message, client.on_connect
        events: set[int] = set()

        def connected(*args: Any) -> None:
            self.connections += 1
            on_connect(*args)  # type: ignore[misc]

        def delivered(c: Any, u: Any, msg: Any) -> None:
            self.received.append(self.connections)
            if "/event/" in msg.topic:
                events.add(msg.mid)
                self.delivered.append((self.connections, msg.mid))
            on_message(c, u, msg)  # type: ignore[misc]

        def record(mid: int, qos: int) -> None:
            if mid in events:
                self.acked.append((self.connections, mid))
            ack(mid, qos)

        client.on_connect = connected
        client.on_message = delivered
        client.ack = record  # type: ignore[method-assign]
        self.failed: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.intake.run()
        except BaseException as e:  # reported by alive()
            self.failed.append(e)

    @property
    def acks(self) -> list[int]:
        return [mid for _, mid in self.acked]

    def check_acks(self) -> None:
        """Each acknowledgement is for an event delivered on the same connection and
        not acknowledged on it yet: an id from an earlier connection names, on this
        one, the broker's copy of it (acknowledged twice) or another message."""
        for conn in {c for c, _ in self.acked}:
            acked = sorted(m for c, m in self.acked if c == conn)
            assert len(set(acked)) == len(acked), f"acknowledged twice on connection {conn}"
            assert set(acked) <= {m for c, m in self.delivered if c == conn}, \
                f"acknowledged on connection {conn} what it did not deliver"

    def alive(self) -> bool:
        assert not self.failed, self.failed
        return self.thread.is_alive()

    def stop(self) -> None:
        self.intake.stop_event.set()
        self.thread.join(30)
        self.intake.db.close()


def _stored(pg: Postgres, dsn: str) -> list[tuple[int, int]]:
    """(count, distinct event_ids) of the events, read by a connection of its own."""
    import psycopg

    try:
        with psycopg.connect(dsn) as c:
            row = c.execute("SELECT count(*), count(DISTINCT event_id) FROM events").fetchone()
    except psycopg.OperationalError:
        return []
    assert row is not None
    return [(int(row[0]), int(row[1]))]


@pytest.mark.parametrize("mode", ["immediate", "fast"])
def test_postgresql_restarted_under_a_running_collector(
        tmp_path: Path, broker: Broker, own_postgres: Postgres,
        subscribe: Callable[[str], Subscriber], mode: str) -> None:
    """PostgreSQL crashes (`immediate`) or is shut down (`fast`) and comes back on
    the same port and data: the collector holds what arrives meanwhile
    unacknowledged, counts the outage, reconnects by itself and stores every
    message exactly once, acknowledging each once, after the commit."""
    pg = own_postgres
    backend = Backend("postgres", tmp_path, pg)
    assert backend.dsn is not None
    states = subscribe("feedback/v1/collector/state")
    acks = subscribe("feedback/v1/clinic-3/reception-1/ack")
    run = _Running(collector_config(tmp_path / "c.toml", broker, backend))
    try:
        wait_collector_online(states)
        publish_all(broker, [press_event(i) for i in range(1, 51)])
        wait_for(lambda: run.acks and len(run.acks) == 50, 30, "the first 50 acknowledged")
        assert _stored(pg, backend.dsn) == [(50, 50)]
        assert run.intake.db_errors == 0

        pg.halt(mode)
        publish_all(broker, [press_event(i) for i in range(51, 151)])
        # Tried, failed, tried again: the batch is held.
        wait_for(lambda: run.alive() and run.intake.db_errors >= 2, 30,
                 "the outage counted twice")
        assert run.alive()
        assert len(run.acks) == 50  # nothing acknowledged while the database is down

        pg.start()
        back = time.monotonic()
        wait_for(lambda: run.alive() and len(run.acks) == 150, 60,
                 "every message acknowledged")
        recovered_s = time.monotonic() - back
        assert _stored(pg, backend.dsn) == [(150, 150)]
        assert len(set(run.acks)) == 150  # each message acknowledged once
        wait_for(lambda: any(m.json().get("seq") == 150 for m in acks.snapshot()), 20,
                 "watermark 150 published")
        assert run.alive()
        run.check_acks()
        # The intake backs off (0.5 s doubling): the first try after the server is
        # back connects; that is at most the back-off reached during the outage.
        assert recovered_s < 20, recovered_s
        print(f"PostgreSQL {mode} restart: stored and acknowledged {recovered_s:.2f} s after "
              f"the server was back; {run.intake.db_errors} database errors counted")
    finally:
        run.stop()


@pytest.mark.parametrize("session", ["kept", "forgotten"])
def test_a_batch_held_over_a_broker_reconnect_is_acknowledged_once_on_the_new_connection(
        tmp_path: Path, broker: Broker, own_postgres: Postgres,
        subscribe: Callable[[str], Subscriber], session: str) -> None:
    """The database is down, a batch is held; meanwhile the broker restarts and the
    collector reconnects.  An acknowledgement carries only a message id, which
    names a message of the connection it is sent on.  With the session `kept`,
    the broker sends the held messages again under the same ids: the collector
    acknowledged each id twice (the held copy, then the new one).  With the session
    `forgotten` (the broker lost its state), the ids of the held batch named
    nothing or, once the broker sent new messages, other messages: acknowledged
    before they were stored.  The held messages are stored either way."""
    pg = own_postgres
    backend = Backend("postgres", tmp_path, pg)
    assert backend.dsn is not None
    states = subscribe("feedback/v1/collector/state")
    run = _Running(collector_config(tmp_path / "c.toml", broker, backend))
    try:
        wait_collector_online(states)
        pg.halt()
        publish_all(broker, [press_event(i) for i in range(1, 21)])
        wait_for(lambda: run.alive() and len(run.delivered) == 20
                 and run.intake.db_errors >= 2, 30, "20 events held")
        if session == "kept":
            broker.stop()  # SIGTERM: mosquitto saves the session and its in-flight messages
        else:
            broker.stop(signal.SIGKILL)
            (broker.workdir / "mosquitto.db").unlink(missing_ok=True)
        broker.start()
        # Anything delivered (its own retained state, at least) says it subscribed.
        wait_for(lambda: 2 in run.received, 30, "the collector connected and subscribed again")
        if session == "kept":
            wait_for(lambda: len(run.delivered) == 40, 30, "the held 20 delivered again")
        publish_all(broker, [press_event(i) for i in range(21, 41)], client_id="edge-2")
        assert run.acks == []
        pg.start()
        wait_for(lambda: run.alive() and _stored(pg, backend.dsn) == [(40, 40)], 60,
                 "every event stored once")
        new = 40 if session == "kept" else 20  # delivered on the second connection
        wait_for(lambda: run.alive() and len(run.acks) >= new, 30,
                 "those delivered on the new connection acknowledged")
        run.check_acks()
        assert {c for c, _ in run.acked} == {2}
        assert len(run.acks) == new
    finally:
        run.stop()
