"""Raw /dev/hidraw transports: consoles and keyboard-class devices.

Keyboard-class devices are read as raw HID boot reports, with their keys kept
away from everything else.

The kernel turns a USB keyboard's reports into key presses for whoever has
the keyboard focus: on a Pi, a login prompt on the local console.  So while
the daemon reads a configured button box or badge reader from /dev/hidrawN,
it also holds an exclusive grab (EVIOCGRAB) on the device's
/dev/input/eventN: the input layer then delivers its keys to the grabbing
file only, which nobody reads.  The grab ends when the daemon closes the file
(or dies), so a device that is removed from the config types again.

`HidrawConsole` speaks to a feedback console through the kernel's hidraw
interface directly (read/write of reports, HIDIOCGFEATURE for feature
reports): the same bytes hidapi's hidraw backend moves, with nothing but the
standard library, on every Pi (edge.kinds.console.open_console says why not
hidapi).

Both implement `drivers.transport.Transport` (`HidrawConsole` its
`HidTransport`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import threading
from pathlib import Path
from typing import Final

from drivers import usb_discovery
from drivers.transport import DeviceGoneError, HidTransport, Transport

__all__ = ["HidrawConsole", "HidrawKeyboard", "hidiocgfeature"]

# _IOW('E', 0x90, int): exclusive access to an input event device.
EVIOCGRAB: Final = 0x40044590

_IOC_READ_WRITE: Final = 3


def hidiocgfeature(length: int) -> int:
    """HIDIOCGFEATURE(len) from <linux/hidraw.h>: _IOC(_IOC_WRITE|_IOC_READ, 'H', 0x07, len)."""
    return (_IOC_READ_WRITE << 30) | (length << 16) | (ord("H") << 8) | 0x07


def _read_report(fd: int, timeout_ms: int) -> bytes | None:
    ready, _, _ = select.select([fd], [], [], timeout_ms / 1000)
    if not ready:
        return None
    try:
        data = os.read(fd, 64)
    except BlockingIOError:
        return None
    except OSError as e:
        raise DeviceGoneError(str(e)) from e
    if not data:
        raise DeviceGoneError("device removed")
    return data


class HidrawConsole(HidTransport):
    """A console on /dev/hidrawN.  Reports carry the report ID first, as in hidapi."""

    def __init__(self, node: Path) -> None:
        try:
            self._fd = os.open(node, os.O_RDWR | os.O_NONBLOCK)
        except OSError as e:
            raise DeviceGoneError(f"cannot open {node}: {e.strerror}") from e
        self._wlock = threading.Lock()

    @classmethod
    def find(cls, vid: int, pid: int, serial: str | None,
             root: Path = usb_discovery.SYSFS) -> HidrawConsole:
        """Open the hidraw node of the console with this identity, as hidapi's open() would."""
        for dev in usb_discovery.scan(root):
            if (dev.vid, dev.pid) == (vid, pid) and serial in (None, dev.serial) and dev.hidraw:
                return cls(Path(dev.hidraw[0]))
        raise DeviceGoneError(f"no hidraw node for {vid:04x}:{pid:04x}"
                              + (" with that serial" if serial else ""))

    def read(self, timeout_ms: int) -> bytes | None:
        return _read_report(self._fd, timeout_ms)

    def write(self, data: bytes) -> None:
        with self._wlock:
            try:
                n = os.write(self._fd, data)
            except OSError as e:
                raise DeviceGoneError(str(e)) from e
            if n != len(data):
                raise DeviceGoneError(f"short write ({n} of {len(data)} bytes)")

    def get_feature(self, report_id: int, length: int) -> bytes:
        buf = bytearray(length)
        buf[0] = report_id
        try:
            n = fcntl.ioctl(self._fd, hidiocgfeature(length), buf)
        except OSError as e:
            raise DeviceGoneError(str(e)) from e
        return bytes(buf[:n]) if n > 0 else bytes(buf)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class HidrawKeyboard(Transport):
    """A keyboard-class device on /dev/hidrawN (boot reports, no report ID),
    with its /dev/input/eventN grabbed while open so its keys reach no one else."""

    def __init__(self, hidraw: Path, event: Path | None) -> None:
        try:
            self._fd = os.open(hidraw, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise DeviceGoneError(f"cannot open {hidraw}: {e.strerror}") from e
        self._grab: int | None = None
        if event is not None:
            try:
                self._grab = os.open(event, os.O_RDONLY | os.O_NONBLOCK)
                fcntl.ioctl(self._grab, EVIOCGRAB, 1)
            except OSError as e:
                self.close()
                raise DeviceGoneError(f"cannot grab {event} (keys would reach the console): "
                                      f"{e.strerror}") from e

    def read(self, timeout_ms: int) -> bytes | None:
        return _read_report(self._fd, timeout_ms)

    def write(self, data: bytes) -> None:
        raise DeviceGoneError("keyboard-class devices take no output here")

    def close(self) -> None:
        if self._grab is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._grab, EVIOCGRAB, 0)
            os.close(self._grab)
            self._grab = None
        with contextlib.suppress(OSError):
            os.close(self._fd)
