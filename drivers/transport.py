"""The one interface every device transport implements.

A transport moves raw bytes between the daemon and one device and knows
nothing of what they mean (the protocol cores `drivers.console`,
`drivers.terminal` and `drivers.keyboard` do).  The real ones:

- `drivers.hidraw_transport.HidrawConsole`: a console on /dev/hidrawN, stdlib only;
- `drivers.hidraw_transport.HidrawKeyboard`: a keyboard-class device on
  /dev/hidrawN, its keys grabbed away from the local console (EVIOCGRAB);
- `drivers.serial_transport.SerialTransport`: a survey terminal through pyserial.

The simulator keeps its own (in memory, and over a unix socket to a
`feedback-sim` process) beside its firmware models: nothing here depends on it.

Threads: one thread reads (`read`, `get_feature`) and finally calls `close`;
`write` may be called from any other thread at the same time (the daemon's
main loop ACKs while a worker thread reads), and each transport serialises
its writes.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["DeviceGoneError", "HidTransport", "Transport"]


class DeviceGoneError(OSError):
    """The device was unplugged, could not be opened, or its simulator went away."""


class Transport(Protocol):
    """Bytes to and from one device."""

    def read(self, timeout_ms: int) -> bytes | None:
        """Wait at most `timeout_ms` milliseconds (>= 0) for input from the device.

        Returns the bytes that arrived, never empty: for a HID device one
        input report exactly as hidraw gives it (report ID first where the
        device numbers its reports, at most 64 bytes); for a serial device
        the bytes waiting, a piece of the byte stream cut anywhere.  Returns
        None when nothing arrived within the timeout (the only way to say
        "nothing read").  Raises `DeviceGoneError` when the device is gone.
        """
        ...

    def write(self, data: bytes) -> None:
        """Send `data` to the device: for a HID device one output report, report
        ID first; for a serial device bytes for the wire.

        Returns once the bytes are handed to the OS (or the simulator).  Safe
        to call from another thread than `read`; writes are serialised.
        Raises `DeviceGoneError` when the device is gone, or when it takes no
        output at all (keyboard-class devices).
        """
        ...

    def close(self) -> None:
        """Release the device (and any grab on it).  Called once, by the reading
        thread, also after `DeviceGoneError`; raises nothing for a device that
        is already gone.  The transport is not used afterwards."""
        ...


class HidTransport(Transport, Protocol):
    """A HID device that also has feature reports (the feedback console)."""

    def get_feature(self, report_id: int, length: int) -> bytes:
        """Read feature report `report_id` (0..255); `length` is the buffer size
        in bytes, the report ID byte included.

        Returns the report, report ID first.  Called from the reading thread
        only, between reads.  Raises `DeviceGoneError` when the device is gone
        or does not answer.
        """
        ...
