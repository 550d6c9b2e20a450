"""A simulated console as a process of its own, reachable on a unix socket.

The daemon connects as the host (`firmware_sim.link.SocketTransport`,
frame kinds described there); `feedback-sim console press` connects as a
control client.  The console keeps its ring while the daemon is down, just as
a real one does while its USB host is not reading.

`unplug` is a USB unplug: power is gone (the ring with it), the host's
connection is closed, and the socket is renamed to `<socket>.unplugged` the
way a device node disappears, so a host finds nothing to open until `plug`
(a host hello arriving anyway is refused); `control()` finds the renamed
socket, so press, state and plug still reach it.  A control request that
the console cannot carry out (a button it does not have, a malformed
request) gets `{"ok": false, "error": ...}` and changes nothing.
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

__all__ = ["ConsoleServer", "control", "run_ticker", "uptime_ms"]

log = logging.getLogger(__name__)

ACKED_REPLY = 1500  # acknowledged events listed in a `state` reply, newest kept


def uptime_ms() -> int:
    """The simulated consoles' clock: this host's monotonic time in ms."""
    return time.monotonic_ns() // 1_000_000


def run_ticker(fw: ConsoleFirmware, wake: threading.Event, stop: threading.Event) -> None:
    """Turn the firmware's timers (debounce, resends) until `stop`: when its next
    step is due, or at once when `wake` is set (a press scripted, an ACK)."""
    while not stop.is_set():
        due = fw.next_due_ms()
        wait = 1.0 if due is None else max(0.0, (due - uptime_ms()) / 1000)
        wake.wait(min(wait, 1.0))
        wake.clear()
        try:
            fw.tick()
        except Exception:  # a model bug must not stop the console for good
            log.exception("firmware tick failed")
            stop.wait(1.0)


def unplugged_path(path: Path) -> Path:
    """Where an unplugged console's socket is (control clients only)."""
    return path.with_name(path.name + ".unplugged")


class ConsoleServer:
    def __init__(self, path: Path, serial: str, buttons: int = 3, layout: int = 1) -> None:
        self.path = path
        self.fw = ConsoleFirmware(serial, buttons=buttons, layout=layout, uptime_ms=uptime_ms)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._host: socket.socket | None = None
        self._host_lock = threading.Lock()
        self._unplugged = False
        for stale in (path, unplugged_path(path)):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
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
            for path in (self.path, unplugged_path(self.path)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _ticker(self) -> None:
        run_ticker(self.fw, self._wake, self._stop)

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
                        if self._unplugged:
                            log.info("host refused: the console is unplugged")
                            return
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
                    send_frame(conn, b"x", json.dumps(self._press(payload)).encode())
                elif kind == b"X":
                    send_frame(conn, b"x", json.dumps(self._control(
                        payload.decode(errors="replace"))).encode())
        except (DeviceGoneError, OSError, ValueError, KeyError):
            pass
        finally:
            self._detach(conn)
            conn.close()

    def _press(self, payload: bytes) -> dict[str, Any]:
        try:
            req = json.loads(payload)
            if not isinstance(req, dict) or "button" not in req:
                raise ValueError('a press is {"button": N, "hold_ms": N, "delay_ms": N}')
            self.fw.press(int(req["button"]), hold_ms=int(req.get("hold_ms", 120)),
                          delay_ms=int(req.get("delay_ms", 0)))
        except (ValueError, TypeError) as e:
            return {"ok": False, "error": str(e)}
        self._wake.set()
        return {"ok": True}

    def _unplug(self) -> None:
        with self.fw.lock, self._host_lock:
            if self._unplugged:
                return
            # First the device node goes, so no host can open it again ...
            self.path.rename(unplugged_path(self.path))
            self._unplugged = True
            self.fw.power_cut()
            host, self._host = self._host, None
            self.fw.set_sender(None)
        # ... then the open one sees the device gone (its reader gets EOF).
        if host is not None:
            with contextlib.suppress(OSError):
                host.shutdown(socket.SHUT_RDWR)
        log.info("unplugged")

    def _plug(self) -> None:
        with self.fw.lock, self._host_lock:
            if not self._unplugged:
                return
            unplugged_path(self.path).rename(self.path)
            self._unplugged = False
            self.fw.power_up()
        log.info("plugged in")

    def _control(self, what: str) -> dict[str, Any]:
        if what == "power-cycle":
            self.fw.power_cut()
            self.fw.power_up()
        elif what == "unplug":
            self._unplug()
        elif what == "plug":
            self._plug()
        elif what != "state":
            return {"ok": False, "error": f"unknown control {what!r}"}
        self._wake.set()
        fw = self.fw
        with fw.lock:
            acked = list(fw.acked)[-ACKED_REPLY:]
            acked_total = fw.acked_total
        return {"ok": True, "serial": fw.serial, "powered": fw.powered,
                "plugged": not self._unplugged, "host_attached": fw.host_attached,
                "unacked": fw.unacked, "lost": fw.lost,
                "sent": fw.counters.sent, "resent": fw.counters.resent,
                "acks": fw.counters.acks,
                # Every button released and settled, nothing scripted: the next
                # press of any button is a press of its own.
                "idle": fw.idle,
                "leds": [[led.button, led.mode, led.ms] for led in fw.leds[-10:]],
                # Events the host's ACKs removed from the ring, oldest first:
                # [dev_seq, "PRESS" | "HOLD" | "HELLO", button, event_uptime_ms].  The
                # last ACKED_REPLY of acked_total (a control frame holds 64 KiB).
                "acked": [[a.dev_seq, a.type.name, a.button, a.event_uptime] for a in acked],
                "acked_total": acked_total}


def control(path: Path, kind: bytes, payload: bytes) -> dict[str, Any]:
    """Send one control frame to a running simulator and return its reply.

    An unplugged console is found under `unplugged_path(path)`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        # Tried again at `path` too: a `plug` may rename it back in between.
        for i, where in enumerate((path, unplugged_path(path), path)):
            try:
                s.connect(str(where))
                break
            except FileNotFoundError:
                if i == 2:
                    raise
        send_frame(s, kind, payload)
        reply_kind, reply = recv_frame(s)
    if reply_kind != b"x":
        raise OSError(f"unexpected reply {reply_kind!r}")
    result = json.loads(reply)
    if not isinstance(result, dict):
        raise OSError("malformed reply")
    return result
