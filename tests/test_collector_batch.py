"""The collector's fast path keeps its word: the compiled schema validator
accepts and refuses exactly what the reference one does (with the same
reasons), and a batch inserted with a few statements stores, counts and
reports each event as inserting them one by one did."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from collector import intake, store
from collector.db import EVENT_COLS, EVENT_TYPES
from collector.intake import classify
from collector.store import Item
from tests.collector_fixtures import Backend, device_lost_event, press_event
from tests.test_collector_fuzz import HOSTILE_INTS, HOSTILE_STRINGS, message

# -- the compiled validator ------------------------------------------------------------


class _Never:
    """A compiled validator that never vouches: every message goes to the reference."""

    def is_valid(self, _body: Any) -> bool:
        return False


def _classify_by_reference(topic: str, payload: bytes) -> Item | None:
    saved = intake._COMPILED
    intake._COMPILED = dict.fromkeys(saved, _Never())  # type: ignore[arg-type]
    try:
        return classify(topic, payload)
    finally:
        intake._COMPILED = saved


def _same_verdict(topic: str, payload: bytes) -> None:
    fast, reference = classify(topic, payload), _classify_by_reference(topic, payload)
    assert fast == reference


@settings(max_examples=600, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(message())
def test_the_compiled_validator_accepts_and_quarantines_what_the_reference_does(
        msg: tuple[str, bytes]) -> None:
    _same_verdict(*msg)


@pytest.mark.parametrize("value", [*HOSTILE_INTS, *HOSTILE_STRINGS, 5.0, 5.5, 1e300, True,
                                   None, [], {}])
@pytest.mark.parametrize("field", ["seq", "desk", "event_id", "site", ("time", "mono_ns"),
                                   ("time", "wall"), ("press", "button"), ("press", "score"),
                                   ("device", "serial"), ("operator", "id")])
def test_every_boundary_value_in_every_kind_of_field_gets_the_reference_verdict(
        field: str | tuple[str, str], value: Any) -> None:
    topic, good = press_event(1)
    body = json.loads(good)
    if isinstance(field, tuple):
        body[field[0]][field[1]] = value
    else:
        body[field] = value
    _same_verdict(topic, json.dumps(body).encode("utf-8", "surrogatepass"))


def test_a_message_the_compiled_validator_cannot_read_is_judged_by_the_reference() -> None:
    """An unpaired surrogate is no Rust string: jsonschema_rs raises, and the
    message must still be classified (here: quarantined for the text)."""
    topic, good = press_event(1)
    body = json.loads(good)
    body["operator"]["id"] = "op\ud800"
    payload = json.dumps(body).encode("utf-8", "surrogatepass")
    with pytest.raises(ValueError):  # noqa: PT011 - whichever its error, it is refused
        intake._COMPILED["event"].is_valid(intake._loads(payload))
    item = classify(topic, payload)
    assert item is not None
    assert item.kind == "quarantine"
    assert item == _classify_by_reference(topic, payload)


# -- batched inserts -------------------------------------------------------------------


def _item(topic: str, payload: bytes) -> Item:
    item = classify(topic, payload)
    assert item is not None
    assert item.kind == "event", item.reason
    return item


def _one_by_one(backend: Backend, batches: list[list[Item]]) -> list[Any]:
    """What each batch gives when its items are ingested one per call (in the
    order the store sorts them), as a comparable summary."""
    db = backend.open()
    try:
        out = []
        for items in batches:
            total = store.IngestResult()
            for it in sorted(items, key=store._order):
                store._merge(total, store.ingest(db, [it], now_ms=1))
            out.append(_summary(total))
        return [*out, _rows(db)]
    finally:
        db.close()


def _summary(res: store.IngestResult) -> tuple[Any, ...]:
    return (res.stored, res.duplicates, res.quarantined, sorted(res.dropped_ranges),
            sorted(res.device_losses))


def _rows(db: Any) -> list[Any]:
    return [tuple(r) for r in db.query(
        "SELECT site, edge, seq, event_id, payload FROM events ORDER BY site, edge, seq")]


def test_a_batch_stores_counts_and_reports_each_event_as_one_by_one(
        backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Duplicates inside the batch (the same event twice; two events with one id),
    events committed by an earlier batch, a dropped range and a device loss, two
    edges: stored, duplicates and reports as ingesting them one by one gives."""
    a = [press_event(i) for i in range(1, 9)]
    other_edge = [press_event(i, edge="office-1") for i in range(1, 4)]
    same_id = press_event(20, event_id=json.loads(a[5][1])["event_id"])  # id of seq 6
    dropped = press_event(9)
    body = json.loads(dropped[1])
    body.update(kind="dropped", dropped={"from_seq": 9, "to_seq": 12, "reason": "store_full"})
    del body["press"]
    dropped = (dropped[0], json.dumps(body).encode())
    lost = device_lost_event(13, lost=3, total=7)
    first = [_item(*m) for m in a[:3]]
    second = [_item(*m) for m in [*a, a[4], same_id, *other_edge, dropped, lost, a[6]]]
    db = backend.open()
    try:
        got = [_summary(store.ingest(db, batch, now_ms=1)) for batch in (first, second, second)]
        got.append(_rows(db))
        counters = store.counters(db)
        marks = store.watermarks(db)
    finally:
        db.close()
    pg = request.getfixturevalue("postgres") if backend.kind == "postgres" else None
    expected = _one_by_one(Backend(backend.kind, tmp_path / "ref", pg), [first, second, second])
    assert got == expected
    assert got[1][:2] == (10, 6)  # 5 new of a, 3 of office-1, dropped, lost; 6 duplicates
    assert got[1][3] == [("clinic-3", "reception-1", 9, 12, "store_full")]
    assert got[1][4] == [("clinic-3", "reception-1", "fc3-a", 3, "ring_overflow")]
    assert got[2][:2] == (0, 16)  # all again: nothing stored, nothing reported
    assert got[2][3:] == ([], [])
    assert counters == {"duplicates": 22}
    assert marks == {("clinic-3", "reception-1"): 13, ("clinic-3", "office-1"): 3}
    # Of the two events with one id, the lower seq (first in the store's order) is kept.
    assert [r[2] for r in got[3] if r[3] == json.loads(a[5][1])["event_id"]] == [6]


def test_a_value_the_database_refuses_in_a_batch_is_quarantined_alone(
        backend: Backend) -> None:
    """One multi-row statement fails whole; the one-by-one pass then stores the
    rest and quarantines the message at fault, naming the field."""
    good = [_item(*press_event(i)) for i in range(1, 6)]
    bad = _item(*press_event(6))
    body = {**bad.body, "desk": "desk\ud800"}  # past classify: no database's text
    poison = Item("event", bad.site, bad.edge, body=body, topic=bad.topic, raw=b"{}")
    db = backend.open()
    try:
        res = store.ingest(db, [*good[:2], poison, *good[2:]])
        assert (res.stored, res.quarantined, res.duplicates) == (5, 1, 0)
        assert [r[0] for r in db.query("SELECT seq FROM events ORDER BY seq")] == [1, 2, 3, 4, 5]
        (reason,) = [r for _, _, r, _ in store.quarantined(db)]
        assert re.fullmatch(r"store: \w+ at desk", reason), reason
        assert store.watermarks(db) == {("clinic-3", "reception-1"): 5}
    finally:
        db.close()


def test_a_number_postgresql_cannot_hold_in_a_batch_is_quarantined_alone(
        backend: Backend) -> None:
    """INTEGER is 32 bits on PostgreSQL: the column arrays' cast refuses the batch;
    the one-by-one pass refuses the one message and names its field."""
    if backend.kind != "postgres":
        pytest.skip("SQLite's INTEGER holds 64 bits")
    good = [_item(*press_event(i)) for i in range(1, 4)]
    bad = _item(*press_event(4))
    body = {**bad.body, "press": {**bad.body["press"], "button": 2**40}}
    poison = Item("event", bad.site, bad.edge, body=body, topic=bad.topic, raw=b"{}")
    db = backend.open()
    try:
        res = store.ingest(db, [*good, poison])
        assert (res.stored, res.quarantined) == (3, 1)
        (reason,) = [r for _, _, r, _ in store.quarantined(db)]
        assert reason == "store: NumericValueOutOfRange at press/button"
    finally:
        db.close()


def test_the_column_types_the_batch_casts_to_are_the_tables(backend: Backend) -> None:
    db = backend.open()
    try:
        if backend.kind == "sqlite":
            have = {str(r[1]): str(r[2]) for r in db.query("PRAGMA table_info(events)")}
        else:
            have = {str(c): {"text": "TEXT", "bigint": "BIGINT", "integer": "INTEGER"}[str(t)]
                    for c, t in db.query("SELECT column_name, data_type FROM "
                                         "information_schema.columns WHERE table_name = "
                                         "'events' AND table_schema = current_schema()")}
    finally:
        db.close()
    assert have == EVENT_TYPES
    assert set(EVENT_COLS) == set(EVENT_TYPES)

