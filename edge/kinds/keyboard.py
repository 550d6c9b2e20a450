"""Keyboard-class button boxes (USB HID boot keyboards typing keys): config,
worker, events.  Badge readers are keyboards too (`edge.kinds.badge`).

Protocol: ../shared/devices/keyboard-class.md, decoded by `drivers.keyboard`.
These devices have no VID:PID of ours, so the config names them by VID:PID
plus serial number or USB port path.  They have no sequence numbers and no
buffer: a press while nobody reads is gone, so there is nothing to
acknowledge, and a press is timed when it is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from drivers.hidraw_transport import HidrawKeyboard
from drivers.keyboard import USB_MATCHER, BootDecoder, ButtonMap, ButtonPress, KeyPress
from drivers.transport import DeviceGoneError, Transport
from drivers.usb_discovery import scan
from edge.contract.ids import NAME_RE, SCORE_RANGE, USB_SERIAL_RE
from edge.contract.toml import MISSING, Table
from edge.events import DeviceRef, Event, Press, new_event_id
from edge.kinds.base import (
    Context,
    Decision,
    DecodeFailed,
    Device,
    DeviceConfig,
    DeviceState,
    Env,
    Kind,
    Reading,
)
from edge.kinds.worker import READ_TIMEOUT_MS, Worker
from edge.store import Append

if TYPE_CHECKING:
    from drivers.usb_discovery import UsbDevice

__all__ = ["KIND", "BootKeyboardWorker", "Keyboard", "KeyboardConfig", "UsbKeyboardConfig",
           "open_keyboard", "parse_id", "parse_identity"]

_USB_PORT: Final = re.compile(r"^\d+-[\d.]+\Z")
_USAGE: Final = re.compile(r"^0x[0-9a-fA-F]{2}\Z")
# Usages a key can send in a boot report: 00-03 are no key or error codes, FF is
# reserved; the event schema's press button (the usage) is 0 to 254.
_KEY_USAGES: Final = range(0x04, 0xFF)
_LABEL: Final = re.compile(r"^[a-z0-9_-]{1,32}\Z")


@dataclass(frozen=True, slots=True)
class UsbKeyboardConfig(DeviceConfig):
    """A boot-keyboard device: VID:PID plus serial number or USB port path."""

    vid: int = 0
    pid: int = 0
    usb_port: str | None = None

    def udev_match(self) -> str | None:
        ident = f'ATTRS{{idVendor}}=="{self.vid:04x}", ATTRS{{idProduct}}=="{self.pid:04x}"'
        if self.serial is not None:
            ident += f', ATTRS{{serial}}=="{self.serial}"'
        if self.usb_port is not None:
            ident += f', KERNELS=="{self.usb_port}"'
        return ident


@dataclass(frozen=True, slots=True)
class KeyboardConfig(UsbKeyboardConfig):
    keys: tuple[tuple[int, str, int | None], ...] = ()  # HID usage -> (label, score)


def parse_identity(t: Table) -> tuple[int, int, str | None, str | None]:
    """(vid, pid, serial, usb_port) of a keyboard-class `[[devices]]` table."""
    vid = t.integer("vid", -1, 0, 0xFFFF)
    pid = t.integer("pid", -1, 0, 0xFFFF)
    if vid < 0 or pid < 0:
        raise t.error("vid" if vid < 0 else "pid", MISSING,
                      "required for keyboard-class devices (`feedback-edge devices` shows it)")
    serial = t.string("serial", default=None, pattern=USB_SERIAL_RE,
                      allowed="the USB serial number as `feedback-edge devices` shows it")
    usb_port = t.string("usb_port", default=None, pattern=_USB_PORT,
                        allowed="a USB port path like 1-1.4 (`feedback-edge devices`)")
    return vid, pid, serial, usb_port


def parse_id(t: Table, index: int, prefix: str, serial: str | None,
             usb_port: str | None) -> str:
    """The device id: given, or made from the serial, the port or the table's index."""
    default_id = f"{prefix}-{(serial or usb_port or str(index + 1)).lower()}"
    default_id = re.sub(r"[^a-z0-9-]", "-", default_id)[:32]
    return str(t.string("id", default=default_id, pattern=NAME_RE,
                        allowed="1 to 32 lower-case letters, digits or '-'"))


def parse(t: Table, index: int, desk: str) -> KeyboardConfig:
    vid, pid, serial, usb_port = parse_identity(t)
    raw_keys = t.table("keys")
    if raw_keys is None or not raw_keys.data:
        raise t.error("keys", MISSING, 'required for buttons: e.g. keys = { "0x1e" = '
                      '["good", 1], "0x1f" = ["neutral", 0], "0x20" = ["bad", -1] }')
    keys: list[tuple[int, str, int | None]] = []
    for usage, spec in raw_keys.data.items():
        raw_keys.used.add(usage)
        if not _USAGE.match(usage) or int(usage, 16) not in _KEY_USAGES:
            raise raw_keys.error(usage, spec, "keys are HID usages of keys, 0x04 to 0xfe, "
                                 "like \"0x1e\"")
        if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
                and _LABEL.match(spec[0])
                and (spec[1] is None or (isinstance(spec[1], int)
                                         and not isinstance(spec[1], bool)
                                         and SCORE_RANGE[0] <= spec[1] <= SCORE_RANGE[1]))):
            raise raw_keys.error(usage, spec, 'must be ["label", score], e.g. ["good", 1], '
                                 f"a score from {SCORE_RANGE[0]} to {SCORE_RANGE[1]} or null")
        keys.append((int(usage, 16), spec[0], spec[1]))
    dev_id = parse_id(t, index, "kbd", serial, usb_port)
    t.finish()
    return KeyboardConfig(dev_id, "keyboard", desk, serial, vid, pid, usb_port, tuple(keys))


def open_keyboard(cfg: UsbKeyboardConfig, sysfs: Path) -> HidrawKeyboard:
    """The device's hidraw node (its evdev node grabbed), found in sysfs by identity."""
    for dev in scan(sysfs):
        if (dev.vid, dev.pid) != (cfg.vid, cfg.pid):
            continue
        if cfg.serial is not None and dev.serial != cfg.serial:
            continue
        if cfg.usb_port is not None and dev.port_path != cfg.usb_port:
            continue
        if not dev.hidraw:
            continue
        return HidrawKeyboard(Path(dev.hidraw[0]), Path(dev.event[0]) if dev.event else None)
    where = f"serial {cfg.serial}" if cfg.serial else f"port {cfg.usb_port or 'any'}"
    raise DeviceGoneError(f"no {cfg.vid:04x}:{cfg.pid:04x} at {where}")


class BootKeyboardWorker(Worker[Transport]):
    """Reads boot keyboard reports and hands each batch of keys to `_keys`;
    decode errors (rollover, unmapped keys ...) are posted as counts."""

    kind = "keyboard"
    read_timeout_ms = READ_TIMEOUT_MS

    def __init__(self, cfg: UsbKeyboardConfig, env: Env) -> None:
        opener: Callable[[UsbKeyboardConfig], Transport] = env.opener or \
            (lambda c: open_keyboard(c, env.sysfs))
        super().__init__(cfg, lambda: opener(cfg), env.post, env.clock)

    def _begin(self) -> None:
        """A new session with the device: fresh decoders."""

    def _keys(self, keys: list[KeyPress], mono: int, wall: int, now_ms: int) -> None:
        raise NotImplementedError

    def _errors(self) -> dict[str, int]:
        return {}

    def _serve(self, transport: Transport) -> None:
        with self._lock:
            self._transport = transport
        self._post(DeviceState(self.cfg.id, "connected", None))
        self._begin()
        boot = BootDecoder()
        counted: dict[str, int] = {}
        while not self._stop.is_set():
            data = transport.read(self.read_timeout_ms)
            mono, wall = self._clock.mono_ns(), self._clock.wall_ns()
            now_ms = mono // 1_000_000
            self._keys(boot.feed(data, now_ms) if data is not None else [], mono, wall, now_ms)
            for name, n in {**boot.errors, **self._errors()}.items():
                for _ in range(n - counted.get(name, 0)):
                    self._post(DecodeFailed(self.cfg.id, name))
                counted[name] = n


class _ButtonWorker(BootKeyboardWorker):
    def __init__(self, cfg: KeyboardConfig, env: Env) -> None:
        super().__init__(cfg, env)
        self._map = {u: (label, score) for u, label, score in cfg.keys}
        self._buttons = ButtonMap(self._map)

    def _begin(self) -> None:
        self._buttons = ButtonMap(self._map)

    def _keys(self, keys: list[KeyPress], mono: int, wall: int, now_ms: int) -> None:
        del now_ms
        for k in keys:
            press = self._buttons.press(k)
            if press is not None:
                self._post(Reading(self.cfg.id, press, mono, wall))

    def _errors(self) -> dict[str, int]:
        return {"unmapped_key": self._buttons.unmapped}


class Keyboard(Device):
    cfg: KeyboardConfig

    def __init__(self, cfg: KeyboardConfig, env: Env) -> None:
        super().__init__(cfg, _ButtonWorker(cfg, env))

    def decide(self, r: Reading, ctx: Context) -> Decision:
        press = r.data
        assert isinstance(press, ButtonPress)  # noqa: S101 - posted by _ButtonWorker only
        # No device clock: the press is when it was read.
        flags = ctx.guard(self.cfg.desk, r.host_mono_ns, r.host_wall_ns, False)
        if flags is None:
            return Decision()
        event = Event(event_id=new_event_id(), desk=self.cfg.desk,
                      device=DeviceRef(self.cfg.id, "keyboard", self.cfg.serial),
                      body=Press(button=press.usage, label=press.label, score=press.score),
                      operator=ctx.operator(self.cfg.desk, r.host_wall_ns),
                      time=ctx.event_time(r.host_mono_ns, r.host_wall_ns), flags=flags)
        return Decision([Append(event)])


def snippet(usb: UsbDevice) -> list[str]:
    """A keyboard-class block: both kinds look alike on the bus."""
    lines = ['kind = "keyboard"   # or "badge" for a badge reader (then no keys)',
             f"vid = 0x{usb.vid:04x}", f"pid = 0x{usb.pid:04x}"]
    lines.append(f'serial = "{usb.serial}"' if usb.serial else
                 f'usb_port = "{usb.port_path}"   # no serial number: keep it in this port')
    lines.append('keys = { "0x1e" = ["good", 1], "0x1f" = ["neutral", 0], '
                 '"0x20" = ["bad", -1] }')
    return lines


KIND: Final = Kind("keyboard", parse, Keyboard, snippet, USB_MATCHER, rank=2)
