"""Opening the outbox without reading all of it, and pruning dedup keys
without sorting them (edge/store_check.py, edge/store_dedup.py), on real
SQLite files."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from edge import outbox_file
from edge.outbox_file import SEQ_BLOCK
from edge.store import Append, Store
from edge.store_dedup import DEDUP_KEEP, PRUNE_EVERY
from tests.test_outbox_file import _codes
from tests.test_store import make_event, open_store


def _counted(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        n, size = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) "
                             "FROM outbox").fetchone()
    return int(n), int(size)


def _figures(s: Store) -> tuple[int, int]:
    st = s.stats()
    return st.depth, st.payload_bytes


def _set_totals(path: Path, value: str | None) -> None:
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM meta WHERE name='totals'")
        if value is not None:
            db.execute("INSERT INTO meta(name, value) VALUES ('totals', ?)", (value,))


def test_pending_totals_are_kept_by_every_write_and_read_back_at_open(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path, announce=True, max_events=60)
    s.commit([Append(make_event()) for _ in range(50)])
    s.commit([Append(make_event()) for _ in range(30)])  # full: a chunk dropped, announced
    s.remove([p.seq for p in s.pending(0, 5)])
    s.commit([Append(make_event())], remove=[p.seq for p in s.pending(0, 3)][1:])
    assert s.rewrite_pending(lambda b: b.replace(b'"synced":true', b'"synced":false ')) > 0
    s.remove_through(s.pending(0, 10)[-1].seq)
    assert _figures(s) == _counted(path)
    s.close()
    s = open_store(path, announce=True, max_events=60)
    assert _figures(s) == _counted(path)
    s.close()

    # Read back, not counted: figures planted in meta (for the same first
    # and last seq) are what the store reports.
    with sqlite3.connect(path) as db:
        first, last = db.execute("SELECT min(seq), max(seq) FROM outbox").fetchone()
    _set_totals(path, f"12345 678 {first} {last}")
    s = open_store(path, announce=True, max_events=60)
    assert _figures(s) == (12345, 678)
    s.close()


@pytest.mark.parametrize("totals", [None, "garbage", "3 300 1 2"])
def test_totals_missing_or_not_fitting_the_outbox_are_counted(tmp_path: Path,
                                                               totals: str | None) -> None:
    """A store from a version that kept no totals, or whose rows changed under
    them (an older daemon wrote to it), is counted row by row."""
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(40)])
    s.remove([1, 2, 3])
    expected = _counted(path)
    s.close()
    _set_totals(path, totals)
    s = open_store(path)
    assert _figures(s) == expected
    s.commit([Append(make_event())])
    assert _figures(s) == _counted(path)


def _damage_a_middle_leaf(path: Path, payload: bytes) -> None:
    """Scribble over the header of the leaf page holding `payload`."""
    data = bytearray(path.read_bytes())
    at = data.find(payload)
    assert at > 0, "harness: payload not found in the file"
    page = at // 1024 * 1024
    data[page:page + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


def damaged_large_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store of 300 events, counted as large (opened after the partial check
    only), with a leaf page in its middle damaged and no WAL beside it."""
    monkeypatch.setattr(outbox_file, "SYNC_CHECK_BYTES", 0)  # every store counts as large
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(300)])
    middle = s.pending(150, 1)[0].payload
    assert s._db is not None
    s._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    _damage_a_middle_leaf(path, middle)
    return path


def test_a_large_store_opens_without_the_whole_check_and_corruption_is_still_moved_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = damaged_large_store(tmp_path, monkeypatch)
    s = open_store(path, announce=True)
    # Open at once: the damage is where only the whole check looks.
    assert s.available
    assert _codes(s) == []
    assert s.checked(30), "the background check did not finish"
    s.retry(time.monotonic())
    assert _codes(s) == ["store_corrupt", "store_replaced"]
    assert [p.name[-4:] for p in tmp_path.glob("o.sqlite.corrupt-*")
            if p.name[-4:] not in ("-wal", "-shm")] != []
    assert [p.seq for p in s.pending(0, 10)] == [SEQ_BLOCK + 1]  # 1..SEQ_BLOCK announced
    assert s.commit([Append(make_event())]).seqs[0] == SEQ_BLOCK + 2


def test_a_large_intact_store_passes_the_background_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_file, "SYNC_CHECK_BYTES", 0)
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(300)])
    s.close()
    s = open_store(path)
    assert s.checked(30)
    s.retry(time.monotonic())
    assert s.available
    assert _codes(s) == []
    assert [p.seq for p in s.pending(0, 2)] == [1, 2]
    s.close()


def test_a_store_damaged_at_its_last_page_is_caught_at_open_even_when_large(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The partial check at open reads the outbox's ends: the page every insert
    goes to is never trusted unchecked."""
    monkeypatch.setattr(outbox_file, "SYNC_CHECK_BYTES", 0)
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(300)])
    last = s.pending(299, 1)[0].payload
    assert s._db is not None
    s._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    _damage_a_middle_leaf(path, last)
    s = open_store(path, announce=True)
    assert _codes(s) == ["store_corrupt", "store_replaced"]
    assert s.commit([Append(make_event())]).seqs[0] == SEQ_BLOCK + 2


# -- dedup keys ------------------------------------------------------------------

def test_dedup_keeps_each_sources_newest_keys_across_reopens_and_prunes_the_rest(
        tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    made: dict[str, list[str]] = {"a": [], "b": []}
    n = 0
    for _ in range(5):  # a daemon restarted between bursts of presses
        for _ in range(30):
            batch = []
            for _ in range(40):
                n += 1
                src = "a" if n % 5 else "b"
                made[src].append(f"k{n}")
                # Keys only, and events with keys, as the device kinds store them.
                batch.append(Append(make_event() if n % 3 else None, (src, f"k{n}")))
            # A replayed key is a duplicate: it must not move the cut-off.
            batch.append(Append(make_event(), ("a", made["a"][-1])))
            s.commit(batch)
            for src, keys in made.items():
                stored = s.keys(src)
                # (Keys stored with one seq tie in `at`: compared as sets.)
                assert set(keys[-DEDUP_KEEP:]) <= set(stored) <= set(keys)
                assert len(stored) < DEDUP_KEEP + 2 * PRUNE_EVERY
        s.close()
        s = open_store(path)
    for src, keys in made.items():
        assert set(keys[-DEDUP_KEEP:]) <= set(s.keys(src)) <= set(keys)
    assert len(s.keys("a")) < DEDUP_KEEP + 2 * PRUNE_EVERY
    assert len(made["a"]) > DEDUP_KEEP + 2 * PRUNE_EVERY  # pruning was needed


def test_forgotten_keys_start_the_source_afresh(tmp_path: Path) -> None:
    s = open_store(tmp_path / "o.sqlite")
    s.commit([Append(make_event(), ("a", f"old{i}")) for i in range(DEDUP_KEEP + PRUNE_EVERY)])
    s.commit([Append(make_event(), ("a", f"new{i}")) for i in range(PRUNE_EVERY)], forget=["a"])
    assert set(s.keys("a")) == {f"new{i}" for i in range(PRUNE_EVERY)}
    s.commit([Append(make_event(), ("a", f"more{i}")) for i in range(DEDUP_KEEP)])
    kept = set(s.keys("a"))
    assert {f"more{i}" for i in range(DEDUP_KEEP)} <= kept
    assert len(kept) < DEDUP_KEEP + PRUNE_EVERY
