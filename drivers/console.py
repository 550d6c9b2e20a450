"""Feedback console FC-3 (USB HID, vendor page 0xFF00): protocol core.

Pure code, no I/O: reports in, decoded reports and host decisions out.  The
transport is `drivers.hidraw_transport` (the kernel's hidraw interface,
stdlib only); the simulator has its own.  Spec: shared/devices/console-hid.md.
USB identity: `VID`:`PID` (`USB_MATCHER`).  The sheet's `seq` is called
`dev_seq` here (the console's own 8-bit number, not the edge's publish seq).

Input report 1, event (13 bytes on hidraw, little-endian)::

     0     1      2      3        4      5..8           9..12
    +----+------+------+--------+------+--------------+--------------+
    | 01 | seq  | type | button | flags| event_uptime | now_uptime   |
    +----+------+------+--------+------+--------------+--------------+
    type  01 PRESS, 02 HOLD (>= 2 s, once, after its PRESS), 03 HELLO (button FF)
    flags bit0 REPLAY, bit1 OVERFLOW; other bits 0
    age of the event = (now_uptime - event_uptime) mod 2^32 ms

Output report 2, command (9 bytes)::

     0     1      2..8
    +----+------+-----------------------------------------+
    | 02 | cmd  | arguments, unused bytes 0               |
    +----+------+-----------------------------------------+
    01 ACK seq | 02 SHOW button mode ms_lo ms_hi | 03 RESEND | 04 BEEP ms_lo ms_hi

Feature report 3, info (17 bytes)::

     0    1      2      3      4        5       6      7      8     9..12     13..16
    +----+------+------+------+--------+-------+------+------+----+----------+--------+
    | 03 | proto| fw_hi| fw_lo| buttons| layout| ring | unack| 00 | now_upt  | lost   |
    +----+------+------+------+--------+-------+------+------+----+----------+--------+

Decode errors, each counted by name and never raised: `bad_length`,
`bad_report_id`, `unknown_type`, `bad_button`, `bad_flags`, `bad_uptime` (an
event claiming to be more than 2^31 ms old, i.e. from the future).

Where the sheet is silent, these are our choices (as a firmware engineer
would make them, and as the simulated firmware implements them):

- HELLO is an event like any other: it sits in the ring with seq 0 until it
  is ACKed, so a reset that happened while the daemon was down is still seen.
- Duplicates are recognised by the key (seq, event_uptime, type, button), a
  stricter form of the sheet's "seq among the session's last 64": it needs no
  window arithmetic across the seq wrap and survives daemon restarts because
  the keys are stored with the events.  A HELLO seen for the first time
  (REPLAY clear), or a device uptime that went backwards, starts a new session
  and forgets the old keys; a replayed HELLO already recorded, with the uptime
  not gone backwards, is a lost ACK, not a reset.
- A device restart is also recognised without its HELLO: while the daemon
  runs, a device's uptime must advance as the host's monotonic clock does
  (2 s + 1 % slack); one that fell behind restarted.  This also tells the
  2^32 ms wrap (about 49.7 days) from a reset.  After a daemon restart only
  "uptime below the newest stored event" is left to go by.  On real
  hardware a replugged console's HELLO always arrives replayed (hidraw is
  not open yet when it is first sent), so this check is what separates it
  from a HELLO whose ACK was lost.
- ACK is cumulative ("every event up to seq"), so after a batch the host ACKs
  the last seq handled; a malformed report in between is covered by it: it
  cannot be stored, and holding back the ACK would only make the ring fill.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

from drivers.usb_match import Matcher

__all__ = [
    "EVENT_REPORT_LEN",
    "INFO_REPORT_LEN",
    "PID",
    "USB_MATCHER",
    "VID",
    "ConsoleDecoder",
    "ConsoleHost",
    "ConsoleInfo",
    "ConsoleReport",
    "DeviceClock",
    "Duplicate",
    "Layout",
    "NewSession",
    "Record",
    "ReportType",
    "button_labels",
    "decode_info",
    "decode_report",
    "encode_ack",
    "encode_beep",
    "encode_info",
    "encode_report",
    "encode_resend",
    "encode_show",
]

VID: Final = 0x1209  # pid.codes
PID: Final = 0xFB02
USB_MATCHER: Final = Matcher("console", VID, PID)
REPORT_EVENT: Final = 0x01
REPORT_COMMAND: Final = 0x02
REPORT_INFO: Final = 0x03
EVENT_REPORT_LEN: Final = 13
COMMAND_REPORT_LEN: Final = 9
INFO_REPORT_LEN: Final = 17
FLAG_REPLAY: Final = 0x01
FLAG_OVERFLOW: Final = 0x02
NO_BUTTON: Final = 0xFF
UPTIME_MOD: Final = 1 << 32
CMD_ACK: Final = 0x01
CMD_SHOW: Final = 0x02
CMD_RESEND: Final = 0x03
CMD_BEEP: Final = 0x04
SHOW_OFF: Final = 0
SHOW_STEADY: Final = 1
SHOW_BLINK: Final = 2

_EVENT = struct.Struct("<BBBBBII")
_INFO = struct.Struct("<BBBBBBBBBII")


class ReportType(IntEnum):
    PRESS = 0x01
    HOLD = 0x02
    HELLO = 0x03


class Layout(IntEnum):
    CUSTOM = 0x00
    THREE_LEVEL = 0x01
    YES_NO = 0x02
    FIVE_POINT = 0x03


@dataclass(frozen=True, slots=True)
class ConsoleReport:
    """One decoded input report 1 (an event, or a replay of one).

    `dev_seq` is the sheet's `seq` (../shared/devices/console-hid.md): the
    console's own 8-bit event number, wrapping 255 -> 0 (HELLO is 0).  It is
    not the edge's publish `seq`.
    """

    dev_seq: int
    type: ReportType
    button: int
    replay: bool
    overflow: bool
    event_uptime: int
    now_uptime: int

    @property
    def age_ms(self) -> int:
        return (self.now_uptime - self.event_uptime) % UPTIME_MOD

    @property
    def key(self) -> str:
        """What identifies this event within a device's power-up session."""
        return f"{self.dev_seq}:{self.event_uptime}:{int(self.type)}:{self.button}"


@dataclass(frozen=True, slots=True)
class ConsoleInfo:
    protocol: int
    fw_major: int
    fw_minor: int
    buttons: int
    layout: int
    ring: int
    unacked: int
    now_uptime: int
    lost: int


@dataclass(frozen=True, slots=True)
class DecodeError:
    name: str
    detail: str


def decode_report(data: bytes, buttons: int) -> ConsoleReport | DecodeError:
    """One input report as read from hidraw (report ID first)."""
    if len(data) != EVENT_REPORT_LEN:
        return DecodeError("bad_length", f"{len(data)} bytes, expected {EVENT_REPORT_LEN}")
    rid, dev_seq, rtype, button, flags, event_up, now_up = _EVENT.unpack(data)
    if rid != REPORT_EVENT:
        return DecodeError("bad_report_id", f"report id {rid}")
    try:
        kind = ReportType(rtype)
    except ValueError:
        return DecodeError("unknown_type", f"type {rtype:#04x}")
    if flags & ~(FLAG_REPLAY | FLAG_OVERFLOW):
        return DecodeError("bad_flags", f"flags {flags:#04x}")
    if kind is ReportType.HELLO:
        if button != NO_BUTTON:
            return DecodeError("bad_button", f"HELLO with button {button}")
    elif button >= buttons:
        return DecodeError("bad_button", f"button {button} of {buttons}")
    if (now_up - event_up) % UPTIME_MOD >= 1 << 31:
        return DecodeError("bad_uptime", "event time after report time")
    return ConsoleReport(dev_seq, kind, button, bool(flags & FLAG_REPLAY),
                         bool(flags & FLAG_OVERFLOW), event_up, now_up)


def encode_report(r: ConsoleReport) -> bytes:
    flags = (FLAG_REPLAY if r.replay else 0) | (FLAG_OVERFLOW if r.overflow else 0)
    return _EVENT.pack(REPORT_EVENT, r.dev_seq & 0xFF, int(r.type), r.button, flags,
                       r.event_uptime % UPTIME_MOD, r.now_uptime % UPTIME_MOD)


def decode_info(data: bytes) -> ConsoleInfo | DecodeError:
    if len(data) != INFO_REPORT_LEN:
        return DecodeError("bad_length", f"info: {len(data)} bytes, expected {INFO_REPORT_LEN}")
    rid, proto, fw_hi, fw_lo, buttons, layout, ring, unacked, _, now_up, lost = \
        _INFO.unpack(data)
    if rid != REPORT_INFO:
        return DecodeError("bad_report_id", f"info report id {rid}")
    if proto != 1:
        return DecodeError("bad_protocol", f"protocol version {proto}")
    if not 1 <= buttons <= 16:
        return DecodeError("bad_button", f"button count {buttons}")
    return ConsoleInfo(proto, fw_hi, fw_lo, buttons, layout, ring, unacked, now_up, lost)


def encode_info(info: ConsoleInfo) -> bytes:
    return _INFO.pack(REPORT_INFO, info.protocol, info.fw_major, info.fw_minor, info.buttons,
                      info.layout, info.ring, info.unacked, 0, info.now_uptime % UPTIME_MOD,
                      info.lost % UPTIME_MOD)


def _command(*args: int) -> bytes:
    body = bytes(args)
    return bytes([REPORT_COMMAND]) + body + bytes(COMMAND_REPORT_LEN - 1 - len(body))


def encode_ack(dev_seq: int) -> bytes:
    """ACK every event up to and including `dev_seq` (the console's own seq)."""
    return _command(CMD_ACK, dev_seq & 0xFF)


def encode_show(button: int, mode: int = SHOW_STEADY, ms: int = 1500) -> bytes:
    ms = max(0, min(ms, 0xFFFF))
    return _command(CMD_SHOW, button, mode, ms & 0xFF, ms >> 8)


def encode_resend() -> bytes:
    return _command(CMD_RESEND)


def encode_beep(ms: int) -> bytes:
    ms = max(0, min(ms, 0xFFFF))
    return _command(CMD_BEEP, ms & 0xFF, ms >> 8)


_LAYOUTS: Final[dict[int, tuple[tuple[str, int], ...]]] = {
    Layout.THREE_LEVEL: (("good", 1), ("neutral", 0), ("bad", -1)),
    Layout.YES_NO: (("yes", 1), ("no", -1)),
    # Five-point: button 0 is the best mark (5).  The collector maps scores
    # 5..1 onto good/neutral/bad for the loyalty index.
    Layout.FIVE_POINT: (("5", 5), ("4", 4), ("3", 3), ("2", 2), ("1", 1)),
}


def button_labels(layout: int, buttons: int, labels: tuple[str, ...] | None = None,
                  scores: tuple[int | None, ...] | None = None,
                  ) -> tuple[tuple[str, int | None], ...]:
    """Label and score per button: from the config if given, else from the layout."""
    if labels is not None:
        return tuple((labels[i] if i < len(labels) else f"button-{i}",
                      scores[i] if scores is not None and i < len(scores) else None)
                     for i in range(buttons))
    known = _LAYOUTS.get(layout, ())
    return tuple(known[i] if i < len(known) else (f"button-{i}", None)
                 for i in range(buttons))


class ConsoleDecoder:
    """Reports in, decoded reports out; every bad report counted by name."""

    def __init__(self, buttons: int) -> None:
        self.buttons = buttons
        self.errors: dict[str, int] = {}

    def feed(self, report: bytes) -> list[ConsoleReport]:
        decoded = decode_report(report, self.buttons)
        if isinstance(decoded, DecodeError):
            self.errors[decoded.name] = self.errors.get(decoded.name, 0) + 1
            return []
        return [decoded]


@dataclass(frozen=True, slots=True)
class Record:
    """Store this event (with its dedup key), then ACK it and light the LED."""

    report: ConsoleReport
    key: str
    new_session: bool


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Already stored: ACK it again, store nothing."""

    report: ConsoleReport


@dataclass(frozen=True, slots=True)
class NewSession:
    """A HELLO: the device powered up; forget the old session's keys, ACK it."""

    report: ConsoleReport
    key: str


HostAction = Record | Duplicate | NewSession

_SESSION_KEYS: Final = 4096
# Reads can be late by an SD-card stall; clocks drift by well under 1 %.
_RATE_SLACK_MS: Final = 2_000


class ConsoleHost:
    """The host's side of one console: sessions and duplicates (pure).

    `known_keys` are the dedup keys the store already holds for this device,
    oldest first, so decisions survive a daemon restart.
    """

    def __init__(self, known_keys: list[str] | None = None) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict.fromkeys(known_keys or [])
        self._max_uptime = max((_uptime_of(k) for k in self._keys), default=None)
        self._last_now: tuple[int, int] | None = None  # (device now_uptime, host mono ms)

    def _remember(self, key: str, uptime: int) -> None:
        self._keys[key] = None
        while len(self._keys) > _SESSION_KEYS:
            self._keys.popitem(last=False)
        self._max_uptime = uptime if self._max_uptime is None else max(self._max_uptime, uptime)

    def _reset(self) -> None:
        self._keys.clear()
        self._max_uptime = None

    def _went_backwards(self, r: ConsoleReport, host_ms: int) -> bool:
        """Did the device restart since we last heard from it?"""
        if self._last_now is not None:
            last_up, last_host = self._last_now
            elapsed = host_ms - last_host
            # A running device's uptime advances with the host's clock (this
            # also covers the 2^32 ms wrap); one that restarted is behind.
            advanced = (r.now_uptime - last_up) % UPTIME_MOD
            if advanced >= UPTIME_MOD // 2:
                return True  # behind the last report: it restarted
            # Only a device that advanced less than the host's time did: a burst of
            # reports that waited in the endpoint advances more (issue 15; a restart
            # within one open is a USB re-enumeration, a new open anyway).
            return elapsed - advanced > _RATE_SLACK_MS + elapsed // 100
        return self._max_uptime is not None and r.now_uptime < self._max_uptime

    def on_report(self, r: ConsoleReport, host_mono_ns: int) -> HostAction:
        host_ms = host_mono_ns // 1_000_000
        backwards = self._went_backwards(r, host_ms)
        self._last_now = (r.now_uptime, host_ms)
        key = r.key
        if r.type is ReportType.HELLO:
            if r.replay and key in self._keys and not backwards:
                return Duplicate(r)
            self._reset()
            self._remember(key, r.event_uptime)
            return NewSession(r, key)
        new_session = backwards
        if backwards:
            self._reset()
        elif key in self._keys:
            return Duplicate(r)
        self._remember(key, r.event_uptime)
        return Record(r, key, new_session)


def _uptime_of(key: str) -> int:
    try:
        return int(key.split(":")[1])
    except (IndexError, ValueError):
        return 0


class DeviceClock:
    """Which input reports waited in the console's endpoint, and for how long.

    The console sheet (../shared/devices/console-hid.md, "What the host must
    do"): time every event by the device's clock, never by when its report was
    read.  A report waits in the interrupt IN endpoint until the host polls, so
    the first reports read after the daemon opens the console can be seconds or
    hours old, their `now_uptime` from when the firmware queued them.  The
    offset between device uptime and the host's monotonic clock (host ms -
    `now_uptime`) is estimated as the minimum over recent fresh samples, as NTP
    keeps its lowest-delay sample; a report whose offset exceeds that minimum
    by more than `LATE_MS` (plus the drift two crystals can build up since the
    reference sample, `DRIFT_PPM`) waited, by that excess.

    Choices where the sheet is silent, a firmware engineer's:
    - Samples reset at every open (`reset`): a console power-up is a USB
      re-enumeration, so one open never spans two device sessions, and the
      info feature report read at open (a control transfer, answered live)
      seeds the estimate before the first input report is read.
    - A console that cannot answer the info report has no seed: the first
      report read becomes the reference, so a report that waited from before
      the open is timed as read (nothing better is known).
    - Offsets are compared modulo 2^32 ms, so `now_uptime` wrapping after
      49.7 days is not a 49-day delay.
    - Only fresh samples (not late) feed the estimate, over `WINDOW_MS`; the
      newest fresh one is kept even when older, its allowance growing with age.
    """

    LATE_MS: Final = 100
    # A USB full-speed device's clock may be 2500 ppm off (USB 2.0, 7.1.11), the
    # Pi's slewed by NTP up to 500 ppm: a slow console is not taken for waiting.
    DRIFT_PPM: Final = 3000
    WINDOW_MS: Final = 600_000

    def __init__(self) -> None:
        self._samples: list[tuple[int, int]] = []  # (host ms, host ms - device uptime)

    def reset(self) -> None:
        """A new open of the device: what was known of its clock no longer holds."""
        self._samples.clear()

    def seed(self, host_ms: int, now_uptime: int) -> None:
        """A sample known to be fresh (the info feature report at open)."""
        self._add(host_ms, self._normal(host_ms - now_uptime))

    def waited_ms(self, host_ms: int, now_uptime: int) -> int:
        """How long a report read at `host_ms` (host monotonic ms) carrying
        `now_uptime` (device ms) waited in the endpoint: 0 when fresh."""
        offset = self._normal(host_ms - now_uptime)
        ref = self._reference()
        if ref is not None:
            at, best = ref
            excess = offset - best
            allowed = self.LATE_MS + (host_ms - at) * self.DRIFT_PPM // 1_000_000
            if excess > allowed:
                return excess
            if excess < -allowed - UPTIME_MOD // 4:
                # Modulo 2^32 a wait of over 24.9 days reads as a negative one: such a
                # report must not become the reference for every later one.
                return (excess + UPTIME_MOD) % UPTIME_MOD
        self._add(host_ms, offset)
        return 0

    def _normal(self, offset: int) -> int:
        """`offset` in the frame of the samples so far (modulo 2^32 ms, signed)."""
        if not self._samples:
            return offset
        base = self._samples[-1][1]
        return base + ((offset - base + (UPTIME_MOD >> 1)) % UPTIME_MOD) - (UPTIME_MOD >> 1)

    def _reference(self) -> tuple[int, int] | None:
        return min(self._samples, key=lambda s: s[1]) if self._samples else None

    def _add(self, host_ms: int, offset: int) -> None:
        self._samples.append((host_ms, offset))
        horizon = host_ms - self.WINDOW_MS
        keep = [s for s in self._samples if s[0] >= horizon]
        self._samples = keep or self._samples[-1:]
        if len(self._samples) > 64:  # a window of steady presses needs no more
            self._samples = self._samples[-64:]
