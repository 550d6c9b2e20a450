"""One guest of the VM tier: QEMU (TCG, 1 vCPU) booting Debian's kernel, the
host's root read-only under a tmpfs overlay, the project installed as on a Pi.

What the guest has (guest/init.sh and guest/stage2.sh set it up):

- the host's files at their own paths (read-only below, writable in guest
  memory), but its own /tmp, /run and /dev; dummy_hcd and configfs for USB
  gadgets, Debian's systemd-udevd with the project's rules;
- /opt/feedback-edge (the venv) and /etc/feedback-edge from install.sh, the
  service user `feedback-edge` made by systemd-sysusers, /var/lib/feedback-edge
  (on the ext4 disk when there is one) and /run/feedback-edge owned by it;
- /share: a directory of the host (`Guest.share`) for files both ways;
- the host's loopback as 10.0.2.2 (QEMU user networking): a Mosquitto the
  test starts on 127.0.0.1 is reachable there;
- /vm/bin on PATH: `as-user USER CMD`, `spawn`, and `checkout-python` (the
  test run's interpreter with the checkout on sys.path, for firmware_sim.usb).

The test talks to the guest through a virtio serial port (guest/agent.sh):
`run` executes a shell script as root or as a user and returns its status and
output; nothing waits on time, everything on an answer or a file, with a
deadline.  `power_cut` is SIGKILL to QEMU: what the guest had not written to
its disk is lost, what it had survives, and `Machines.boot(disk=...)` boots
again on the same disk.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.vm.assets import CHECKOUT, STDLIB, Assets

__all__ = ["DAEMON", "HOST", "SERVICE_USER", "Guest", "GuestError", "Machines", "Result",
           "run_dir"]

SERVICE_USER = "feedback-edge"
DAEMON = "/opt/feedback-edge/venv/bin/feedback-edge"
CONFIG = "/etc/feedback-edge/edge.toml"
HOST = "10.0.2.2"  # the host's 127.0.0.1, seen from the guest
T = TypeVar("T")


def run_dir(parent: Path, name: str) -> Path:
    """A new directory for one test's (or fixture's) boots under `parent`,
    named by time, this process and `name`, so kept failures sort and tell
    whose they were."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:80]
    path = parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{safe}"
    path.mkdir(parents=True)
    return path


class GuestError(AssertionError):
    """The guest did not do what was asked in time; the message has the console's tail."""


@dataclass(frozen=True)
class Result:
    status: int
    stdout: str
    stderr: str
    seconds: float  # wall time from sending the request to its answer


def _die_with_parent() -> None:
    # A test run killed outright must not leave QEMU spinning on the shared cores.
    # (The signal comes when the thread that started QEMU ends: boot from the
    # test's own thread.)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _drive(serial: str, path: Path, options: str, fmt: str = "raw") -> list[str]:
    return ["-drive", f"if=none,id={serial},file={_q(path)},format={fmt},{options}",
            "-device", f"virtio-blk-pci,drive={serial},serial={serial}"]


def _q(path: Path) -> str:
    s = str(path)
    if "," in s:
        raise ValueError(f"{s}: QEMU options cannot carry a comma here")
    return s


class Guest:
    """A QEMU process and its channel; `Machines.boot` makes and starts one."""

    def __init__(self, assets: Assets | None, rundir: Path, *, scenario: str | None = None,
                 disk: Path | None = None, disk_mount: str = "/var/lib/feedback-edge",
                 poweroff_after_scenario: bool = True, memory_mb: int = 1024,
                 udcs: int = 1, root_cache: str = "", cpu: str = "max",
                 python_images: bool = True, qemu_args: Sequence[str] = ()) -> None:
        self.assets = assets
        self.rundir = rundir
        self.share = rundir / "share"
        self.console = rundir / "console.log"
        self.disk = disk
        self.timings: dict[str, float] = {}
        self._vm = self.share / ".vm"
        self._scenario = scenario
        self._disk_mount = disk_mount
        self._poweroff_after = poweroff_after_scenario
        self._memory = memory_mb
        self._udcs = udcs
        self._root_cache = root_cache
        self._cpu = cpu
        self._python_images = python_images
        self._qemu_args = list(qemu_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._sockdir: str | None = None
        self._cond = threading.Condition()
        self._answers: dict[int, int] = {}
        self._ready_uptime: float | None = None
        self._closed = False
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._t0 = 0.0

    # -- lifecycle -----------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        """What the guest's scripts find in $VM/env (guest/env.sh)."""
        assert self.assets is not None
        return {"FEEDBACK_INSTALL_ROOT": str(self.assets.install_root),
                "FEEDBACK_CHECKOUT": str(CHECKOUT),
                "FEEDBACK_PYTHON": sys.executable,
                "VM_DISK_MOUNT": self._disk_mount,
                "VM_STDLIB": str(STDLIB),
                "VM_POWEROFF_AFTER_SCENARIO": "1" if self._poweroff_after else "0"}

    def _channel_args(self, sock: Path) -> list[str]:
        """The agent's virtio serial port and the share, common to every guest."""
        return ["-virtfs", f"local,path={_q(self.share)},mount_tag=share,security_model=none",
                "-netdev", "user,id=net0",
                # romfile= : no PXE option ROM to load; the kernel is booted directly.
                "-device", "virtio-net-pci,netdev=net0,romfile=",
                "-device", "virtio-serial-pci",
                "-chardev", f"socket,id=agent,path={_q(sock)},server=on,wait=off",
                "-device", "virtserialport,chardev=agent,name=agent"]

    def _boot_args(self) -> list[str]:
        """The machine: the kernel, its command line, the root and the disks."""
        assert self.assets is not None
        append = f"console=ttyS0 panic=-1 quiet vm.udcs={self._udcs}"
        if self._root_cache:
            append += f" vm.rootcache={self._root_cache}"  # a 9p cache mode, to measure
        args = ["-kernel", _q(self.assets.vmlinux), "-initrd", _q(self.assets.initrd),
                "-append", append,
                "-virtfs", "local,path=/,mount_tag=hostroot,readonly=on,security_model=none,"
                           "multidevs=remap"]
        # Disks are found in the guest by serial number (guest/stage2.sh).
        if self._python_images:
            args += _drive("feedback-opt", self.assets.opt_image, "readonly=on")
            args += _drive("python-stdlib", self.assets.stdlib_image, "readonly=on")
        if self.disk is not None:
            # cache=unsafe: the power cut is SIGKILL to QEMU, not to the host, so
            # whatever QEMU has written survives in the host's page cache either
            # way, and whatever the guest kernel still holds is lost.
            args += _drive("feedback-store", self.disk, "cache=unsafe")
        return args

    def start(self) -> Guest:
        for d in (self._vm / "cmd", self._vm / "proc", self._vm / "files"):
            d.mkdir(parents=True, exist_ok=True)
        (self._vm / "env").write_text("".join(f"{k}={shlex.quote(v)}\n"
                                              for k, v in self._env().items()))
        if self._scenario is not None:
            text = self._scenario
            if not text.startswith("#!"):
                text = "#!/bin/sh\n" + text
            path = self._vm / "scenario"
            path.write_text(text)
            path.chmod(0o755)
        # A unix socket path is limited to 108 bytes: not under the run directory.
        self._sockdir = tempfile.mkdtemp(prefix="fe-vm-")
        sock = Path(self._sockdir) / "agent"
        args = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", self._cpu, "-smp", "1",
                "-m", str(self._memory), "-nodefaults", "-no-user-config", "-display", "none",
                "-no-reboot", "-serial", f"file:{_q(self.console)}",
                *self._boot_args(), *self._channel_args(sock), *self._qemu_args]
        self._t0 = time.monotonic()
        with (self.rundir / "qemu.log").open("wb") as log:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT,
                                          preexec_fn=_die_with_parent)  # noqa: PLW1509
        self._sock = self._connect(sock)
        threading.Thread(target=self._reader, name="vm-agent", daemon=True).start()
        return self

    def _connect(self, path: Path) -> socket.socket:
        def attempt() -> socket.socket | None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
            except OSError:
                s.close()
                return None
            return s

        return self.wait_for(attempt, 30, "QEMU's agent socket")

    def _reader(self) -> None:
        assert self._sock is not None
        buf = b""
        while True:
            try:
                chunk = self._sock.recv(4096)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self._answer(line.decode(errors="replace").split())
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _answer(self, words: list[str]) -> None:
        with self._cond:
            if words[:1] == ["ready"] and len(words) == 2:
                self._ready_uptime = float(words[1])
                self.timings["boot_s"] = time.monotonic() - self._t0
                self.timings["guest_uptime_at_ready_s"] = self._ready_uptime
            elif len(words) == 2 and words[0].isdigit() and words[1].lstrip("-").isdigit():
                self._answers[int(words[0])] = int(words[1])
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_ready(self, timeout: float = 120) -> None:
        self._wait_answer(lambda: self._ready_uptime is not None, timeout, "the guest to boot")

    def poweroff(self, timeout: float = 60) -> int:
        """Sync and power off (a clean stop for the disk); QEMU's exit status."""
        self._send(next(self._ids), "root", "sync; /vm/busybox poweroff -f\n")
        return self.wait_stopped(timeout)

    def power_cut(self) -> None:
        """SIGKILL to QEMU: the guest's unwritten data is gone, as in a power cut."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(30)
            self.timings["qemu_s"] = time.monotonic() - self._t0

    def wait_stopped(self, timeout: float = 60) -> int:
        assert self._proc is not None
        try:
            status = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestError(f"QEMU still running after {timeout} s{self._tail()}") from None
        self.timings["qemu_s"] = time.monotonic() - self._t0
        return status

    def close(self) -> None:
        self.power_cut()
        if self._sock is not None:
            self._sock.close()
        if self._sockdir is not None:
            shutil.rmtree(self._sockdir, ignore_errors=True)
            self._sockdir = None

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------------

    def _send(self, cid: int, user: str, script: str) -> None:
        (self._vm / "cmd" / f"{cid}.sh").write_text(script)
        assert self._sock is not None
        with self._send_lock:
            self._sock.sendall(f"{cid} {user}\n".encode())

    def run(self, cmd: str | Sequence[str], *, user: str = "root", timeout: float = 60,
            check: bool = True) -> Result:
        """A shell script (or an argv) in the guest, as `user`; waits for it to exit."""
        script = cmd if isinstance(cmd, str) else shlex.join(cmd)
        cid = next(self._ids)
        t = time.monotonic()
        self._send(cid, user, script + "\n")
        self._wait_answer(lambda: cid in self._answers, timeout, f"`{script[:200]}`")
        with self._cond:
            status = self._answers.pop(cid)
        out = self._vm / "cmd" / f"{cid}"
        result = Result(status, out.with_suffix(".out").read_text(errors="replace"),
                        out.with_suffix(".err").read_text(errors="replace"),
                        time.monotonic() - t)
        if check and result.status != 0:
            raise GuestError(f"`{script[:500]}` as {user} exited with {result.status}\n"
                             f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}")
        return result

    def spawn(self, cmd: str | Sequence[str], *, name: str, user: str = "root",
              umask: int = 0o022, log: str | None = None) -> int:
        """Start a background process; its pid.  Its output goes to /share/`log`
        (default NAME.log) and its exit status to `wait_exit(name)`."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        log_path = f"/share/{log or name + '.log'}"
        (self._vm / "proc" / f"{name}.rc").unlink(missing_ok=True)
        r = self.run(f"umask {umask:04o}; spawn {shlex.join([name, log_path, user, *argv])}")
        return int(r.stdout.strip())

    def wait_exit(self, name: str, timeout: float = 30) -> int:
        """The exit status of a spawned process (128 + N when signal N killed it)."""
        path = self.wait_file(f".vm/proc/{name}.rc", timeout, f"{name} to exit")
        return int(path.read_text().strip())

    def put(self, path: str, data: str | bytes, *, mode: int = 0o644,
            owner: str = "root", group: str = "root") -> None:
        """Write a file into the guest (its directories are made)."""
        src = self._vm / "files" / f"{next(self._ids)}"
        if isinstance(data, str):
            src.write_text(data)
        else:
            src.write_bytes(data)
        self.run(["install", "-D", "-m", f"{mode:04o}", "-o", owner, "-g", group,
                  f"/share/.vm/files/{src.name}", path])

    def start_daemon(self, config: str | None = None, *, name: str = "daemon",
                     args: Sequence[str] = ()) -> int:
        """The installed daemon as the unit runs it: as the service user, umask 0077,
        `feedback-edge run --config /etc/feedback-edge/edge.toml`.  `config`
        replaces the installed edge.toml (0640 root:feedback-edge).  Its pid."""
        if config is not None:
            self.put(CONFIG, config, mode=0o640, group=SERVICE_USER)
        return self.spawn([DAEMON, "run", "--config", CONFIG, *args], name=name,
                          user=SERVICE_USER, umask=0o077)

    # -- waiting -------------------------------------------------------------------------

    def _tail(self, lines: int = 40) -> str:
        out = ""
        for path in (self.rundir / "qemu.log", self.console):
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                tail = "\n".join(text.splitlines()[-lines:])
                out += f"\n--- {path} (last {lines} lines) ---\n{tail}"
        return out

    def _wait_answer(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not cond():
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    why = "the guest is gone" if self._closed else f"{timeout} s passed"
                    raise GuestError(f"no answer to {what}: {why}{self._tail()}")
                self._cond.wait(left)

    def wait_for(self, cond: Callable[[], T | None], timeout: float, what: str,
                 interval: float = 0.02) -> T:
        """Poll `cond` on the host until it returns something truthy; fails with the
        console's tail after `timeout` or when QEMU has exited."""
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if not self.running:
                raise GuestError(f"QEMU exited while waiting for {what}{self._tail()}")
            if time.monotonic() > deadline:
                raise GuestError(f"timed out after {timeout} s waiting for {what}{self._tail()}")
            threading.Event().wait(interval)

    def wait_file(self, name: str, timeout: float = 30, what: str | None = None) -> Path:
        """A file in the share (path relative to it) once it exists."""
        path = self.share / name
        return self.wait_for(lambda: path if path.exists() else None, timeout,
                             what or f"/share/{name}")

    def wait_console(self, text: str, timeout: float = 30) -> None:
        self.wait_for(lambda: text in self.console_text(), timeout, f"{text!r} on the console")

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def scenario_status(self, timeout: float = 120) -> int:
        """The scenario's exit status once it has ended (its output: /share/scenario.log)."""
        path = self._vm / "scenario.rc"
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not self.running:
                # It may have powered off right after writing the status.
                if path.exists():
                    break
                raise GuestError(f"QEMU exited before the scenario ended{self._tail()}")
            if time.monotonic() > deadline:
                raise GuestError(f"the scenario did not end within {timeout} s{self._tail()}")
            threading.Event().wait(0.05)
        return int(path.read_text().strip())


class Machines:
    """The `vm` fixture: boots guests for one test and kills whatever is left."""

    def __init__(self, assets: Assets, rundir: Path) -> None:
        self.assets = assets
        self.rundir = rundir
        self.guests: list[Guest] = []

    def boot(self, *, ready: bool = True, timeout: float = 120, **kw: Any) -> Guest:
        """A started guest (see Guest's arguments), by default waited for until its
        agent answers: udevd runs and the service user exists by then."""
        rundir = self.rundir / f"boot-{len(self.guests) + 1}"
        rundir.mkdir(parents=True)
        g = Guest(self.assets, rundir, **kw)
        self.guests.append(g)
        g.start()
        if ready:
            g.wait_ready(timeout)
        return g

    def disk(self, name: str = "disk.img", size_mb: int = 256) -> Path:
        """A fresh ext4 image, sparse; the guest mounts it (by default at the
        service's state directory, so the store is on it)."""
        path = self.rundir / name
        with path.open("wb") as f:
            f.truncate(size_mb << 20)
        # Initialised in full here, not lazily by the guest kernel's ext4lazyinit
        # thread under TCG, which would compete with the test for the one vCPU.
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        str(path)], check=True, capture_output=True,
                       env={**os.environ, "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"})
        return path

    def close(self) -> None:
        for g in self.guests:
            g.close()
