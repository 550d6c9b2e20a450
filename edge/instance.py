"""One daemon per state directory.

Two daemons on one store would hand out the same seqs with different
event_ids, take each other's control socket and fight over the MQTT client
id.  `run` therefore takes an exclusive lock (flock) on `feedback-edge.lock`
in the store's directory before it opens anything, and holds it for its
lifetime; the kernel releases it when the process dies, however it dies.
The file holds the PID of the holder, for the message a second `run` prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["AlreadyRunningError", "InstanceLock"]


class AlreadyRunningError(Exception):
    """Another daemon holds the lock; `pid` is what its lock file says (None if unknown)."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.pid = pid
        who = f"PID {pid}" if pid is not None else "another process"
        super().__init__(f"another feedback-edge ({who}) is running with the state "
                         f"directory {path.parent}")


class InstanceLock:
    """The lock on `<store dir>/feedback-edge.lock`.

    `acquire()` raises AlreadyRunningError when another process holds it, and
    OSError when the file cannot be opened at all (then the daemon runs
    without the guarantee and says so: a disk fault must not stop it).
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "feedback-edge.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                text = ""
            os.close(fd)
            raise AlreadyRunningError(self.path, int(text) if text.isdigit() else None) from None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
