"""A console on /dev/hidraw*, through hidapi (its hidraw backend on Linux).

Implements `drivers.transport.HidTransport`.  Where the `hidapi` package cannot
be installed, `drivers.hidraw_transport.HidrawConsole` moves the same report
bytes with the standard library only.
"""

from __future__ import annotations

import threading

from drivers.transport import DeviceGoneError, HidTransport

__all__ = ["HidapiTransport"]


class HidapiTransport(HidTransport):
    """A console on /dev/hidraw*, through the `hidapi` package (module `hid`)."""

    def __init__(self, vid: int, pid: int, serial: str | None, path: bytes | None = None) -> None:
        import hid  # noqa: PLC0415 - only the real-device path needs the C library

        self._dev = hid.device()
        try:
            if path is not None:
                self._dev.open_path(path)
            else:
                self._dev.open(vid, pid, serial)
        except OSError as e:
            raise DeviceGoneError(f"cannot open {vid:04x}:{pid:04x} serial {serial}: {e}") from e
        self._wlock = threading.Lock()

    def read(self, timeout_ms: int) -> bytes | None:
        try:
            data = self._dev.read(64, timeout_ms)
        except (OSError, ValueError) as e:
            raise DeviceGoneError(str(e)) from e
        return bytes(data) if data else None

    def write(self, data: bytes) -> None:
        with self._wlock:
            try:
                n = self._dev.write(data)
            except (OSError, ValueError) as e:
                raise DeviceGoneError(str(e)) from e
            if n < 0:
                raise DeviceGoneError("write failed")

    def get_feature(self, report_id: int, length: int) -> bytes:
        try:
            return bytes(self._dev.get_feature_report(report_id, length))
        except (OSError, ValueError) as e:
            raise DeviceGoneError(str(e)) from e

    def close(self) -> None:
        self._dev.close()
