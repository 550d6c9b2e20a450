"""Issue 14, the collector's limits: values the schemas let through or the code
trusted, each of which stopped or subverted something for every site.

- a wall time far from now (year 9999, year 1) crashed every report, and a
  timesync anchor corrected times into year 10146: wall times have a range;
- one event with seq 2^53 - 1 made `gaps` step through every missing seq;
- a `dropped.reason` with a line break forged collector log lines;
- refused messages on a hostile topic became edges (listed by `fleet`, sent a
  retained ack on every reconnect);
- status, devices and health had no string, list or key limits;
- a quarantine reason echoed the unknown schema version (a phone number);
- `dropped` from_seq > to_seq and `device_lost` lost > total were stored.

Every test that stores runs against SQLite and a real PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector import cli, intake, queries, store
from collector.intake import classify
from collector.store import IngestResult, Item
from tests.collector_fixtures import Backend, count_events, device_lost_event, press_event

EDGE = "feedback/v1/clinic-3/reception-1"


def _item(topic: str, payload: bytes | dict[str, Any]) -> Item:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    item = classify(topic, raw)
    assert item is not None
    return item


def _press(**time: Any) -> tuple[str, dict[str, Any]]:
    topic, payload = press_event(1)
    body = json.loads(payload)
    body["time"].update(time)
    return topic, body


def _dropped(seq: int, lo: int, hi: int, reason: str = "store_full") -> tuple[str, bytes]:
    from tests.test_collector import dropped_event

    topic, payload = dropped_event(seq, lo, hi)
    body = json.loads(payload)
    body["dropped"]["reason"] = reason
    return topic, json.dumps(body).encode()


@contextlib.contextmanager
def _within(seconds: float) -> Iterator[None]:
    """Fail (TimeoutError) if the block runs longer than `seconds` (no sleep: a timer)."""
    def expired(_sig: int, _frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# -- 1. wall times have a range -----------------------------------------------------------

def test_the_wall_time_range_is_1960_to_2099() -> None:
    from edge.contract.timefmt import WALL_MAX_MS, WALL_MIN_MS

    assert WALL_MIN_MS == -315_619_200_000  # 1960-01-01T00:00:00Z
    assert WALL_MAX_MS == 4_102_444_799_999  # 2099-12-31T23:59:59.999Z


@pytest.mark.parametrize(("wall", "why"), [
    ("9999-12-31T23:59:60Z", "pattern"),  # year 10000 once the leap second is added
    ("9999-12-15T00:00:00Z", "pattern"),
    ("0001-01-01T00:00:00Z", "pattern"),
    ("1959-12-31T23:59:59.999Z", "pattern"),
    ("2100-01-01T00:00:00Z", "pattern"),
    ("2099-12-31T23:59:60Z", "range"),  # a leap second is the next instant: 2100
])
def test_wall_times_outside_the_contract_s_range_are_quarantined(wall: str, why: str) -> None:
    topic, body = _press(wall=wall)
    item = _item(topic, body)
    assert (item.kind, item.reason) == ("quarantine", f"invalid: time/wall fails {why}")
    anchor = _item(f"{EDGE}/timesync", {"boot_id": "boot-a", "mono_ns": 0, "wall": wall})
    assert (anchor.kind, anchor.reason) == ("quarantine", f"invalid: wall fails {why}")
    status = _item(f"{EDGE}/status", {"state": "online", "since": wall, "version": "0.1.0",
                                      "boot_id": "boot-a"})
    assert status.kind == "quarantine"
    assert status.reason.startswith("invalid: since fails ")


@pytest.mark.parametrize("wall", ["1960-01-01T00:00:00Z", "1969-10-03T00:00:00.000Z",
                                  "1970-01-01T00:00:05.000Z", "2099-12-31T23:59:59.999999Z"])
def test_wall_times_at_the_ends_of_the_range_are_stored(wall: str) -> None:
    """An unsynced Pi reads 1970; a terminal's replay is up to 90 days older (and the
    schema's age_ms up to 5 years): those are real answers, kept until timesync."""
    topic, body = _press(wall=wall, synced=False)
    assert _item(topic, body).kind == "event"


@pytest.mark.parametrize("anchor_first", [True, False])
def test_a_timesync_correction_that_would_leave_the_range_is_not_applied(
        backend: Backend, anchor_first: bool) -> None:
    """An anchor at 2099-12-31T23:59 read 10 min of uptime before a press: the press
    would be corrected into 2100.  The correction is not applied (the press keeps its
    recorded wall time); one that lands inside the range is, whichever comes first."""
    from edge.contract.timefmt import WALL_MAX_MS

    db = backend.open()
    minute = 60 * 10**9
    late = _item(*press_event(1, synced=False, wall_ns=5 * 10**9, mono_ns=20 * minute,
                              boot_id="boot-x"))
    fine = _item(*press_event(2, synced=False, wall_ns=6 * 10**9, mono_ns=5 * minute,
                              boot_id="boot-x"))
    # The largest uptime the schema allows (146 years) before the earliest anchor.
    early = _item(*press_event(3, synced=False, wall_ns=7 * 10**9, mono_ns=0,
                               boot_id="boot-y"))
    anchors = [_item(f"{EDGE}/timesync", {"boot_id": "boot-x", "mono_ns": 10 * minute,
                                          "wall": "2099-12-31T23:55:00Z"}),
               _item(f"{EDGE}/timesync", {"boot_id": "boot-y", "mono_ns": 2**62 - 1,
                                          "wall": "1960-01-01T00:00:00Z"})]
    assert [i.kind for i in anchors] == ["timesync"] * 2
    events = [late, fine, early]
    for batch in ([*anchors], events) if anchor_first else (events, [*anchors]):
        store.ingest(db, batch)
    got = {r["seq"]: (r["wall_ms"], r["corrected_ms"]) for r in queries.events(db, ["press"])}
    assert got == {1: (5_000, None), 2: (6_000, WALL_MAX_MS + 1 - 10 * 60_000), 3: (7_000, None)}
    db.close()


# -- 2. gaps in O(stored) --------------------------------------------------------------------

def test_missing_ranges_are_computed_from_what_is_stored_at_any_size() -> None:
    top = 2**53 - 1
    with _within(5):
        assert store.missing_ranges(0, top, {top}, []) == [(1, top - 1)]
        assert store.missing_ranges(0, top, {1, 2, 5, top}, [(7, 9), (3, 3)]) == [
            (4, 4), (6, 6), (10, top - 1)]
        # Overlapping and enclosing drops, seqs inside them, seqs at or below the watermark.
        assert store.missing_ranges(4, 40, {2, 12, 30, 40}, [(10, 20), (15, 16), (1, 5),
                                                             (25, 35)]) == [
            (6, 9), (21, 24), (36, 39)]
        assert store.missing_ranges(10, 10, set(), []) == []
        assert store.missing_ranges(0, 3, {1, 2, 3}, [(2, 1)]) == []  # an inverted range: none


def test_gaps_with_one_event_at_the_largest_seq_finishes(backend: Backend,
                                                        tmp_path: Path) -> None:
    db = backend.open()
    store.ingest(db, [_item(*press_event(2**53 - 1, mono_ns=1)), _item(*press_event(2))])
    with _within(10):
        (gap,) = store.gaps(db)
    assert gap["missing"] == [(1, 1), (3, 2**53 - 2)]
    db.close()


# -- 3. no message value forges a log line ---------------------------------------------------

@pytest.mark.parametrize("reason", ["x\nERROR forged", "", "Store_Full", "x" * 33, "full!"])
def test_a_dropped_reason_outside_its_grammar_is_quarantined(reason: str) -> None:
    item = _item(*_dropped(5, 1, 4, reason))
    assert (item.kind, item.reason) == ("quarantine", "invalid: dropped/reason fails pattern")


@pytest.mark.parametrize("reason", ["store_full", "store_replaced", "store_rolled_back"])
def test_the_daemon_s_drop_reasons_pass(reason: str) -> None:
    assert _item(*_dropped(5, 1, 4, reason)).kind == "event"


def test_every_value_from_a_message_is_escaped_in_the_collector_s_log(
        caplog: pytest.LogCaptureFixture) -> None:
    """What passed the schema before (or a future schema) cannot forge a log line."""
    res = IngestResult(quarantined=1)
    res.dropped_ranges.append(("clin\nic", "e\x1b[2J", 1, 2, "x\nERROR forged"))
    res.device_losses.append(("s", "e", "dev\nERROR forged", 3, "r\u202eeason"))
    with caplog.at_level(logging.INFO, logger="collector"):
        intake.log_result(res)
    assert len(caplog.records) == 3
    for r in caplog.records:
        text = r.getMessage()
        assert not {"\n", "\x1b", "\u202e"} & set(text), text
    assert "x\\x0aERROR forged" in caplog.text


# -- 5. refused messages create no edges -----------------------------------------------------

def test_quarantined_messages_create_no_edges_and_get_no_ack(backend: Backend) -> None:
    db = backend.open()
    topic, good = press_event(1)
    other = json.loads(good)
    other["edge"] = "reception-2"
    items = [_item("feedback/v1/CLINIC/reception-1/status", b"{}"),
             _item("feedback/v1/clin\u202eic/e1/status", b"{}"),
             _item("feedback/v1/clin\u202eic/e1/health", b"not json"),
             _item("feedback/v1/clinic-3/e1/event/x", json.dumps(other).encode()),
             _item("feedback/v1/clinic-9/edge-9/event/x", b"{}")]
    assert [i.kind for i in items] == ["quarantine"] * 5
    res = store.ingest(db, items)
    assert res.quarantined == 5
    assert db.query("SELECT site, edge FROM edges") == []
    assert len(store.quarantined(db)) == 5
    # An edge from before this fix (a row with nothing but its name) is not listed and
    # gets no retained ack; a real edge is and does.
    with db.transaction() as cur:
        cur.execute("INSERT INTO edges (site, edge) VALUES (?, ?)", ("clin\u202eic", "e1"))
    store.ingest(db, [_item(topic, good)])
    assert store.watermarks(db) == {("clinic-3", "reception-1"): 1}
    assert [r["edge"] for r in cli.fleet_rows(db, int(time.time() * 1000))] == [
        "clinic-3/reception-1"]
    db.close()


def test_watermarks_are_published_only_to_edges_with_names() -> None:
    sent: list[str] = []

    class _Client:
        def publish(self, topic: str, *_a: Any, **_k: Any) -> None:
            sent.append(topic)

    fake = intake.Intake.__new__(intake.Intake)
    fake._client = _Client()  # type: ignore[assignment]
    fake.cfg = type("Cfg", (), {"id": "central-1"})()  # type: ignore[assignment]
    fake._publish_watermarks({("clin\u202eic", "e1"): 0, ("CLINIC", "reception-1"): 0,
                              ("clinic-3", "reception-1"): 4})
    assert sent == ["feedback/v1/clinic-3/reception-1/ack"]


# -- 6. side messages have limits and grammars -----------------------------------------------

STATUS = {"state": "online", "since": "2026-11-23T09:00:00.000Z", "version": "0.1.0",
          "boot_id": "0e0a8d1c-5b7e-4c1f-9f5e-3f1f2b8c9d00"}
DEVICE = {"id": "fc3-a", "kind": "console", "serial": "00A1B2C3D4E5", "desk": "desk-1",
          "state": "connected", "last_seen": "2026-11-23T09:00:00.000Z", "error": None}
UNCONFIGURED = {"id": "usb-1-1.2", "kind": "keyboard", "serial": None, "desk": None,
                "state": "unconfigured", "last_seen": None, "error": None,
                "usb_id": "16c0:27db", "port_path": "1-1.2"}
HEALTH = {"queue_depth": 0, "oldest_pending_age_s": None, "store_bytes": 4096,
          "disk_free_bytes": 10**9, "drops": {"store_full": 2, "after_hours": 1},
          "decode_errors": {"fc3-a": {"bad_length": 1}}, "clock_synced": True,
          "uptime_s": 12.5, "alarms": ["device_missing: console fc3-a at desk desk-1 ..."],
          "delivery": {"mode": "collector", "collector_online": True, "watermark": 3,
                       "resent": 0}}


def test_side_messages_as_the_daemon_publishes_them_pass() -> None:
    assert _item(f"{EDGE}/status", STATUS).kind == "status"
    assert _item(f"{EDGE}/devices", {"devices": [DEVICE, UNCONFIGURED]}).kind == "devices"
    assert _item(f"{EDGE}/health", HEALTH).kind == "health"


@pytest.mark.parametrize(("name", "body", "where"), [
    ("status", {**STATUS, "version": "1" * 30_000_000}, "size"),
    ("status", {**STATUS, "version": "0.1\n0"}, "version"),
    ("status", {**STATUS, "boot_id": "b\nforged"}, "boot_id"),
    ("status", {**STATUS, "boot_id": "b" * 65}, "boot_id"),
    ("timesync", {"boot_id": "b\nforged", "mono_ns": 0, "wall": "2026-11-23T09:00:00Z"},
     "boot_id"),
    ("devices", {"devices": [{**DEVICE, "id": "dev\x1b[31mred"}]}, "devices/0/id"),
    ("devices", {"devices": [{**DEVICE, "id": "usb-1-1.2\n"}]}, "devices/0/id"),
    ("devices", {"devices": [{**DEVICE, "desk": "front desk"}]}, "devices/0/desk"),
    ("devices", {"devices": [{**DEVICE, "serial": "AB\x07"}]}, "devices/0/serial"),
    ("devices", {"devices": [{**DEVICE, "kind": "Console\n"}]}, "devices/0/kind"),
    ("devices", {"devices": [{**DEVICE, "last_seen": "9999-01-01T00:00:00Z"}]},
     "devices/0/last_seen"),
    ("devices", {"devices": [{**DEVICE, "error": "e" * 2000}]}, "devices/0/error"),
    ("devices", {"devices": [{**UNCONFIGURED, "port_path": "1-1\n"}]}, "devices/0/port_path"),
    ("devices", {"devices": [DEVICE] * 257}, "devices"),
    ("devices", {"devices": [DEVICE] * 300_000}, "size"),
    ("health", {**HEALTH, "drops": {f"k{i}": 1 for i in range(65)}}, "drops"),
    ("health", {**HEALTH, "drops": {"Store\nFull": 1}}, "drops"),
    ("health", {**HEALTH, "drops": {f"k{i}": 1 for i in range(500_000)}}, "size"),
    ("health", {**HEALTH, "decode_errors": {"dev\x1b": {"bad": 1}}}, "decode_errors"),
    ("health", {**HEALTH, "alarms": ["a" * 2000]}, "alarms/0"),
    ("health", {**HEALTH, "alarms": ["a"] * 257}, "alarms"),
])
def test_side_messages_beyond_their_limits_are_quarantined(name: str, body: dict[str, Any],
                                                           where: str) -> None:
    item = _item(f"{EDGE}/{name}", body)
    assert item.kind == "quarantine"
    if where == "size":
        assert item.reason == f"size: payload over {intake.MAX_PAYLOAD_BYTES} bytes"
    else:
        assert item.reason.startswith(f"invalid: {where} fails "), item.reason
    assert "forged" not in item.reason
    assert "\x1b" not in item.reason


# -- 7. a reason never carries a message's value --------------------------------------------

@pytest.mark.parametrize(("version", "reason"), [
    ("feedback.event/2 +4917012345678", "schema: unknown version"),
    ("+4917012345678", "schema: unknown version"),
    ("feedback.event/2\n", "schema: unknown version"),
    (None, "schema: unknown version"),
    (2, "schema: unknown version"),
    ("feedback.event/2", "schema: unknown version 'feedback.event/2'"),
    ("feedback.event/10", "schema: unknown version 'feedback.event/10'"),
])
def test_an_unknown_version_is_named_only_when_it_is_a_version(version: Any,
                                                               reason: str) -> None:
    topic, body = _press()
    body["schema"] = version
    item = _item(topic, body)
    assert (item.kind, item.reason) == ("quarantine", reason)


# -- 8. ranges that contradict themselves -----------------------------------------------------

def test_an_inverted_dropped_range_and_a_loss_above_the_total_are_quarantined(
        backend: Backend) -> None:
    db = backend.open()
    items = [_item(*_dropped(5, 50, 10)), _item(*device_lost_event(6, lost=5, total=3))]
    assert [(i.kind, i.reason) for i in items] == [
        ("quarantine", "invalid: dropped/to_seq fails >= from_seq"),
        ("quarantine", "invalid: device_lost/lost fails <= total")]
    # The ends themselves are fine: one seq dropped, every loss the device counted.
    fine = [_item(*_dropped(7, 4, 4)), _item(*device_lost_event(8, lost=3, total=3))]
    assert [i.kind for i in fine] == ["event", "event"]
    res = store.ingest(db, items + fine)
    assert (res.stored, res.quarantined) == (2, 2)
    assert count_events(backend) == 2
    (gap,) = store.gaps(db)
    assert gap["dropped"] == [(4, 4, "store_full")]
    db.close()
