"""The fsync in its own thread (edge.committer), under a real slow fsync.

Each test runs itself again in a child pytest with an LD_PRELOAD shim
(benchmarks/slow_fsync.py, compiled with gcc here) wrapping fsync and
fdatasync: a gate holds every fsync until the test lets it go and tells the
test when one started, so "while an fsync is blocked" is a fact, not a
timing guess.  The daemon runs in the child, with the console firmware
behind the in-memory HID transport and a real Mosquitto.
"""

from __future__ import annotations

import ctypes
import os
import select
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.slow_fsync import build_shim, preload_env
from tests.conftest import Broker, Subscriber, wait_for
from tests.test_daemon import Running

_CHILD = "FEEDBACK_SLOW_FSYNC_CHILD"


def _in_child(request: pytest.FixtureRequest, tmp_path: Path, delay_us: int = 0) -> bool:
    """True in the child; in the parent, run this test in a child with the shim."""
    if os.environ.get(_CHILD) == "1":
        return True
    lib = build_shim(tmp_path)
    if lib is None:
        pytest.skip("no C compiler for the slow-fsync shim")
    env = {**preload_env(lib, delay_us), _CHILD: "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           f"{request.node.path}::{request.node.name}"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return False


class Gate:
    """Holds every fsync of this process (the preloaded shim) until released;
    opened again at the test's end whatever happened (see `gate`)."""

    def __init__(self) -> None:
        self._release_r, self._release_w = os.pipe()
        self._entered_r, self._entered_w = os.pipe()
        self.entered = 0
        self._closed = False

    def close_(self) -> None:
        self._closed = True
        ctypes.CDLL(None).slow_fsync_gate(self._release_r, self._entered_w)

    def wait_entered(self, timeout: float = 10.0) -> None:
        """Until one more fsync has started (and is held)."""
        ready, _, _ = select.select([self._entered_r], [], [], timeout)
        assert ready, f"no fsync started within {timeout} s"
        os.read(self._entered_r, 1)
        self.entered += 1

    def open_(self) -> None:
        """No more holding: let every held fsync go."""
        if not self._closed:
            return
        ctypes.CDLL(None).slow_fsync_gate(-1, -1)
        while select.select([self._entered_r], [], [], 0)[0]:
            os.read(self._entered_r, 1)
            self.entered += 1
        os.write(self._release_w, b"x" * max(1, self.entered))


@pytest.fixture
def gate() -> Iterator[Gate]:
    g = Gate()
    yield g
    g.open_()  # else a failed test's daemon would wait on its last fsync forever


def _round_trips(r: Running, n: int = 5) -> None:
    """The main loop answered `n` status requests: it turns."""
    for _ in range(n):
        r.status()


def test_pubacks_and_publishes_go_on_while_a_commits_fsync_is_held(
        request: pytest.FixtureRequest, tmp_path: Path, broker: Broker,
        subscribe: Callable[[str], Subscriber], gate: Gate) -> None:
    if not _in_child(request, tmp_path):
        return
    sub = subscribe("feedback/+/+/+/event/#")
    with Running(tmp_path, broker) as r:
        broker.stop()
        for i in range(5):
            r.fw.press(i % 3, delay_ms=i * 200)
        wait_for(lambda: r.daemon.store.last_seq == 5 and r.fw.unacked == 0, 10,
                 "five presses stored while offline")
        base = r.fw.acked_total
        gate.close_()
        r.fw.press(2)  # button 1 may still be held down from the fifth press
        gate.wait_entered()  # the sixth press's commit is waiting for its fsync
        broker.start()
        # The backlog goes out and its PUBACKs are handled while that fsync is held.
        wait_for(lambda: r.daemon.publisher.acked == 5, 20, "PUBACKs for the backlog")
        wait_for(lambda: len(sub.events()) == 5, 10, "the backlog delivered")
        _round_trips(r)
        assert r.fw.acked_total == base, "the sixth press was ACKed before its fsync returned"
        assert [e["seq"] for e in sub.events()] == [1, 2, 3, 4, 5]
        gate.open_()
        wait_for(lambda: r.fw.acked_total == base + 1 and r.fw.unacked == 0, 10,
                 "ACK after fsync")
        wait_for(lambda: len(sub.events()) == 6, 10, "the sixth press delivered")
        assert [e["seq"] for e in sub.events()] == [1, 2, 3, 4, 5, 6]


def test_no_ack_or_publish_before_the_fsync_returns_and_later_presses_wait(
        request: pytest.FixtureRequest, tmp_path: Path, broker: Broker,
        subscribe: Callable[[str], Subscriber], gate: Gate) -> None:
    if not _in_child(request, tmp_path):
        return
    sub = subscribe("feedback/+/+/+/event/#")
    with Running(tmp_path, broker) as r:
        acked_while_held: list[int] = []
        held = {"now": False}
        prev = r.fw.on_acked

        def on_acked(events: list[object]) -> None:
            if held["now"]:
                acked_while_held.append(len(events))
            if prev is not None:
                prev(events)  # type: ignore[arg-type]

        r.fw.on_acked = on_acked  # type: ignore[assignment]
        wait_for(lambda: r.fw.unacked == 0, 10, "HELLO acknowledged")
        base = r.fw.acked_total
        gate.close_()
        held["now"] = True
        r.fw.press(0)
        gate.wait_entered()
        r.fw.press(2)  # arrives while the first press's fsync is held
        wait_for(lambda: r.fw.unacked == 2, 5, "the second press sent")
        _round_trips(r)
        assert r.fw.acked_total == base
        assert sub.events() == []
        assert r.daemon.publisher.published == 0
        held["now"] = False
        gate.open_()
        wait_for(lambda: r.fw.acked_total == base + 2, 10, "both presses ACKed once durable")
        wait_for(lambda: len(sub.events()) == 2, 10, "both delivered")
        assert acked_while_held == []
        assert [(e["seq"], e["press"]["button"]) for e in sub.events()] == [(1, 0), (2, 2)]


def test_seq_order_holds_when_commits_and_publishes_interleave_on_a_slow_disk(
        request: pytest.FixtureRequest, tmp_path: Path, broker: Broker,
        subscribe: Callable[[str], Subscriber]) -> None:
    if not _in_child(request, tmp_path, delay_us=7000):
        return
    sub = subscribe("feedback/+/+/+/event/#")
    with Running(tmp_path, broker) as r:
        n = 60
        wait_for(lambda: r.fw.unacked == 0, 10, "HELLO acknowledged")
        base = r.fw.acked_total
        for i in range(n):
            r.fw.press(i % 3, hold_ms=40, delay_ms=i * 70)
        wait_for(lambda: r.fw.acked_total == base + n and r.fw.unacked == 0, 30,
                 "every press ACKed")
        wait_for(lambda: len(sub.events()) >= n, 30, "every press delivered")
        seqs = [e["seq"] for e in sub.events()]
        assert seqs == list(range(1, len(seqs) + 1))
        sync = r.daemon.store._durable.sync
        assert sync is not None
        assert min(sync.fsync_s) >= 0.007


def test_a_failed_fsync_acknowledges_nothing_and_the_press_comes_again(
        request: pytest.FixtureRequest, tmp_path: Path, broker: Broker,
        subscribe: Callable[[str], Subscriber], gate: Gate) -> None:
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
        gate.close_()
        r.fw.press(1)
        gate.wait_entered()
        # The fsync fails as a dying card's would: EBADF from a closed descriptor.
        os.close(sync._fd)
        gate.open_()
        wait_for(lambda: r.status()["drops"].get("store_io_error", 0) >= 1, 10, "the failure")
        assert r.fw.acked_total == base
        # The store reopens and the console's resend is stored, ACKed and published.
        wait_for(lambda: r.fw.acked_total == base + 1 and r.fw.unacked == 0, 30,
                 "the press again")
        wait_for(lambda: len(sub.events()) == 2, 10, "delivered")
        seqs = [e["seq"] for e in sub.events()]
        assert seqs[0] == 1
        assert seqs[1] > 1
        if seqs[1] == 2:
            # The resend was taken as a duplicate of the row written before the
            # failed fsync: only right if reopening wrote that row again, into the
            # database file (checkpointed there and fsynced), not left in the WAL
            # whose fsync failed (a later fsync may return 0 without writing it).
            copy = tmp_path / "db-file-only.sqlite"
            copy.write_bytes(r.daemon.store.path.read_bytes())
            c = sqlite3.connect(copy)
            try:
                in_file = {int(q) for (q,) in c.execute("SELECT seq FROM outbox")}
            finally:
                c.close()
            assert 2 in in_file, (
                "seq 2 was ACKed as the resend's duplicate but is only in the WAL whose "
                f"fsync failed (the database file holds {sorted(in_file)})")
