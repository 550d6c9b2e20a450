"""The outbox on real files: durability, limits, disk full.

Opening, corruption and seq reservation: tests/test_outbox_file.py."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.events import (
    DeviceRef,
    Dropped,
    Event,
    EventTime,
    OperatorTag,
    Press,
    encode_event,
    new_event_id,
)
from edge.store import Append, Store, StoreDiskFullError, read_stats


def make_event(button: int = 0) -> Event:
    return Event(new_event_id(), "desk-1", DeviceRef("fc3-00a1b2c3d4e5", "console",
                                                      "00A1B2C3D4E5"),
                 Press(button=button, label="good", score=1),
                 OperatorTag.nobody(), EventTime(time.time_ns(), True, "boot", 1, 0))


def encode(event: Event, seq: int) -> tuple[str, bytes]:
    return f"t/{event.device.id}", encode_event(event, seq, "site", "edge")


def drop_event(first: int, last: int, reason: str) -> Event:
    return Event(new_event_id(), "edge-1", DeviceRef("edge-1", "edge", None),
                 Dropped(first, last, reason), OperatorTag.nobody(),
                 EventTime(time.time_ns(), True, "boot", 1, 0))


def open_store(path: Path, *, announce: bool = False, **kw: int) -> Store:
    return Store(path, encode, drop_event=drop_event if announce else None, **kw)


def test_events_come_out_in_order_and_leave_only_when_removed(tmp_path: Path) -> None:
    s = open_store(tmp_path / "o.sqlite")
    res = s.commit([Append(make_event(i % 3)) for i in range(5)])
    assert res.seqs == [1, 2, 3, 4, 5]
    assert [p.seq for p in s.pending(0, 10)] == [1, 2, 3, 4, 5]
    assert [p.seq for p in s.pending(3, 10)] == [4, 5]
    assert json.loads(s.pending(0, 1)[0].payload)["seq"] == 1
    s.remove([1, 3])
    assert [p.seq for p in s.pending(0, 10)] == [2, 4, 5]
    assert s.depth == 3


def test_duplicate_keys_are_not_stored_twice_even_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    s = open_store(path)
    assert s.commit([Append(make_event(), ("dev", "1:100"))]).seqs == [1]
    s.close()
    s = open_store(path)
    res = s.commit([Append(make_event(), ("dev", "1:100")), Append(make_event(), ("dev", "2:200"))])
    assert res.seqs == [None, 2]
    assert s.keys("dev") == ["1:100", "2:200"]
    s.commit([], forget=["dev"])
    assert s.keys("dev") == []


def test_full_by_count_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    s = open_store(tmp_path / "o.sqlite", max_events=100)
    s.commit([Append(make_event()) for _ in range(100)])
    res = s.commit([Append(make_event()) for _ in range(7)])
    assert res.dropped == [(1, 7)]
    assert s.depth == 100
    assert s.pending(0, 1)[0].seq == 8
    assert s.stats().drops == {"store_full": 7}
    s.close()
    assert read_stats(tmp_path / "o.sqlite").drops == {"store_full": 7}  # type: ignore[union-attr]


def test_full_by_bytes_drops_the_oldest(tmp_path: Path) -> None:
    s = open_store(tmp_path / "o.sqlite", max_bytes=1_000_000)
    size = len(encode(make_event(), 1)[1])
    n = 1_000_000 // size
    s.commit([Append(make_event()) for _ in range(n + 10)])
    st = s.stats()
    assert st.payload_bytes <= 1_000_000
    assert st.drops["store_full"] >= 10
    assert s.depth + st.drops["store_full"] == n + 10


def test_disk_full_fails_the_whole_commit_and_changes_nothing(tmp_path: Path) -> None:
    s = Store(tmp_path / "o.sqlite", encode, max_page_count=40)
    stored = 0
    full: StoreDiskFullError | None = None
    for _ in range(1000):
        try:
            s.commit([Append(make_event()) for _ in range(5)])
        except StoreDiskFullError as e:
            full = e
            break
        stored += 5
    assert full is not None
    assert s.depth == stored
    assert [p.seq for p in s.pending(0, 10_000)] == list(range(1, stored + 1))
    # Delivering frees room; the store keeps working.
    s.remove(list(range(1, stored + 1)))
    assert s.commit([Append(make_event())]).seqs == [stored + 1]


_WRITER = """
import sys, time
from pathlib import Path
from tests.test_store import open_store, make_event
from edge.store import Append
s = open_store(Path(sys.argv[1]))
while True:
    r = s.commit([Append(make_event()) for _ in range(time.time_ns() % 4 + 1)])
    # Acknowledged only now that commit() returned: this is what a device is told.
    print("A", *r.seqs, flush=True)
    if r.seqs[0] % 7 == 0:
        print("R", r.seqs[0] - 3, flush=True)  # said before it happens: may be lost
        s.remove([r.seqs[0] - 3])
"""


@pytest.mark.parametrize("round_", range(5))
def test_sigkill_at_any_moment_loses_nothing_acknowledged(tmp_path: Path, round_: int) -> None:
    path = tmp_path / "o.sqlite"
    acked: set[int] = set()
    removed: set[int] = set()
    for kill in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)],
                                stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]
        # Let it write for a while that differs per round, then kill it,
        # most likely in the middle of a transaction.
        deadline = time.monotonic() + 0.05 + ((round_ * 4 + kill) * 0.037) % 0.25
        while time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate()
        lines += rest.splitlines(keepends=True)
        for line in lines:
            word, *nums = line.split()
            (acked if word == b"A" else removed).update(int(n) for n in nums)
        db = sqlite3.connect(path)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        present = {r[0] for r in db.execute("SELECT seq FROM outbox")}
        db.close()
        lost = acked - present - removed
        assert not lost, f"acknowledged events lost: {sorted(lost)[:10]}"
        # Committed-but-unacknowledged events are kept too; no seq is skipped.
        assert set(range(1, max(acked) + 1)) <= present | removed
    s = open_store(path)
    assert s.commit([Append(make_event())]).seqs[0] == s.last_seq
    assert s.last_seq > max(acked)


def test_pending_never_serves_events_dropped_or_removed(tmp_path: Path) -> None:
    s = open_store(tmp_path / "o.sqlite", max_events=100)
    s.commit([Append(make_event()) for _ in range(150)])  # one batch over the limit
    assert [p.seq for p in s.pending(0, 1000)] == list(range(51, 151))
    assert s.pending(0, 1)[0].seq == 51
    s.remove([60, 61])
    assert [p.seq for p in s.pending(59, 3)] == [62, 63, 64]
    s.commit([Append(make_event())], remove=[62])
    assert [p.seq for p in s.pending(59, 3)] == [63, 64, 65]
    s.close()
    reopened = open_store(tmp_path / "o.sqlite", max_events=100)
    assert [p.seq for p in reopened.pending(59, 3)] == [63, 64, 65]
