"""The control socket of a USB-backed simulator: the same unix-socket framing
and requests as the socket simulators (`firmware_sim.link`, framing drawn
there; `firmware_sim.server.control` is the client), so a test or
`feedback-sim console press ... --socket S` says the same thing to either
backend.

A connection may carry several requests; each frame gets one 'x' reply
holding a JSON object.  A handler that raises ValueError, TypeError or
OSError answers `{"ok": false, "error": ...}` and the connection stays.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers.transport import DeviceGoneError
from firmware_sim.link import recv_frame, send_frame

__all__ = ["ControlServer", "Handler", "quiet_thread"]

log = logging.getLogger(__name__)

Handler = Callable[[bytes, bytes], dict[str, Any]]
"""(frame kind, payload) -> the JSON reply."""


def quiet_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A started daemon thread that leaves SIGINT and SIGTERM to the main
    thread: a signal landing in a thread blocked in USB I/O would only
    restart that I/O."""
    import signal  # noqa: PLC0415 - only threads started here need it

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        target()

    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    return t


class ControlServer:
    """Serves `handler` on a unix socket at `path` until `stop()`.  The socket
    is created by `start()`; a test can take its appearance as "ready"."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._stop = threading.Event()
        self._sock: socket.socket | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = self.path.with_name(self.path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock.bind(str(tmp))
        sock.listen(8)
        sock.settimeout(0.5)
        # Renamed into place only once listening: its existence means ready.
        tmp.rename(self.path)
        self._sock = sock
        quiet_thread(self._accept_loop, "control")

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        assert self._sock is not None  # noqa: S101 - started by start()
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                quiet_thread(functools.partial(self._client, conn), "control-client")
        finally:
            self._sock.close()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    kind, payload = recv_frame(conn)
                    try:
                        reply = self._handler(kind, payload)
                    except (ValueError, TypeError, OSError) as e:
                        reply = {"ok": False, "error": str(e)}
                    send_frame(conn, b"x", json.dumps(reply).encode())
            except (DeviceGoneError, OSError):
                pass
