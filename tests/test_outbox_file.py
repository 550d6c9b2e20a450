"""The outbox's files on disk: opening, corruption, the seq watermark and reservation."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from edge.outbox_file import (
    SEQ_BLOCK,
    SeqReservation,
    open_outbox,
    read_stats,
    state_path,
)
from edge.store import Append
from tests.test_store import make_event, open_store


def test_seq_is_never_reused_after_everything_was_delivered_and_reopened(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(3)])
    s.remove([1, 2, 3])
    s.close()
    s = open_store(path)
    assert s.commit([Append(make_event())]).seqs == [4]


def test_corrupt_store_is_moved_aside_with_an_alarm_and_seq_continues(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(5)])
    s.close()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.write_bytes(b"this is not an sqlite database at all" * 200)
    s = open_store(path)
    assert len(s.alarms) == 1
    assert "store_corrupt" in s.alarms[0]
    aside = list(tmp_path.glob("o.sqlite.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not")
    # Seqs 1..5 may have reached the collector: the fresh store must not reuse them.
    seq = s.commit([Append(make_event())]).seqs[0]
    assert seq is not None
    assert seq > 5
    assert seq == SEQ_BLOCK + 1
    # Whatever of 1..SEQ_BLOCK the collector lacks is gone: the daemon says so.
    assert s.lost == (1, SEQ_BLOCK)


def test_store_damaged_inside_is_detected_by_the_integrity_check(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(300)])
    s._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()
    data = bytearray(path.read_bytes())
    for i in range(2048, len(data), 1024):  # scribble over every page but the header
        data[i:i + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    s = open_store(path)
    assert s.alarms
    assert s.commit([Append(make_event())]).seqs[0] == SEQ_BLOCK + 1


def test_an_unknown_schema_version_is_moved_aside_not_reused(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    opened = open_outbox(path)
    assert len(opened.alarms) == 1
    assert "unknown store schema version 99" in opened.alarms[0]
    assert len(list(tmp_path.glob("o.sqlite.corrupt-*"))) == 1
    assert opened.last_seq == 0
    assert opened.lost is None  # nothing was ever reserved, so nothing can be lost
    opened.db.close()
    opened.seqs.close()


def test_seqs_are_reserved_on_file_a_block_ahead_and_written_once_per_block(
        tmp_path: Path) -> None:
    path = state_path(tmp_path / "o.sqlite")
    assert path.name == "o.sqlite.state.json"
    r = SeqReservation(path)
    assert r.on_file == 0
    r.reserve(1)
    assert SeqReservation(path).on_file == SEQ_BLOCK
    inode = path.stat().st_ino
    r.reserve(SEQ_BLOCK)  # inside the block: no write
    assert path.stat().st_ino == inode
    r.reserve(SEQ_BLOCK + 1)  # every write replaces the file (write and rename)
    assert path.stat().st_ino != inode
    assert SeqReservation(path).on_file == 2 * SEQ_BLOCK
    r.close()


def test_a_lost_reservation_file_does_not_make_seqs_repeat(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(3)])
    s.remove([1, 2, 3])
    s.close()
    state_path(path).unlink()
    s = open_store(path)
    assert s.lost is None
    assert s.commit([Append(make_event())]).seqs == [4]  # from the watermark in the store
    assert SeqReservation(state_path(path)).on_file == SEQ_BLOCK


def test_read_stats_without_a_readable_store_is_none_and_creates_nothing(
        tmp_path: Path) -> None:
    assert read_stats(tmp_path / "missing.sqlite") is None
    assert not (tmp_path / "missing.sqlite").exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not an sqlite database at all" * 200)
    assert read_stats(junk) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.sqlite"]
