"""The fault suite's harness (tests/test_faults.py): real storage faults, made
by the kernel and by other processes, around the real daemon process.

- `TmpfsMount`: a sized tmpfs, filled by a real writer until ENOSPC (or down
  to a given number of free bytes) and freed by deleting the filler.
- `Ext4Image`: a loop-mounted ext4 image that can be mounted read-only, made
  to fail at runtime (`trigger_fs_error`: the kernel turns it emergency
  read-only under the daemon's open files), and recovered (lazy unmount,
  e2fsck, mounted again read-write at the same place through a new loop
  device, so that the failed superblock is not reused).
- `LockHolder`: a second process holding the outbox's SQLite write lock.
- `FaultSite`: tests.test_pipeline.Site with its store inside a given
  directory (a mount), its own config (min_free_bytes, max_events, delivery
  mode), an optional real collector, and a watcher recording every alarm code
  the daemon shows in `status`.
- `check_invariants`: the four invariants of the storage fault model.

Everything mounted or attached is undone at teardown (lazy unmount when busy,
loop devices detached); the daemons are killed before the mounts go.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.collector_fixtures import Backend, collector_config
from tests.conftest import Broker, Proc, Subscriber, wait_for
from tests.test_pipeline import Site

__all__ = [
    "AckedPress",
    "Ext4Image",
    "FaultSite",
    "LockHolder",
    "TmpfsMount",
    "alarm_code",
    "check_invariants",
    "ext4",
    "fault_site",
    "require_root",
    "tmpfs",
    "unique_events",
]

EVENT_TOPIC = "feedback/+/+/+/event/#"
# Alarms the spec gives no clearing condition for (device_lost expires after an
# hour): for these only the raising is checked.
STICKY_ALARMS = frozenset({"device_lost", "store_corrupt", "state_unreadable",
                           "seq_state_lost"})
# Never acceptable unless the test expects them: a fault that is not
# corruption must not be taken for one.
REPLACEMENT_ALARMS = ("store_corrupt", "store_replaced")


def require_root(*tools: str) -> None:
    """Skip unless root (mounts, loop devices, sysfs) and the named tools exist."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the fault tests mount file systems and attach loop devices")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")


def _run(cmd: Sequence[str], ok: Iterable[int] = (0,)) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=60)
    if r.returncode not in set(ok):
        raise AssertionError(f"harness: {' '.join(cmd)} exited {r.returncode}: "
                             f"{r.stdout}{r.stderr}")
    return r


def _run_or_skip(cmd: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a mount or loop command; skip the test when this machine does not allow
    it at all (a container without the capability or without loop devices)."""
    r = subprocess.run(list(cmd), capture_output=True, text=True, check=False, timeout=60)
    if r.returncode != 0:
        text = (r.stdout + r.stderr).lower()
        if any(s in text for s in ("permission denied", "operation not permitted",
                                   "must be superuser", "cannot find an unused loop",
                                   "failed to set up loop")):
            pytest.skip(f"this machine does not allow {cmd[0]}: {r.stderr.strip()}")
        raise AssertionError(f"harness: {' '.join(cmd)} exited {r.returncode}: "
                             f"{r.stdout}{r.stderr}")
    return r


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def _unmount(path: Path) -> None:
    """Unmount `path` (every mount stacked on it); lazily when it is busy."""
    for _ in range(8):
        if not _mounted(path):
            return
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _write_probe(directory: Path) -> OSError | None:
    """Try to create (and remove) a file in `directory`; the error, or None if writable."""
    probe = directory / ".fault-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        return e
    os.close(fd)
    with contextlib.suppress(OSError):
        probe.unlink()
    return None


# -- a full disk ----------------------------------------------------------------------


class TmpfsMount:
    """A tmpfs of `size` at `path`, filled and freed by a real writer."""

    def __init__(self, path: Path, size: str = "4m") -> None:
        self.path = path
        self.filler = path / "filler.bin"
        self._keeper: threading.Thread | None = None
        self._keep_stop = threading.Event()
        path.mkdir(parents=True, exist_ok=True)
        _run_or_skip(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                      str(path)])

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0, keep: bool = False) -> int:
        """Write the filler until ENOSPC (leave=0) or until at most `leave` bytes are free.

        Returns the bytes written.  With `keep`, a thread goes on appending to
        the filler (every 50 ms) until free(), so that space SQLite gives back
        (a WAL truncated after a checkpoint) does not quietly end the fault.
        """
        written = self._fill(leave)
        if not leave:
            assert self.free_bytes() == 0, "harness: the tmpfs is not full"
        if keep and self._keeper is None:
            self._keep_stop.clear()
            self._keeper = threading.Thread(target=self._keep, args=(leave,), daemon=True)
            self._keeper.start()
        return written

    def _keep(self, leave: int) -> None:
        while not self._keep_stop.wait(0.05):
            with contextlib.suppress(OSError):
                self._fill(leave)

    def _fill(self, leave: int) -> int:
        written = 0
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            chunk = 64 * 1024
            while chunk >= 1:
                if leave:
                    room = self.free_bytes() - leave
                    if room <= 0:
                        break
                    chunk = min(chunk, max(room, 1))
                try:
                    n = os.write(fd, b"\0" * chunk)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    chunk //= 2
                    continue
                written += n
        finally:
            os.close(fd)
        return written

    def free(self) -> None:
        """Stop keeping it full and delete the filler: the space is back at once."""
        self._keep_stop.set()
        if self._keeper is not None:
            self._keeper.join(5)
            self._keeper = None
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()

    def close(self) -> None:
        self.free()
        _unmount(self.path)


# -- a failing disk -------------------------------------------------------------------


class Ext4Image:
    """An ext4 file system in an image file, loop-mounted at `path`.

    The store's directory is the mount itself.  `fail()` makes the kernel
    declare a file system error: with errors=remount-ro the mount becomes
    emergency read-only even while the daemon has its files open for writing
    (a plain `mount -o remount,ro` would fail with EBUSY then).
    """

    def __init__(self, path: Path, image: Path, size: str = "32M",
                 read_only: bool = False) -> None:
        self.path = path
        self.image = image
        self.loops: list[str] = []
        self.loop: str | None = None
        path.mkdir(parents=True, exist_ok=True)
        _run(["truncate", "-s", size, str(image)])
        _run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
              str(image)])
        try:
            self.mount(read_only=read_only)
        except BaseException:  # a skip included: no loop device left behind
            self.close()
            raise

    def _attach(self) -> str:
        # A new loop device each time: mounting the image again through the
        # device of a failed mount would hand back the failed superblock.
        loop = _run_or_skip(["losetup", "--find", "--show", str(self.image)]).stdout.strip()
        self.loops.append(loop)
        self.loop = loop
        return loop

    def mount(self, read_only: bool = False, new_loop: bool = False) -> None:
        loop = self.loop if self.loop is not None and not new_loop else self._attach()
        opts = "ro,errors=remount-ro" if read_only else "errors=remount-ro"
        _run(["mount", "-t", "ext4", "-o", opts, loop, str(self.path)])

    def unmount(self) -> None:
        """Unmount cleanly (no process may have files open there)."""
        _run(["umount", str(self.path)])

    def remount_rw(self) -> None:
        _run(["mount", "-o", "remount,rw", str(self.path)])

    def remount_ro_offline(self) -> None:
        """Unmount and mount read-only again (the daemon must not be running)."""
        self.unmount()
        self.mount(read_only=True)

    def writable(self) -> bool:
        return _write_probe(self.path) is None

    def fail(self) -> None:
        """A file system error now: the mount turns read-only under the daemon's feet."""
        assert self.loop is not None
        trigger = Path("/sys/fs/ext4") / Path(self.loop).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger} (ext4 fault injection)")
        trigger.write_text("1\n")
        wait_for(lambda: not self.writable(), 10, "the ext4 mount to turn read-only")
        err = _write_probe(self.path)
        assert err is not None, "harness: the mount is still writable"
        assert err.errno == errno.EROFS, f"harness: expected EROFS, got {err}"

    def recover(self) -> None:
        """Lazy unmount, e2fsck, and the same place mounted read-write again."""
        _run(["umount", "-l", str(self.path)])
        # 0: clean, 1: errors corrected (the journal replayed, counts fixed).
        _run(["e2fsck", "-fy", str(self.image)], ok=(0, 1))
        self.mount(new_loop=True)
        assert self.writable(), "harness: the recovered mount is not writable"

    def close(self) -> None:
        _unmount(self.path)
        for loop in self.loops:
            # A device still held by a lazily unmounted file system is detached
            # by the kernel once its last user goes (autoclear).
            subprocess.run(["losetup", "-d", loop], capture_output=True, check=False)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[..., TmpfsMount]]:
    """tmpfs(size="4m"): a tmpfs mounted at tmp_path/"mnt" (root only)."""
    made: list[TmpfsMount] = []

    def make(size: str = "4m") -> TmpfsMount:
        require_root("mount", "umount")
        m = TmpfsMount(tmp_path / f"mnt{len(made) or ''}", size)
        made.append(m)
        return m

    yield make
    for m in reversed(made):
        m.close()


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[Callable[..., Ext4Image]]:
    """ext4(read_only=False): a 32 MB ext4 image loop-mounted at tmp_path/"mnt"."""
    made: list[Ext4Image] = []

    def make(read_only: bool = False) -> Ext4Image:
        require_root("mount", "umount", "losetup", "mkfs.ext4", "e2fsck", "truncate")
        suffix = str(len(made) or "")
        m = Ext4Image(tmp_path / f"mnt{suffix}", tmp_path / f"ext4{suffix}.img",
                      read_only=read_only)
        made.append(m)
        return m

    yield make
    for m in reversed(made):
        m.close()


# -- a busy store ---------------------------------------------------------------------

_HOLDER = r"""
import select, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
# Until a line on stdin (or stdin closed), or the given seconds.
select.select([sys.stdin], [], [], float(sys.argv[2]))
db.execute("ROLLBACK")
db.close()
print("released", flush=True)
"""


class LockHolder:
    """Another process holding the outbox's write lock (BEGIN IMMEDIATE) for `seconds`."""

    def __init__(self, db: Path, seconds: float) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(db), str(seconds)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_for(lambda: "locked" in self.lines or self.proc.poll() is not None, 35,
                 "the lock holder to take the write lock")
        assert "locked" in self.lines, f"harness: lock holder failed: {self.lines}"
        self.locked_at = time.monotonic()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def wait_released(self, timeout: float = 30) -> None:
        """Wait for the holder's own deadline to pass and the lock to be gone."""
        self.proc.wait(timeout)
        self._reader.join(5)
        assert "released" in self.lines, f"harness: lock holder failed: {self.lines}"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.write("\n")
                self.proc.stdin.flush()
            self.wait_released()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


# -- the site -------------------------------------------------------------------------


# edge/alarms.py's log line for every alarm raised.
_RAISED = re.compile(r"alarm (\w+) raised: (.*)")


def alarm_code(text: str) -> str:
    """The stable code an alarm text starts with ("disk_full: ..." -> "disk_full")."""
    return text.split(":", 1)[0].strip()


@dataclass(frozen=True, slots=True)
class AckedPress:
    """An event a console's ACK removed from its ring (firmware_sim's record)."""

    device_id: str
    dev_seq: int
    type: str  # PRESS | HOLD | HELLO
    button: int
    event_uptime: int


def write_fault_config(path: Path, *, port: int, store: Path, sockets: Sequence[Path],
                       serials: Sequence[str], control_socket: Path, mode: str = "broker",
                       min_free_bytes: int = 0, max_events: int | None = None,
                       extra: str = "") -> Path:
    lines = ['site = "clinic-3"', 'edge = "reception-1"', "",
             "[broker]", 'host = "127.0.0.1"', f"port = {port}", "reconnect_min_s = 0.1",
             "reconnect_max_s = 0.5", "",
             "[store]", f'path = "{store}"', f"min_free_bytes = {min_free_bytes}",
             *([f"max_events = {max_events}"] if max_events is not None else []), "",
             "[daemon]", f'control_socket = "{control_socket}"', "health_interval_s = 1", "",
             # Several daemons in one test run: none of them takes port 8480.
             "[web]", "enabled = false", "",
             "[delivery]", f'mode = "{mode}"', "resend_after_s = 5", "", extra, ""]
    for i, (sock, serial) in enumerate(zip(sockets, serials, strict=True)):
        lines += ["[[devices]]", 'kind = "console"', f'desk = "desk-{i + 1}"',
                  'transport = "socket"', f'socket = "{sock}"', f'serial = "{serial}"', ""]
    path.write_text("\n".join(lines))
    return path


class FaultSite(Site):
    """A Site whose store lives in `store_dir`, with an alarm watcher and the
    bookkeeping the invariants need (every daemon process, how each ended)."""

    def __init__(self, tmp: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
                 *, store_dir: Path, mode: str = "broker", min_free_bytes: int = 0,
                 max_events: int | None = None, consoles: int = 1) -> None:
        super().__init__(tmp, broker, procs, consoles=consoles)
        self.broker = broker
        self.mode = mode
        self.store_dir = store_dir
        self.store_path = store_dir / "outbox.sqlite"
        self.config = write_fault_config(
            tmp / "edge.toml", port=broker.port, store=self.store_path, sockets=self.sockets,
            serials=self.serials, control_socket=self.control_socket, mode=mode,
            min_free_bytes=min_free_bytes, max_events=max_events)
        self.device_ids = [f"fc3-{s.lower()}" for s in self.serials]
        self.daemons: list[Proc] = []
        # Daemons that ended without the test stopping them: (pid, returncode).
        self.unexpected_exits: list[tuple[int, int | None]] = []
        self._stopped: set[int] = set()  # pids of daemons the test stopped
        self.seen_alarms: dict[str, str] = {}  # code -> first text seen
        # Every status answer: (monotonic time it arrived, the alarm codes in it).
        self.timeline: list[tuple[float, frozenset[str]]] = []
        self._raised_at: dict[str, float] = {}  # code -> when wait_alarm saw it
        self.fault_ended_at: float | None = None
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.collector: Proc | None = None
        self.collector_db: Backend | None = None
        self.cli_runs: list[subprocess.CompletedProcess[str]] = []
        # (console, button) -> monotonic time its last scheduled press is over.
        self._free_at: dict[tuple[int, int], float] = {}

    # -- processes ---------------------------------------------------------------

    def start_collector(self) -> None:
        """A real `feedback-collector run` on this test's broker, SQLite in tmp."""
        backend = Backend("sqlite", self.tmp, None)
        cfg = collector_config(self.tmp / "collector.toml", self.broker, backend)
        self.collector_db = backend
        self.collector = self.procs(["collector.cli", "run", "--config", str(cfg)],
                                    self.tmp / "collector.log")
        wait_for(lambda: backend.path is not None and backend.path.exists(), 20,
                 "the collector's database")

    def start(self) -> None:
        self._note_exits()
        super().start()
        assert self.daemon is not None
        self.daemons.append(self.daemon)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, daemon=True)
            self._watcher.start()

    def _note_exits(self) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is not None and \
                    d.proc.pid not in self._stopped:
                entry = (d.proc.pid, d.proc.returncode)
                if entry not in self.unexpected_exits:
                    self.unexpected_exits.append(entry)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stop the running daemon (SIGTERM: cleanly); its exit code."""
        assert self.daemon is not None
        assert self.daemon.proc is not None
        self._note_exits()
        if self.daemon.proc.poll() is None:
            self._stopped.add(self.daemon.proc.pid)
            self.daemon.kill(sig)
        return self.daemon.proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.stop(sig)

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.proc is not None and \
            self.daemon.proc.poll() is None

    def close(self) -> None:
        """Teardown: stop watching, kill every daemon (before the mounts go)."""
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                self._stopped.add(d.proc.pid)
                d.kill(signal.SIGKILL)

    # -- what the daemon says -------------------------------------------------------

    def _watch(self) -> None:
        while not self._watch_stop.wait(0.2):
            self._record(self.status())

    def _record(self, st: dict[str, Any]) -> dict[str, Any]:
        if not st:
            return st  # the daemon is down or busy: no sample
        codes = []
        for text in st.get("alarms", []) or []:
            codes.append(alarm_code(str(text)))
            self.seen_alarms.setdefault(codes[-1], str(text))
        # Stamped on arrival: the answer shows the daemon's state before then.
        self.timeline.append((time.monotonic(), frozenset(codes)))
        return st

    def note_logged_alarms(self) -> None:
        """Add the alarms every daemon of this site logged as raised to
        `seen_alarms`: an alarm that lives for less than one status sample (a
        replaced store's alarms clear when its announcement is PUBACKed, which
        can be within milliseconds of opening) is still seen."""
        for d in self.daemons:
            with contextlib.suppress(OSError):
                for m in _RAISED.finditer(d.log()):
                    self.seen_alarms.setdefault(m[1], f"{m[1]}: {m[2]}")

    def fault_ends(self) -> None:
        """The test is about to end the fault: until now, every alarm the test
        waited for must have stayed raised (checked by check_invariants)."""
        self.fault_ended_at = time.monotonic()

    def gaps(self, code: str) -> list[float]:
        """Seconds after wait_alarm(code) at which `code` was missing from status
        before fault_ends()."""
        start, end = self._raised_at.get(code), self.fault_ended_at
        if start is None or end is None:
            return []
        return [round(t - start, 2) for t, codes in self.timeline
                if start <= t <= end and code not in codes]

    def status(self) -> dict[str, Any]:
        return self._record(super().status())

    def alarm_codes(self) -> set[str]:
        return {alarm_code(str(a)) for a in self.status().get("alarms", []) or []}

    def diag(self) -> str:
        """What a failure message needs: daemon state, alarms, log tail."""
        log = ""
        if self.daemon is not None:
            log = "\n".join(self.daemon.log().splitlines()[-40:])
        st = super().status()
        brief = {k: st.get(k) for k in ("alarms", "queue", "drops", "broker", "delivery")}
        sims = []
        for i in range(len(self.sockets)):
            try:
                s = self.sim(i)
            except OSError as e:
                sims.append(f"console {i}: {e}")
                continue
            sims.append(f"console {i}: " + " ".join(
                f"{k}={s.get(k)}" for k in ("host_attached", "unacked", "sent", "resent",
                                             "acks", "lost", "acked_total")))
        return (f"\n-- daemon alive={self.alive()} unexpected exits={self.unexpected_exits}"
                f"\n-- seen alarms={sorted(self.seen_alarms)}\n-- status={json.dumps(brief)}"
                f"\n-- {'; '.join(sims)}"
                f"\n-- daemon.log (tail):\n{log}")

    def wait(self, cond: Callable[[], Any], timeout: float, what: str) -> Any:
        """wait_for with the daemon's state and log in the failure message."""
        try:
            return wait_for(cond, timeout, what, interval=0.05)
        except AssertionError as e:
            raise AssertionError(f"{e}{self.diag()}") from None

    def wait_running(self, timeout: float = 20) -> dict[str, Any]:
        """The daemon answers on its control socket (it did not exit)."""
        def up() -> dict[str, Any] | None:
            if not self.alive():
                raise AssertionError(f"the daemon exited{self.diag()}")
            st = self.status()
            return st if st.get("running") else None

        result: dict[str, Any] = self.wait(up, timeout, "the daemon answering status")
        return result

    def wait_connected(self) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if not self.alive():
                raise AssertionError(f"the daemon exited{self.diag()}")
            st = self.status()
            ok = st.get("broker", {}).get("state") == "connected" and all(
                d["state"] == "connected" for d in st.get("devices", []))
            if ok and self.mode == "collector":
                ok = st.get("delivery", {}).get("collector_online") is True
            return st if ok else None

        result: dict[str, Any] = self.wait(ready, 25, "daemon connected to broker and devices")
        return result

    def wait_broker(self, state: str) -> None:
        self.wait(lambda: self.status().get("broker", {}).get("state") == state, 15,
                  f"the daemon's broker state {state}")

    def wait_alarm(self, code: str, timeout: float = 15) -> str:
        """Wait until alarm `code` is shown; its text."""
        def shown() -> str | None:
            for text in self.status().get("alarms", []) or []:
                if alarm_code(str(text)) == code:
                    return str(text)
            return None

        result: str = self.wait(shown, timeout, f"alarm {code}")
        self._raised_at[code] = time.monotonic()
        return result

    def wait_depth(self, n: int, timeout: float = 20) -> None:
        self.wait(lambda: self.status().get("queue", {}).get("depth") == n, timeout,
                  f"{n} events pending in the store")

    def corrupt_files(self) -> list[Path]:
        return sorted(self.store_dir.glob(f"{self.store_path.name}.corrupt*"))

    # -- the consoles ------------------------------------------------------------------

    def press(self, button: int, console: int = 0, delay_ms: int = 0, hold_ms: int = 60) -> None:
        """Press a button; never before its previous press is released and settled
        (a press scheduled inside the previous one's hold would merge with it)."""
        now = time.monotonic()
        free_at = self._free_at.get((console, button), 0.0)
        delay_ms = max(delay_ms, int((free_at - now) * 1000) + 1)
        # Released at hold_ms, bounces until hold_ms + 2, settled 30 ms later.
        self._free_at[(console, button)] = now + (delay_ms + hold_ms + 60) / 1000
        super().press(button, console=console, delay_ms=delay_ms, hold_ms=hold_ms)

    def press_many(self, n: int, console: int = 0, spacing_ms: int = 40,
                   hold_ms: int = 45, buttons: int = 3) -> list[int]:
        """Schedule `n` presses, rotating over the buttons; the buttons pressed.

        Each button is pressed every spacing_ms * buttons (>= 120 ms): well
        clear of the 30 ms debounce, so every press is one PRESS.
        """
        made = [i % buttons for i in range(n)]
        for i, b in enumerate(made):
            self.press(b, console=console, delay_ms=i * spacing_ms, hold_ms=hold_ms)
        return made

    def wait_unacked(self, n: int, console: int = 0, resent: bool = True,
                     timeout: float = 15) -> dict[str, Any]:
        """Wait until the console holds `n` unacknowledged events and (resent=True)
        has sent them all again at least once: the daemon had them and did not ACK."""
        first = self.sim(console)
        base = first["resent"]

        def holding() -> dict[str, Any] | None:
            s = self.sim(console)
            ok = s["unacked"] == n and (not resent or s["resent"] >= base + n)
            return s if ok else None

        result: dict[str, Any] = self.wait(
            holding, timeout, f"the console holding {n} unacknowledged events")
        return result

    def acked(self) -> list[AckedPress]:
        """Every event the consoles were ACKed for, in the order they happened."""
        out: list[AckedPress] = []
        for i, dev_id in enumerate(self.device_ids):
            s = self.sim(i)
            assert s["acked_total"] == len(s["acked"]), "harness: the simulator's ACK " \
                "log was truncated in its state reply"
            out += [AckedPress(dev_id, int(q), str(t), int(b), int(up))
                    for q, t, b, up in s["acked"]]
        return out

    def settle(self, sub: Subscriber, timeout: float = 30) -> tuple[list[dict[str, Any]],
                                                                     list[AckedPress]]:
        """Wait until the consoles hold nothing, the outbox is empty and the last
        stored seq has reached the subscriber; (published events, ACKed events)."""
        for i in range(len(self.sockets)):
            def empty(i: int = i) -> bool:
                return bool(self.sim(i)["unacked"] == 0)

            self.wait(empty, timeout, f"console {i} fully acknowledged")
        self.wait(lambda: self.status().get("queue", {}).get("depth") == 0, timeout,
                  "the outbox drained (delivered)")
        last = self.status().get("queue", {}).get("last_seq")
        with contextlib.suppress(AssertionError):
            wait_for(lambda: any(e.get("seq") == last for e in sub.events()), 5,
                     "the last seq at the subscriber")
        return sub.events(), self.acked()

    def operator_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`feedback-edge operator ARGS --config CFG`, as an installer runs it."""
        r = subprocess.run([sys.executable, "-m", "edge.cli", "operator", *args, "--config",
                            str(self.config)], capture_output=True, text=True, check=False,
                           timeout=30)
        self.cli_runs.append(r)
        return r


@pytest.fixture
def fault_site(tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
               tmpfs: Callable[..., TmpfsMount], ext4: Callable[..., Ext4Image],
               ) -> Iterator[Callable[..., FaultSite]]:
    """fault_site(store_dir, mode="broker", min_free_bytes=0, max_events=None).

    Depends on the mount fixtures so that its teardown (killing the daemons)
    runs before theirs (unmounting)."""
    del tmpfs, ext4
    sites: list[FaultSite] = []

    def make(store_dir: Path | None = None, mode: str = "broker", **kw: Any) -> FaultSite:
        s = FaultSite(tmp_path, broker, procs, store_dir=store_dir or tmp_path / "state",
                      mode=mode, **kw)
        if mode == "collector":
            s.start_collector()
        sites.append(s)
        return s

    yield make
    for s in sites:
        s.close()


# -- the invariants -------------------------------------------------------------------


def unique_events(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events de-duplicated by event_id (first copy kept), in seq order."""
    seen: dict[str, dict[str, Any]] = {}
    for e in events:
        seen.setdefault(str(e["event_id"]), e)
    return sorted(seen.values(), key=lambda e: (int(e["seq"]), str(e["event_id"])))


def dropped_ranges(events: Iterable[dict[str, Any]],
                   reason: str | None = None) -> list[tuple[int, int, str]]:
    return [(int(e["dropped"]["from_seq"]), int(e["dropped"]["to_seq"]),
             str(e["dropped"]["reason"])) for e in events
            if e.get("kind") == "dropped" and (reason is None or
                                               e["dropped"]["reason"] == reason)]


def covered(seq: int, ranges: Iterable[tuple[int, int, str]]) -> bool:
    return any(lo <= seq <= hi for lo, hi, _ in ranges)


def _unpublished_in(ranges: Iterable[tuple[int, int, str]], published: set[int]) -> int:
    """How many seqs the dropped ranges cover (overlaps once) that were not published."""
    merged: list[list[int]] = []
    for lo, hi, _ in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return sum(hi - lo + 1 - sum(1 for q in published if lo <= q <= hi) for lo, hi in merged)


def _is_subsequence(short: Sequence[Any], long: Sequence[Any]) -> bool:
    it = iter(long)
    return all(any(x == y for y in it) for x in short)


_EVENT_VALIDATOR: jsonschema.Draft202012Validator | None = None


def _validate_event(payload: dict[str, Any]) -> None:
    global _EVENT_VALIDATOR  # noqa: PLW0603 - one compiled schema per test session
    if _EVENT_VALIDATOR is None:
        text = resources.files("edge.contract").joinpath("schemas",
                                                         "event.schema.json").read_text()
        _EVENT_VALIDATOR = jsonschema.Draft202012Validator(json.loads(text))
    _EVENT_VALIDATOR.validate(payload)


def check_invariants(site: FaultSite, published_events: list[dict[str, Any]],
                     acked_presses: list[AckedPress],
                     expect_alarm: str | Sequence[str] | None = None, *,
                     reuse_allowed_upto: int = 0, unannounced_loss_ok: int = 0,
                     clear_timeout: float = 20) -> list[dict[str, Any]]:
    """The storage fault model's four invariants (/tmp/fault_spec.md); returns the
    published events de-duplicated by event_id, in seq order.

    1. every press ACKed to a console is published or covered by a `dropped`
       event: without drops, the ACKed presses and the published ones, both in
       the order they happened, are the same buttons; with drops,
       the published ones are an ordered subsequence of the ACKed ones and the
       rest fit into the dropped, unpublished seqs;
    2. no seq published with two event_ids (`reuse_allowed_upto`: seqs up to
       it may be, where the spec says continuity cannot be proven, and
       `unannounced_loss_ok` ACKed presses may be missing without an
       announcement: nothing left on the Pi knows their seqs);
    3. the daemon is running and no daemon ended without the test stopping it;
    4. each expected alarm was raised, stayed raised until the test ended the
       fault (`FaultSite.fault_ends`), and (unless STICKY_ALARMS) is cleared;
       corruption / replacement is never alarmed, moved aside or announced
       unless expected.
    Also: every published event is valid against the contract's schema.
    """
    expected = ((expect_alarm,) if isinstance(expect_alarm, str)
                else tuple(expect_alarm or ()))
    events = unique_events(published_events)
    for e in events:
        _validate_event(e)
    # In the order the presses happened (the host's monotonic clock at the press:
    # one boot here), not in seq order: by the spec a press made after a fault
    # may be stored before the older ones its console replays later.
    in_order = sorted(events, key=lambda e: (int(e["time"]["mono_ns"]), int(e["seq"])))

    # 2. seq -> one event_id
    by_seq: dict[int, set[str]] = {}
    for e in events:
        by_seq.setdefault(int(e["seq"]), set()).add(str(e["event_id"]))
    reused = {q: ids for q, ids in by_seq.items() if len(ids) > 1 and q > reuse_allowed_upto}
    assert not reused, f"invariant 2: seqs published with different event_ids: {reused}"

    # 1. ACKed presses published or announced as dropped
    drops = dropped_ranges(events)
    published_seqs = set(by_seq)
    for dev_id in site.device_ids:
        acked = [(a.button, a.type == "HOLD") for a in acked_presses
                 if a.device_id == dev_id and a.type in ("PRESS", "HOLD")]
        pub = [(int(e["press"]["button"]), bool(e["press"]["hold"])) for e in in_order
               if e.get("kind") == "press" and e["device"]["id"] == dev_id]
        if not drops and not unannounced_loss_ok:
            assert pub == acked, (
                f"invariant 1 ({dev_id}): {len(acked)} presses ACKed, {len(pub)} published"
                f"\n  ACKed     {acked}\n  published {pub}{site.diag()}")
            continue
        assert _is_subsequence(pub, acked), (
            f"invariant 1 ({dev_id}): the published presses are not the ACKed ones in order"
            f"\n  ACKed     {acked}\n  published {pub}{site.diag()}")
        missing = len(acked) - len(pub)
        if missing:
            room = _unpublished_in(drops, published_seqs) + unannounced_loss_ok
            assert room >= missing, (
                f"invariant 1 ({dev_id}): {missing} ACKed presses neither published nor "
                f"covered by a dropped range (drops {drops}){site.diag()}")

    # 3. the daemon never exited on its own
    site._note_exits()
    assert site.alive(), f"invariant 3: the daemon is not running{site.diag()}"
    assert not site.unexpected_exits, (
        f"invariant 3: daemon(s) exited without being stopped: {site.unexpected_exits}"
        f"{site.diag()}")
    for d in site.daemons[:-1]:
        assert d.proc is not None
        if d.proc.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(f"invariant 3: a daemon stopped by the test exited "
                                 f"{d.proc.returncode}{site.diag()}")
    for r in site.cli_runs:
        assert "Traceback" not in r.stderr + r.stdout, (
            f"a CLI run printed a traceback:\n{r.stderr}")

    # 4. expected alarms raised, then cleared; no replacement unless expected
    site.note_logged_alarms()
    for code in expected:
        assert code in site.seen_alarms, (
            f"invariant 4: alarm {code} was never raised (seen: {sorted(site.seen_alarms)})"
            f"{site.diag()}")
        gaps = site.gaps(code)
        assert not gaps, (
            f"invariant 4: alarm {code} went away while the fault lasted (at +{gaps} s "
            f"after it was first seen){site.diag()}")
        if code not in STICKY_ALARMS:
            def cleared(code: str = code) -> bool:
                return code not in site.alarm_codes()

            site.wait(cleared, clear_timeout, f"invariant 4: alarm {code} cleared")
    for code in REPLACEMENT_ALARMS:
        if code not in expected:
            assert code not in site.seen_alarms, (
                f"invariant 4: unexpected alarm {site.seen_alarms[code]!r}{site.diag()}")
    if "store_corrupt" not in expected:
        assert not site.corrupt_files(), f"the store was moved aside: {site.corrupt_files()}"
    if "store_replaced" not in expected and "seq_state_lost" not in expected:
        replaced = dropped_ranges(events, "store_replaced")
        assert not replaced, f"unexpected store_replaced announcement(s): {replaced}"
    return events
