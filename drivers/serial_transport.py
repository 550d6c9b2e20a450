"""A thin pyserial transport for the survey terminal (CDC-ACM, USB-UART or a pty).

115200 8N1, no flow control, opened exclusively so that no second process
(a getty, ModemManager, a second daemon) reads half of the frames: pyserial's
advisory lock (flock, which only programs that also lock respect) and the
kernel's exclusive mode (the TIOCEXCL ioctl: any further open(2) of the tty
fails with EBUSY; processes with CAP_SYS_ADMIN, i.e. root, are exempt).  The
exclusive mode lives on the tty, not on our file descriptor, so `close()`
ends it (TIOCNXCL) before closing: a pty (the simulator) keeps its tty while
the other side is open, and would refuse our own reopen otherwise.

Implements `drivers.transport.Transport`; `read()` returns None when nothing
arrived within its timeout, else the bytes waiting, at most `READ_MAX` (a
piece of the stream, cut anywhere: `drivers.terminal.FrameDecoder`
reassembles frames, holding at most one frame's worth).
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import termios
import threading
from pathlib import Path
from typing import Final

import serial

from drivers.transport import DeviceGoneError, Transport

__all__ = ["READ_MAX", "SerialTransport", "find_by_serial"]

BY_ID = "/dev/serial/by-id"
READ_MAX: Final = 4096  # bytes per read(): what the kernel buffers comes in pieces


def find_by_serial(serial_number: str, root: str = BY_ID) -> Path | None:
    """udev names USB serial ports /dev/serial/by-id/usb-<maker>_<product>_<serial>-if00."""
    hits = sorted(glob.glob(f"{root}/*_{serial_number}-if*"))
    return Path(hits[0]) if hits else None


class SerialTransport(Transport):
    def __init__(self, port: Path) -> None:
        try:
            self._s = serial.Serial(str(port), 115200, timeout=0.5, exclusive=True)
        except (serial.SerialException, OSError, ValueError) as e:
            raise DeviceGoneError(f"cannot open {port}: {e}") from e
        try:
            fcntl.ioctl(self._s.fileno(), termios.TIOCEXCL)
        except OSError as e:
            self._s.close()
            raise DeviceGoneError(f"cannot open {port} exclusively: {e}") from e
        self._wlock = threading.Lock()

    def read(self, timeout_ms: int) -> bytes | None:
        """What arrived within `timeout_ms` (None if nothing), at most READ_MAX bytes."""
        try:
            timeout = timeout_ms / 1000
            if self._s.timeout != timeout:
                # pyserial's setter rewrites the termios settings (tcgetattr and
                # tcsetattr) even for the same value: once per frame otherwise.
                self._s.timeout = timeout
            first = self._s.read(1)
            if not first:
                return None
            waiting = min(self._s.in_waiting, READ_MAX - 1)
            return bytes(first + (self._s.read(waiting) if waiting else b""))
        except (serial.SerialException, OSError, TypeError) as e:
            raise DeviceGoneError(f"serial port: {e}") from e

    def write(self, data: bytes) -> None:
        with self._wlock:
            try:
                self._s.write(data)
            except (serial.SerialException, OSError) as e:
                raise DeviceGoneError(f"serial port: {e}") from e

    def close(self) -> None:
        # A device that is gone takes its tty (and the exclusive mode) with it.
        with contextlib.suppress(OSError, ValueError, serial.SerialException):
            if self._s.is_open:
                fcntl.ioctl(self._s.fileno(), termios.TIOCNXCL)
        self._s.close()
