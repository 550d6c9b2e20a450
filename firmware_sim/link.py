"""The simulator's transports: how the daemon reaches a simulated console.

Both implement `drivers.transport.HidTransport` with the same report bytes
(report ID first, as hidraw does):

- `MemoryTransport`: an in-process `ConsoleFirmware`, for tests;
- `SocketTransport`: a `feedback-sim console` process on a unix socket, so a
  simulated console can outlive the daemon (the demo; black-box tests).

Socket framing (both directions; `feedback-sim terminal`'s control socket
uses it too)::

    +------+-----------+----------------+
    | kind | len u16le | payload (len)  |
    +------+-----------+----------------+
    kind 'H' host hello (empty)          host -> sim   the daemon opened the device
         'I' input report                sim  -> host
         'O' output report               host -> sim
         'F' get feature (report id)     host -> sim
         'f' feature report              sim  -> host
         'P' press {"button","hold_ms"}  control -> sim
         'X' control: "power-cycle" | "unplug" | "plug" | "state"
         'x' control reply (JSON)        sim  -> control
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
from pathlib import Path

from drivers.transport import DeviceGoneError, HidTransport
from firmware_sim.console import ConsoleFirmware

__all__ = ["MemoryTransport", "SocketTransport", "recv_frame", "send_frame"]

_HDR = struct.Struct("<cH")


class MemoryTransport(HidTransport):
    """The host side of an in-process firmware model."""

    def __init__(self, firmware: ConsoleFirmware) -> None:
        self._fw = firmware
        self._in: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._closed = False
        firmware.set_sender(self._in.put)

    def read(self, timeout_ms: int) -> bytes | None:
        if self._closed:
            raise DeviceGoneError("closed")
        try:
            item = self._in.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            return None
        if item is None:
            raise DeviceGoneError("unplugged")
        return item

    def write(self, data: bytes) -> None:
        if self._closed:
            raise DeviceGoneError("closed")
        self._fw.output_report(data)

    def get_feature(self, report_id: int, length: int) -> bytes:
        del report_id, length
        return self._fw.feature_report()

    def unplug(self) -> None:
        """Make the reader see the device disappear."""
        self._in.put(None)

    def close(self) -> None:
        self._closed = True
        self._fw.set_sender(None)


def send_frame(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_HDR.pack(kind, len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise DeviceGoneError("simulator closed the connection")
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, n = _HDR.unpack(_recv_exact(sock, _HDR.size))
    return kind, _recv_exact(sock, n)


class SocketTransport(HidTransport):
    """A console simulated by a `feedback-sim console run` process."""

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(str(path))
        except OSError as e:
            self._sock.close()
            raise DeviceGoneError(f"no simulator at {path}: {e.strerror}") from e
        self._wlock = threading.Lock()
        self._pending: list[bytes] = []
        self._write(b"H")

    def _write(self, kind: bytes, payload: bytes = b"") -> None:
        with self._wlock:
            try:
                send_frame(self._sock, kind, payload)
            except OSError as e:
                raise DeviceGoneError(str(e)) from e

    def _next(self, timeout_ms: int) -> tuple[bytes, bytes] | None:
        self._sock.settimeout(timeout_ms / 1000)
        try:
            head = self._sock.recv(_HDR.size, socket.MSG_PEEK)
        except TimeoutError:
            return None
        except OSError as e:
            raise DeviceGoneError(str(e)) from e
        if not head:
            raise DeviceGoneError("simulator closed the connection")
        self._sock.settimeout(None)
        try:
            return recv_frame(self._sock)
        except OSError as e:
            raise DeviceGoneError(str(e)) from e

    def read(self, timeout_ms: int) -> bytes | None:
        if self._pending:
            return self._pending.pop(0)
        while True:
            frame = self._next(timeout_ms)
            if frame is None:
                return None
            kind, payload = frame
            if kind == b"I":
                return payload

    def write(self, data: bytes) -> None:
        self._write(b"O", data)

    def get_feature(self, report_id: int, length: int) -> bytes:
        del length
        self._write(b"F", bytes([report_id]))
        # Called from the reading thread only, so input reports met on the way
        # are kept for read().
        for _ in range(1000):
            frame = self._next(2000)
            if frame is None:
                raise DeviceGoneError("simulator did not answer the feature request")
            kind, payload = frame
            if kind == b"f":
                return payload
            if kind == b"I":
                self._pending.append(payload)
        raise DeviceGoneError("no feature report in 1000 frames")

    def close(self) -> None:
        self._sock.close()
