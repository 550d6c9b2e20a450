"""commit thread (edge/committer.py): what a failed fsync
leaves behind.  Same machinery as tests/test_commit_thread.py (an LD_PRELOAD
shim gates fsync; the test runs itself again in a child pytest).

On Linux a failed fsync (writeback error) marks the dirty pages clean and
reports the error once, to the descriptor that asked; a later fsync on a new
descriptor returns 0 while the data never reached the disk (the 2018
"fsyncgate": PostgreSQL's answer is to PANIC and redo from its own log).
So a row written before a failed fsync is not durable, whatever a later
fsync says, unless it is written again.  The guarantee: a press is ACKed
only once a *successful* fsync covered the write that stored it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Broker, Subscriber, wait_for
from tests.test_commit_thread import Gate, _in_child, gate  # noqa: F401 - fixture
from tests.test_daemon import Running


def test_a_press_whose_fsync_failed_is_not_acked_on_the_strength_of_that_same_row(
        request: pytest.FixtureRequest, tmp_path: Path, broker: Broker,
        subscribe: Callable[[str], Subscriber], gate: Gate) -> None:  # noqa: F811
    if not _in_child(request, tmp_path):
        return
    sub = subscribe("feedback/+/+/+/event/#")
    with Running(tmp_path, broker) as r:
        r.fw.press(0)
        wait_for(lambda: len(sub.events()) == 1 and r.fw.unacked == 0, 10, "first press")
        base = r.fw.acked_total
        durable = r.daemon.store._durable
        sync = durable.sync if durable is not None else None
        assert sync is not None
        before = r.daemon.store.last_seq
        gate.close_()
        r.fw.press(1)
        gate.wait_entered()
        assert r.daemon.store.last_seq == before + 1  # written (NORMAL), its fsync held
        os.close(sync._fd)  # this fsync fails: the frames of that commit are not on disk
        gate.open_()
        wait_for(lambda: r.status()["drops"].get("store_io_error", 0) >= 1, 10, "the failure")
        wait_for(lambda: r.fw.acked_total == base + 1 and r.fw.unacked == 0, 30,
                 "the press ACKed again")
        wait_for(lambda: len(sub.events()) == 2, 10, "delivered")
        second = sub.events()[1]
        if second["seq"] != before + 1:
            return  # the resend was stored anew: nothing was trusted
        # The resend was taken as a duplicate of the row written before the failed
        # fsync: only right if reopening wrote that row again, into the database
        # file (checkpointed there and fsynced), not left in the WAL whose fsync
        # failed.  The file alone, without its WAL, must hold it.
        copy = tmp_path / "db-file-only.sqlite"
        copy.write_bytes(r.daemon.store.path.read_bytes())
        c = sqlite3.connect(copy)
        try:
            in_file = {int(q) for (q,) in c.execute("SELECT seq FROM outbox")}
        finally:
            c.close()
        assert before + 1 in in_file, (
            f"seq {before + 1} was ACKed as the resend's duplicate but is only in the WAL "
            f"whose fsync failed (the database file holds {sorted(in_file)})")
