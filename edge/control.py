"""The local control socket: how `feedback-edge status` asks a running daemon.

A unix stream socket (mode 0660) next to the store or where the config puts
it.  A client sends one JSON line (`{"cmd": "status"}`, or `{"cmd":
"operator", "desk": ..., "operator": ...}`) and reads one JSON reply; the
server thread hands the request to the main loop and relays its answer, so
the daemon's state is only ever touched by the thread that owns it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ControlServer", "query"]

log = logging.getLogger(__name__)


class ControlServer:
    def __init__(self, path: Path,
                 ask: Callable[[queue.SimpleQueue[dict[str, Any]], dict[str, Any]], None],
                 ) -> None:
        self.path = path
        self._ask = ask
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o660)
        self._sock.listen(8)
        self._sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                try:
                    line = _read_line(conn, 4096, deadline_s=2.0)
                    try:
                        request = json.loads(line) if line else {}
                    except (ValueError, RecursionError):  # not JSON, or [[[[... too deep
                        request = None
                    if not isinstance(request, dict) or \
                            request.get("cmd") not in ("status", "operator"):
                        reply: dict[str, Any] = {"error": "unknown request; known: status, "
                                                 "operator"}
                    else:
                        box: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
                        self._ask(box, request)
                        try:
                            reply = box.get(timeout=5.0)
                        except queue.Empty:
                            reply = {"error": "the daemon's main loop did not answer in 5 s"}
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except (OSError, ValueError) as e:
                    log.debug("control client: %s", e)


def _read_line(conn: socket.socket, limit: int, *, deadline_s: float) -> bytes:
    """One request line, read within `deadline_s` in all: a client trickling a
    byte a second must not hold the (single-threaded) socket for everyone.
    Raises TimeoutError when the deadline passes first."""
    end = time.monotonic() + deadline_s
    data = b""
    while b"\n" not in data and len(data) < limit:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request line took too long")
        conn.settimeout(left)
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def query(path: Path, timeout: float = 6.0,
          request: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ask a running daemon (status by default); raises OSError if none answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request or {"cmd": "status"}).encode() + b"\n")
        data = s.makefile("rb").readline()
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise OSError("the daemon closed the connection without a proper reply")
    return reply
