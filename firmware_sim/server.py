"""A simulated console as a process of its own, reachable on a unix socket.

The daemon connects as the host (`firmware_sim.link.SocketTransport`,
frame kinds described there); `feedback-sim console press` connects as a
control client.  The console keeps its ring while the daemon is down, just as
a real one does while its USB host is not reading.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

from drivers.transport import DeviceGoneError
from firmware_sim.console import ConsoleFirmware
from firmware_sim.link import recv_frame, send_frame

__all__ = ["ConsoleServer", "control"]

log = logging.getLogger(__name__)


def _uptime_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class ConsoleServer:
    def __init__(self, path: Path, serial: str, buttons: int = 3, layout: int = 1) -> None:
        self.path = path
        self.fw = ConsoleFirmware(serial, buttons=buttons, layout=layout, uptime_ms=_uptime_ms)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._host: socket.socket | None = None
        self._host_lock = threading.Lock()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._sock.settimeout(0.5)

    def serve_forever(self) -> None:
        threading.Thread(target=self._ticker, name="firmware", daemon=True).start()
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._client, args=(conn,), daemon=True).start()
        finally:
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _ticker(self) -> None:
        while not self._stop.is_set():
            due = self.fw.next_due_ms()
            wait = 1.0 if due is None else max(0.0, (due - _uptime_ms()) / 1000)
            self._wake.wait(min(wait, 1.0))
            self._wake.clear()
            self.fw.tick()

    def _send_to_host(self, conn: socket.socket, report: bytes) -> None:
        try:
            with self._host_lock:
                send_frame(conn, b"I", report)
        except OSError:
            # The host went away: like a closed hidraw, reports are lost.
            self._detach(conn)

    # Lock order: the firmware's lock, then _host_lock (the firmware sends
    # reports while holding its own).  Attach and detach take both, in that
    # order, so a late detach of an old connection cannot undo a new attach.
    def _detach(self, conn: socket.socket) -> None:
        with self.fw.lock, self._host_lock:
            if self._host is conn:
                self._host = None
                self.fw.set_sender(None)

    def _client(self, conn: socket.socket) -> None:
        try:
            while True:
                kind, payload = recv_frame(conn)
                if kind == b"H":
                    with self.fw.lock, self._host_lock:
                        self._host = conn
                        self.fw.set_sender(functools.partial(self._send_to_host, conn))
                    log.info("host attached")
                elif kind == b"O":
                    self.fw.output_report(payload)
                    self._wake.set()
                elif kind == b"F":
                    report = self.fw.feature_report()
                    with self._host_lock:
                        send_frame(conn, b"f", report)
                elif kind == b"P":
                    req = json.loads(payload)
                    self.fw.press(int(req["button"]), hold_ms=int(req.get("hold_ms", 120)),
                                  delay_ms=int(req.get("delay_ms", 0)))
                    self._wake.set()
                    send_frame(conn, b"x", json.dumps({"ok": True}).encode())
                elif kind == b"X":
                    send_frame(conn, b"x", json.dumps(self._control(payload.decode())).encode())
        except (DeviceGoneError, OSError, ValueError, KeyError):
            pass
        finally:
            self._detach(conn)
            conn.close()

    def _control(self, what: str) -> dict[str, Any]:
        if what == "power-cycle":
            self.fw.power_cut()
            self.fw.power_up()
        elif what == "unplug":
            self.fw.power_cut()
        elif what == "plug":
            self.fw.power_up()
        elif what != "state":
            return {"ok": False, "error": f"unknown control {what!r}"}
        self._wake.set()
        fw = self.fw
        return {"ok": True, "serial": fw.serial, "powered": fw.powered,
                "host_attached": fw.host_attached, "unacked": fw.unacked, "lost": fw.lost,
                "sent": fw.counters.sent, "resent": fw.counters.resent,
                "acks": fw.counters.acks,
                "leds": [[led.button, led.mode, led.ms] for led in fw.leds[-10:]]}


def control(path: Path, kind: bytes, payload: bytes) -> dict[str, Any]:
    """Send one control frame to a running simulator and return its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        send_frame(s, kind, payload)
        reply_kind, reply = recv_frame(s)
    if reply_kind != b"x":
        raise OSError(f"unexpected reply {reply_kind!r}")
    result = json.loads(reply)
    if not isinstance(result, dict):
        raise OSError("malformed reply")
    return result
