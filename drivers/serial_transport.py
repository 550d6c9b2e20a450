"""A thin pyserial transport for the survey terminal (CDC-ACM, USB-UART or a pty).

115200 8N1, no flow control, opened exclusively so that no second process
(a getty, ModemManager, a second daemon) reads half of the frames.

Implements `drivers.transport.Transport`; `read()` returns None when nothing
arrived within its timeout, else the bytes waiting (a piece of the stream, cut
anywhere: `drivers.terminal.FrameDecoder` reassembles frames).
"""

from __future__ import annotations

import glob
import threading
from pathlib import Path

import serial

from drivers.transport import DeviceGoneError, Transport

__all__ = ["SerialTransport", "find_by_serial"]

BY_ID = "/dev/serial/by-id"


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
        self._wlock = threading.Lock()

    def read(self, timeout_ms: int) -> bytes | None:
        """What arrived within `timeout_ms` (None if nothing)."""
        try:
            self._s.timeout = timeout_ms / 1000
            first = self._s.read(1)
            if not first:
                return None
            waiting = self._s.in_waiting
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
        self._s.close()
