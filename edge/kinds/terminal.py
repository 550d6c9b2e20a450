"""The survey terminal (ProLAN-3000 class, USB CDC-ACM or RS-232): config,
worker, events.

Protocol: ../shared/devices/terminal-serial.md, framed and decided by
`drivers.terminal.TerminalHost`.  A record is ACKed only after the main loop
has stored it; (terminal serial, record id) identifies a record for good, so
a duplicate is ACKed again and not stored.

Device-side loss (the sheet is silent on it): record ids count up by one per
record and the terminal drops its oldest records when its flash holds 500
unacknowledged ones, replaying the rest oldest first; so a record whose id
jumps past the last one stored means the records in between were lost on
the terminal.  That becomes a `device_lost` event (reason flash_full, dedup
key `gap:<last>:<id>`), a `device_overflow` drop count and an alarm.  A jump
of more than `MAX_PLAUSIBLE_GAP` records is no count of losses: more than a
terminal makes in two months of its busiest use (about 2,000 records a day),
it means the flash or firmware was reset or another unit took this serial.
The record is stored, no `device_lost` is invented (a record of 4 billion
losses would wreck every figure built on it), the jump is counted as
`id_jump` under the device's decode errors and raises alarm
`device_implausible` for a person to look at the terminal.

Identity: the serial the terminal states in HELLO is what `status` and the
`devices` topic show (`Terminal.serial()`), also for a terminal configured by
port only; the worker asks with WHO after opening the port until a HELLO
comes (`drivers.terminal.TerminalHost`), since an RS-232 unit cannot see the
daemon restart and says HELLO by itself only at power-up.

A stuck terminal (a record the host refuses, retransmitted for ever, holding
every record behind it): when the same refusal repeats `STUCK_AFTER` times
the worker raises alarm `device_stuck` (through a `DeviceAlarm` message) and
counts `stuck` under the device's decode errors; the alarm is cleared once a
later record from the terminal is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from drivers.serial_transport import SerialTransport, find_by_serial
from drivers.terminal import (
    LINK_TIMEOUT_MS,
    USB_MATCHER,
    Abandoned,
    Answer,
    Count,
    Hello,
    HelloSeen,
    Presence,
    Record,
    Send,
    StoreRecord,
    Stuck,
    TerminalHost,
)
from drivers.transport import DeviceGoneError
from edge import events
from edge.contract.ids import NAME_RE, SERIAL_RE
from edge.contract.toml import MISSING, Table
from edge.events import DeviceRef, Event, EventBody, new_event_id
from edge.kinds.base import (
    LOSS_ALARM_S,
    Context,
    Decision,
    DecodeFailed,
    Device,
    DeviceAlarm,
    DeviceConfig,
    DeviceState,
    Doctors,
    Env,
    Kind,
    Reading,
)
from edge.kinds.worker import READ_TIMEOUT_MS, Worker
from edge.store import Append

if TYPE_CHECKING:
    from drivers.usb_discovery import UsbDevice

__all__ = ["KIND", "Terminal", "TerminalConfig", "TerminalInput", "TerminalWorker"]

log = logging.getLogger(__name__)

TIME_EVERY_S: Final = 3600.0
# Records a terminal can lose between two stored ones: 2,000 a day for 60 days.
MAX_PLAUSIBLE_GAP: Final = 120_000


@dataclass(frozen=True, slots=True)
class TerminalConfig(DeviceConfig):
    port: Path | None = None  # a fixed port (RS-232 adapters); else found by serial


def parse(t: Table, index: int, desk: str) -> TerminalConfig:
    serial = t.string("serial", default=None, pattern=SERIAL_RE,
                      allowed="12 upper-case hex digits, as printed on the label")
    port = t.path_value("port")
    if serial is None and port is None:
        raise t.error("port", MISSING, "give serial (found under /dev/serial/by-id) or port "
                      "(e.g. /dev/ttyUSB0 for an RS-232 unit), or both")
    default_id = f"st3-{serial.lower()}" if serial else f"terminal-{index + 1}"
    dev_id = t.string("id", default=default_id, pattern=NAME_RE,
                      allowed="1 to 32 lower-case letters, digits or '-'")
    t.finish()
    return TerminalConfig(str(dev_id), "terminal", desk, serial, port)


def open_terminal(cfg: TerminalConfig) -> SerialTransport:
    port = cfg.port
    if port is None and cfg.serial is not None:
        port = find_by_serial(cfg.serial)
    if port is None:
        raise DeviceGoneError(f"no serial port for terminal {cfg.serial} under "
                              "/dev/serial/by-id")
    return SerialTransport(port)


# -- worker ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TerminalInput:
    """A complete record from the terminal with serial `serial`, in frame `frame_seq`."""

    record: Record
    serial: str
    frame_seq: int


class TerminalWorker(Worker[SerialTransport]):
    """Reads one survey terminal; the protocol decisions are TerminalHost's."""

    kind = "terminal"

    def __init__(self, cfg: TerminalConfig, post: Callable[[object], None], env: Env,
                 open_port: Callable[[TerminalConfig], SerialTransport]) -> None:
        super().__init__(cfg, lambda: open_port(cfg), post, env.clock)
        self._doctors = env.doctors
        self._host: TerminalHost | None = None
        self._doctors_due = False  # a newer list for this worker's thread to send

    def _detached(self) -> None:
        self._transport = None
        self._host = None
        self._doctors_due = False

    def ack(self, frame_seq: int) -> bool:
        """The record in that frame is durable: tell the terminal (main loop)."""
        with self._lock:
            if self._host is None:
                return False
            return self._write(self._host.ack_frame(frame_seq))

    def set_doctors(self, doctors: Doctors) -> None:
        """A newer list (main loop).  The worker's thread sends it on its next
        turn: a 13 KB DOCTORS takes over a second on a 115200-baud RS-232 line,
        and the main loop must not wait for that write."""
        with self._lock:
            if self._host is None:
                return
            self._host.doctors = doctors
            self._doctors_due = True

    def _serve(self, transport: SerialTransport) -> None:
        opened_ms = self._clock.mono_ns() // 1_000_000
        host = TerminalHost(self.cfg.serial, self._doctors(),
                            clock_synced=self._clock.synced(), opened_ms=opened_ms)
        # Bytes that waited in the terminal reach the port before it is raw and
        # the tty echoes them back (found on a real CDC-ACM port): a lone frame
        # delimiter ends that garbage, so the terminal reads our first frame whole.
        transport.write(b"\x00")
        with self._lock:
            self._transport = transport
            self._host = host
        self._post(DeviceState(self.cfg.id, "connected", None))
        link_up = True
        next_time = 0.0
        timeout = READ_TIMEOUT_MS
        while not self._stop.is_set():
            data = transport.read(timeout)
            mono = self._clock.mono_ns()
            now_ms = mono // 1_000_000
            wall = self._clock.wall_ns()
            with self._lock:
                host.clock_synced = self._clock.synced()
                actions = host.feed(data, now_ms, wall // 1_000_000) if data is not None else []
                actions += host.poll(now_ms)  # WHO while no HELLO
                due = host.next_due_ms()
                timeout = READ_TIMEOUT_MS if due is None else \
                    max(0, min(READ_TIMEOUT_MS, due - now_ms))
                if any(isinstance(a, HelloSeen) for a in actions):
                    self._doctors_due = False  # HELLO compared the revisions itself
                if self._doctors_due and host.link_up(now_ms):
                    self._doctors_due = False
                    frame = host.doctors_frame()
                    if frame is not None:
                        actions.append(Send(frame))
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
                    self._post(Reading(self.cfg.id, TerminalInput(a.record, a.serial, a.seq),
                                       mono, wall))
                elif isinstance(a, Count):
                    self._post(DecodeFailed(self.cfg.id, a.name))
                elif isinstance(a, Stuck):
                    self._stuck(a)
                elif isinstance(a, HelloSeen):
                    if self.cfg.serial is not None and a.hello.serial != self.cfg.serial:
                        self._post(DeviceState(self.cfg.id, "error",
                                               f"terminal says serial {a.hello.serial}, the "
                                               f"config says {self.cfg.serial}", a.hello))
                    else:
                        self._post(DeviceState(self.cfg.id, "connected", None, a.hello))
            if up != link_up:
                link_up = up
                self._post(DeviceState(self.cfg.id, "connected" if up else "error",
                                       None if up else "link down: no frame for 30 s"))

    def _stuck(self, a: Stuck) -> None:
        where = f"terminal {self.cfg.id} at {self.cfg.desk}"
        if a.seq is None:
            text = (f"{where} keeps sending frames the host refuses ({a.reason}), {a.times} "
                    "in a row: nothing from it gets through; check the cable and the unit")
        else:
            text = (f"{where} keeps sending a record the host refuses ({a.reason}), "
                    f"{a.times} times in a row: the records behind it wait on the terminal "
                    "until the record is removed from it (service) or its firmware fixed")
        log.warning("terminal %s: the same frame (seq %s) refused %d times (%s)",
                    self.cfg.id, a.seq, a.times, a.reason)
        self._post(DecodeFailed(self.cfg.id, "stuck"))
        self._post(DeviceAlarm(self.cfg.id, "device_stuck", text))


# -- decisions ----------------------------------------------------------------------


class Terminal(Device):
    cfg: TerminalConfig
    worker: TerminalWorker

    def __init__(self, cfg: TerminalConfig, env: Env) -> None:
        opener: Callable[[TerminalConfig], SerialTransport] = env.opener or open_terminal
        super().__init__(cfg, TerminalWorker(cfg, env.post, env, opener))
        self._stored_keys = env.stored_keys
        self._last_id: dict[str, int] = {}  # terminal serial -> highest record id seen
        self.hello: Hello | None = None  # the terminal's last HELLO (kept while it is away)

    def on_state(self, msg: DeviceState, wall_ns: int) -> None:
        super().on_state(msg, wall_ns)
        if isinstance(msg.details, Hello):
            self.hello = msg.details
            self.last_seen_ns = wall_ns

    def serial(self) -> str | None:
        return self.hello.serial if self.hello is not None else self.cfg.serial

    def details(self) -> dict[str, Any]:
        h = self.hello
        return {"buttons": None, "model": h.model if h else None, "fw": h.fw if h else None}

    def decide(self, r: Reading, ctx: Context) -> Decision:
        inp = r.data
        assert isinstance(inp, TerminalInput)  # noqa: S101 - posted by TerminalWorker only
        rec = inp.record
        body: EventBody
        if isinstance(rec, Answer):
            personal = ctx.send_personal_data
            body = events.SurveyAnswer(record_id=rec.id, doctor=rec.doctor, q1=rec.q1,
                                       q2=rec.q2, phone=rec.phone if personal else None,
                                       comment=rec.comment if personal else None, lang=rec.lang)
        elif isinstance(rec, Presence):
            body = events.Presence(record_id=rec.id, approaches=rec.approaches,
                                   engaged=rec.engaged, period_ms=rec.period_ms)
        else:
            assert isinstance(rec, Abandoned)  # noqa: S101 - the three record kinds
            body = events.Abandoned(record_id=rec.id, doctor=rec.doctor, step=rec.step)
        age_ns = rec.age_ms * 1_000_000
        mono, wall = r.host_mono_ns - age_ns, r.host_wall_ns - age_ns
        event = Event(event_id=new_event_id(), desk=self.cfg.desk,
                      device=DeviceRef(self.cfg.id, "terminal", inp.serial), body=body,
                      operator=ctx.operator(self.cfg.desk, wall),
                      time=ctx.event_time(mono, wall, rec.age_ms))
        scope = f"terminal:{inp.serial}"
        # (terminal serial, record id) identifies a record for good.
        appends = [*self._gap(r, inp.serial, rec.id, ctx), Append(event, (scope, str(rec.id)))]
        return Decision(appends, token=inp.frame_seq)

    def _gap(self, r: Reading, serial: str, rec_id: int, ctx: Context) -> list[Append]:
        """A `device_lost` record when ids jumped past the last one seen."""
        last = self._last_id.get(serial)
        if last is None:
            last = max((int(k) for k in self._stored_keys(f"terminal:{serial}") if k.isdigit()),
                       default=0)
        self._last_id[serial] = max(last, rec_id)
        if not last or rec_id <= last + 1:
            return []
        n = rec_id - last - 1
        if n > MAX_PLAUSIBLE_GAP:
            self.count_decode_error("id_jump")
            ctx.alarm("device_implausible", f"terminal {self.cfg.id} at desk {self.cfg.desk}: "
                      f"record ids jumped from {last} to {rec_id}, more than it can have made; "
                      "was its memory reset or the unit replaced?", subject=self.cfg.id,
                      for_s=LOSS_ALARM_S)
            log.warning("terminal %s: record ids jumped from %d to %d: not counted as losses",
                        self.cfg.id, last, rec_id)
            return []
        log.warning("terminal %s: record ids jumped from %d to %d: %d lost on the terminal",
                    self.cfg.id, last, rec_id, n)
        event = Event(event_id=new_event_id(), desk=self.cfg.desk,
                      device=DeviceRef(self.cfg.id, "terminal", serial),
                      body=events.DeviceLost(lost=n, total=n, reason="flash_full"),
                      operator=ctx.operator(self.cfg.desk, r.host_wall_ns),
                      time=ctx.event_time(r.host_mono_ns, r.host_wall_ns))
        return [Append(event, (f"terminal:{serial}", f"gap:{last}:{rec_id}"))]

    def committed(self, outcomes: Sequence[tuple[Decision, Sequence[bool]]],
                  ctx: Context) -> None:
        ctx.lost_on_device(self.cfg, outcomes)
        for decision, _ in outcomes:
            assert isinstance(decision.token, int)  # noqa: S101 - set by decide()
            self.worker.ack(decision.token)  # stored now, or stored before
        if outcomes:
            # A record got past whatever was refused: the terminal moves again.
            ctx.clear_alarm("device_stuck", self.cfg.id)

    def commit_failed(self) -> None:
        # The ids seen were not stored: judge the next ones against the store.
        self._last_id.clear()

    def on_doctors(self, doctors: Doctors) -> None:
        self.worker.set_doctors(doctors)


def _snippet(usb: UsbDevice) -> list[str]:
    return ['kind = "terminal"', f'serial = "{usb.serial}"' if usb.serial else
            f'port = "{(usb.tty or ("/dev/ttyUSB0",))[0]}"']


KIND: Final = Kind("terminal", parse, Terminal, _snippet, USB_MATCHER, rank=1)
