"""Keyboard-class devices as real USB boot keyboards: a button box (keys) and
a badge reader (a badge number typed, then Enter), each a gadget with the
kernel's HID function (f_hid: interface 3/1/1, the boot keyboard report
descriptor, 8-byte reports written to /dev/hidgN).

Boot keyboard input report (shared/devices/keyboard-class.md; HID 1.11
appendix B.1)::

     0          1          2..7
    +----------+----------+-----------------------------------+
    | modifiers| reserved | up to six key usages held now     |
    +----------+----------+-----------------------------------+
    modifiers bit1 left Shift; usages (HID page 0x07): 04..1D 'a'..'z',
    1E..26 '1'..'9', 27 '0', 28 Enter, 59..62 keypad '1'..'9','0'

A key is typed as a report holding it and then an all-zero report (the
release); a badge reader types upper-case letters with Shift, as the
daemon's `drivers.keyboard` expects.  The default identities are the
README's example devices (a 1a86:e026 button box, a ffff:0035 badge
reader); neither has a serial number unless one is given, so the daemon
tells them apart by USB port (`Gadget.host_port()`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from firmware_sim.usb.control import ControlServer
from firmware_sim.usb.gadget import Gadget, HidFunction, Identity

__all__ = [
    "BOOT_KEYBOARD_DESCRIPTOR",
    "UsbKeyboard",
    "key_reports",
    "text_usages",
]

log = logging.getLogger(__name__)

# The boot keyboard report descriptor of HID 1.11 appendix E.6 (also the
# example in the kernel's Documentation/usb/gadget_hid.rst): 8 modifier
# bits, a reserved byte, 5 LED output bits, 6 key usages 0..101.
BOOT_KEYBOARD_DESCRIPTOR: Final = bytes.fromhex(
    "05010906a101 050719e029e715002501750195088102 950175088103"
    " 95057501050819012905 9102 950175039103"
    " 95067508150025650507190029658100 c0")
REPORT_LEN: Final = 8
ENTER: Final = 0x28
SHIFT: Final = 0x02
KINDS: Final = {
    # kind: (vid, pid, manufacturer, product)
    "keyboard": (0x1A86, 0xE026, "Seed Feedback", "Feedback Button Box"),
    "badge": (0xFFFF, 0x0035, "Seed Feedback", "Badge Reader"),
}


def text_usages(text: str) -> list[tuple[int, int]]:
    """(modifiers, usage) per character of a badge number: letters (upper-case
    with Shift), digits; anything else raises ValueError."""
    out: list[tuple[int, int]] = []
    for ch in text:
        if "a" <= ch.lower() <= "z":
            out.append((SHIFT if ch.isupper() else 0, 0x04 + ord(ch.lower()) - ord("a")))
        elif "1" <= ch <= "9":
            out.append((0, 0x1E + ord(ch) - ord("1")))
        elif ch == "0":
            out.append((0, 0x27))
        else:
            raise ValueError(f"a badge reader types letters and digits, not {ch!r}")
    return out


def key_reports(keys: Iterable[tuple[int, int]]) -> list[bytes]:
    """Press-and-release report pairs for (modifiers, usage) keys, in order."""
    release = bytes(REPORT_LEN)
    out: list[bytes] = []
    for mods, usage in keys:
        if not 0 <= usage <= 0xFF or not 0 <= mods <= 0xFF:
            raise ValueError(f"a key is a usage 0..255 with modifiers 0..255, not {usage}/{mods}")
        out += [bytes([mods, 0, usage, 0, 0, 0, 0, 0]), release]
    return out


class UsbKeyboard:
    """A boot keyboard gadget with a control socket.

    Control requests: 'T' type, JSON {"keys": [usage, ...]} (a button box's
    keys) or {"text": "04A7F3", "enter": true} (a badge scan) or
    {"reports": ["hex", ...]} (raw 8-byte reports, e.g. a rollover error),
    with "gap_ms" between keys (default 20: a scan must keep each key within
    100 ms of the last) and "hold_ms" per key (default 10); the reply comes
    when the last report is queued on the endpoint.  'X' "state" | "unplug"
    | "plug" | "power-cycle" (a keyboard has nothing to lose: a replug)."""

    def __init__(self, kind: str, control: Path, *, serial: str | None = None,
                 udc: str | None = None, name: str | None = None, vid: int | None = None,
                 pid: int | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r}: {', '.join(KINDS)}")
        dvid, dpid, manufacturer, product = KINDS[kind]
        self.kind = kind
        # Unique among live simulators: a gadget of the same name is replaced.
        self.name = name or f"{kind}-{(serial or udc or str(os.getpid())).lower()}"
        self.gadget = Gadget(self.name, Identity(vid if vid is not None else dvid,
                                                 pid if pid is not None else dpid,
                                                 manufacturer, product, serial))
        self._udc = udc
        self._fn: HidFunction | None = None
        self._lock = threading.Lock()  # one typist at a time
        self.plugged = False
        self.reports = 0
        self.control = ControlServer(control, self.handle)

    def start(self) -> None:
        self.gadget.create()
        try:
            self._fn = self.gadget.add_hid("kbd", protocol=1, subclass=1,
                                           report_length=REPORT_LEN,
                                           report_desc=BOOT_KEYBOARD_DESCRIPTOR)
            self.gadget.bind(self._udc)
        except BaseException:
            self.gadget.remove()
            raise
        self.plugged = True
        self.control.start()

    def stop(self) -> None:
        self.control.stop()
        with self._lock:  # no /dev/hidgN open while the function goes
            self.gadget.unbind()
            self.gadget.remove()

    def send(self, reports: list[bytes], gap_ms: int, hold_ms: int) -> None:
        """Write reports to /dev/hidgN: a key's press, `hold_ms`, its release,
        `gap_ms`.  The node is opened per call, so none stays open across an
        unplug.  Raises OSError when unplugged or the host stops polling."""
        if any(len(r) != REPORT_LEN for r in reports):
            raise ValueError(f"boot keyboard reports are {REPORT_LEN} bytes")
        with self._lock:
            if not self.plugged or self._fn is None:
                raise OSError(errno.ENODEV, "unplugged")
            fd = os.open(self._fn.device(), os.O_WRONLY | os.O_NONBLOCK)
            try:
                for i, report in enumerate(reports):
                    # f_hid takes one report at a time; POLLOUT once the host polled it.
                    if not select.select([], [fd], [], 2.0)[1]:
                        raise OSError(errno.ETIMEDOUT, "the host does not poll the keyboard")
                    os.write(fd, report)
                    self.reports += 1
                    if i + 1 < len(reports):
                        time.sleep((hold_ms if any(report) else gap_ms) / 1000)
            finally:
                os.close(fd)

    def handle(self, kind: bytes, payload: bytes) -> dict[str, Any]:
        """One control frame -> its reply (see the class docstring)."""
        if kind == b"T":
            req = json.loads(payload)
            if not isinstance(req, dict):
                raise ValueError('type {"keys": [...]} or {"text": "...", "enter": true}')
            if "reports" in req:
                reports = [bytes.fromhex(r) for r in req["reports"]]
            elif "text" in req:
                keys = text_usages(str(req["text"]))
                if req.get("enter", True):
                    keys.append((0, ENTER))
                reports = key_reports(keys)
            else:
                reports = key_reports((0, int(k)) for k in req.get("keys", []))
            self.send(reports, int(req.get("gap_ms", 20)), int(req.get("hold_ms", 10)))
            return {"ok": True, "reports": len(reports)}
        what = payload.decode(errors="replace") if kind == b"X" else ""
        if what not in ("state", "unplug", "plug", "power-cycle"):
            return {"ok": False, "error": f"unknown request {kind!r} {what!r}"}
        with self._lock:
            if what in ("unplug", "power-cycle") and self.plugged:
                self.gadget.unbind()
                self.plugged = False
            if what in ("plug", "power-cycle") and not self.plugged:
                self.gadget.bind(self.gadget.udc)
                self.plugged = True
        return self.state()

    def state(self) -> dict[str, Any]:
        ident = self.gadget.identity
        hidg = None
        with contextlib.suppress(OSError):
            hidg = str(self._fn.device()) if self._fn is not None else None
        return {"ok": True, "kind": self.kind, "vid": ident.vid, "pid": ident.pid,
                "serial": ident.serial, "plugged": self.plugged, "reports": self.reports,
                "usb": {"udc": self.gadget.udc, "port": self.gadget.host_port(),
                        "hidg": hidg}}


def type_request(control: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Send a 'T' request to a running keyboard (client side)."""
    from firmware_sim.server import control as send  # noqa: PLC0415 - client only

    return send(control, b"T", json.dumps(payload).encode())
