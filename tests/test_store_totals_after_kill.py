"""pending totals kept in meta (edge/store_check.py): a
writer killed with SIGKILL at random points (commits with the fsync in its
thread, removals, full-store drops, rewrites, dedup pruning), then the figures
`feedback-edge status` reads (read_stats) and those a reopened Store reports
compared with COUNT(*) and SUM(length(payload))."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from edge.outbox_file import read_stats
from tests.test_store import open_store

WRITER = r"""
import queue, random, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from edge.store import Append, Store
from tests.test_store import make_event, encode, drop_event
q = queue.SimpleQueue()
s = Store(Path({path!r}), encode, drop_event=drop_event, max_events=300, post_synced=q.put)
rnd = random.Random({seed})
print("ready", flush=True)
n = 0
while True:
    n += 1
    k = rnd.randint(1, 20)
    appends = [Append(make_event(), ("dev", f"k{{n}}-{{i}}") if rnd.random() < 0.7 else None)
               for i in range(k)]
    pend = s.pending(0, 50)
    remove = [p.seq for p in pend if rnd.random() < 0.5]
    s.commit(appends, remove=remove)
    while True:  # wait for the fsync thread's word, as the daemon does
        msg = q.get()
        if s.synced(msg) is not None:
            break
    if rnd.random() < 0.3:
        s.remove([p.seq for p in s.pending(0, 30) if rnd.random() < 0.5])
    if rnd.random() < 0.05:
        s.rewrite_pending(lambda b: b.replace(b'"boot"', b'"boot2"'))
"""


def _counted(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as db:
        n, size = db.execute("SELECT count(*), coalesce(sum(length(payload)), 0) "
                             "FROM outbox").fetchone()
    return int(n), int(size)


def test_totals_match_the_rows_after_kill_9_at_random_points(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parent.parent)
    rnd = random.Random(17)
    path = tmp_path / "o.sqlite"
    for round_ in range(12):
        code = WRITER.format(root=root, path=str(path), seed=round_)
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.startswith(b"ready"), p.stderr.read() if p.stderr else line
            # Let it write for a random while: wait on its exit (it never exits by
            # itself) with a random deadline, then SIGKILL it.
            try:
                p.wait(timeout=rnd.uniform(0.05, 0.6))
                raise AssertionError(f"writer ended: {p.communicate()[1]!r}")
            except subprocess.TimeoutExpired:
                pass
        finally:
            p.send_signal(signal.SIGKILL)
            p.communicate()
        st = read_stats(path)  # feedback-edge status with the daemon down
        assert st is not None
        assert (st.depth, st.payload_bytes) == _counted(path), f"round {round_}: status"
        s = open_store(path, announce=True, max_events=300)
        figures = s.stats()
        assert (figures.depth, figures.payload_bytes) == _counted(path), f"round {round_}: open"
        s.close()
        last_seq = st.last_seq
    assert last_seq > 300, "harness: the writers wrote too little to fill the store"
