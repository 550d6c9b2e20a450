"""The feedback console's config and its worker thread: how a `[[devices]]`
table becomes a `ConsoleConfig`, how the console is opened (its /dev/hidrawN
node, or the simulator's socket), and what the worker posts to the main loop
(`ConsoleInput`, `ConsoleOpened`, `ConsoleLoss`).  The decisions on them are
`edge.kinds.console.Console`'s; the module docstring there says why.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from drivers.console import (
    INFO_REPORT_LEN,
    PID,
    REPORT_INFO,
    VID,
    ConsoleInfo,
    ConsoleReport,
    DecodeError,
    DeviceClock,
    Layout,
    decode_info,
    decode_report,
    encode_resend,
)
from drivers.hidraw_transport import HidrawConsole
from drivers.transport import DeviceGoneError, HidTransport
from edge.contract.ids import NAME_RE, SCORE_RANGE, SERIAL_RE
from edge.contract.toml import MISSING, Table
from edge.kinds.base import DecodeFailed, DeviceAlarm, DeviceConfig, DeviceState, Reading
from edge.kinds.worker import READ_TIMEOUT_MS, Worker

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["ConsoleConfig", "ConsoleInput", "ConsoleLoss", "ConsoleOpened", "ConsoleWorker",
           "fallback_info", "open_console", "parse"]

log = logging.getLogger(__name__)

_LABEL: Final = re.compile(r"^[a-z0-9_-]{1,32}\Z")


@dataclass(frozen=True, slots=True)
class ConsoleConfig(DeviceConfig):
    transport: str = "hid"  # "hid" (USB) or "socket" (a `feedback-sim console` process)
    socket: Path | None = None
    vid: int = VID
    pid: int = PID
    labels: tuple[str, ...] | None = None  # per button, overriding the layout's
    scores: tuple[int | None, ...] | None = None


def _parse_labels(t: Table) -> tuple[tuple[str, ...] | None, tuple[int | None, ...] | None]:
    labels = t.get("labels")
    scores = t.get("scores")
    if labels is MISSING:
        if scores is not MISSING:
            raise t.error("scores", scores, "needs labels (one score per label)")
        return None, None
    if not isinstance(labels, list) or not 1 <= len(labels) <= 16 or not all(
            isinstance(x, str) and _LABEL.match(x) for x in labels):
        raise t.error("labels", labels,
                      "must be a list of 1 to 16 labels like \"good\" ([a-z0-9_-], 1-32 chars)")
    if scores is MISSING:
        return tuple(labels), None
    low, high = SCORE_RANGE
    if not isinstance(scores, list) or len(scores) != len(labels) or not all(
            isinstance(x, int) and not isinstance(x, bool) and low <= x <= high
            for x in scores):
        raise t.error("scores", scores, f"must be a list of {len(labels)} integers from "
                      f"{low} to {high}, one per label")
    return tuple(labels), tuple(scores)


def parse(t: Table, index: int, desk: str) -> ConsoleConfig:
    transport = t.string("transport", default="hid", allowed="\"hid\" or \"socket\"")
    if transport not in ("hid", "socket"):
        raise t.error("transport", transport, "must be \"hid\" or \"socket\" (a simulator)")
    serial = t.string("serial", default=None, pattern=SERIAL_RE,
                      allowed="12 upper-case hex digits, as printed on the label")
    if transport == "hid" and serial is None:
        raise t.error("serial", MISSING, "required for a USB console: 12 upper-case hex "
                      "digits, as printed on the label (`feedback-edge devices` lists them)")
    sock = t.path_value("socket")
    if transport == "socket" and sock is None:
        raise t.error("socket", MISSING, "required when transport = \"socket\"")
    if transport == "hid" and sock is not None:
        raise t.error("socket", str(sock), "only allowed with transport = \"socket\"")
    vid = t.integer("vid", VID, 0, 0xFFFF)
    pid = t.integer("pid", PID, 0, 0xFFFF)
    labels, scores = _parse_labels(t)
    default_id = f"fc3-{serial.lower()}" if serial else f"console-{index + 1}"
    dev_id = t.string("id", default=default_id, pattern=NAME_RE,
                      allowed="1 to 32 lower-case letters, digits or '-'")
    t.finish()
    return ConsoleConfig(str(dev_id), "console", desk, serial, str(transport), sock, vid, pid,
                         labels, scores)


def open_console(cfg: ConsoleConfig) -> HidTransport:
    """The console's transport: the simulator's socket, or its /dev/hidrawN node.

    Always the kernel's hidraw interface through the standard library, never
    hidapi: PyPI's hidapi wheel's `import hid` is its libusb backend, which
    detaches usbhid (the hidraw node the udev rule gives the service user
    disappears) and then cannot open the device as that user; and armv7 has
    no hidapi wheel at all.  One path on every Pi."""
    if cfg.transport == "socket":
        # The simulator link is for demos and black-box tests; it stays out of
        # the daemon's import graph unless a config asks for it.
        from firmware_sim.link import SocketTransport  # noqa: PLC0415

        assert cfg.socket is not None  # noqa: S101 - config validation guarantees it
        return SocketTransport(cfg.socket)
    return HidrawConsole.find(cfg.vid, cfg.pid, cfg.serial)


# -- worker ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConsoleInput:
    """One decoded input report, and how long it waited in the console's
    endpoint before it was read (ms, `DeviceClock`; 0 when read fresh)."""

    report: ConsoleReport
    waited_ms: int = 0


@dataclass(frozen=True, slots=True)
class ConsoleOpened:
    """The console's `now_uptime` (ms) in the info report read at open."""

    uptime_ms: int


@dataclass(frozen=True, slots=True)
class ConsoleLoss:
    """The console's lost counter (events its ring overwrote since power-up) and
    how many unacknowledged events its ring holds now (info feature report)."""

    total: int
    unacked: int | None = None
    uptime_ms: int | None = None  # the console's now_uptime when it was read


class ConsoleWorker(Worker[HidTransport]):
    kind = "console"

    def send(self, report: bytes) -> bool:
        """Write an output report now (from the main loop); False if the device is gone."""
        return self._write(report)

    def _read_info(self, transport: HidTransport) -> ConsoleInfo | DecodeError:
        try:
            return decode_info(transport.get_feature(REPORT_INFO, INFO_REPORT_LEN))
        except DeviceGoneError as e:
            # The device stalls GET_REPORT, or the node refuses the ioctl: if the
            # device is really gone, the next read says so.
            return DecodeError("info_failed", str(e))

    def _serve(self, transport: HidTransport) -> None:
        clock = DeviceClock()
        info = self._read_info(transport)
        seeded_ms = self._clock.mono_ns() // 1_000_000
        note = None
        if isinstance(info, DecodeError):
            self._post(DecodeFailed(self.cfg.id, "info_unreadable"))
            log.warning("device %s: no info feature report (%s): served as configured, "
                        "device losses not counted", self.cfg.id, info.name)
            note = f"no info report ({info.name}): losses not counted"
            assert isinstance(self.cfg, ConsoleConfig)  # noqa: S101 - built by Console
            info = fallback_info(self.cfg)
            if not self.cfg.labels:
                self._post(DeviceAlarm(self.cfg.id, "device_unidentified", (
                    f"console {self.cfg.id} does not say its layout (no info report): its "
                    "presses are stored as button-N; set labels in its [[devices]] table")))
        else:
            clock.seed(seeded_ms, info.now_uptime)
        with self._lock:
            self._transport = transport
        self._post(DeviceState(self.cfg.id, "connected", note, info))
        if note is None:
            # Before anything else read now: is this still the session we knew?
            self._post(Reading(self.cfg.id, ConsoleOpened(info.now_uptime),
                               seeded_ms * 1_000_000, self._clock.wall_ns()))
        if info.lost:
            # Lost while nobody read it (the OVERFLOW flag went with a report
            # sent into the void): the counter says so.
            self._post(Reading(self.cfg.id, ConsoleLoss(info.lost, info.unacked,
                                                                   info.now_uptime),
                               self._clock.mono_ns(), self._clock.wall_ns()))
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
            waited = clock.waited_ms(mono // 1_000_000, decoded.now_uptime)
            self._post(Reading(self.cfg.id, ConsoleInput(decoded, waited), mono, wall))
            if decoded.overflow:
                fresh = self._read_info(transport)
                if not isinstance(fresh, DecodeError):
                    self._post(Reading(self.cfg.id, ConsoleLoss(fresh.lost, fresh.unacked,
                                                                       fresh.now_uptime),
                                       mono, wall))


def fallback_info(cfg: ConsoleConfig) -> ConsoleInfo:
    """What the daemon assumes of a console whose info report is unreadable:
    the config's labels, or 16 unlabelled buttons; protocol 0 marks it assumed."""
    # Without labels in the config the layout is unknown: every button the sheet
    # allows (16) is taken, as button-N without a score, rather than refused or
    # mislabelled (a yes/no console's "no" is not "neutral").
    return ConsoleInfo(0, 0, 0, len(cfg.labels) if cfg.labels else 16, Layout.CUSTOM, 32, 0,
                       0, 0)
