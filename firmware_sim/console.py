"""The FC-3 console's firmware, modelled as the device sheet describes it.

Time comes from `uptime_ms()` (device milliseconds since power-up), so tests
drive it with a manual clock and the `feedback-sim` process with the real one.
Nothing here sleeps: `tick()` does whatever is due and `next_due_ms()` says
when to call it again.

Behaviour (shared/devices/console-hid.md, "Firmware behaviour"):
- raw contacts are debounced for 30 ms; a PRESS is stamped with the moment
  the contact closed and stayed closed; bouncing and holding never make a
  second PRESS; a button held for 2000 ms sends one HOLD after its PRESS;
- every event (HELLO included, seq 0) goes into a RAM ring of 32 until ACKed;
  while anything is unacknowledged all of it is resent, oldest first, with
  REPLAY set, 1 s after the last send, backing off 1, 2, 4, 8 s, then every
  8 s; a new event restarts the back-off at 1 s;
- a full ring overwrites its oldest event, counts it as lost and sets
  OVERFLOW on the next report sent;
- power loss loses the ring; power-up restarts seq and uptime at 0 and sends
  HELLO;
- reports sent while no host has the device open are lost on the wire, as
  interrupt-IN reports are when hidraw has no reader.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from drivers.console import (
    CMD_ACK,
    CMD_BEEP,
    CMD_RESEND,
    CMD_SHOW,
    COMMAND_REPORT_LEN,
    NO_BUTTON,
    REPORT_COMMAND,
    UPTIME_MOD,
    ConsoleInfo,
    ConsoleReport,
    Layout,
    ReportType,
    encode_info,
    encode_report,
)

__all__ = ["AckedEvent", "ConsoleFirmware", "LedState"]

DEBOUNCE_MS = 30
HOLD_MS = 2000
RING = 32
BACKOFF_MS = (1000, 2000, 4000, 8000)
ACKED_LOG = 10_000  # events remembered as acknowledged (a test's record, not firmware)


@dataclass(slots=True)
class _Button:
    raw: bool = False
    raw_since: int = 0
    stable: bool = False
    pressed_at: int = 0
    hold_sent: bool = False


@dataclass(slots=True)
class _Entry:
    dev_seq: int  # the sheet's seq: 8 bits, HELLO 0
    type: ReportType
    button: int
    event_uptime: int


@dataclass(frozen=True, slots=True)
class AckedEvent:
    """An event the host's ACK removed from the ring (the simulator's record, for
    tests: every press the device was told is safe, in the order it happened)."""

    dev_seq: int
    type: ReportType
    button: int
    event_uptime: int


@dataclass(slots=True)
class LedState:
    button: int
    mode: int
    ms: int
    at_uptime: int


@dataclass(slots=True)
class _Counters:
    sent: int = 0
    resent: int = 0
    acks: int = 0
    beeps: list[int] = field(default_factory=list)


class ConsoleFirmware:
    """One console.  Thread-safe: the host side and the buttons may be driven
    from different threads."""

    def __init__(self, serial: str, *, buttons: int = 3, layout: int = Layout.THREE_LEVEL,
                 uptime_ms: Callable[[], int], send: Callable[[bytes], None] | None = None,
                 fw: tuple[int, int] = (1, 4)) -> None:
        self.serial = serial
        self.buttons = buttons
        self.layout = layout
        self.fw = fw
        self._clock = uptime_ms
        self._send_cb = send
        # Public so that a server can order its own lock after this one.
        self.lock = threading.RLock()
        self.host_attached = False
        self.leds: list[LedState] = []
        self.counters = _Counters()
        self._script: list[tuple[int, int, bool]] = []
        # Not part of the firmware: what ACKs removed from the ring, oldest first.
        self.acked: deque[AckedEvent] = deque(maxlen=ACKED_LOG)
        self.acked_total = 0
        # Not part of the firmware either: told of each ACK's newly acknowledged
        # events, under `lock` (so `powered_up_at_ms` is still their session's).
        self.on_acked: Callable[[list[AckedEvent]], None] | None = None
        self.powered = False
        self.power_up()

    # -- power and USB -----------------------------------------------------

    def _now(self) -> int:
        return self._clock() - self._boot_at

    def power_up(self) -> None:
        with self.lock:
            self._boot_at = self._clock()
            self.powered = True
            self._dev_seq = 0
            self._ring: list[_Entry] = []
            self.lost = 0
            self._overflow_pending = False
            self._buttons = [_Button() for _ in range(self.buttons)]
            self._backoff = 0
            self._next_resend: int | None = None
            self._emit(ReportType.HELLO, NO_BUTTON, 0, first=True)

    @property
    def powered_up_at_ms(self) -> int:
        """The clock's reading (`uptime_ms()`) at the last power-up: uptime 0."""
        with self.lock:
            return self._boot_at

    def power_cut(self) -> None:
        """Power loss: the RAM ring is gone; nothing is sent until power_up()."""
        with self.lock:
            self.powered = False
            self._ring = []
            self._script = []

    def set_sender(self, send: Callable[[bytes], None] | None) -> None:
        """A host opened (or closed, with None) the device."""
        with self.lock:
            self._send_cb = send
            self.host_attached = send is not None

    # -- buttons -----------------------------------------------------------

    def contact(self, button: int, closed: bool) -> None:
        """A raw contact change now, bounces and all."""
        with self.lock:
            if not self.powered or not 0 <= button < self.buttons:
                return
            b = self._buttons[button]
            if b.raw != closed:
                b.raw = closed
                b.raw_since = self._now()
            self._update(self._now())

    def press(self, button: int, hold_ms: int = 120, bounce: bool = True,
              delay_ms: int = 0) -> None:
        """Script a human press starting `delay_ms` from now: bounce, hold, release.

        Raises ValueError for a button this console does not have or a negative
        time, before anything is scripted (the ticks replay the script later)."""
        if not 0 <= button < self.buttons:
            raise ValueError(f"no button {button}: this console has {self.buttons} buttons "
                             f"(0..{self.buttons - 1})")
        if hold_ms < 0 or delay_ms < 0:
            raise ValueError(f"hold_ms and delay_ms must be >= 0, not {hold_ms} and "
                             f"{delay_ms}")
        with self.lock:
            t = self._clock() + delay_ms
            steps = [(0, True)]
            if bounce:
                steps += [(1, False), (3, True)]
            steps += [(hold_ms, False)]
            if bounce:
                steps += [(hold_ms + 1, True), (hold_ms + 2, False)]
            self._script.extend((t + dt, button, closed) for dt, closed in steps)
            self._script.sort(key=lambda s: s[0])
            self.tick()

    # -- time --------------------------------------------------------------

    def next_due_ms(self) -> int | None:
        """Absolute clock time (as uptime_ms() counts) of the next thing to do."""
        with self.lock:
            if not self.powered:
                return None
            due: list[int] = [s[0] for s in self._script[:1]]
            for b in self._buttons:
                if b.raw != b.stable:
                    due.append(self._boot_at + b.raw_since + DEBOUNCE_MS)
                elif b.stable and not b.hold_sent:
                    due.append(self._boot_at + b.pressed_at + HOLD_MS)
            if self._next_resend is not None:
                due.append(self._boot_at + self._next_resend)
            return min(due) if due else None

    def tick(self) -> None:
        with self.lock:
            if not self.powered:
                return
            now_abs = self._clock()
            while self._script and self._script[0][0] <= now_abs:
                at, button, closed = self._script.pop(0)
                b = self._buttons[button]
                if b.raw != closed:
                    # Debounce within the step: stamp with the step's own time
                    # so a late tick does not shift the press time.
                    self._update(at - self._boot_at)
                    b.raw = closed
                    b.raw_since = at - self._boot_at
            self._update(self._now())
            if self._next_resend is not None and self._now() >= self._next_resend:
                self._resend_all()

    def _update(self, now: int) -> None:
        for i, b in enumerate(self._buttons):
            if b.raw != b.stable and now - b.raw_since >= DEBOUNCE_MS:
                b.stable = b.raw
                if b.stable:
                    b.pressed_at = b.raw_since
                    b.hold_sent = False
                    self._emit(ReportType.PRESS, i, b.pressed_at)
            if b.stable and not b.hold_sent and now - b.pressed_at >= HOLD_MS:
                b.hold_sent = True
                self._emit(ReportType.HOLD, i, b.pressed_at + HOLD_MS)

    # -- events and the ring -------------------------------------------------

    def _emit(self, kind: ReportType, button: int, event_uptime: int, first: bool = False) -> None:
        dev_seq = 0 if first else (self._dev_seq + 1) & 0xFF
        self._dev_seq = dev_seq
        if len(self._ring) >= RING:
            self._ring.pop(0)
            self.lost += 1
            self._overflow_pending = True
        entry = _Entry(dev_seq, kind, button, event_uptime)
        self._ring.append(entry)
        self._send(entry, replay=False)
        self._backoff = 0
        self._next_resend = self._now() + BACKOFF_MS[0]

    def _send(self, e: _Entry, replay: bool) -> None:
        report = ConsoleReport(e.dev_seq, e.type, e.button, replay, self._overflow_pending,
                               e.event_uptime % UPTIME_MOD, self._now() % UPTIME_MOD)
        self._overflow_pending = False
        if replay:
            self.counters.resent += 1
        else:
            self.counters.sent += 1
        if self._send_cb is not None:
            self._send_cb(encode_report(report))

    def _resend_all(self) -> None:
        if not self._ring:
            self._next_resend = None
            return
        for e in list(self._ring):
            self._send(e, replay=True)
        self._backoff = min(self._backoff + 1, len(BACKOFF_MS) - 1)
        self._next_resend = self._now() + BACKOFF_MS[self._backoff]

    # -- host commands -------------------------------------------------------

    def output_report(self, data: bytes) -> None:
        """An output report from the host (report ID first)."""
        with self.lock:
            if not self.powered or len(data) != COMMAND_REPORT_LEN or data[0] != REPORT_COMMAND:
                return
            cmd = data[1]
            if cmd == CMD_ACK:
                self.counters.acks += 1
                ack = data[2]
                # Cumulative: everything up to and including `ack`, in the
                # half of the seq space behind it.
                keep: list[_Entry] = []
                newly: list[AckedEvent] = []
                for e in self._ring:
                    if (ack - e.dev_seq) % 256 >= 128:
                        keep.append(e)
                    else:
                        newly.append(AckedEvent(e.dev_seq, e.type, e.button, e.event_uptime))
                self.acked.extend(newly)
                self.acked_total += len(newly)
                self._ring = keep
                if newly and self.on_acked is not None:
                    self.on_acked(newly)
                if not self._ring:
                    self._next_resend = None
            elif cmd == CMD_SHOW:
                self.leds.append(LedState(data[2], data[3], data[4] | data[5] << 8, self._now()))
            elif cmd == CMD_RESEND:
                for e in list(self._ring):
                    self._send(e, replay=True)
                if self._ring:
                    self._backoff = 0
                    self._next_resend = self._now() + BACKOFF_MS[0]
            elif cmd == CMD_BEEP:
                self.counters.beeps.append(data[2] | data[3] << 8)
            # Unknown commands are ignored, as the sheet says.

    def feature_report(self) -> bytes:
        with self.lock:
            return encode_info(ConsoleInfo(
                protocol=1, fw_major=self.fw[0], fw_minor=self.fw[1], buttons=self.buttons,
                layout=self.layout, ring=RING, unacked=len(self._ring),
                now_uptime=self._now(), lost=self.lost))

    @property
    def idle(self) -> bool:
        """No scripted contact changes pending and every button released and settled."""
        with self.lock:
            return not self._script and not any(b.raw or b.stable for b in self._buttons)

    @property
    def unacked(self) -> int:
        with self.lock:
            return len(self._ring)
