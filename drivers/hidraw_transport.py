"""Keyboard-class devices read as raw HID boot reports, with their keys kept
away from everything else.

The kernel turns a USB keyboard's reports into key presses for whoever has
the keyboard focus: on a Pi, a login prompt on the local console.  So while
the daemon reads a configured button box or badge reader from /dev/hidrawN,
it also holds an exclusive grab (EVIOCGRAB) on the device's
/dev/input/eventN: the input layer then delivers its keys to the grabbing
file only, which nobody reads.  The grab ends when the daemon closes the file
(or dies), so a device that is removed from the config types again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
from pathlib import Path
from typing import Final

from drivers.hid_transport import DeviceGoneError

__all__ = ["HidrawKeyboard"]

# _IOW('E', 0x90, int): exclusive access to an input event device.
EVIOCGRAB: Final = 0x40044590


class HidrawKeyboard:
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
        ready, _, _ = select.select([self._fd], [], [], timeout_ms / 1000)
        if not ready:
            return None
        try:
            data = os.read(self._fd, 64)
        except BlockingIOError:
            return None
        except OSError as e:
            raise DeviceGoneError(str(e)) from e
        if not data:
            raise DeviceGoneError("device removed")
        return data

    def write(self, data: bytes, /) -> None:
        raise DeviceGoneError("keyboard-class devices take no output here")

    def close(self) -> None:
        if self._grab is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._grab, EVIOCGRAB, 0)
            os.close(self._grab)
            self._grab = None
        with contextlib.suppress(OSError):
            os.close(self._fd)
