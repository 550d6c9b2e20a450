"""The ST-3000 survey terminal as a real USB CDC-ACM device: `TerminalFirmware`
(unchanged) speaking on the gadget side, /dev/ttyGSn, of the kernel's acm
function; the host sees /dev/ttyACMn (shared/devices/terminal-serial.md,
"Link": 1209:fb30, a 12-hex-digit iSerialNumber; systemd/70-feedback-edge.rules
links it as /dev/feedback/terminal-SERIAL and /dev/serial/by-id/*-if00).

What the terminal can and cannot see of its host:
- It sees the USB configuration (the UDC's `state` turns "configured"), as
  real CDC firmware sees SET_CONFIGURATION: then it says HELLO and replays
  its unacknowledged records (`TerminalFirmware.set_sender`).
- It cannot see the host open the port: f_acm (6.1) keeps the host's DTR
  to itself (SET_CONTROL_LINE_STATE only lands in port_handshake_bits), so
  a daemon that restarts gets no HELLO by itself; it asks with WHO, as the
  sheet says a host does for an RS-232 unit.
- What it sends while the host has the port closed waits in the gadget's
  buffer and the bulk IN endpoint (cdc-acm reads only while the port is
  open) and arrives when the host opens it.  A frame that would not fit in
  u_serial's 8 KiB write buffer is dropped whole and counted, as a terminal
  whose transmit buffer is full drops it (the record is retransmitted).

Unplug pulls the cable of a self-powered terminal: the gadget is unbound,
the terminal keeps running and storing records in flash; plug binds it
again.  `power-cycle` is a power cut and power-up (HELLO, replay); killing
the process is a power cut too (the flash file survives).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import select
import struct
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Any, Final

from drivers.terminal import PID, VID
from firmware_sim.terminal import TerminalFirmware
from firmware_sim.usb.control import ControlServer
from firmware_sim.usb.gadget import Gadget, Identity

__all__ = ["UsbTerminal"]

log = logging.getLogger(__name__)

MANUFACTURER: Final = "Seed Feedback"
PRODUCT: Final = "Survey Terminal ST-3000"
TX_BUFFER: Final = 8192  # u_serial.c WRITE_BUF_SIZE: the gadget tty's transmit FIFO
_INT: Final = struct.Struct("i")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class UsbTerminal:
    """One terminal process: the firmware, its CDC-ACM gadget and the control
    socket.

    Control requests (`firmware_sim.terminal_server`'s, so `feedback-sim
    terminal answer|state --control CONTROL` drive it): 'A' a record (JSON
    {"kind": "answer"|"presence"|"abandoned", ...fields}), 'W' raw bytes to
    put on the wire, 'D' the technician drops the oldest record, 'X' "state"
    | "unplug" | "plug" | "power-cycle"."""

    def __init__(self, serial: str, flash: Path, control: Path, *, udc: str | None = None,
                 name: str | None = None, vid: int = VID, pid: int = PID,
                 script: list[dict[str, Any]] | None = None) -> None:
        self.name = name or f"st3-{serial.lower()}"
        self.gadget = Gadget(self.name, Identity(vid, pid, MANUFACTURER, PRODUCT, serial))
        self._udc = udc
        self._fd = -1
        self._fd_lock = threading.Lock()
        self._stop = threading.Event()
        self._tty: Path | None = None
        self.plugged = False
        self.configured = False
        # After a bind the UDC's state still reads "configured" from the
        # gadget bound before until the new enumeration starts.
        self._stale_state = False
        self.counters: dict[str, int] = {}
        self._script = script or []
        self._started = _now_ms()
        # Transmitting from power-up on: what goes out before the host reads
        # waits in the gadget (see the module docstring).
        self.fw = TerminalFirmware(serial, flash, clock_ms=_now_ms, send=self._write)
        self.control = ControlServer(control, self.handle)

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # -- the gadget tty ------------------------------------------------------------

    def _open_tty(self) -> None:
        assert self._tty is not None  # noqa: S101 - set by start()
        fd = os.open(self._tty, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd)
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        with self._fd_lock:
            if self._fd < 0:
                self._fd = fd
                return
        os.close(fd)

    def _close_tty(self) -> None:
        with self._fd_lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _write(self, data: bytes) -> None:
        # The firmware's transmitter: called under its lock, so never blocks for long.
        with self._fd_lock:
            if self._fd < 0:
                self._count("tx_lost_unplugged", len(data))
                return
            try:
                queued = _INT.unpack(fcntl.ioctl(self._fd, termios.TIOCOUTQ, bytes(_INT.size)))[0]
            except OSError:
                queued = 0
            if queued + len(data) > TX_BUFFER:
                self._count("tx_dropped_frames")
                return
            view = memoryview(data)
            deadline = time.monotonic() + 0.5
            while view:
                try:
                    view = view[os.write(self._fd, view):]
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        self._count("tx_cut_bytes", len(view))
                        return
                    select.select([], [self._fd], [], 0.05)
                except OSError as e:
                    self._count("tx_lost_unplugged", len(view))
                    log.debug("tty write: %s", e)
                    return
            self._count("tx_bytes", len(data))

    def _udc_configured(self) -> bool:
        if self.gadget.udc is None:
            return False
        try:
            state = Path(f"/sys/class/udc/{self.gadget.udc}/state").read_text().strip()
        except OSError:
            return False
        if state != "configured":
            self._stale_state = False
        return state == "configured" and not self._stale_state

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Create and plug the gadget, open its tty, then the control socket."""
        self.gadget.create()
        try:
            fn = self.gadget.add_acm("serial")
            self._tty = fn.device()
            self._open_tty()
            self._stale_state = True  # the UDC may still show a former gadget's state
            self.gadget.bind(self._udc)
        except BaseException:
            self._close_tty()
            self.gadget.remove()
            raise
        self.plugged = True
        self.control.start()

    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        """Run the firmware until `stop()`, then take the gadget apart."""
        poller = select.poll()
        registered = -1
        try:
            while not self._stop.is_set():
                configured = self.plugged and self._udc_configured()
                if configured and not self.configured:
                    log.info("configured by the host: HELLO")
                    self.fw.set_sender(self._write)
                self.configured = configured
                with self._fd_lock:
                    fd = self._fd
                if fd != registered:
                    if registered >= 0:
                        with contextlib.suppress(KeyError):
                            poller.unregister(registered)
                    if fd >= 0:
                        poller.register(fd, select.POLLIN)
                    registered = fd
                wait = max(0, min(self.fw.next_due_ms() - _now_ms(), 100))
                if fd >= 0 and not self.plugged:
                    self._close_tty()
                    continue
                if fd < 0:
                    self._stop.wait(wait / 1000)
                    if self.plugged:
                        self._reopen()
                else:
                    for _, ev in poller.poll(wait):
                        if ev & select.POLLIN:
                            self._read(fd)
                        elif ev & (select.POLLHUP | select.POLLERR):
                            self._hangup()
                self._play_script()
                self.fw.tick()
        finally:
            self.control.stop()
            self.gadget.unbind()
            self._close_tty()
            self.gadget.remove()

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.EIO:
                self._hangup()
                return
            raise
        if data:
            self.fw.receive(data)
        else:
            self._hangup()

    def _hangup(self) -> None:
        # u_serial hangs the tty up when the USB link goes (unbind, bus
        # reset); the next link needs a fresh open.
        log.info("gadget tty hung up")
        self._close_tty()

    def _reopen(self) -> None:
        try:
            self._open_tty()
        except OSError as e:
            log.debug("reopen %s: %s", self._tty, e)

    # -- control -------------------------------------------------------------------

    # The tty is opened and closed by serve_forever's thread only: the
    # function cannot be removed while any open of it is left behind.
    def unplug(self) -> None:
        if not self.plugged:
            return
        self.plugged = False
        self.gadget.unbind()  # u_serial hangs the tty up; the loop closes it
        log.info("unplugged")

    def plug(self) -> None:
        if self.plugged:
            return
        self._stale_state = True
        self.gadget.bind(self.gadget.udc)
        self.plugged = True
        log.info("plugged in")

    def _play_script(self) -> None:
        self.fw.play(self._script, _now_ms() - self._started)

    def handle(self, kind: bytes, payload: bytes) -> dict[str, Any]:
        """One control frame -> its reply (see the class docstring)."""
        if kind == b"A":
            return {"ok": True, "id": self.fw.add(json.loads(payload))}
        if kind == b"W":
            self._write(payload)
            return {"ok": True}
        if kind == b"D":
            return {"ok": True, "dropped": self.fw.drop_oldest()}
        what = payload.decode(errors="replace") if kind == b"X" else "state"
        if what == "unplug":
            self.unplug()
        elif what == "plug":
            self.plug()
        elif what == "power-cycle":
            self.fw.power_cut()
            self.fw.power_up()
        elif what != "state":
            return {"ok": False, "error": f"unknown control {what!r}"}
        return self.state()

    def state(self) -> dict[str, Any]:
        fw = self.fw
        doctors = json.dumps(fw.flash["doctors"], sort_keys=True, ensure_ascii=False)
        return {"ok": True, "serial": fw.serial, "tty": str(self._tty),
                "plugged": self.plugged, "host_attached": self.configured,
                "unacked": fw.unacked, "next_id": fw.flash["next_id"],
                "script_done": fw.flash["script_done"],
                "doctors_rev": fw.flash["doctors_rev"], "doctors": len(fw.flash["doctors"]),
                "doctors_sha256": hashlib.sha256(doctors.encode()).hexdigest(),
                "time_set": fw.time_set, "naks": fw.naks[-20:], "pongs": fw.pongs,
                "whos": fw.whos,
                "usb": {"udc": self.gadget.udc, "port": self.gadget.host_port(),
                        "configured": self.configured, **self.counters}}
