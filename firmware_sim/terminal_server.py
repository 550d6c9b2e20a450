"""A simulated survey terminal on a real pseudo-terminal.

The daemon opens the pty's slave side with pyserial exactly as it opens
/dev/ttyACM0; `link` is a symlink to it with a stable name (as udev's
/dev/serial/by-id names are).  The terminal notices the host opening and
closing the port through the pty (POLLHUP on the master while no one has the
slave open), as CDC-ACM firmware notices DTR, and sends HELLO on open.

With `rs232=True` it is an older unit on an RS-232 cable: it cannot see the
host at all, so it keeps transmitting (what it sends while nobody has the
port open is lost on the wire, as on a real cable), says HELLO only at
power-up and when asked with WHO.

A SIGKILL of this process is the terminal's power cut: the flash file
survives, and the next start replays what the host never ACKed.

Control socket frames (firmware_sim.link framing): 'A' a record (JSON:
{"kind": "answer"|"presence"|"abandoned", ...fields}), 'W' raw bytes to put
on the wire (corrupted frames for tests), 'D' the technician removes the
oldest record from flash, 'X' "state"; replies are 'x' JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import select
import socket
import threading
import time
import tty
from pathlib import Path
from typing import Any

from drivers.transport import DeviceGoneError
from firmware_sim.link import recv_frame, send_frame
from firmware_sim.terminal import TerminalFirmware

__all__ = ["TerminalServer", "scripted_day"]

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def scripted_day(spacing_ms: int = 100) -> list[dict[str, Any]]:
    """A clinic day in miniature: every shape of answer, presence, walk-aways."""
    steps: list[dict[str, Any]] = [
        {"kind": "presence", "approaches": 3, "engaged": 1, "period_ms": 60000},
        {"kind": "answer", "doctor": "dr-ivanova", "q1": "yes", "lang": "en"},
        {"kind": "answer", "doctor": "dr-ivanova", "q1": "unsure", "lang": "ru"},
        {"kind": "answer", "doctor": "dr-petrov", "q1": "no", "q2": "no", "lang": "en"},
        {"kind": "answer", "doctor": "dr-petrov", "q1": "no", "q2": "yes",
         "phone": "+74951234567", "comment": "Waited 40 minutes past my slot.", "lang": "ru"},
        {"kind": "answer", "doctor": "dr-petrov", "q1": "no", "q2": "yes", "phone": "89161234567",
         "comment": None, "lang": "ru"},
        {"kind": "abandoned", "doctor": None, "step": "q1"},
        {"kind": "abandoned", "doctor": "dr-ivanova", "step": "q2"},
        {"kind": "abandoned", "doctor": "dr-petrov", "step": "contact"},
        {"kind": "presence", "approaches": 5, "engaged": 4, "period_ms": 60000},
        {"kind": "answer", "doctor": "dr-sidorova", "q1": "yes", "lang": "en"},
        {"kind": "answer", "doctor": "dr-sidorova", "q1": "no", "q2": "yes", "phone": None,
         "comment": "Très bien, mais trop cher — ¿por qué? 医生很好", "lang": "fr"},
        {"kind": "presence", "approaches": 0, "engaged": 0, "period_ms": 60000},
    ]
    for i, s in enumerate(steps):
        s["after_ms"] = (i + 1) * spacing_ms
    return steps


class TerminalServer:
    def __init__(self, link: Path, flash: Path, serial: str, control: Path | None = None,
                 script: list[dict[str, Any]] | None = None, *, rs232: bool = False) -> None:
        self.link = link
        self._master, slave = os.openpty()
        self.slave_name = os.ttyname(slave)
        tty.setraw(slave)
        os.close(slave)
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        link.symlink_to(self.slave_name)
        self._stop = threading.Event()
        self._attached = False
        self.rs232 = rs232
        # An RS-232 unit transmits whether or not anyone listens: its HELLO
        # at power-up goes to the wire now (and is lost if no host has the port).
        self.fw = TerminalFirmware(serial, flash, clock_ms=_now_ms,
                                   send=self._wire if rs232 else None)
        self._script = script or []
        self._started = _now_ms()
        self._ctl: socket.socket | None = None
        if control is not None:
            with contextlib.suppress(FileNotFoundError):
                control.unlink()
            self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._ctl.bind(str(control))
            self._ctl.listen(4)
            self._ctl.setblocking(False)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a 16 KB frame may take more than one write
            try:
                n = os.write(self._master, view)
            except OSError as e:
                log.debug("pty write: %s", e)
                return
            view = view[n:]

    def _wire(self, data: bytes) -> None:
        """An RS-232 transmitter: the bytes reach the host only if it has the port open."""
        if self._attached:
            self._write(data)

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        poller = select.poll()
        poller.register(self._master, select.POLLIN | select.POLLHUP)
        if self._ctl is not None:
            poller.register(self._ctl.fileno(), select.POLLIN)
        try:
            while not self._stop.is_set():
                wait = max(0, min(self.fw.next_due_ms() - _now_ms(), 100))
                events = dict(poller.poll(wait))
                mev = events.get(self._master, 0)
                hung_up = bool(mev & select.POLLHUP)
                if hung_up and self._attached:
                    self._attached = False
                    if not self.rs232:
                        self.fw.set_sender(None)
                    log.info("host closed the port")
                elif not hung_up and not self._attached:
                    self._attached = True
                    log.info("host opened the port")
                    if not self.rs232:
                        self.fw.set_sender(self._write)
                if mev & select.POLLIN:
                    try:
                        data = os.read(self._master, 4096)
                    except OSError:
                        data = b""
                    if data:
                        self.fw.receive(data)
                elif hung_up:
                    # POLLHUP is level-triggered while nobody has the port open.
                    self._stop.wait(0.05)
                if self._ctl is not None and self._ctl.fileno() in events:
                    self._accept()
                self._play_script()
                self.fw.tick()
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
            os.close(self._master)

    def _play_script(self) -> None:
        self.fw.play(self._script, _now_ms() - self._started)

    def _accept(self) -> None:
        assert self._ctl is not None  # noqa: S101 - only called when the socket exists
        try:
            conn, _ = self._ctl.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(2)
            try:
                kind, payload = recv_frame(conn)
                reply: dict[str, Any]
                if kind == b"A":
                    reply = {"ok": True, "id": self.fw.add(json.loads(payload))}
                elif kind == b"W":
                    self._write(payload)
                    reply = {"ok": True}
                elif kind == b"D":
                    reply = {"ok": True, "dropped": self.fw.drop_oldest()}
                else:
                    reply = self.state()
                send_frame(conn, b"x", json.dumps(reply).encode())
            except (DeviceGoneError, OSError, ValueError, TypeError) as e:
                with contextlib.suppress(OSError):
                    send_frame(conn, b"x", json.dumps({"ok": False, "error": str(e)}).encode())

    def state(self) -> dict[str, Any]:
        fw = self.fw
        doctors = json.dumps(fw.flash["doctors"], sort_keys=True, ensure_ascii=False)
        return {"ok": True, "serial": fw.serial, "pty": self.slave_name,
                "host_attached": self._attached, "unacked": fw.unacked,
                "next_id": fw.flash["next_id"], "script_done": fw.flash["script_done"],
                "doctors_rev": fw.flash["doctors_rev"], "doctors": len(fw.flash["doctors"]),
                "doctors_sha256": hashlib.sha256(doctors.encode()).hexdigest(),
                "time_set": fw.time_set, "naks": fw.naks[-20:], "pongs": fw.pongs,
                "whos": fw.whos}
