"""What is plugged in: USB devices read from sysfs, with their device nodes.

For each USB device under /sys/bus/usb/devices (names like `1-1.2`, which is
also its port path: bus 1, hub port 1, port 2) we read its identity
(idVendor, idProduct, serial, manufacturer, product), its interfaces' class
triples, and the nodes the kernel made for it: /dev/hidrawN, /dev/ttyACMN or
ttyUSBN, /dev/input/eventN.  Each driver module declares what it matches as
data (its `USB_MATCHER`, a `Matcher`); the caller passes the matchers to
`classify` (the daemon collects them from its device kinds, edge.kinds), so
this module stays generic.

Pure reading of files under `root` (tests build a small tree on disk).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from drivers.usb_match import Matcher

__all__ = ["Matcher", "UsbDevice", "classify", "scan"]

SYSFS: Final = Path("/sys")
_USB_NAME: Final = re.compile(r"^\d+-[\d.]+$")


@dataclass(frozen=True, slots=True)
class UsbDevice:
    port_path: str
    vid: int
    pid: int
    serial: str | None
    manufacturer: str | None
    product: str | None
    interfaces: tuple[tuple[int, int, int], ...]
    hidraw: tuple[str, ...] = field(default=())
    tty: tuple[str, ...] = field(default=())
    event: tuple[str, ...] = field(default=())

    @property
    def ident(self) -> str:
        return f"{self.vid:04x}:{self.pid:04x}"


def _read(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _hex(p: Path) -> int | None:
    text = _read(p)
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


def _nodes(dev_dir: Path) -> tuple[list[str], list[str], list[str]]:
    hidraw: list[str] = []
    tty: list[str] = []
    event: list[str] = []
    for dirpath, dirnames, _ in os.walk(dev_dir, followlinks=False):
        here = Path(dirpath)
        # Do not wander into child USB devices behind a hub.
        dirnames[:] = [d for d in dirnames if not _USB_NAME.match(d)]
        if here.name == "hidraw":
            hidraw += [f"/dev/{d}" for d in dirnames if d.startswith("hidraw")]
        elif here.name == "tty":
            tty += [f"/dev/{d}" for d in dirnames if d.startswith("tty")]
        elif here.name.startswith("input") and here.parent.name == "input":
            event += [f"/dev/input/{d}" for d in dirnames if d.startswith("event")]
    return sorted(hidraw), sorted(tty), sorted(event)


def scan(root: Path = SYSFS) -> list[UsbDevice]:
    """Every USB device present now, in port order."""
    base = root / "bus" / "usb" / "devices"
    out: list[UsbDevice] = []
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    for name in names:
        if not _USB_NAME.match(name):
            continue  # root hubs (usb1) and interfaces (1-1:1.0)
        d = (base / name).resolve()
        vid, pid = _hex(d / "idVendor"), _hex(d / "idProduct")
        if vid is None or pid is None:
            continue
        interfaces = []
        for entry in sorted(os.listdir(d)):
            if entry.startswith(f"{name}:"):
                triple = tuple(_hex(d / entry / f) for f in
                               ("bInterfaceClass", "bInterfaceSubClass", "bInterfaceProtocol"))
                if None not in triple:
                    interfaces.append((triple[0], triple[1], triple[2]))
        hidraw, tty, event = _nodes(d)
        out.append(UsbDevice(name, vid, pid, _read(d / "serial"), _read(d / "manufacturer"),
                             _read(d / "product"), tuple(interfaces),  # type: ignore[arg-type]
                             tuple(hidraw), tuple(tty), tuple(event)))
    return out


def classify(dev: UsbDevice, matchers: tuple[Matcher, ...]) -> str | None:
    """The device kind this daemon would read it as, if any."""
    for m in matchers:
        if m.vid is not None and (dev.vid, dev.pid) != (m.vid, m.pid):
            continue
        if m.interface is not None:
            cls, sub, proto = m.interface
            if not any(i[0] == cls and (sub is None or i[1] == sub)
                       and (proto is None or i[2] == proto) for i in dev.interfaces):
                continue
        return m.kind
    return None
