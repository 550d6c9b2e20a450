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
key `gap:<last>:<id>`), a `device_overflow` drop count and an alarm.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from drivers.serial_transport import SerialTransport, find_by_serial
from drivers.terminal import (
    LINK_TIMEOUT_MS,
    USB_MATCHER,
    Abandoned,
    Answer,
    Count,
    HelloSeen,
    Presence,
    Record,
    Send,
    StoreRecord,
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

    def _detached(self) -> None:
        self._transport = None
        self._host = None

    def ack(self, frame_seq: int) -> bool:
        """The record in that frame is durable: tell the terminal (main loop)."""
        with self._lock:
            if self._host is None:
                return False
            return self._write(self._host.ack_frame(frame_seq))

    def set_doctors(self, doctors: Doctors) -> None:
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
                actions = host.feed(data, now_ms, wall // 1_000_000) if data is not None else []
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


# -- decisions ----------------------------------------------------------------------


class Terminal(Device):
    cfg: TerminalConfig
    worker: TerminalWorker

    def __init__(self, cfg: TerminalConfig, env: Env) -> None:
        opener: Callable[[TerminalConfig], SerialTransport] = env.opener or open_terminal
        super().__init__(cfg, TerminalWorker(cfg, env.post, env, opener))
        self._stored_keys = env.stored_keys
        self._last_id: dict[str, int] = {}  # terminal serial -> highest record id seen

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
        ctx.count("device_overflow", n)
        ctx.alarm("device_lost", f"terminal {self.cfg.id} at {self.cfg.desk} lost {n} records: "
                  "its flash was full", subject=self.cfg.id, for_s=LOSS_ALARM_S)
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
        del ctx
        for decision, _ in outcomes:
            assert isinstance(decision.token, int)  # noqa: S101 - set by decide()
            self.worker.ack(decision.token)  # stored now, or stored before

    def on_doctors(self, doctors: Doctors) -> None:
        self.worker.set_doctors(doctors)


def _snippet(usb: UsbDevice) -> list[str]:
    return ['kind = "terminal"', f'serial = "{usb.serial}"' if usb.serial else
            f'port = "{(usb.tty or ("/dev/ttyUSB0",))[0]}"']


KIND: Final = Kind("terminal", parse, Terminal, _snippet, USB_MATCHER, rank=1)
