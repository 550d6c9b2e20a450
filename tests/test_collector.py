"""The collector: exactly-once intake, watermarks, quarantine, timesync, end to end.

Every test that stores runs against SQLite and against a real PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from collector import cli, queries, store
from collector.db import DatabaseError, RefusedError
from collector.intake import classify
from collector.store import Item
from edge.events import DeviceRef, Dropped, Event, EventTime, OperatorTag, encode_event
from tests.collector_fixtures import (
    Backend,
    collector_config,
    count_events,
    device_lost_event,
    press_event,
    wait_events,
)
from tests.conftest import Broker, Proc, Subscriber, wait_for
from tests.test_pipeline import Site


def _item(topic: str, payload: bytes) -> Item:
    item = classify(topic, payload)
    assert item is not None
    return item


def dropped_event(seq: int, lo: int, hi: int) -> tuple[str, bytes]:
    ev = Event(f"0192c0de-0000-7000-8000-{seq:012d}", "reception-1",
               DeviceRef("reception-1", "edge", None), Dropped(lo, hi, "store_full"),
               OperatorTag(None, "none"), EventTime(1_795_000_000_000_000_000, True, "b", 1))
    return ("feedback/v1/clinic-3/reception-1/event/reception-1",
            encode_event(ev, seq, "clinic-3", "reception-1"))


def publish_all(broker: Broker, messages: list[tuple[str, bytes]], *, retain: bool = False,
                client_id: str = "test-edge") -> None:
    """Publish QoS 1 as an edge would and wait for every PUBACK."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        infos = [c.publish(t, p, qos=1, retain=retain) for t, p in messages]
        for info in infos:
            info.wait_for_publish(timeout=30)
    finally:
        c.disconnect()
        c.loop_stop()


def wait_collector_online(sub: Subscriber, n: int = 1) -> None:
    """`sub` must be subscribed before the collectors start: the state is one retained
    message, so only the last instance's word would be seen otherwise."""
    wait_for(lambda: len({m.json().get("collector") for m in sub.snapshot()
                          if m.json().get("state") == "online"}) >= n, 20,
             f"{n} collector(s) online")


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector.cli", *args, "--config",
                           str(config)], capture_output=True, text=True, check=False, timeout=60)


# -- the database, directly ----------------------------------------------------------

def test_watermark_passes_declared_drops_and_stops_at_what_is_missing(
        backend: Backend) -> None:
    db = backend.open()
    msgs = [press_event(1), press_event(2), press_event(4), dropped_event(5, 3, 3)]
    res = store.ingest(db, [_item(t, p) for t, p in msgs])
    assert res.stored == 4
    assert res.watermarks == {("clinic-3", "reception-1"): 5}
    assert res.dropped_ranges == [("clinic-3", "reception-1", 3, 3, "store_full")]
    res = store.ingest(db, [_item(*press_event(7))])
    assert res.watermarks == {}  # 6 is missing
    (gap,) = store.gaps(db)
    assert gap["watermark"] == 5
    assert gap["max_seq"] == 7
    assert gap["missing"] == [(6, 6)]
    assert gap["dropped"] == [(3, 3, "store_full")]
    res = store.ingest(db, [_item(*press_event(6))])
    assert res.watermarks == {("clinic-3", "reception-1"): 7}
    db.close()


def test_the_same_event_delivered_three_times_is_stored_once(backend: Backend) -> None:
    db = backend.open()
    topic, payload = press_event(1)
    first = store.ingest(db, [_item(topic, payload)])
    again = store.ingest(db, [_item(topic, payload), _item(topic, payload)])
    assert (first.stored, again.stored, again.duplicates) == (1, 0, 2)
    assert count_events(backend) == 1
    assert store.counters(db)["duplicates"] == 2
    db.close()


@pytest.mark.parametrize("anchor_first", [True, False])
def test_timesync_corrects_unsynced_events_whichever_arrives_first(
        backend: Backend, anchor_first: bool) -> None:
    db = backend.open()
    # Recorded 5 s after boot with the clock still at 1970-ish; synchronised at 20 s.
    ev = _item(*press_event(1, synced=False, wall_ns=5_000_000_000, mono_ns=5_000_000_000,
                            boot_id="boot-x"))
    # 0.5 ms later: 14,999.5 ms before the anchor, so in its millisecond 09:00:05.000
    # (times are cut to the millisecond, like wall_ms): SQL's division truncated
    # to 05.001 when the anchor came second, Python's floor said 05.000.
    later = _item(*press_event(2, synced=False, wall_ns=5_000_500_000, mono_ns=5_000_500_000,
                               boot_id="boot-x"))
    anchor = _item("feedback/v1/clinic-3/reception-1/timesync", json.dumps(
        {"boot_id": "boot-x", "mono_ns": 20_000_000_000, "wall": "2026-11-23T09:00:20.000Z",
         "reason": "synchronised"}).encode())
    for batch in ([anchor], [ev, later]) if anchor_first else ([ev, later], [anchor]):
        store.ingest(db, batch)
    rows = queries.events(db, ["press"])
    # 2026-11-23T09:00:05Z
    assert [row["corrected_ms"] for row in rows] == [1_795_424_405_000] * 2
    assert [row["wall_ms"] for row in rows] == [5_000, 5_000]
    db.close()


def test_malformed_and_unknown_versions_are_kept_aside_with_a_named_reason(
        backend: Backend) -> None:
    db = backend.open()
    topic, good = press_event(1)
    body = json.loads(good)
    v2 = dict(body, schema="feedback.event/2")
    bad_phone = dict(body, kind="answer", answer={
        "record_id": 1, "doctor": "dr-a", "q1": "no", "q2": "yes", "phone": "call me maybe",
        "comment": None, "lang": "en"})
    bad_phone.pop("press")
    other_edge = dict(body, edge="reception-2")
    items = [_item(topic, b"{not json"), _item(topic, json.dumps(v2).encode()),
             _item(topic, json.dumps(bad_phone).encode()),
             _item(topic, json.dumps(other_edge).encode()),
             _item("feedback/v1/clinic-3/reception-1/health", b'{"queue_depth": -1}'),
             _item(topic, good)]
    res = store.ingest(db, items)
    assert (res.stored, res.quarantined) == (1, 5)
    reasons = sorted(r for _, _, r, _ in store.quarantined(db))
    assert reasons[0].startswith("invalid: ")
    assert any(r.startswith("json: ") for r in reasons)
    assert "schema: unknown version 'feedback.event/2'" in reasons
    assert any("site/edge differ" in r for r in reasons)
    assert not any("call me" in r for r in reasons)  # a value may be personal data
    counts = store.counters(db)
    assert sum(v for k, v in counts.items() if k.startswith("quarantined:")) == 5
    db.close()


@pytest.mark.parametrize(("wall", "ms"), [
    ("2026-11-23T17:30:00Z", 1_795_455_000_000),  # another producer: no fraction
    ("2026-11-23T17:30:00.5Z", 1_795_455_000_500),
    ("2026-11-23T17:30:00.123456789Z", 1_795_455_000_123),  # cut to ms, not rounded
    ("2026-11-23T09:14:03.512Z", 1_795_425_243_512),  # the daemon's (float maths lost 1 ms)
    ("2016-12-31T23:59:60Z", 1_483_228_800_000)])  # a leap second
def test_rfc3339_times_with_any_fraction_are_stored_at_the_millisecond(
        tmp_path: Path, wall: str, ms: int) -> None:
    db = Backend("sqlite", tmp_path, None).open()
    topic, payload = press_event(1)
    body = json.loads(payload)
    body["time"]["wall"] = wall
    anchor = {"boot_id": "boot-z", "mono_ns": 0, "wall": wall}
    items = [_item(topic, json.dumps(body).encode()),
             _item("feedback/v1/clinic-3/reception-1/timesync", json.dumps(anchor).encode())]
    assert [i.kind for i in items] == ["event", "timesync"]
    store.ingest(db, items)
    assert db.query("SELECT wall_ms FROM events") == [(ms,)]
    assert db.query("SELECT wall_ms FROM anchors") == [(ms,)]
    db.close()


@pytest.mark.parametrize(("wall", "reason"), [
    ("2026-02-30T10:00:00Z", "invalid: time/wall fails date-time"),
    ("2027-02-29T10:00:00Z", "invalid: time/wall fails date-time"),
    ("0000-01-01T00:00:00Z", "invalid: time/wall fails pattern"),  # outside 1960..2099
    ("2026-11-23T17:30:61Z", "invalid: time/wall fails date-time"),
    ("2026-11-23T17:30:00Z\n", "invalid: time/wall fails pattern"),  # ECMA-262's $
    ("2026-11-23T17:30:00+00:00", "invalid: time/wall fails pattern"),
    ("2026-11-23T17:30Z", "invalid: time/wall fails pattern")])
def test_times_that_are_not_rfc3339_utc_or_not_real_are_quarantined(wall: str,
                                                                    reason: str) -> None:
    topic, payload = press_event(1)
    body = json.loads(payload)
    body["time"]["wall"] = wall
    item = _item(topic, json.dumps(body).encode())
    assert (item.kind, item.reason) == ("quarantine", reason)


ANSWER = {"record_id": 1, "doctor": "dr-a", "q1": "no", "q2": "yes", "phone": None,
          "comment": None, "lang": "en"}


@pytest.mark.parametrize(("change", "where"), [
    ({"operator": {"id": "anna\nFAKE log line", "source": "command"}}, "operator/id"),
    ({"operator": {"id": " anna", "source": "command"}}, "operator/id"),  # space at an end
    ({"operator": {"id": "anna\u202eevil", "source": "command"}}, "operator/id"),  # bidi
    ({"operator": {"id": "=cmd|' /C calc'!A0", "source": "badge"}}, "operator/id"),
    ({"operator": {"id": "anna;drop", "source": "badge"}}, "operator/id"),  # only the code says
    ({"desk": "front desk"}, "desk"),
    ({"desk": "desk\n"}, "desk"),
    ({"device": {"id": "dev-1", "kind": "console", "serial": "AB\u0007"}}, "device/serial"),
    ({"time_boot_id": "boot\nid"}, "time/boot_id"),
    ({"kind": "answer", "answer": dict(ANSWER, doctor="dr a")}, "answer/doctor"),
    ({"kind": "answer", "answer": dict(ANSWER, lang="english!")}, "answer/lang"),
    ({"kind": "abandoned", "abandoned": {"record_id": 2, "doctor": "=1+1", "step": "q1"}},
     "abandoned/doctor")])
def test_identifiers_that_break_their_grammar_are_quarantined_naming_the_field(
        change: dict[str, object], where: str) -> None:
    """Issue 14: one grammar per identifier (edge/contract/ids.py), enforced by the
    collector as by the edge's config and commands; the value is never in the reason."""
    topic, payload = press_event(1)
    body = json.loads(payload)
    if "time_boot_id" in change:
        body["time"]["boot_id"] = change.pop("time_boot_id")
    if change.get("kind") in ("answer", "abandoned"):
        body.pop("press")
    body.update(change)
    item = _item(topic, json.dumps(body).encode())
    assert item.kind == "quarantine"
    assert item.reason is not None
    assert item.reason.startswith(f"invalid: {where} fails")
    assert "anna" not in item.reason
    assert "FAKE" not in item.reason


@pytest.mark.parametrize("op", ["Анна Петрова", "O'Brien", "José María", "op-17", None])
def test_operator_ids_of_any_script_pass(op: str | None) -> None:
    topic, payload = press_event(1)
    body = json.loads(payload)
    body["operator"] = {"id": op, "source": "none" if op is None else "command"}
    assert _item(topic, json.dumps(body).encode()).kind == "event"


def test_what_the_database_refuses_is_quarantined_and_the_rest_of_the_batch_is_stored(
        backend: Backend) -> None:
    """The store's own line, behind the schema: items that skipped `classify`."""
    db = backend.open()
    first, second = _item(*press_event(1)), _item(*press_event(3))
    huge = _item(*press_event(2))
    huge = Item("event", huge.site, huge.edge, body={**huge.body, "seq": 2**63},
                topic=huge.topic, raw=b"{}")
    bad_text = _item(*press_event(4))
    bad_text = Item("event", bad_text.site, bad_text.edge,
                    body={**bad_text.body, "desk": "desk-\ud800"}, topic=bad_text.topic)
    res = store.ingest(db, [first, huge, second, bad_text])
    assert (res.stored, res.quarantined) == (2, 2)
    by_field = {r.rsplit(" at ", 1)[-1]: r for _, _, r, _ in store.quarantined(db)}
    assert sorted(by_field) == ["desk", "seq"]
    assert by_field["desk"] == "store: UnicodeEncodeError at desk"
    assert by_field["seq"].startswith("store: ")  # OverflowError; NumericValueOutOfRange
    assert store.counters(db)["quarantined:store"] == 2
    assert store.watermarks(db) == {("clinic-3", "reception-1"): 1}
    db.close()


class _FailingConn:
    """A connection whose event inserts fail with `error`."""

    def __init__(self, conn: Any, error: Exception) -> None:
        self._conn, self._error = conn, error

    def cursor(self) -> Any:
        cur, error = self._conn.cursor(), self._error

        class Cursor:
            rowcount = property(lambda _self: cur.rowcount)

            def execute(self, sql: str, params: Any = ()) -> Any:
                if sql.startswith("INSERT INTO events"):
                    raise error
                return cur.execute(sql, params)

            def __getattr__(self, name: str) -> Any:
                return getattr(cur, name)

        return Cursor()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.mark.parametrize(("error", "outage"), [
    (sqlite3.OperationalError("database is locked"), True),
    (sqlite3.OperationalError("disk I/O error"), True),
    (sqlite3.OperationalError("database or disk is full"), True),
    (sqlite3.OperationalError("unable to open database file"), True),
    (sqlite3.DatabaseError("database disk image is malformed"), True),
    (sqlite3.ProgrammingError("Cannot operate on a closed database."), True),
    (sqlite3.IntegrityError("NOT NULL constraint failed: events.desk"), False),
    (sqlite3.DataError("string or blob too big"), False),
    (OverflowError("Python int too large to convert to SQLite INTEGER"), False)])
def test_an_outage_holds_the_batch_but_a_refusal_quarantines_the_message(
        tmp_path: Path, error: Exception, outage: bool) -> None:
    db = Backend("sqlite", tmp_path, None).open()
    db._conn = _FailingConn(db._conn, error)  # the error, injected
    items = [_item(*press_event(1)), _item(*press_event(2))]
    if outage:
        with pytest.raises(DatabaseError) as raised:
            store.ingest(db, items)
        assert not isinstance(raised.value, RefusedError)
        assert store.quarantined(db) == []  # nothing acknowledged: all delivered again
    else:
        res = store.ingest(db, items)
        assert (res.stored, res.quarantined) == (0, 2)
        assert {r for _, _, r, _ in store.quarantined(db)} == {
            f"store: {type(error).__name__}"}  # the class, never the driver's text
    db.close()


def test_postgresql_errors_are_told_apart_by_class() -> None:
    psycopg = pytest.importorskip("psycopg")
    from collector.db import _is_refusal

    refusals = [psycopg.errors.NumericValueOutOfRange(), psycopg.errors.NotNullViolation(),
                psycopg.errors.UntranslatableCharacter(), psycopg.DataError()]
    outages = [psycopg.OperationalError(), psycopg.errors.DiskFull(),
               psycopg.errors.AdminShutdown(), psycopg.errors.DeadlockDetected(),
               psycopg.errors.UndefinedTable(), psycopg.errors.InsufficientPrivilege(),
               psycopg.InterfaceError()]
    assert [_is_refusal(e) for e in refusals] == [True] * len(refusals)
    assert [_is_refusal(e) for e in outages] == [False] * len(outages)


# -- device_lost: events a device lost before the edge could store them ---------------

T0_NS = 1_795_000_000_000_000_000  # 2026-11-18 11:06:40 UTC
HOUR_MS = 3600 * 1000


def test_device_losses_are_stored_once_and_summed_per_device(backend: Backend,
                                                            tmp_path: Path) -> None:
    db = backend.open()
    t0 = T0_NS // 10**6
    msgs = [device_lost_event(1, lost=3, total=3, wall_ns=T0_NS), press_event(2),
            device_lost_event(3, lost=2, total=5, wall_ns=T0_NS + HOUR_MS * 10**6),
            device_lost_event(4, device="st-1", device_kind="terminal", lost=7, total=7,
                              reason="flash_full", wall_ns=T0_NS + 2 * HOUR_MS * 10**6)]
    items = [_item(t, p) for t, p in msgs]
    assert [i.kind for i in items] == ["event"] * 4  # valid against the schema
    first = store.ingest(db, items)
    again = store.ingest(db, items)  # delivered twice
    assert (first.stored, again.stored, again.duplicates) == (4, 0, 4)
    assert count_events(backend) == 4
    assert first.device_losses == [("clinic-3", "reception-1", "fc3-a", 3, "ring_overflow"),
                                   ("clinic-3", "reception-1", "fc3-a", 2, "ring_overflow"),
                                   ("clinic-3", "reception-1", "st-1", 7, "flash_full")]
    assert first.watermarks == {("clinic-3", "reception-1"): 4}  # ordinary seqs
    (gap,) = store.gaps(db)
    assert (gap["dropped"], gap["missing"]) == ([], [])
    edge = {"site": "clinic-3", "edge": "reception-1"}
    assert gap["device_losses"] == [
        {**edge, "device": "fc3-a", "kind": "console", "reason": "ring_overflow", "lost": 5,
         "last_ms": t0 + HOUR_MS},
        {**edge, "device": "st-1", "kind": "terminal", "reason": "flash_full", "lost": 7,
         "last_ms": t0 + 2 * HOUR_MS}]
    # The fleet view: the last 24 h only (fc3-a's first loss is 24.5 h old).
    (row,) = cli.fleet_rows(db, now_ms=t0 + 24 * HOUR_MS + HOUR_MS // 2)
    assert row["device_lost_24h"] == {"fc3-a": 2, "st-1": 7}
    db.close()
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'id = "cli"\n\n[broker]\nhost = "127.0.0.1"\n\n{backend.toml()}')
    r = _cli(cfg, "gaps")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "no seq gaps"
    assert [line.split() for line in out if "reception-1" in line] == [
        ["clinic-3/reception-1", "fc3-a", "console", "ring_overflow", "5", "2026-11-18",
         "12:06:40"],
        ["clinic-3/reception-1", "st-1", "terminal", "flash_full", "7", "2026-11-18",
         "13:06:40"]]


MAX_LOST = 2**53 - 1  # the schema's largest `lost`


def test_device_losses_are_summed_exactly_past_64_bits(backend: Backend,
                                                       tmp_path: Path) -> None:
    """Each `lost` is at most 2^53 - 1, but 1,025 of them pass 2^63: SQLite's SUM
    raised "integer overflow" and `gaps` and `fleet` died (PostgreSQL's SUM is
    numeric).  The sums are exact integers at any size, on both databases."""
    db = backend.open()
    n = 1100
    t0 = T0_NS // 10**6
    msgs = [device_lost_event(i, lost=MAX_LOST, total=MAX_LOST, wall_ns=T0_NS + i * 10**6)
            for i in range(1, n + 1)]
    # A second device whose figures stay small: exact too, next to the huge one.
    msgs += [device_lost_event(n + 1, device="st-1", device_kind="terminal", lost=2**53 - 2,
                               total=2**53 - 2, reason="flash_full", wall_ns=T0_NS),
             device_lost_event(n + 2, device="st-1", device_kind="terminal", lost=1, total=1,
                               reason="flash_full", wall_ns=T0_NS)]
    items = [_item(t, p) for t, p in msgs]
    assert {i.kind for i in items} == {"event"}
    assert store.ingest(db, items).stored == n + 2
    assert n * MAX_LOST > 2**63
    (gap,) = store.gaps(db)
    assert [(d["device"], d["lost"], d["last_ms"]) for d in gap["device_losses"]] == [
        ("fc3-a", n * MAX_LOST, t0 + n), ("st-1", MAX_LOST, t0)]
    assert [d["lost"] for d in store.device_losses(db, since_ms=t0 + n - 9)] == [10 * MAX_LOST]
    (row,) = cli.fleet_rows(db, now_ms=t0 + HOUR_MS)
    assert row["device_lost_24h"] == {"fc3-a": n * MAX_LOST, "st-1": MAX_LOST}
    db.close()
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'id = "cli"\n\n[broker]\nhost = "127.0.0.1"\n\n{backend.toml()}')
    r = _cli(cfg, "gaps")
    assert r.returncode == 0, r.stderr
    assert [line.split()[4] for line in r.stdout.splitlines() if "reception-1" in line] == [
        str(n * MAX_LOST), str(MAX_LOST)]


def test_device_lost_with_no_loss_or_an_unknown_reason_is_quarantined_naming_the_field(
        backend: Backend) -> None:
    db = backend.open()
    topic, good = device_lost_event(3)
    without_body = json.loads(good)
    del without_body["device_lost"]
    items = [_item(*device_lost_event(1, lost=0, total=0)),
             _item(*device_lost_event(2, reason="cosmic_rays")),
             _item(topic, json.dumps(without_body).encode())]
    assert [i.kind for i in items] == ["quarantine"] * 3
    res = store.ingest(db, items)
    assert (res.stored, res.quarantined) == (0, 3)
    assert sorted(r for _, _, r, _ in store.quarantined(db)) == [
        "invalid: (top) fails required",  # kind device_lost needs its object
        "invalid: device_lost/lost fails minimum",
        "invalid: device_lost/reason fails enum"]  # the field and rule, not the value
    assert count_events(backend) == 0
    db.close()


# The events table as the collector created it before device_lost (no `lost`).
_EVENTS_BEFORE_DEVICE_LOST = """CREATE TABLE events (
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
    PRIMARY KEY (site, edge, event_id))"""


def test_a_database_from_before_device_lost_gains_the_column_on_open_and_keeps_its_rows(
        backend: Backend) -> None:
    _topic, payload = press_event(1)
    insert = ("INSERT INTO events (site, edge, event_id, seq, kind, desk, device_id, "
              "device_kind, operator_id, operator_source, wall_ms, synced, boot_id, mono_ns, "
              "flags, label, score, hold, button, payload, received_ms) VALUES "
              "(?, ?, ?, 1, 'press', 'desk-1', 'fc3-a', 'console', 'op-1', 'config', ?, 1, "
              "'boot-a', 1000000000, '', 'good', 1, 0, 0, ?, ?)")
    params = ("clinic-3", "reception-1", json.loads(payload)["event_id"], T0_NS // 10**6,
              payload.decode(), T0_NS // 10**6)
    if backend.path is not None:
        with sqlite3.connect(backend.path) as lite:
            lite.execute(_EVENTS_BEFORE_DEVICE_LOST)
            lite.execute(insert, params)
        lite.close()
    else:
        import psycopg

        assert backend.dsn is not None
        with psycopg.connect(backend.dsn) as pg:
            pg.execute(_EVENTS_BEFORE_DEVICE_LOST)
            pg.execute(insert.replace("?", "%s"), params)
    db = backend.open()  # adds `lost`
    assert db.query("SELECT seq, label, lost FROM events") == [(1, "good", None)]
    res = store.ingest(db, [_item(*device_lost_event(2, lost=4, total=4))])
    assert (res.stored, res.watermarks) == (1, {("clinic-3", "reception-1"): 2})
    db.close()
    db = backend.open()  # again: nothing left to add, nothing changed
    assert db.query("SELECT seq, kind, lost FROM events ORDER BY seq") == [
        (1, "press", None), (2, "device_lost", 4)]
    assert [d["lost"] for d in store.gaps(db)[0]["device_losses"]] == [4]
    db.close()


def test_a_quarantine_from_before_digests_gains_them_on_open_and_keeps_its_rows(
        backend: Backend) -> None:
    """Quarantined messages are kept once by their digest; an older database's
    quarantine table gains the column and its unique index, its rows untouched."""
    old = ("CREATE TABLE quarantine (id {serial} PRIMARY KEY, topic TEXT NOT NULL, "
           "payload {blob} NOT NULL, reason TEXT NOT NULL, received_ms BIGINT NOT NULL)")
    insert = ("INSERT INTO quarantine (topic, payload, reason, received_ms) "
              "VALUES ('t', ?, 'json: JSONDecodeError', 1)")
    if backend.path is not None:
        with sqlite3.connect(backend.path) as lite:
            lite.execute(old.format(serial="INTEGER", blob="BLOB"))
            for _ in range(2):  # the same message twice, as before digests
                lite.execute(insert, (b"{",))
        lite.close()
    else:
        import psycopg

        assert backend.dsn is not None
        with psycopg.connect(backend.dsn) as pg:
            pg.execute(old.format(serial="BIGSERIAL", blob="BYTEA"))
            for _ in range(2):
                pg.execute(insert.replace("?", "%s"), (b"{",))
    db = backend.open()
    try:
        assert db.query("SELECT topic, digest FROM quarantine") == [("t", None)] * 2
        bad = _item("feedback/v1/clinic-3/reception-1/event/fc3-a", b"{")
        first, again = store.ingest(db, [bad]), store.ingest(db, [bad])
        assert (first.quarantined, again.quarantined, again.duplicates) == (1, 0, 1)
        assert len(store.quarantined(db)) == 3
    finally:
        db.close()
    db = backend.open()  # again: nothing to add
    try:
        assert len(store.quarantined(db)) == 3
    finally:
        db.close()


# -- the collector process -----------------------------------------------------------

def test_duplicates_by_republish_and_by_two_instances_are_stored_once(
        broker: Broker, backend: Backend, collectors: Callable[[str], Proc],
        subscribe: Callable[[str], Subscriber]) -> None:
    states = subscribe("feedback/v1/collector/state")
    collectors("central-1")
    collectors("central-2")
    wait_collector_online(states, 2)
    same = press_event(1)
    unique = [press_event(i) for i in range(2, 202)]
    # Three deliveries of one event, and every other event twice, split over
    # the two instances by the shared subscription.
    publish_all(broker, [same, *unique, same, *unique, same])
    wait_events(backend, 201)
    db = backend.open()
    rows = db.query("SELECT event_id, count(*) FROM events GROUP BY event_id")
    assert len(rows) == 201
    assert {n for _, n in rows} == {1}
    wait_for(lambda: store.watermarks(db).get(("clinic-3", "reception-1")) == 201, 20,
             "watermark 201")
    db.close()


def test_collector_sigkilled_mid_stream_loses_nothing_and_doubles_nothing(
        broker: Broker, backend: Backend, collectors: Callable[[str], Proc],
        subscribe: Callable[[str], Subscriber]) -> None:
    states = subscribe("feedback/v1/collector/state")
    first = collectors("central-1")
    wait_collector_online(states)
    msgs = [press_event(i) for i in range(1, 2001)]
    t = threading.Thread(target=publish_all, args=(broker, msgs))
    t.start()
    wait_for(lambda: count_events(backend) >= 300, 60, "a part of the stream stored")
    first.kill()  # SIGKILL: batches in flight were never acknowledged
    t.join(60)
    collectors("central-1")  # same id: the same persistent session
    wait_events(backend, 2000, 90)
    db = backend.open()
    assert db.query("SELECT count(DISTINCT event_id), count(*), min(seq), max(seq) "
                    "FROM events")[0] == (2000, 2000, 1, 2000)
    wait_for(lambda: store.watermarks(db).get(("clinic-3", "reception-1")) == 2000, 20,
             "watermark 2000")
    db.close()


def test_end_to_end_presses_to_report(tmp_path: Path, broker: Broker, backend: Backend,
                                      collectors: Callable[[str], Proc],
                                      procs: Callable[[list[str], Path], Proc]) -> None:
    collectors("central-1")
    site = Site(tmp_path, broker, procs)
    site.config.write_text(site.config.read_text() + '\n[delivery]\nmode = "collector"\n')
    site.start()
    site.wait_connected()
    presses = [0, 0, 1, 2, 0, 2, 0, 1, 0, 0]  # good 6, neutral 2, bad 2
    for i, b in enumerate(presses):
        site.press(b, delay_ms=i * 150)
    wait_events(backend, len(presses), 30)
    cfg = collector_config(tmp_path / "cli.toml", broker, backend)

    def report(*extra: str) -> tuple[str, ...]:
        r = _cli(cfg, "report", "loyalty", "--by", "desk", "--period", "day", "--csv", "-",
                 *extra)
        assert r.returncode == 0, r.stderr
        lines = list(csv.reader(io.StringIO(r.stdout, newline="")))
        assert lines[0] == ["desk", "day", "good", "neutral", "bad", "presses", "index"]
        (row,) = lines[1:]
        desk, _day, *figures = row
        return (desk, *figures)

    # Ten presses in 1.5 s at one desk: from the 6th on they are a `burst`,
    # left out by default.  First five: good 3, neutral 1, bad 1 -> (3-1)/5.
    assert report() == ("clinic-3/desk-1", "3", "1", "1", "5", "40.0")
    # All ten: good 6, neutral 2, bad 2 -> (6-2)/10.
    assert report("--include-burst") == ("clinic-3/desk-1", "6", "2", "2", "10", "40.0")
    # The edge removes them once the collector's watermark covers them.
    wait_for(lambda: site.status().get("queue", {}).get("depth") == 0, 20,
             "the edge's store emptied by the watermark")
    assert site.status()["delivery"]["watermark"] == len(presses)
    fleet = json.loads(_cli(cfg, "fleet", "--json").stdout)
    assert fleet[0]["edge"] == "clinic-3/reception-1"
    assert fleet[0]["state"] == "online"


@pytest.mark.parametrize(("mode", "all_arrive"), [("collector", True), ("broker", False)])
def test_collector_down_longer_than_the_broker_queue_holds(
        tmp_path: Path, procs: Callable[[list[str], Path], Proc], mode: str,
        all_arrive: bool) -> None:
    broker = Broker(tmp_path / "broker", extra="max_queued_messages 100\n")
    broker.conf.write_text(broker.conf.read_text().replace("max_queued_messages 0\n", ""))
    broker.start()
    try:
        sqlite = Backend("sqlite", tmp_path, None)
        cfg = collector_config(tmp_path / "c.toml", broker, sqlite)
        collector = procs(["collector.cli", "run", "--config", str(cfg)], tmp_path / "c.log")
        wait_for(lambda: sqlite.path is not None and sqlite.path.exists(), 20, "collector up")
        site = Site(tmp_path, broker, procs, buttons=5, layout="five-point")
        site.config.write_text(site.config.read_text()
                               + f'\n[delivery]\nmode = "{mode}"\nresend_after_s = 5\n')
        site.start()
        site.wait_connected()
        site.press(0)
        wait_events(sqlite, 1, 20, "the first press, with the collector up")
        collector.kill(15)  # a clean stop: its session stays, and it says offline
        for i in range(1000):
            site.press(i % 5, delay_ms=i * 20, hold_ms=40)
        wait_for(lambda: site.status().get("published", 0) >= 1001 or
                 site.status().get("queue", {}).get("depth", 0) >= 1000, 60,
                 "1,000 presses taken by the edge")
        collector = procs(["collector.cli", "run", "--config", str(cfg)], tmp_path / "c2.log")
        if all_arrive:
            wait_events(sqlite, 1001, 120, "every press after the collector is back")
            assert count_events(sqlite) == 1001
        else:
            wait_for(lambda: site.status().get("queue", {}).get("depth") == 0, 60,
                     "the edge deleted everything on PUBACK")
            wait_for(lambda: count_events(sqlite) >= 100, 30, "the broker's queue delivered")
            lost = 1001 - count_events(sqlite)
            assert lost >= 800, f"only {lost} lost"  # the broker kept 100 of 1,000
    finally:
        broker.stop()


def test_commands_to_an_edge_wait_for_its_result(tmp_path: Path, broker: Broker,
                                                 procs: Callable[[list[str], Path], Proc],
                                                 subscribe: Callable[[str], Any]) -> None:
    sqlite = Backend("sqlite", tmp_path, None)
    cfg = collector_config(tmp_path / "c.toml", broker, sqlite)
    site = Site(tmp_path, broker, procs)
    site.start()
    site.wait_connected()
    r = _cli(cfg, "operator", "clinic-3/reception-1", "desk-1", "op-9")
    assert r.returncode == 0, r.stderr
    assert "op-9 on duty at desk-1" in r.stdout
    sub = subscribe("feedback/+/+/+/event/#")
    site.press(0)
    wait_for(sub.events, 10, "a press after the command")
    assert sub.events()[0]["operator"] == {"id": "op-9", "source": "command"}
    r = _cli(cfg, "operator", "clinic-3/reception-1", "desk-99", "op-9")
    assert r.returncode == 1
    assert "refused: desk must be one of" in r.stderr
    r = _cli(cfg, "operator", "clinic-3/nowhere", "desk-1", "op-9", "--timeout", "1")
    assert r.returncode == 3
    assert "did not answer" in r.stderr
    doctors = tmp_path / "doctors.json"
    doctors.write_text(json.dumps({"rev": 2, "doctors": [
        {"id": "dr-a", "name": "Dr A", "specialty": "ENT", "photo": None}]}))
    r = _cli(cfg, "doctors", "clinic-3/reception-1", str(doctors))
    assert r.returncode == 0, r.stderr
    assert "doctor list rev 2 applied" in r.stdout


def test_a_poison_event_is_quarantined_and_intake_goes_on(
        broker: Broker, backend: Backend, collectors: Callable[[str], Proc],
        subscribe: Callable[[str], Subscriber]) -> None:
    """seq 2^63 passed the old schema and killed `run` (SQLite: OverflowError) or
    wedged it (PostgreSQL: bigint out of range, retried for ever); unacknowledged,
    it came back after every restart and nothing from any edge was committed."""
    states = subscribe("feedback/v1/collector/state")
    proc = collectors("central-1")
    wait_collector_online(states)
    topic, good = press_event(1)
    poison = json.loads(press_event(2)[1])
    poison["seq"] = 2**63
    publish_all(broker, [(topic, json.dumps(poison).encode())])
    publish_all(broker, [press_event(3, site="clinic-4", edge="office-1"), (topic, good)])
    wait_events(backend, 2, 30, "the events published after the poison stored")
    db = backend.open()
    try:
        wait_for(lambda: len(store.quarantined(db)) == 1, 10, "the poison quarantined")
        assert [r for _, _, r, _ in store.quarantined(db)] == ["invalid: seq fails maximum"]
        assert store.counters(db).get("quarantined:invalid") == 1
        assert db.query("SELECT site, seq FROM events ORDER BY site") == [
            ("clinic-3", 1), ("clinic-4", 3)]
    finally:
        db.close()
    assert proc.proc is not None
    assert proc.proc.poll() is None, proc.log()


@pytest.mark.parametrize(("line", "accepted"), [
    ("dr-a,2026-11-01,2026-11-30,120", True),
    ("dr a,2026-11-01,2026-11-30,120", False),  # not a doctor id
    ("=HYPERLINK(1),2026-11-01,2026-11-30,1", False),
    ("dr-a,2026-11-01,2026-11-30,9223372036854775808", False),  # 2^63: no database holds it
    ("dr-a,2026-11-01,2026-11-30,-1", False),
    ("dr-a,2026-11-30,2026-11-01,1", False)])
def test_visits_import_checks_doctor_ids_and_counts(tmp_path: Path, line: str,
                                                     accepted: bool) -> None:
    """Issue 14: imported visit counts follow the doctor-id grammar and a documented range."""
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'id = "cli"\n\n[broker]\nhost = "127.0.0.1"\n\n'
                   f'{Backend("sqlite", tmp_path, None).toml()}')
    csv_file = tmp_path / "visits.csv"
    csv_file.write_text(f"doctor,from,to,patients\n{line}\n", encoding="utf-8")
    r = _cli(cfg, "visits", str(csv_file))
    assert (r.returncode == 0) == accepted, r.stderr
    if not accepted:
        assert "line 2" in r.stderr
        assert "Traceback" not in r.stderr


def test_who_handled_a_callback_follows_the_operator_grammar(tmp_path: Path) -> None:
    """`--by` lands in reports and CSV exports: a line break or formula is refused."""
    cfg = tmp_path / "cli.toml"
    cfg.write_text(f'id = "cli"\n\n[broker]\nhost = "127.0.0.1"\n\n'
                   f'{Backend("sqlite", tmp_path, None).toml()}')
    for by in ("anna\nFAKE", "=1+1", " anna"):
        r = _cli(cfg, "callback", "clinic-3/reception-1/x", "--status", "called", "--by", by)
        assert r.returncode == 2, r.stderr
        assert "--by must be an operator id" in r.stderr
    r = _cli(cfg, "callback", "clinic-3/reception-1/x", "--status", "called", "--by", "Анна")
    assert r.returncode == 1
    assert "no callback request" in r.stderr
