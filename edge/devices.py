"""Device workers: one thread per configured device, reading its transport.

A worker only opens, reads and decodes; every decoded report goes to the
daemon's main loop as a message, and the main loop decides, stores and then
ACKs through `ConsoleWorker.send()`.  A device that is missing or goes away is
retried every second, so unplugging and replugging needs no restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from drivers.console import (
    INFO_REPORT_LEN,
    REPORT_INFO,
    ConsoleInfo,
    ConsoleReport,
    DecodeError,
    decode_info,
    decode_report,
    encode_resend,
)
from drivers.hid_transport import DeviceGoneError, HidTransport
from drivers.hidraw_transport import HidrawKeyboard
from drivers.keyboard import BadgeDecoder, BootDecoder, ButtonMap, ButtonPress
from drivers.serial_transport import SerialTransport, find_by_serial
from drivers.terminal import (
    LINK_TIMEOUT_MS,
    Count,
    HelloSeen,
    Record,
    Send,
    StoreRecord,
    TerminalHost,
)
from drivers.usb_discovery import UsbDevice, classify, scan
from edge.clock import Clock
from edge.config import DeviceConfig

__all__ = [
    "Attached",
    "BadgeScanned",
    "ButtonPressed",
    "ConsoleWorker",
    "DecodeFailed",
    "DeviceReport",
    "DeviceState",
    "DiscoveryWatcher",
    "KeyboardReader",
    "KeyboardWorker",
    "TerminalRecord",
    "TerminalWorker",
]

log = logging.getLogger(__name__)

READ_TIMEOUT_MS = 500
RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class DeviceReport:
    device_id: str
    report: ConsoleReport
    host_mono_ns: int
    host_wall_ns: int
    lost_total: int | None


@dataclass(frozen=True, slots=True)
class TerminalRecord:
    device_id: str
    record: Record
    serial: str
    frame_seq: int
    host_mono_ns: int
    host_wall_ns: int


@dataclass(frozen=True, slots=True)
class DecodeFailed:
    device_id: str
    name: str


@dataclass(frozen=True, slots=True)
class DeviceState:
    device_id: str
    state: str  # connected | missing | error
    error: str | None
    info: ConsoleInfo | None = None


class _Transport(Protocol):
    def write(self, data: bytes, /) -> None: ...

    def close(self) -> None: ...


T = TypeVar("T", bound=_Transport)


class _Worker(Generic[T]):
    """One device's thread: open it (retrying every second), serve it until it
    goes away, report its state; subclasses only know their protocol."""

    kind = "device"

    def __init__(self, cfg: DeviceConfig, open_transport: Callable[[], T],
                 post: Callable[[object], None], clock: Clock) -> None:
        self.cfg = cfg
        self._open = open_transport
        self._post = post
        self._clock = clock
        self._stop = threading.Event()
        self._transport: T | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"dev-{cfg.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(READ_TIMEOUT_MS / 1000 + 2)

    def _write(self, data: bytes) -> bool:
        """Write now (from any thread); False if the device is gone."""
        t = self._transport
        if t is None:
            return False
        try:
            t.write(data)
        except (DeviceGoneError, OSError):
            return False
        return True

    def _serve(self, transport: T) -> None:
        raise NotImplementedError

    def _detached(self) -> None:
        """The transport is gone (called with the lock held)."""
        self._transport = None

    def _run(self) -> None:
        last_error: str | None = None
        while not self._stop.is_set():
            try:
                transport = self._open()
            except (DeviceGoneError, OSError) as e:
                if str(e) != last_error:
                    last_error = str(e)
                    self._post(DeviceState(self.cfg.id, "missing", str(e)))
                self._stop.wait(RETRY_S)
                continue
            last_error = None
            try:
                self._serve(transport)
            except (DeviceGoneError, OSError) as e:
                log.warning("%s %s went away: %s", self.kind, self.cfg.id, e)
                self._post(DeviceState(self.cfg.id, "missing", f"disconnected: {e}"))
            finally:
                with self._lock:
                    self._detached()
                transport.close()
            self._stop.wait(RETRY_S if not self._stop.is_set() else 0)


class ConsoleWorker(_Worker[HidTransport]):
    kind = "console"

    def send(self, report: bytes) -> bool:
        """Write an output report now (from the main loop); False if the device is gone."""
        return self._write(report)

    def _read_info(self, transport: HidTransport) -> ConsoleInfo | DecodeError:
        return decode_info(transport.get_feature(REPORT_INFO, INFO_REPORT_LEN))

    def _serve(self, transport: HidTransport) -> None:
        info = self._read_info(transport)
        if isinstance(info, DecodeError):
            self._post(DecodeFailed(self.cfg.id, info.name))
            self._post(DeviceState(self.cfg.id, "error", f"unreadable info report: {info.detail}"))
            self._stop.wait(RETRY_S * 5)
            return
        with self._lock:
            self._transport = transport
        self._post(DeviceState(self.cfg.id, "connected", None, info))
        # Presses made while nobody was reading (daemon down, up to the ring's
        # 32) arrive at once instead of at the next back-off step.
        transport.write(encode_resend())
        buttons = info.buttons
        while not self._stop.is_set():
            data = transport.read(READ_TIMEOUT_MS)
            if data is None:
                continue
            mono, wall = self._clock.mono_ns(), self._clock.wall_ns()
            decoded = decode_report(data, buttons)
            if isinstance(decoded, DecodeError):
                self._post(DecodeFailed(self.cfg.id, decoded.name))
                continue
            lost: int | None = None
            if decoded.overflow:
                fresh = self._read_info(transport)
                if not isinstance(fresh, DecodeError):
                    lost = fresh.lost
            self._post(DeviceReport(self.cfg.id, decoded, mono, wall, lost))


TIME_EVERY_S = 3600.0


class TerminalWorker(_Worker[SerialTransport]):
    """Reads one survey terminal; the protocol decisions are TerminalHost's."""

    kind = "terminal"

    def __init__(self, cfg: DeviceConfig, post: Callable[[object], None], clock: Clock,
                 doctors: Callable[[], tuple[int, list[dict[str, object]]] | None],
                 open_port: Callable[[DeviceConfig], SerialTransport] | None = None) -> None:
        opener = open_port or _open_terminal
        super().__init__(cfg, lambda: opener(cfg), post, clock)
        self._doctors = doctors
        self._host: TerminalHost | None = None

    def _detached(self) -> None:
        self._transport = None
        self._host = None

    def ack(self, frame_seq: int) -> bool:
        """The record in that frame is durable: tell the terminal (main loop)."""
        with self._lock:
            if self._host is None:
                return False
            return self._write(self._host.ack_frame(frame_seq))

    def set_doctors(self, doctors: tuple[int, list[dict[str, object]]]) -> None:
        with self._lock:
            if self._host is None:
                return
            self._host.doctors = doctors
            frame = self._host.doctors_frame()
            if frame is not None and self._host.link_up(self._clock.mono_ns() // 1_000_000):
                self._write(frame)

    def _serve(self, transport: SerialTransport) -> None:
        host = TerminalHost(self.cfg.serial, self._doctors(),
                            clock_synced=self._clock.synced())
        with self._lock:
            self._transport = transport
            self._host = host
        self._post(DeviceState(self.cfg.id, "connected", None))
        link_up = True
        opened_ms = self._clock.mono_ns() // 1_000_000
        next_time = 0.0
        while not self._stop.is_set():
            data = transport.read(READ_TIMEOUT_MS)
            mono = self._clock.mono_ns()
            now_ms = mono // 1_000_000
            wall = self._clock.wall_ns()
            with self._lock:
                host.clock_synced = self._clock.synced()
                actions = host.feed(data, now_ms, wall // 1_000_000) if data else []
                for a in actions:
                    if isinstance(a, Send):
                        self._write(a.data)
                up = host.link_up(now_ms) or (host.last_rx_ms is None
                                             and now_ms - opened_ms <= LINK_TIMEOUT_MS)
                if host.clock_synced and host.hello is not None and now_ms / 1000 >= next_time:
                    next_time = now_ms / 1000 + TIME_EVERY_S
                    self._write(host.time_frame(wall // 1_000_000))
            for a in actions:
                if isinstance(a, StoreRecord):
                    self._post(TerminalRecord(self.cfg.id, a.record, a.serial, a.seq, mono, wall))
                elif isinstance(a, Count):
                    self._post(DecodeFailed(self.cfg.id, a.name))
                elif isinstance(a, HelloSeen):
                    if self.cfg.serial is not None and a.hello.serial != self.cfg.serial:
                        self._post(DeviceState(self.cfg.id, "error",
                                               f"terminal says serial {a.hello.serial}, the "
                                               f"config says {self.cfg.serial}"))
                    else:
                        self._post(DeviceState(self.cfg.id, "connected", None))
            if up != link_up:
                link_up = up
                self._post(DeviceState(self.cfg.id, "connected" if up else "error",
                                       None if up else "link down: no frame for 30 s"))


def _open_terminal(cfg: DeviceConfig) -> SerialTransport:
    port = cfg.port
    if port is None and cfg.serial is not None:
        port = find_by_serial(cfg.serial)
    if port is None:
        raise DeviceGoneError(f"no serial port for terminal {cfg.serial} under "
                              "/dev/serial/by-id")
    return SerialTransport(port)


@dataclass(frozen=True, slots=True)
class Attached:
    """What is plugged in now, with the kind we would read it as (None: not ours)."""

    devices: tuple[tuple[UsbDevice, str | None], ...]


class DiscoveryWatcher:
    """Rescans sysfs every `interval` s and posts Attached when anything changed.

    Configured devices are found by their own workers (which retry every
    second); this is what lets status and the `devices` topic list hardware
    that is plugged in but not configured, within 2 s of plugging it in.
    """

    def __init__(self, post: Callable[[object], None], root: Path = Path("/sys"),
                 interval: float = 2.0) -> None:
        self._post = post
        self._root = root
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._interval + 1)

    def _run(self) -> None:
        last: tuple[tuple[UsbDevice, str | None], ...] | None = None
        while not self._stop.is_set():
            now = tuple((d, classify(d)) for d in scan(self._root))
            if now != last:
                last = now
                self._post(Attached(now))
            self._stop.wait(self._interval)


@dataclass(frozen=True, slots=True)
class ButtonPressed:
    device_id: str
    press: ButtonPress
    host_mono_ns: int
    host_wall_ns: int


@dataclass(frozen=True, slots=True)
class BadgeScanned:
    device_id: str
    badge: str = field(repr=False)  # personal data: never in a log line
    host_wall_ns: int = 0


class KeyboardReader(Protocol):
    def read(self, timeout_ms: int) -> bytes | None: ...

    def write(self, data: bytes, /) -> None: ...

    def close(self) -> None: ...


class KeyboardWorker(_Worker[KeyboardReader]):
    """A keyboard-class button box or badge reader.

    These devices have no sequence numbers and no buffer: a press while
    nobody reads is gone, so there is nothing to acknowledge.
    """

    kind = "keyboard"

    def __init__(self, cfg: DeviceConfig, post: Callable[[object], None], clock: Clock,
                 open_reader: Callable[[DeviceConfig], KeyboardReader] | None = None,
                 sysfs: Path = Path("/sys")) -> None:
        opener = open_reader or (lambda c: _open_keyboard(c, sysfs))
        super().__init__(cfg, lambda: opener(cfg), post, clock)

    def _serve(self, transport: KeyboardReader) -> None:
        with self._lock:
            self._transport = transport
        self._post(DeviceState(self.cfg.id, "connected", None))
        boot = BootDecoder()
        buttons = ButtonMap({u: (label, score) for u, label, score in self.cfg.keys})
        badges = BadgeDecoder() if self.cfg.kind == "badge" else None
        counted: dict[str, int] = {}
        while not self._stop.is_set():
            data = transport.read(50 if badges is not None else READ_TIMEOUT_MS)
            mono, wall = self._clock.mono_ns(), self._clock.wall_ns()
            now_ms = mono // 1_000_000
            keys = boot.feed(data, now_ms) if data is not None else []
            if badges is not None:
                badges.expire(now_ms)
                for k in keys:
                    scan = badges.feed(k)
                    if scan is not None:
                        self._post(BadgeScanned(self.cfg.id, scan.badge, wall))
            else:
                for k in keys:
                    press = buttons.press(k)
                    if press is not None:
                        self._post(ButtonPressed(self.cfg.id, press, mono, wall))
            errors = dict(boot.errors)
            if badges is not None:
                errors.update(badges.errors)
            errors["unmapped_key"] = buttons.unmapped if badges is None else 0
            for name, n in errors.items():
                for _ in range(n - counted.get(name, 0)):
                    self._post(DecodeFailed(self.cfg.id, name))
                counted[name] = n


def _open_keyboard(cfg: DeviceConfig, sysfs: Path) -> KeyboardReader:
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
