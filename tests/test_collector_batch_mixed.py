"""collector intake: a batch with a duplicate event_id
(the same message twice, and another message reusing an id) and a poison
message (one the database refuses) together, on both backends: stored,
counted, quarantined and watermarked as one message at a time would be."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from collector import store
from collector.store import Item
from tests.collector_fixtures import Backend, press_event
from tests.test_collector_batch import _item, _one_by_one, _rows, _summary


def test_a_batch_with_duplicates_and_a_poison_message_is_as_one_by_one(
        backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    msgs = [press_event(i) for i in range(1, 8)]
    items = [_item(*m) for m in msgs]
    # The poison is seq 4; a second event carries seq 4's id (its replacement,
    # seq 9), and seq 2 comes twice.
    bad = items[3]
    poison = Item("event", bad.site, bad.edge, body={**bad.body, "desk": "d\ud800"},
                  topic=bad.topic, raw=b"{}")
    reuse = _item(*press_event(9, event_id=bad.body["event_id"]))
    batch = [items[0], items[1], poison, items[1], reuse, *items[4:], items[2]]
    db = backend.open()
    try:
        got: list[Any] = [_summary(store.ingest(db, batch, now_ms=1)),
               _summary(store.ingest(db, batch, now_ms=1))]
        got.append(_rows(db))
        marks = store.watermarks(db)
        quarantined = store.quarantined(db)
    finally:
        db.close()
    pg = request.getfixturevalue("postgres") if backend.kind == "postgres" else None
    expected = _one_by_one(Backend(backend.kind, tmp_path / "ref", pg), [batch, batch])
    assert got == expected
    assert len(quarantined) == 1
    # seq 4 is neither stored nor announced: the watermark stops below it.
    assert marks == {("clinic-3", "reception-1"): 3}
    assert [r[2] for r in got[2] if r[3] == bad.body["event_id"]] == [9]
