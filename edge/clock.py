"""Where the daemon's notion of time comes from.

Every event carries two clocks: the wall clock (which may be wrong until NTP
has set it, and may jump) and a monotonic clock that counts from this boot
(identified by the kernel's boot_id).  Together with a `timesync` anchor they
let the collector correct times recorded before the wall clock was trusted.

`SystemClock` reads the real clocks; tests inject `ManualClock` so that no
test has to sleep.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "kernel_clock_synced", "read_boot_id"]

_BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


class Clock(Protocol):
    """What the daemon needs to know about time."""

    @property
    def boot_id(self) -> str: ...

    def wall_ns(self) -> int:
        """UTC nanoseconds since the epoch, as the system clock says now."""
        ...

    def mono_ns(self) -> int:
        """Nanoseconds since this boot, never going backwards."""
        ...

    def synced(self) -> bool:
        """True once NTP (timesyncd, chrony) has set the wall clock."""
        ...


def read_boot_id(path: Path = _BOOT_ID_PATH) -> str:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        # Outside Linux there is no boot_id; a per-process id keeps mono_ns
        # values from being compared across runs they do not belong to.
        return str(uuid.uuid4())


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> on 64-bit and 32-bit Linux: the leading
    # fields are what we read; the padding covers the rest of the kernel struct.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 11),
    ]


_STA_UNSYNC = 0x0040
_TIME_ERROR = 5
_libc: ctypes.CDLL | None = None


def kernel_clock_synced() -> bool:
    """The kernel's own verdict, as `timedatectl` reports it.

    timesyncd and chrony clear STA_UNSYNC through adjtimex() once they have
    disciplined the clock; adjtimex() then returns something other than
    TIME_ERROR.  This is the same test systemd uses for "System clock
    synchronized", rather than guessing from the presence of a network.
    """
    global _libc  # noqa: PLW0603 - one lazily loaded libc handle per process
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        tx = _Timex()
        state = _libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return False
    # -1: the call was refused (a seccomp filter: the unit's sandbox once did)
    # and `tx` was never filled in; its zeroed status would read as synced.
    return state not in (-1, _TIME_ERROR) and not (tx.status & _STA_UNSYNC)


class SystemClock:
    """The real clocks of this machine."""

    def __init__(self) -> None:
        self._boot_id = read_boot_id()
        self._synced_cache: tuple[int, bool] = (-1, False)

    @property
    def boot_id(self) -> str:
        return self._boot_id

    def wall_ns(self) -> int:
        return time.time_ns()

    def mono_ns(self) -> int:
        # CLOCK_BOOTTIME keeps counting through suspend, so (boot_id, mono_ns)
        # names one instant for the whole boot.
        return time.clock_gettime_ns(time.CLOCK_BOOTTIME)

    def synced(self) -> bool:
        # One syscall per second at most: presses can arrive in bursts.
        now = time.monotonic_ns() // 1_000_000_000
        checked_at, value = self._synced_cache
        if checked_at != now:
            value = kernel_clock_synced()
            self._synced_cache = (now, value)
        return value


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(
        self,
        wall_ns: int = 1_795_000_000_000_000_000,
        mono_ns: int = 1_000_000_000,
        synced: bool = True,
        boot_id: str = "00000000-0000-4000-8000-000000000001",
    ) -> None:
        self._lock = threading.Lock()
        self._wall = wall_ns
        self._mono = mono_ns
        self._synced = synced
        self._boot_id = boot_id

    @property
    def boot_id(self) -> str:
        return self._boot_id

    def wall_ns(self) -> int:
        with self._lock:
            return self._wall

    def mono_ns(self) -> int:
        with self._lock:
            return self._mono

    def synced(self) -> bool:
        with self._lock:
            return self._synced

    def advance(self, seconds: float) -> None:
        step = round(seconds * 1e9)
        with self._lock:
            self._wall += step
            self._mono += step

    def step_wall(self, seconds: float) -> None:
        """Jump the wall clock only, as an NTP step or a bad RTC does."""
        with self._lock:
            self._wall += round(seconds * 1e9)

    def set_synced(self, synced: bool) -> None:
        with self._lock:
            self._synced = synced
