"""The outbox's files on disk: opening, corruption, the seq watermark and reservation."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.outbox_file import (
    SEQ_BLOCK,
    SeqReservation,
    open_outbox,
    read_stats,
    state_path,
)
from edge.store import Append, Store, StoreBusyError, StoreDiskFullError, StoreError
from tests.test_store import encode, make_event, open_store


def _codes(s: Store) -> list[str]:
    return sorted({a.code for a in s.alarms.active(time.time_ns())})


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
    s = open_store(path, announce=True)
    assert _codes(s) == ["store_corrupt", "store_replaced"]
    aside = list(tmp_path.glob("o.sqlite.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not")
    # Whatever of 1..SEQ_BLOCK the collector lacks is gone: the store says so
    # with the first event of the fresh store, written with its birth.
    first = s.pending(0, 10)
    assert [p.seq for p in first] == [SEQ_BLOCK + 1]
    assert json.loads(first[0].payload)["dropped"] == {
        "from_seq": 1, "to_seq": SEQ_BLOCK, "reason": "store_replaced"}
    # Seqs 1..5 may have reached the collector: the fresh store must not reuse them.
    assert s.commit([Append(make_event())]).seqs[0] == SEQ_BLOCK + 2
    # Once the announcement is delivered, the alarms are over.
    s.remove([SEQ_BLOCK + 1])
    assert _codes(s) == []


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
    s = open_store(path, announce=True)
    assert _codes(s) == ["store_corrupt", "store_replaced"]
    assert s.commit([Append(make_event())]).seqs[0] == SEQ_BLOCK + 2


def test_an_unknown_schema_version_is_moved_aside_not_reused(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    opened = open_outbox(path)
    # No reservation file and no seq left in the old store: continuity is unproven.
    assert [code for code, _ in opened.alarms] == ["store_corrupt", "seq_state_lost"]
    assert "unknown store schema version 99" in opened.alarms[0][1]
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
    assert r.needs(1) == SEQ_BLOCK
    r.write(SEQ_BLOCK)
    assert SeqReservation(path).on_file == SEQ_BLOCK
    inode = path.stat().st_ino
    assert r.needs(SEQ_BLOCK) is None  # inside the block: no write
    assert r.needs(SEQ_BLOCK + 1) == 2 * SEQ_BLOCK
    r.write(2 * SEQ_BLOCK)  # every write replaces the file (write and rename)
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
    s = open_store(path, announce=True)
    assert _codes(s) == []  # a missing file is not damage: the store vouches for seqs
    assert s.pending(0, 10) == []  # nothing announced as lost
    assert s.commit([Append(make_event())]).seqs == [4]  # from the watermark in the store
    # The reservation is written again at once, not at the next block.
    assert SeqReservation(state_path(path)).on_file == SEQ_BLOCK


def test_read_stats_without_a_readable_store_is_none_and_creates_nothing(
        tmp_path: Path) -> None:
    assert read_stats(tmp_path / "missing.sqlite") is None
    assert not (tmp_path / "missing.sqlite").exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not an sqlite database at all" * 200)
    assert read_stats(junk) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.sqlite"]


# -- the fault model, file by file (edge/outbox_file.py's table) --------------------

_HOLD_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""


def test_a_busy_store_is_waited_for_never_taken_for_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(3)])
    s.close()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n"
        s = open_store(path, announce=True)
        assert s.available  # reading needs no write lock
        assert [p.seq for p in s.pending(0, 10)] == [1, 2, 3]
        with pytest.raises(StoreBusyError):
            s.commit([Append(make_event())])
        assert _codes(s) == ["store_busy"]
        assert not list(tmp_path.glob("*.corrupt*"))
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(10)
        assert holder.stdout is not None
        holder.stdout.close()
    assert s.commit([Append(make_event())]).seqs == [4]
    assert _codes(s) == []


def test_a_full_disk_refuses_raises_the_alarm_and_clears_it(tmp_path: Path) -> None:
    s = Store(tmp_path / "o.sqlite", encode, max_page_count=40, wall_ns=time.time_ns)
    stored = 0
    full: StoreDiskFullError | None = None
    while full is None and stored < 5000:
        try:
            s.commit([Append(make_event()) for _ in range(5)])
            stored += 5
        except StoreDiskFullError as e:
            full = e
    assert full is not None
    assert _codes(s) == ["disk_full"]
    assert s.depth == stored
    s.remove(list(range(1, stored + 1)))
    assert s.commit([Append(make_event())]).seqs == [stored + 1]
    assert _codes(s) == []


def test_a_zero_length_store_is_a_new_store_above_the_reservation(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(3)])
    s.close()
    path.write_bytes(b"")
    s = open_store(path, announce=True)
    assert _codes(s) == ["store_replaced"]
    pending = s.pending(0, 10)
    assert [p.seq for p in pending] == [SEQ_BLOCK + 1]
    assert json.loads(pending[0].payload)["dropped"]["to_seq"] == SEQ_BLOCK
    s.close()
    # Opening it again announces nothing more: the store was born with the announcement.
    s = open_store(path, announce=True)
    assert [p.seq for p in s.pending(0, 10)] == [SEQ_BLOCK + 1]
    assert _codes(s) == ["store_replaced"]  # until the announcement is delivered


def test_an_unreadable_reservation_file_is_rebuilt_from_the_store(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event()) for _ in range(3)])
    s.close()
    state_path(path).write_bytes(b"")
    s = open_store(path, announce=True)
    assert _codes(s) == ["state_unreadable"]
    assert s.commit([Append(make_event())]).seqs == [4]
    assert SeqReservation(state_path(path)).on_file >= SEQ_BLOCK
    s.close()
    state_path(path).write_bytes(b'{"_default": {"1": {"seq_res')
    s = open_store(path, announce=True)
    assert _codes(s) == ["state_unreadable"]
    assert s.commit([Append(make_event())]).seqs == [5]


def test_store_and_reservation_both_lost_is_alarmed(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event())])
    s.close()
    (tmp_path / "logins.json").write_text("{}")  # the daemon ran here before
    for p in (path, state_path(path)):
        p.unlink()
    s = open_store(path, announce=True)
    assert _codes(s) == ["seq_state_lost"]


def test_an_unwritable_reservation_refuses_the_commit_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    s.commit([Append(make_event())])  # reserves 1..SEQ_BLOCK
    s.close()
    sp = state_path(path)
    s = open_store(path)
    sp.unlink()
    sp.mkdir()  # the rename onto the state file now fails
    big = [Append(make_event()) for _ in range(SEQ_BLOCK)]
    with pytest.raises(StoreError):
        s.commit(big)  # needs the next block first: refused before anything is written
    assert s.depth == 1
    assert _codes(s) != []
    sp.rmdir()
    s.retry(time.monotonic() + 10)  # the daemon's loop reopens a closed store
    assert s.commit(big).seqs[-1] == SEQ_BLOCK + 1
    assert SeqReservation(sp).on_file == 2 * SEQ_BLOCK
    assert _codes(s) == []


def test_store_full_drops_are_always_announced_with_room_kept(tmp_path: Path) -> None:
    """max_events 100, nothing delivered, 130 single-event commits: every seq is
    still pending or inside a pending `dropped` range (the issue's instance 5)."""
    s = open_store(tmp_path / "o.sqlite", announce=True, max_events=100)
    for _ in range(130):
        s.commit([Append(make_event())])
    pending = s.pending(0, 1000)
    assert len(pending) <= 100
    covered: set[int] = set()
    announcements = 0
    for p in pending:
        body = json.loads(p.payload)
        covered.add(p.seq)
        if body["kind"] == "dropped":
            announcements += 1
            covered.update(range(body["dropped"]["from_seq"], body["dropped"]["to_seq"] + 1))
    assert covered >= set(range(1, s.last_seq + 1))
    assert announcements <= 5  # dropped in chunks: not one announcement per event
    assert s.stats().drops["store_full"] == 130 - (len(pending) - announcements)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a file system needs root")
def test_a_read_only_store_is_opened_again_once_writable(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        path = mnt / "o.sqlite"
        s = open_store(path)
        s.commit([Append(make_event())])
        s.close()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        s = open_store(path, announce=True)
        assert not s.available
        assert _codes(s) == ["store_read_only"]
        with pytest.raises(StoreError):
            s.commit([Append(make_event())])
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], check=True)
        s.retry(time.monotonic() + 10)
        assert s.available
        assert s.commit([Append(make_event())]).seqs == [2]
        assert _codes(s) == []
        s.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_older_copy_of_the_store_put_back_does_not_reuse_seqs(tmp_path: Path) -> None:
    """A backup restored over the outbox (or a copy from another card) is valid but
    older than the seqs already used: it continues above them and says so."""
    path = tmp_path / "o.sqlite"
    s = open_store(path, announce=True)
    s.commit([Append(make_event()) for _ in range(2)])
    s.close()
    backup = tmp_path / "backup.sqlite"
    shutil.copy(path, backup)
    s = open_store(path, announce=True)
    s.commit([Append(make_event()) for _ in range(3)])  # seqs 3..5, published
    s.remove([1, 2, 3, 4, 5])
    s.close()  # notes seq 5 as used
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    shutil.copy(backup, path)
    s = open_store(path, announce=True)
    assert "store_rolled_back" in _codes(s)
    announced = [json.loads(p.payload) for p in s.pending(0, 10)]
    assert [a["dropped"] for a in announced if a["kind"] == "dropped"] == [
        {"from_seq": 3, "to_seq": 5, "reason": "store_rolled_back"}]
    assert s.commit([Append(make_event())]).seqs[0] == 7  # 6 is the announcement


def test_a_store_deleted_while_open_is_noticed_and_started_again(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path, announce=True)
    s.commit([Append(make_event()) for _ in range(3)])
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    s.retry(time.monotonic() + 100)
    assert s.available
    assert _codes(s) == ["store_replaced"]
    first = s.pending(0, 10)
    assert [json.loads(p.payload)["dropped"]["to_seq"] for p in first] == [SEQ_BLOCK]
    assert s.commit([Append(make_event())]).seqs == [SEQ_BLOCK + 2]
