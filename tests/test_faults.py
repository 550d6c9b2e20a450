"""The storage fault model (issue 12): real faults around the real daemon.

Real conditions, not mocks: a sized tmpfs filled by a real writer (disk full),
an ext4 image the kernel turns read-only under the daemon's open files (a
failing disk), a second process holding SQLite's write lock (busy), files
deleted, truncated or overwritten between runs.  The daemon, the console
simulator, Mosquitto and (in collector mode) the collector are real
processes.  Every test ends with `check_invariants`: ACKed presses published
or announced, no seq reused, the daemon never exited, the expected alarm
raised and cleared.

Rows of the fault table (alarm codes) each test covers are in its docstring.
Mounts and loop devices need root; those tests skip without it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

from tests import faults_fixtures
from tests.conftest import Broker, Subscriber, wait_for
from tests.faults_fixtures import (
    EVENT_TOPIC,
    AckedPress,
    Ext4Image,
    FaultSite,
    LockHolder,
    TmpfsMount,
    check_invariants,
    covered,
    dropped_ranges,
    unique_events,
)

# The harness's fixtures, in this module's namespace for pytest to find.
tmpfs = faults_fixtures.tmpfs
ext4 = faults_fixtures.ext4
fault_site = faults_fixtures.fault_site

MakeSite = Callable[..., FaultSite]
MODES = ["broker", "collector"]


def presses(sub: Subscriber) -> list[dict[str, Any]]:
    return [e for e in unique_events(sub.events()) if e.get("kind") == "press"]


def soft_wait(cond: Callable[[], Any], timeout: float) -> bool:
    """Wait for `cond` but do not fail: the invariants then say precisely what is wrong."""
    try:
        wait_for(cond, timeout, "", interval=0.05)
    except AssertionError:
        return False
    return True


def start_connected(site: FaultSite) -> None:
    site.start()
    site.wait_connected()
    site.wait(lambda: site.sim()["unacked"] == 0, 10, "the console's HELLO acknowledged")


def published_presses(site: FaultSite, sub: Subscriber, n: int) -> None:
    site.wait(lambda: len(presses(sub)) >= n, 20, f"{n} presses published")


# -- busy: another process holds the write lock --------------------------------------


def test_busy_store_at_start_is_not_taken_for_corrupt(
        fault_site: MakeSite, broker: Broker, subscribe: Callable[[str], Subscriber]) -> None:
    """store_busy at start (issue instance 1): 3 presses queued with the broker down,
    the lock held 15 s while the daemon starts.  Not moved aside, no store_replaced,
    the 3 published once the lock is gone; presses meanwhile kept by the console."""
    sub = subscribe(EVENT_TOPIC)
    site = fault_site()
    start_connected(site)
    broker.stop()
    site.wait_broker("disconnected")
    site.press_many(3)
    site.wait_depth(3)
    site.wait(lambda: site.sim()["unacked"] == 0, 10, "the 3 presses ACKed")
    assert site.stop() == 0
    holder = LockHolder(site.store_path, 15)
    try:
        site.start()
        site.wait_running(12)
        # Reading needs no lock: busy shows once the daemon has something to store.
        site.press_many(2)
        site.wait_alarm("store_busy", 12)
        site.wait_unacked(2, timeout=12)
        assert site.alive(), site.diag()
        assert not site.corrupt_files(), f"moved aside while busy: {site.corrupt_files()}"
        site.fault_ends()
        holder.wait_released(30)
    finally:
        holder.close()
    broker.start()
    soft_wait(lambda: len(presses(sub)) >= 5, 20)
    events, acked = site.settle(sub)
    events = check_invariants(site, events, acked, "store_busy")
    assert [e["seq"] for e in events if e["kind"] == "press"] == [1, 2, 3, 4, 5]


def test_busy_store_at_runtime_refuses_then_recovers(
        fault_site: MakeSite, subscribe: Callable[[str], Subscriber]) -> None:
    """store_busy at runtime: nothing stored or ACKed while another process holds the
    write lock; everything arrives once it lets go."""
    sub = subscribe(EVENT_TOPIC)
    site = fault_site()
    start_connected(site)
    site.press_many(2)
    published_presses(site, sub, 2)
    holder = LockHolder(site.store_path, 20)
    try:
        site.press_many(3)
        site.wait_alarm("store_busy", 12)
        site.wait_unacked(3, timeout=12)
        assert site.alive(), site.diag()
        site.fault_ends()
        holder.release()
    finally:
        holder.close()
    soft_wait(lambda: len(presses(sub)) >= 5, 15)
    events, acked = site.settle(sub)
    check_invariants(site, events, acked, "store_busy")


# -- full: a small tmpfs filled by a real writer ------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_disk_full_refused_presses_all_arrive_after_space_is_freed(
        mode: str, fault_site: MakeSite, tmpfs: Callable[..., TmpfsMount],
        subscribe: Callable[[str], Subscriber]) -> None:
    """disk_full, SQLITE_FULL/ENOSPC path (issue instance 2, the cumulative ACK): the disk
    filled, 20 presses refused and kept by the console, space freed, one more press:
    all 21 arrive (the ACK of the 21st must not cover the 20 before they are stored)."""
    disk = tmpfs("4m")
    sub = subscribe(EVENT_TOPIC)
    site = fault_site(disk.path, mode)
    start_connected(site)
    site.press_many(2)
    published_presses(site, sub, 2)
    acked_before = site.sim(0)["acked_total"]
    disk.fill(keep=True)
    site.press_many(20, spacing_ms=50)
    site.wait_alarm("disk_full")
    # A press may still fit in pages SQLite had in hand when the disk filled (how
    # many depends on the store's layout); every other one waits on the console.
    site.wait(lambda: (st := site.sim(0))["unacked"] > 0 and st["unacked"]
              + st["acked_total"] - acked_before == 20 and st["resent"] > 0, 15,
              "the console holding the presses the full disk refused")
    assert site.alive(), site.diag()
    site.fault_ends()
    disk.free()
    site.press(0)
    soft_wait(lambda: len(presses(sub)) >= 23, 20)
    events, acked = site.settle(sub)
    check_invariants(site, events, acked, "disk_full")
    assert len([a for a in acked if a.type == "PRESS"]) == 23


@pytest.mark.parametrize("mode", MODES)
def test_disk_full_at_start_keeps_running_and_continues_seq(
        mode: str, fault_site: MakeSite, tmpfs: Callable[..., TmpfsMount], broker: Broker,
        subscribe: Callable[[str], Subscriber]) -> None:
    """disk_full at start (issue instance 3): stopped with SIGTERM while the disk is full
    and 3 presses pending, then started: it keeps running, moves nothing aside, raises
    disk_full; once space is freed the pending presses and those kept by the console
    are published with seqs continuing (no seq 1 reused)."""
    disk = tmpfs("4m")
    sub = subscribe(EVENT_TOPIC)
    site = fault_site(disk.path, mode)
    start_connected(site)
    site.press_many(3)
    published_presses(site, sub, 3)
    site.wait_depth(0)
    broker.stop()
    site.wait_broker("disconnected")
    site.press_many(3)
    site.wait_depth(3)
    site.wait(lambda: site.sim()["unacked"] == 0, 10, "the 3 pending presses ACKed")
    disk.fill(keep=True)
    site.press_many(2)
    site.wait_alarm("disk_full")
    site.wait_unacked(2)
    site.stop()
    site.start()
    site.wait_running()
    site.wait_alarm("disk_full")
    # Through two of its 2 s reopen attempts, still up.
    site.wait(lambda: site.status().get("uptime_s", 0) >= 4.5, 15, "4.5 s up on a full disk")
    assert site.alive(), site.diag()
    assert not site.corrupt_files(), f"a full disk taken for corruption: {site.corrupt_files()}"
    site.fault_ends()
    disk.free()
    broker.start()
    soft_wait(lambda: len(presses(sub)) >= 8, 25)
    events, acked = site.settle(sub)
    events = check_invariants(site, events, acked, "disk_full")
    seqs = [e["seq"] for e in events if e["kind"] == "press"]
    assert seqs == list(range(1, 9)), seqs


def test_disk_below_min_free_bytes_refuses_until_space_is_back(
        fault_site: MakeSite, tmpfs: Callable[..., TmpfsMount],
        subscribe: Callable[[str], Subscriber]) -> None:
    """disk_full, reserve path: free space below [store] min_free_bytes (the disk is not
    full): refused, alarmed, kept by the console; all stored once space is back."""
    disk = tmpfs("8m")
    sub = subscribe(EVENT_TOPIC)
    site = fault_site(disk.path, min_free_bytes=3_000_000)
    start_connected(site)
    site.press_many(1)
    published_presses(site, sub, 1)
    disk.fill(leave=1_500_000, keep=True)
    site.press_many(3)
    site.wait_alarm("disk_full")
    site.wait_unacked(3)
    assert disk.free_bytes() > 1_000_000, "harness: this is meant to be the reserve, not ENOSPC"
    assert site.alive(), site.diag()
    site.fault_ends()
    disk.free()
    soft_wait(lambda: len(presses(sub)) >= 4, 15)
    events, acked = site.settle(sub)
    check_invariants(site, events, acked, "disk_full")


# -- read-only: an ext4 image the kernel turns read-only --------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_read_only_at_runtime_then_remounted_read_write(
        mode: str, fault_site: MakeSite, ext4: Callable[..., Ext4Image],
        subscribe: Callable[[str], Subscriber]) -> None:
    """store_read_only at runtime: the file system errors and turns read-only under the
    daemon's open store; presses refused and kept; after e2fsck and a read-write mount
    at the same place the daemon reopens its store (every 2 s) and everything arrives."""
    disk = ext4()
    sub = subscribe(EVENT_TOPIC)
    site = fault_site(disk.path, mode)
    start_connected(site)
    site.press_many(2)
    published_presses(site, sub, 2)
    site.wait_depth(0)
    disk.fail()
    site.press_many(3)
    site.wait_alarm("store_read_only")
    site.wait_unacked(3)
    assert site.alive(), site.diag()
    site.fault_ends()
    disk.recover()
    soft_wait(lambda: len(presses(sub)) >= 5, 20)
    events, acked = site.settle(sub)
    check_invariants(site, events, acked, "store_read_only")


def test_read_only_at_start_keeps_running_until_remounted_read_write(
        fault_site: MakeSite, ext4: Callable[..., Ext4Image], broker: Broker,
        subscribe: Callable[[str], Subscriber]) -> None:
    """store_read_only at start: the store's file system is mounted read-only before the
    daemon starts (2 presses pending in it); it runs, alarms, keeps nothing it cannot
    store, and picks the store up once the mount is read-write again."""
    disk = ext4()
    sub = subscribe(EVENT_TOPIC)
    site = fault_site(disk.path)
    start_connected(site)
    site.press_many(2)
    published_presses(site, sub, 2)
    site.wait_depth(0)
    broker.stop()
    site.wait_broker("disconnected")
    site.press_many(2)
    site.wait_depth(2)
    site.wait(lambda: site.sim()["unacked"] == 0, 10, "the 2 pending presses ACKed")
    assert site.stop() == 0
    disk.remount_ro_offline()
    site.start()
    site.wait_running()
    site.wait_alarm("store_read_only")
    site.press_many(2)
    site.wait_unacked(2)
    assert site.alive(), site.diag()
    broker.start()
    site.fault_ends()
    disk.remount_rw()
    soft_wait(lambda: len(presses(sub)) >= 6, 20)
    events, acked = site.settle(sub)
    events = check_invariants(site, events, acked, "store_read_only")
    assert [e["seq"] for e in events if e["kind"] == "press"] == list(range(1, 7))


def test_operator_login_while_the_state_dir_is_read_only(
        fault_site: MakeSite, ext4: Callable[..., Ext4Image],
        subscribe: Callable[[str], Subscriber]) -> None:
    """state_write_failed (issue instance 4): the state dir turns read-only, then
    `feedback-edge operator login` through the control socket: the daemon keeps running,
    the CLI says something plain (no traceback), the alarm is raised, and the login
    applies (in memory) to the presses made afterwards; a later login write clears it."""
    disk = ext4()
    sub = subscribe(EVENT_TOPIC)
    site = fault_site(disk.path)
    start_connected(site)
    site.press_many(1)
    published_presses(site, sub, 1)
    disk.fail()
    r = site.operator_cli("login", "--desk", "desk-1", "--operator", "op-23")
    assert "Traceback" not in r.stderr, r.stderr
    assert (r.stdout + r.stderr).strip(), "the CLI said nothing"
    assert site.alive(), site.diag()
    site.wait_alarm("state_write_failed")
    desk = next(d for d in site.status()["desks"] if d["desk"] == "desk-1")
    assert desk["operator"] == "op-23", desk
    site.press_many(2)  # the store is read-only too: the console keeps them
    site.wait_alarm("store_read_only")
    site.wait_unacked(2)
    site.fault_ends()
    disk.recover()
    soft_wait(lambda: len(presses(sub)) >= 3, 20)
    site.press(1)
    soft_wait(lambda: len(presses(sub)) >= 4, 10)
    again = site.operator_cli("login", "--desk", "desk-1", "--operator", "op-23")
    assert again.returncode == 0, again.stderr
    events, acked = site.settle(sub)
    events = check_invariants(site, events, acked, ("state_write_failed", "store_read_only"))
    ops = [e["operator"] for e in events if e["kind"] == "press"]
    assert ops[0]["id"] is None
    assert ops[1:] == [{"id": "op-23", "source": "command"}] * 3, ops


# -- store full: every dropped seq announced ---------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_store_full_every_seq_is_published_or_announced(
        mode: str, fault_site: MakeSite, broker: Broker,
        subscribe: Callable[[str], Subscriber]) -> None:
    """Store-full drops (issue instance 5): max_events = 100, broker down, 130 presses,
    the daemon restarted, broker up: every seq 1..N is published as an event or covered
    by a `dropped` announcement; no announcement is itself lost."""
    sub = subscribe(EVENT_TOPIC)
    site = fault_site(mode=mode, max_events=100)
    start_connected(site)
    broker.stop()
    site.wait_broker("disconnected")
    site.press_many(130)
    site.wait(lambda: (s := site.sim())["acked_total"] >= 131 and s["unacked"] == 0, 30,
              "the 130 presses taken by the daemon")
    drops = site.status()["drops"].get("store_full", 0)
    assert drops >= 30, site.diag()
    assert site.stop() == 0
    site.start()
    site.wait_running()
    broker.start()
    site.wait_connected()
    soft_wait(lambda: len(unique_events(sub.events())) >= 100, 20)
    events, acked = site.settle(sub)
    events = check_invariants(site, events, acked)
    ranges = dropped_ranges(events, "store_full")
    assert ranges, "no store_full announcement"
    published = {int(e["seq"]) for e in events}
    top = max(published)
    unannounced = [q for q in range(1, top + 1) if q not in published and not covered(q, ranges)]
    assert not unannounced, f"seqs neither published nor announced: {unannounced}"
    pressed = [e for e in events if e["kind"] == "press"]
    assert len(pressed) >= 100 - len(ranges), len(pressed)


# -- device-side loss --------------------------------------------------------------------


def test_console_ring_overflow_while_the_daemon_is_down_is_counted_alarmed_published(
        fault_site: MakeSite, subscribe: Callable[[str], Subscriber]) -> None:
    """device_lost (issue instance 6): 40 presses into the console's 32-event ring while
    the daemon is down: the 32 arrive, and the 8 lost are counted (drops
    device_overflow), alarmed and published as one `device_lost` event with lost == 8."""
    sub = subscribe(EVENT_TOPIC)
    site = fault_site()
    start_connected(site)
    assert site.stop() == 0
    site.press_many(40)
    site.wait(lambda: (s := site.sim())["lost"] == 8 and s["unacked"] == 32, 10,
              "40 presses, 32 in the ring, 8 lost")
    site.start()
    site.wait_connected()
    soft_wait(lambda: len(presses(sub)) >= 32, 15)
    site.wait_alarm("device_lost")
    drops = site.status()["drops"]
    assert drops.get("device_overflow", 0) >= 8, drops
    soft_wait(lambda: any(e.get("kind") == "device_lost" for e in sub.events()), 10)
    events, acked = site.settle(sub)
    events = check_invariants(site, events, acked, "device_lost")
    assert len([e for e in events if e["kind"] == "press"]) == 32
    lost = [e for e in events if e["kind"] == "device_lost"]
    assert len(lost) == 1, lost
    assert lost[0]["device"]["id"] == site.device_ids[0]
    assert lost[0]["device_lost"] == {"lost": 8, "total": 8, "reason": "ring_overflow"}


# -- files damaged between runs ------------------------------------------------------------

# damage -> (alarms expected, the store replaced (old pending events lost))
DAMAGE: dict[str, tuple[tuple[str, ...], bool]] = {
    "outbox_deleted": (("store_replaced",), True),
    "outbox_zero_length": (("store_replaced",), True),
    "outbox_truncated_half": (("store_corrupt", "store_replaced"), True),
    "outbox_garbage_in_the_middle": (("store_corrupt", "store_replaced"), True),
    "seq_state_deleted": ((), False),
    "seq_state_zero_length": (("state_unreadable",), False),
    "seq_state_garbage": (("state_unreadable",), False),
    "outbox_and_seq_state_deleted": (("seq_state_lost",), True),
    "logins_garbage": (("state_unreadable",), False),
}


def _damage(site: FaultSite, how: str) -> None:
    db = site.store_path
    state = db.with_name(db.name + ".state.json")
    assert db.exists(), "harness: no store to damage"
    assert state.exists(), "harness: no seq state file to damage"
    if how.startswith("outbox"):
        # Exactly the damage named: no WAL left to replay over it.
        for suffix in ("-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    size = db.stat().st_size
    if how in ("outbox_deleted", "outbox_and_seq_state_deleted"):
        db.unlink()
    elif how == "outbox_zero_length":
        os.truncate(db, 0)
    elif how == "outbox_truncated_half":
        os.truncate(db, size // 2)
    elif how == "outbox_garbage_in_the_middle":
        junk = random.Random(12).randbytes(size // 2)
        with db.open("r+b") as f:
            f.seek(size // 4)
            f.write(junk)
    if how in ("seq_state_deleted", "outbox_and_seq_state_deleted"):
        state.unlink()
    elif how == "seq_state_zero_length":
        os.truncate(state, 0)
    elif how == "seq_state_garbage":
        state.write_bytes(b'{"_default": {"1": {"seq_res\x00\xff garbage')
    elif how == "logins_garbage":
        (db.parent / "logins.json").write_bytes(b"\x00\x00not json{")
    if how in ("outbox_truncated_half", "outbox_garbage_in_the_middle"):
        # Harness check: the damage is detectable (checked on a copy: opening
        # the file itself would create -wal and -shm beside it).
        copy = site.tmp / "damaged-copy.sqlite"
        shutil.copyfile(db, copy)
        try:
            c = sqlite3.connect(copy)
            check = c.execute("PRAGMA quick_check").fetchone()[0]
            c.close()
        except sqlite3.DatabaseError:
            check = "unreadable"
        assert check != "ok", "harness: the damaged store still passes quick_check"


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_files_between_runs(
        how: str, fault_site: MakeSite, broker: Broker,
        subscribe: Callable[[str], Subscriber]) -> None:
    """store_replaced / store_corrupt / state_unreadable / seq_state_lost: on a site in
    use, the daemon stopped (SIGTERM) with 3 presses delivered and 2 pending, a file
    damaged, the daemon started.  It runs; seqs published after the restart are above
    every seq published before; a replaced store continues above every seq that could
    have been used and announces the old range as `dropped` (store_replaced); an intact
    store's pending presses are published."""
    expected, replaced = DAMAGE[how]
    sub = subscribe(EVENT_TOPIC)
    site = fault_site()
    start_connected(site)
    # A site in use has other state beside the store (here logins.json): with
    # nothing at all left, a lost seq history looks like a first installation.
    login = site.operator_cli("login", "--desk", "desk-1", "--operator", "op-7")
    assert login.returncode == 0, login.stderr
    site.press_many(3)
    published_presses(site, sub, 3)
    site.wait_depth(0)
    broker.stop()
    site.wait_broker("disconnected")
    site.press_many(2)
    site.wait_depth(2)
    site.wait(lambda: site.sim()["unacked"] == 0, 10, "the 2 pending presses ACKed")
    last_used = site.status()["queue"]["last_seq"]
    before = {e["event_id"]: e["seq"] for e in unique_events(sub.events())}
    assert site.stop() == 0
    _damage(site, how)
    broker.start()
    site.start()
    site.wait_connected()
    site.press_many(2)
    soft_wait(lambda: len(presses(sub)) >= (5 if replaced else 7), 15)
    events, acked = site.settle(sub)
    lost_seq_state = "seq_state_lost" in expected
    # Both files gone: nothing on the Pi names the seqs used or the 2 presses that
    # were pending, so neither reuse nor an announcement of them can be checked.
    events = check_invariants(site, events, acked, expected,
                              reuse_allowed_upto=last_used if lost_seq_state else 0,
                              unannounced_loss_ok=2 if lost_seq_state else 0)
    after = [e for e in events if e["event_id"] not in before]
    if not lost_seq_state:
        assert min(e["seq"] for e in after) > max(before.values()), (
            f"a seq at or below one published before the restart: "
            f"{[(e['seq'], e['kind']) for e in after]}")
    if how == "logins_garbage":
        assert (site.store_dir / "logins.json.corrupt").exists()
    if how == "seq_state_garbage":
        assert site.store_path.with_name("outbox.sqlite.state.json.corrupt").exists()
    if "store_corrupt" in expected:
        assert site.corrupt_files(), "the corrupt store was not moved aside"
    new_presses = [e["seq"] for e in after if e["kind"] == "press"]
    if replaced and not lost_seq_state:
        assert min(new_presses) > last_used, (new_presses, last_used)
        announced = dropped_ranges(events, "store_replaced")
        assert any(lo <= max(before.values()) + 1 and hi >= last_used
                   for lo, hi, _ in announced), (
            f"the lost range up to {last_used} not announced: {announced}")
    elif not replaced:
        assert [e["seq"] for e in events if e["kind"] == "press"] == list(range(1, 8))


# -- the harness itself ----------------------------------------------------------------


def test_harness_the_firmware_logs_what_each_ack_removed_in_order() -> None:
    """firmware_sim's ACK log, which invariant 1 compares with what was published."""
    from drivers.console import encode_ack
    from firmware_sim.console import ConsoleFirmware

    now = [0]
    fw = ConsoleFirmware("00A1B2C3D4E5", uptime_ms=lambda: now[0])
    for i, b in enumerate((2, 0, 1)):
        fw.press(b, hold_ms=60, delay_ms=200 * i)
    for _ in range(100):
        now[0] += 10
        fw.tick()
    assert fw.unacked == 4  # HELLO and 3 presses
    fw.output_report(encode_ack(1))  # cumulative: HELLO and the first press
    assert [(a.type.name, a.button) for a in fw.acked] == [("HELLO", 255), ("PRESS", 2)]
    fw.output_report(encode_ack(3))
    assert [a.dev_seq for a in fw.acked] == [0, 1, 2, 3]
    assert [a.button for a in fw.acked][1:] == [2, 0, 1]
    assert fw.acked_total == 4
    assert fw.unacked == 0


class _Log:
    """A stopped daemon as check_invariants reads it: its log."""

    def __init__(self, text: str) -> None:
        self.text = text

    def log(self) -> str:
        return self.text


class _Stub:
    """What check_invariants reads of a FaultSite, without processes."""

    def __init__(self, alarms_seen: set[str], alarms_now: set[str]) -> None:
        self.device_ids = ["fc3-a"]
        self.unexpected_exits: list[tuple[int, int | None]] = []
        self.daemons: list[Any] = []
        self.cli_runs: list[Any] = []
        self.seen_alarms = {a: a for a in alarms_seen}
        self.now = alarms_now

    def diag(self) -> str:
        return ""

    def _note_exits(self) -> None:
        pass

    def note_logged_alarms(self) -> None:
        FaultSite.note_logged_alarms(cast(FaultSite, self))

    def alive(self) -> bool:
        return True

    def gaps(self, code: str) -> list[float]:
        del code
        return []

    def alarm_codes(self) -> set[str]:
        return self.now

    def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        return wait_for(cond, timeout, what)

    def corrupt_files(self) -> list[Path]:
        return []


def _press(seq: int, button: int, at: int) -> dict[str, Any]:
    from tests.collector_fixtures import press_event

    return json.loads(press_event(seq, button=button, mono_ns=at * 10**9)[1])


def _dropped(seq: int, lo: int, hi: int, reason: str = "store_full") -> dict[str, Any]:
    from edge.events import DeviceRef, Dropped, Event, EventTime, OperatorTag, encode_event

    ev = Event(f"0192c0de-0000-7000-8000-{seq:012d}", "reception-1",
               DeviceRef("reception-1", "edge", None), Dropped(lo, hi, reason),
               OperatorTag(None, "none"), EventTime(1_795_000_000_000_000_000, True, "b", 1))
    return json.loads(encode_event(ev, seq, "clinic-3", "reception-1"))


def _acked(*buttons: int) -> list[AckedPress]:
    return [AckedPress("fc3-a", i + 1, "PRESS", b, 100 * i) for i, b in enumerate(buttons)]


def test_harness_check_invariants_catches_each_violation() -> None:
    """Negative controls: the checker fails on a lost press, a doubled press, a
    reused seq, an unannounced gap, an alarm never raised or never cleared."""
    site = cast(FaultSite, _Stub({"disk_full"}, set()))
    ok = [_press(1, 0, 1), _press(2, 1, 2)]
    check_invariants(site, ok + ok[:1], _acked(0, 1), "disk_full")  # duplicates: fine
    # Stored out of press order (a new press before the console's replays): fine.
    check_invariants(site, [_press(1, 1, 2), _press(2, 0, 1)], _acked(0, 1))
    with pytest.raises(AssertionError, match="invariant 1"):
        check_invariants(site, ok[:1], _acked(0, 1))
    with pytest.raises(AssertionError, match="invariant 1"):
        check_invariants(site, [*ok, _press(3, 1, 3)], _acked(0, 1))
    with pytest.raises(AssertionError, match="invariant 2"):
        check_invariants(site, [*ok, _press(2, 1, 3)], _acked(0, 1, 1))
    # A lost press covered by an announcement: fine; not covered: not.
    check_invariants(site, [ok[0], _dropped(3, 2, 2)], _acked(0, 1))
    with pytest.raises(AssertionError, match="invariant 1"):
        check_invariants(site, [ok[0], _dropped(3, 1, 1)], _acked(0, 1))
    with pytest.raises(AssertionError, match="invariant 4: alarm store_busy was never"):
        check_invariants(site, ok, _acked(0, 1), "store_busy")
    # Raised and cleared between two status samples: the daemon's log has it.
    brief = _Stub(set(), set())
    brief.daemons = [_Log("WARNING edge.alarms: alarm store_replaced raised: the event "
                          "store started again\nINFO edge.alarms: alarm store_replaced cleared\n")]
    check_invariants(cast(FaultSite, brief), ok, _acked(0, 1), "store_replaced")
    with pytest.raises(AssertionError, match="invariant 4: alarm store_corrupt was never"):
        check_invariants(cast(FaultSite, brief), ok, _acked(0, 1), "store_corrupt")
    stuck = cast(FaultSite, _Stub({"disk_full"}, {"disk_full"}))
    with pytest.raises(AssertionError, match="invariant 4: alarm disk_full cleared"):
        check_invariants(stuck, ok, _acked(0, 1), "disk_full", clear_timeout=0.2)
    with pytest.raises(AssertionError, match="store_replaced announcement"):
        check_invariants(site, [*ok, _dropped(3, 1, 2, "store_replaced")], _acked(0, 1))
