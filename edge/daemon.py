"""The daemon's main loop: devices -> durable store -> MQTT.

One thread owns all state: the store, the publisher's window, the device
inventory and every counter.  Device workers, paho's callbacks, the control
socket and signal handlers only post messages into `inbox`; the loop takes
everything that arrived since its last turn and handles it as one batch:

1. device reports are decided (new, duplicate, device reset) and the new
   events stored in one transaction, one fsync (group commit);
2. only then is each device ACKed and the LED of each stored press lit;
3. PUBACKs remove delivered events (reason code checked);
4. the publisher fills its in-flight window from the store, in seq order.

The window is min(broker.window, the broker's Receive Maximum): paho does not
enforce Receive Maximum itself, and a small window keeps press-to-PUBACK
latency low (shared/measured.md).
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import json
import logging
import os
import queue
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.console import (
    ConsoleHost,
    ConsoleInfo,
    Duplicate,
    NewSession,
    Record,
    ReportType,
    button_labels,
    encode_ack,
    encode_show,
)
from drivers.hid_transport import HidapiTransport, HidTransport, SocketTransport
from drivers.hidraw_transport import HidrawConsole
from drivers.terminal import Abandoned as TermAbandoned
from drivers.terminal import Answer as TermAnswer
from drivers.terminal import Presence as TermPresence
from drivers.usb_discovery import classify, scan
from edge import __version__
from edge.clock import Clock, SystemClock
from edge.config import Config, DeviceConfig
from edge.devices import (
    Attached,
    BadgeScanned,
    ButtonPressed,
    ConsoleWorker,
    DecodeFailed,
    DeviceReport,
    DeviceState,
    DiscoveryWatcher,
    KeyboardReader,
    KeyboardWorker,
    TerminalRecord,
    TerminalWorker,
)
from edge.doctors import DoctorList, validate_doctors
from edge.events import (
    COLLECTOR_STATE_TOPIC,
    Abandoned,
    DeviceRef,
    Dropped,
    Event,
    EventBody,
    EventTime,
    OperatorTag,
    Presence,
    Press,
    SurveyAnswer,
    encode_event,
    format_wall,
    new_event_id,
)
from edge.guards import Guards
from edge.mqtt import Connected, Disconnected, Inbound, MqttLink, PubAck
from edge.operators import Operators
from edge.sdnotify import Notifier, Watchdog
from edge.store import Append, Store, StoreDiskFullError, StoreError

__all__ = ["Daemon", "StatusRequest", "Stop", "open_transport"]

log = logging.getLogger(__name__)

_REJECT_RETRY_S = (1.0, 5.0, 30.0, 60.0)
# Delivered events are deleted in batches, usually inside the next insert's
# transaction, which rewrites the same page anyway: at clinic rates that
# halves the bytes written per event.  A deletion lost to a crash only means
# publishing that event again, which the collector drops by event_id.
_REMOVE_BATCH = 256
_REMOVE_DELAY_S = 30.0


@dataclass(frozen=True, slots=True)
class Stop:
    reason: str


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """A control-socket request (status, or an operator login) for the main loop."""

    reply: queue.SimpleQueue[dict[str, Any]]
    request: dict[str, Any] = field(default_factory=lambda: {"cmd": "status"})


@dataclass(slots=True)
class _Device:
    cfg: DeviceConfig
    worker: ConsoleWorker | TerminalWorker | KeyboardWorker
    host: ConsoleHost | None
    state: str = "missing"
    error: str | None = None
    last_seen_ns: int | None = None
    info: ConsoleInfo | None = None
    labels: tuple[tuple[str, int | None], ...] = ()
    lost_seen: int | None = None
    decode_errors: dict[str, int] = field(default_factory=dict)
    presses: int = 0
    duplicates: int = 0
    resets: int = 0

    @property
    def source(self) -> str:
        return f"console:{self.cfg.id}"

    def console(self) -> tuple[ConsoleWorker, ConsoleHost]:
        assert isinstance(self.worker, ConsoleWorker)  # noqa: S101 - consoles only
        assert self.host is not None  # noqa: S101
        return self.worker, self.host


# hidapi has no armv7 wheel; there the console is read through hidraw directly.
_HAVE_HIDAPI = importlib.util.find_spec("hid") is not None


def open_transport(cfg: DeviceConfig) -> HidTransport:
    if cfg.transport == "socket":
        assert cfg.socket is not None  # noqa: S101 - config validation guarantees it
        return SocketTransport(cfg.socket)
    if _HAVE_HIDAPI:
        return HidapiTransport(cfg.vid, cfg.pid, cfg.serial)
    return HidrawConsole.find(cfg.vid, cfg.pid, cfg.serial)


class Daemon:
    def __init__(self, config: Config, *, clock: Clock | None = None,
                 transport: Callable[[DeviceConfig], HidTransport] = open_transport,
                 rng: random.Random | None = None, sysfs: Path = Path("/sys"),
                 keyboards: Callable[[DeviceConfig], KeyboardReader] | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._rng = rng or random.Random()
        self.started_wall_ns = self.clock.wall_ns()
        self._started_mono = time.monotonic()
        root = config.topic_root
        self.store = Store(config.store.path, self._encode, max_events=config.store.max_events,
                           max_bytes=config.store.max_bytes,
                           min_free_bytes=config.store.min_free_bytes)
        self.alarms: list[str] = list(self.store.alarms)
        self._status_topic = f"{root}/status"
        self.link = MqttLink(config.broker, will=(self._status_topic, self._status("offline")),
                             post=self.inbox.put, rng=self._rng)
        self.doctors = DoctorList(config.store.path.with_name("doctors.json"),
                                  config.survey.doctors_file)
        self.alarms.extend(self.doctors.alarms)
        # Read by terminal workers on their own threads: an immutable snapshot.
        self._doctors_now = self.doctors.current()
        self.devices: dict[str, _Device] = {}
        self.desks = sorted({*config.desks, *(d.desk for d in config.devices)})
        self.operators = Operators(config.store.path.parent,
                                   {n: d.operator for n, d in config.desks.items()},
                                   max_login_s=config.max_login_s)
        self._roster_checked = 0.0
        self.guards = Guards(config.guards)
        # Clock watch: (synced, wall - mono) at the last look, and the anchor
        # (mono_ns, wall_ns) that the collector and the store correct with.
        self._clock_seen: tuple[bool, int] | None = None
        self.anchor: tuple[int, int] | None = None
        self.corrected = 0
        # The last stored events for the status page, without personal data.
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)
        for d in config.devices:
            if d.kind in ("keyboard", "badge"):
                kw = KeyboardWorker(d, self.inbox.put, self.clock, keyboards, sysfs=sysfs)
                self.devices[d.id] = _Device(d, kw, None)
                continue
            if d.kind == "terminal":
                tw = TerminalWorker(d, self.inbox.put, self.clock, lambda: self._doctors_now)
                self.devices[d.id] = _Device(d, tw, None)
                continue
            worker = ConsoleWorker(d, functools.partial(transport, d), self.inbox.put, self.clock)
            self.devices[d.id] = _Device(d, worker, ConsoleHost(self.store.keys(f"console:{d.id}")))
        self._sysfs = sysfs
        self._discovery = DiscoveryWatcher(self.inbox.put, sysfs)
        self.notifier = Notifier()
        self.last_turn = time.monotonic()
        self._status_sent = ("", 0.0)
        self._attached: tuple[tuple[Any, str | None], ...] = ()
        # Publisher state.
        self._window = config.broker.window
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._inflight_seqs: set[int] = set()
        self._cursor = 0  # highest seq handed to paho since the last rewind
        self._published_high = 0  # highest seq ever handed to paho
        self._retry_at: float | None = None
        self._reject_streak = 0
        self._probing = False
        self._control_mids: set[int] = set()
        self._delivered: list[int] = []
        self._delivered_since = 0.0
        # `collector` delivery: events stay until the collector's watermark covers them.
        self._end_to_end = config.delivery.mode == "collector"
        self._collector_online = False
        self._watermark = 0  # every seq <= this is committed at the collector
        self._progress_at = time.monotonic()  # the watermark last moved (or nothing was owed)
        self.resent = 0
        # Counters.
        self.published = 0
        self.acked = 0
        self.rejected: dict[str, int] = {}
        self.store_errors: dict[str, int] = {}
        self.broker_state = "connecting"
        self.broker_since_ns = self.clock.wall_ns()
        self.broker_error: str | None = None
        self._stopping: str | None = None
        self._next_health = time.monotonic() + config.health_interval_s
        self.turns = 0

    # -- encoding ------------------------------------------------------------

    def _encode(self, event: Event, seq: int) -> tuple[str, bytes]:
        topic = f"{self.config.topic_root}/event/{event.device.id}"
        return topic, encode_event(event, seq, self.config.site, self.config.edge)

    def _status(self, state: str) -> bytes:
        return json.dumps({"state": state, "since": format_wall(self.started_wall_ns),
                           "version": __version__, "boot_id": self.clock.boot_id},
                          separators=(",", ":")).encode()

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self.store.lost is not None:
            # Without this, a collector-mode watermark would wait for them forever.
            self._announce_drops([self.store.lost], "store_replaced")
        # One scan before READY=1, so "ready" means the hardware was looked at.
        self._attached = tuple((d, classify(d)) for d in scan(self._sysfs))
        for dev in self.devices.values():
            dev.worker.start()
        self._discovery.start()
        self.link.start()

    def request_stop(self, reason: str = "stop requested") -> None:
        self.inbox.put(Stop(reason))

    def alive(self) -> bool:
        """For the watchdog: the main loop and the MQTT thread both still turn."""
        # The main loop turns at least once a second; allow for a slow fsync.
        limit = max(3.0, (self.notifier.watchdog_s or 0) / 2)
        return time.monotonic() - self.last_turn < limit and self.link.alive(limit)

    def _status_line(self) -> str:
        return (f"{self.store.depth - len(self._delivered)} queued, broker "
                f"{self.broker_state}, {sum(d.state == 'connected' for d in self.devices.values())}"
                f"/{len(self.devices)} devices")

    def _notify_status(self) -> None:
        last, at = self._status_sent
        # At most once a second; the line is only built when one may be sent.
        if not self.notifier.enabled or time.monotonic() - at < 1.0:
            return
        line = self._status_line()
        if line != last:
            self._status_sent = (line, time.monotonic())
            self.notifier.send(f"STATUS={line}")

    def run(self) -> None:
        """Run until a Stop message; then publish offline and close cleanly."""
        self.start()
        self.notifier.send("READY=1", f"STATUS={self._status_line()}")
        watchdog = Watchdog(self.notifier, self.alive)
        watchdog.start()
        try:
            while self._stopping is None:
                self.turn(self._timeout())
                self._notify_status()
        finally:
            self.notifier.send("STOPPING=1", f"STATUS=stopping: {self._stopping}")
            watchdog.stop()
            self._shutdown()
            self.notifier.close()

    def _flush_delivered(self) -> None:
        self.store.remove(self._delivered)
        self._delivered = []

    def _timeout(self) -> float:
        now = time.monotonic()
        wake = self._next_health
        if self._delivered:
            wake = min(wake, self._delivered_since + _REMOVE_DELAY_S)
        if self._retry_at is not None:
            wake = min(wake, self._retry_at)
        return max(0.0, min(wake - now, 1.0))

    def turn(self, timeout: float) -> None:
        """Handle everything that arrived (waiting up to `timeout` for the first)."""
        try:
            first = self.inbox.get(timeout=timeout)
        except queue.Empty:
            first = None
        batch: list[object] = [] if first is None else [first]
        while True:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        self.turns += 1
        self.last_turn = time.monotonic()
        reports: list[DeviceReport | TerminalRecord | ButtonPressed] = []
        acks: list[PubAck] = []
        for msg in batch:
            if isinstance(msg, DeviceReport | TerminalRecord | ButtonPressed):
                reports.append(msg)
            elif isinstance(msg, BadgeScanned):
                # In arrival order: presses before the scan keep the old operator.
                if reports:
                    self._ingest(reports)
                    reports = []
                self._on_badge(msg)
            elif isinstance(msg, PubAck):
                acks.append(msg)
            else:
                self._handle(msg)
        if reports:
            self._ingest(reports)
        if acks:
            self._on_pubacks(acks)
        now = time.monotonic()
        if self._delivered and (len(self._delivered) >= _REMOVE_BATCH
                                or now - self._delivered_since >= _REMOVE_DELAY_S):
            self._flush_delivered()
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
        self._check_resend(now)
        self._pump()
        self._check_clock()
        if now - self._roster_checked >= 1.0:
            self._roster_checked = now
            if self.operators.reload_roster():
                log.info("shift roster reloaded (%d shifts)", len(self.operators.shifts))
        if now >= self._next_health:
            self._next_health = now + self.config.health_interval_s
            self._publish_health()

    def _handle(self, msg: object) -> None:
        if isinstance(msg, DeviceState):
            self._on_device_state(msg)
        elif isinstance(msg, DecodeFailed):
            dev = self.devices.get(msg.device_id)
            if dev is not None:
                n = dev.decode_errors[msg.name] = dev.decode_errors.get(msg.name, 0) + 1
                # 1st, 2nd, 4th, 8th ...: a babbling device cannot flood the journal.
                if n & (n - 1) == 0:
                    log.warning("device %s: malformed report (%s), %d so far", msg.device_id,
                                msg.name, n)
        elif isinstance(msg, Connected):
            self._on_connected(msg)
        elif isinstance(msg, Disconnected):
            if self.broker_state != "disconnected" or self.broker_error != msg.reason:
                log.warning("broker: %s", msg.reason)
            self.broker_state = "disconnected"
            self.broker_error = msg.reason
            self.broker_since_ns = self.clock.wall_ns()
        elif isinstance(msg, Inbound):
            self._on_inbound(msg)
        elif isinstance(msg, Attached):
            self._attached = msg.devices
            self._publish_devices()
        elif isinstance(msg, StatusRequest):
            if msg.request.get("cmd") == "operator":
                if msg.request.get("logout") is True:
                    error = self._logout(msg.request.get("desk"))
                else:
                    error = self._cmd_operator(msg.request)
                msg.reply.put({"ok": error is None, "error": error})
            else:
                msg.reply.put(self.status())
        elif isinstance(msg, Stop):
            self._stopping = msg.reason

    # -- devices -> store ------------------------------------------------------

    def _on_device_state(self, msg: DeviceState) -> None:
        dev = self.devices.get(msg.device_id)
        if dev is None:
            return
        dev.state, dev.error = msg.state, msg.error
        if msg.info is not None:
            dev.info = msg.info
            dev.labels = button_labels(msg.info.layout, msg.info.buttons, dev.cfg.labels,
                                       dev.cfg.scores)
            dev.last_seen_ns = self.clock.wall_ns()
        log.info("device %s (desk %s): %s%s", dev.cfg.id, dev.cfg.desk, msg.state,
                 f" ({msg.error})" if msg.error else "")
        self._publish_devices()

    def _on_badge(self, msg: BadgeScanned) -> None:
        dev = self.devices.get(msg.device_id)
        if dev is None:
            return
        desk = dev.cfg.desk
        op = self.config.badges.get(msg.badge.upper())
        if not self.operators.badge(desk, op, msg.host_wall_ns):
            log.info("desk %s: operator %s logged out by badge", desk, op or "(unknown badge)")
            return
        if op is None:
            alarm = f"unknown badge scanned at desk {desk}"
            if alarm not in self.alarms:
                self.alarms.append(alarm)
            log.warning("desk %s: unknown badge (%d characters) scanned", desk, len(msg.badge))
        else:
            log.info("desk %s: operator %s logged in by badge", desk, op)

    def _operator(self, desk: str, at_wall_ns: int) -> OperatorTag:
        """Who was on duty at `desk` when the event happened (not when it is sent)."""
        return self.operators.who(desk, at_wall_ns)

    def _guard(self, desk: str, mono_ns: int, wall_ns: int, hold: bool) -> list[str] | None:
        """The guards' flags for a press, or None if it is to be dropped (counted)."""
        flags, drop = self.guards.press(desk, mono_ns, wall_ns, hold)
        if drop:
            self.store_errors["after_hours"] = self.store_errors.get("after_hours", 0) + 1
            return None
        return flags

    def _make_event(self, dev: _Device, r: DeviceReport) -> Event | None:
        rep = r.report
        age_ns = rep.age_ms * 1_000_000
        label, score = dev.labels[rep.button] if rep.button < len(dev.labels) else \
            (f"button-{rep.button}", None)
        guard = self._guard(dev.cfg.desk, r.host_mono_ns - age_ns, r.host_wall_ns - age_ns,
                            rep.type is ReportType.HOLD)
        if guard is None:
            return None
        flags: list[str] = list(guard)
        if rep.replay:
            flags.append("replayed")
        if rep.overflow:
            flags.append("device_overflow")
        return Event(
            event_id=new_event_id(),
            desk=dev.cfg.desk,
            device=DeviceRef(dev.cfg.id, "console", dev.cfg.serial),
            body=Press(button=rep.button, label=label, score=score,
                       hold=rep.type is ReportType.HOLD),
            operator=self._operator(dev.cfg.desk, r.host_wall_ns - age_ns),
            time=EventTime(wall_ns=r.host_wall_ns - age_ns, synced=self.clock.synced(),
                           boot_id=self.clock.boot_id, mono_ns=r.host_mono_ns - age_ns,
                           age_ms=rep.age_ms),
            flags=tuple(flags),
        )

    def _terminal_event(self, dev: _Device, r: TerminalRecord) -> Event:
        rec = r.record
        body: EventBody
        if isinstance(rec, TermAnswer):
            personal = self.config.survey.send_personal_data
            body = SurveyAnswer(record_id=rec.id, doctor=rec.doctor, q1=rec.q1, q2=rec.q2,
                                phone=rec.phone if personal else None,
                                comment=rec.comment if personal else None, lang=rec.lang)
        elif isinstance(rec, TermPresence):
            body = Presence(record_id=rec.id, approaches=rec.approaches, engaged=rec.engaged,
                            period_ms=rec.period_ms)
        else:
            assert isinstance(rec, TermAbandoned)  # noqa: S101 - the three record kinds
            body = Abandoned(record_id=rec.id, doctor=rec.doctor, step=rec.step)
        age_ns = rec.age_ms * 1_000_000
        return Event(
            event_id=new_event_id(), desk=dev.cfg.desk,
            device=DeviceRef(dev.cfg.id, "terminal", r.serial), body=body,
            operator=self._operator(dev.cfg.desk, r.host_wall_ns - age_ns),
            time=EventTime(wall_ns=r.host_wall_ns - age_ns, synced=self.clock.synced(),
                           boot_id=self.clock.boot_id, mono_ns=r.host_mono_ns - age_ns,
                           age_ms=rec.age_ms))

    def _button_event(self, dev: _Device, r: ButtonPressed) -> Event | None:
        # Keyboard-class buttons have no device clock: the press is when we read it.
        flags = self._guard(dev.cfg.desk, r.host_mono_ns, r.host_wall_ns, False)
        if flags is None:
            return None
        return Event(
            event_id=new_event_id(), desk=dev.cfg.desk,
            device=DeviceRef(dev.cfg.id, "keyboard", dev.cfg.serial),
            body=Press(button=r.press.usage, label=r.press.label, score=r.press.score),
            operator=self._operator(dev.cfg.desk, r.host_wall_ns),
            time=EventTime(wall_ns=r.host_wall_ns, synced=self.clock.synced(),
                           boot_id=self.clock.boot_id, mono_ns=r.host_mono_ns),
            flags=tuple(flags))

    def _ingest(self, reports: list[DeviceReport | TerminalRecord | ButtonPressed]) -> None:
        appends: list[Append] = []
        forget: list[str] = []
        # Per report, in order: (device, report, index into appends or None).
        plan: list[tuple[_Device, DeviceReport | TerminalRecord | ButtonPressed,
                         int | None]] = []
        for r in reports:
            dev = self.devices.get(r.device_id)
            if dev is None:
                continue
            dev.last_seen_ns = r.host_wall_ns
            if isinstance(r, ButtonPressed):
                event = self._button_event(dev, r)
                if event is not None:
                    appends.append(Append(event))
                    plan.append((dev, r, len(appends) - 1))
                continue
            if isinstance(r, TerminalRecord):
                # (terminal serial, record id) identifies a record for good.
                appends.append(Append(self._terminal_event(dev, r),
                                      (f"terminal:{r.serial}", str(r.record.id))))
                plan.append((dev, r, len(appends) - 1))
                continue
            _, host = dev.console()
            action = host.on_report(r.report, r.host_mono_ns)
            if r.lost_total is not None:
                self._count_device_loss(dev, r.lost_total)
            if isinstance(action, Duplicate):
                dev.duplicates += 1
                plan.append((dev, r, None))
            elif isinstance(action, NewSession):
                dev.resets += 1
                dev.lost_seen = 0
                log.info("device %s powered up (HELLO)", dev.cfg.id)
                forget.append(dev.source)
                appends.append(Append(None, (dev.source, action.key)))
                plan.append((dev, r, None))
            elif isinstance(action, Record):
                if action.new_session:
                    dev.resets += 1
                    forget.append(dev.source)
                event = self._make_event(dev, r)
                # A dropped press still records its key, so its replays are
                # recognised instead of being judged (and counted) again.
                appends.append(Append(event, (dev.source, action.key)))
                plan.append((dev, r, len(appends) - 1 if event is not None else None))
        try:
            result = self.store.commit(appends, forget, remove=self._delivered)
        except StoreError as e:
            name = "disk_full" if isinstance(e, StoreDiskFullError) else "write_failed"
            self.store_errors[name] = self.store_errors.get(name, 0) + 1
            log.error("store: %s; devices keep their events and will send them again", e)
            # The console hosts remembered keys that never reached the disk.
            for dev, _, _ in plan:
                if dev.host is not None:
                    dev.host = ConsoleHost(self.store.keys(dev.source))
            return
        self._delivered = []
        # Durable now: acknowledge and light the LEDs.
        last_seq: dict[str, int] = {}
        for dev, r, idx in plan:
            stored = idx is not None and result.seqs[idx] is not None
            if stored and idx is not None:
                self._remember(appends[idx].event)
            if idx is not None and not stored:
                dev.duplicates += 1
            if stored:
                dev.presses += 1
            if isinstance(r, ButtonPressed):
                continue  # nothing to acknowledge: these devices keep nothing
            if isinstance(r, TerminalRecord):
                assert isinstance(dev.worker, TerminalWorker)  # noqa: S101
                dev.worker.ack(r.frame_seq)
                continue
            worker, _ = dev.console()
            last_seq[dev.cfg.id] = r.report.seq
            if stored and r.report.type is ReportType.PRESS and self.config.led_ms > 0:
                worker.send(encode_show(r.report.button, ms=self.config.led_ms))
        for dev_id, seq in last_seq.items():
            self.devices[dev_id].console()[0].send(encode_ack(seq))
        if result.dropped:
            log.warning("store full: dropped %s", result.dropped)
            self._announce_drops(result.dropped, "store_full")

    def _announce_drops(self, ranges: list[tuple[int, int]], reason: str) -> None:
        """A `dropped` event per lost range: the collector's watermark can pass the
        gap, and the loss is on record centrally, not only in this Pi's counters."""
        now = EventTime(self.clock.wall_ns(), self.clock.synced(), self.clock.boot_id,
                        self.clock.mono_ns())
        ref = DeviceRef(self.config.edge, "edge", None)
        appends = [Append(Event(new_event_id(), self.config.edge, ref, Dropped(first, last, reason),
                                OperatorTag(None, "none"), now))
                   for first, last in ranges]
        try:
            self.store.commit(appends)
        except StoreError as e:
            log.error("store: could not record dropped range(s) %s: %s", ranges, e)

    def _remember(self, event: Event | None) -> None:
        if event is None:
            return
        body = event.body
        if isinstance(body, Press):
            what = f"{body.label}{' (held)' if body.hold else ''}"
        elif isinstance(body, SurveyAnswer):
            what = f"answer {body.q1} for {body.doctor}"  # never the phone or comment
        elif isinstance(body, Presence):
            what = f"presence {body.engaged}/{body.approaches}"
        elif isinstance(body, Abandoned):
            what = f"abandoned at {body.step}"
        else:
            what = event.kind
        self.recent.appendleft({"time": format_wall(event.time.wall_ns), "desk": event.desk,
                                "device": event.device.id, "what": what,
                                "operator": event.operator.id, "flags": list(event.flags)})

    def _count_device_loss(self, dev: _Device, lost_total: int) -> None:
        before = dev.lost_seen if dev.lost_seen is not None else 0
        if lost_total > before:
            n = lost_total - before
            self.store_errors["device_overflow"] = self.store_errors.get("device_overflow", 0) + n
            log.warning("device %s: its ring overflowed, %d presses lost", dev.cfg.id, n)
        dev.lost_seen = lost_total

    # -- time ---------------------------------------------------------------------

    def _check_clock(self) -> None:
        """Publish a timesync anchor when the clock becomes synchronised or steps."""
        synced = self.clock.synced()
        mono, wall = self.clock.mono_ns(), self.clock.wall_ns()
        offset = wall - mono
        seen, self._clock_seen = self._clock_seen, (synced, offset)
        if not synced:
            return
        if seen is None or not seen[0]:
            reason = "synchronised"
        elif abs(offset - seen[1]) > 1_000_000_000:
            # A step while synchronised (an NTP step, an operator's `date`).
            # seq and the publishing order never depend on the wall clock; the
            # new anchor lets the collector map monotonic times to wall times.
            reason = "stepped"
            log.warning("wall clock stepped by %.1f s", (offset - seen[1]) / 1e9)
        else:
            return
        self.anchor = (mono, wall)
        self._publish_anchor(reason)
        if reason == "synchronised":
            n = self.store.rewrite_pending(self._correct_time,
                                           skip=frozenset(self._inflight_seqs))
            self.corrected += n
            if n:
                log.info("clock synchronised: corrected the time of %d stored events", n)

    def _correct_time(self, payload: bytes) -> bytes | None:
        """An unsynchronised event of this boot, re-timed from the anchor."""
        assert self.anchor is not None  # noqa: S101 - only called with an anchor
        try:
            event = json.loads(payload)
            t = event["time"]
            if t["synced"] is not False or t["boot_id"] != self.clock.boot_id:
                return None
            mono, wall = self.anchor
            t["wall"] = format_wall(wall - (mono - int(t["mono_ns"])))
            t["synced"] = True
            event["flags"] = [*event["flags"], "time_corrected"]
        except (ValueError, KeyError, TypeError):
            return None
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()

    def _publish_anchor(self, reason: str) -> None:
        if self.anchor is None or not self.link.connected:
            return  # sent on the next connect
        mono, wall = self.anchor
        payload = {"boot_id": self.clock.boot_id, "mono_ns": mono, "wall": format_wall(wall),
                   "reason": reason}
        self._control_mids.add(self.link.publish(f"{self.config.topic_root}/timesync",
                                                 json.dumps(payload).encode()))

    # -- store -> broker ---------------------------------------------------------

    def _on_connected(self, msg: Connected) -> None:
        self.broker_state = "connected"
        self.broker_error = None
        self.broker_since_ns = self.clock.wall_ns()
        self._window = max(1, min(self.config.broker.window, msg.receive_maximum))
        log.info("broker %s:%d connected (window %d)", self.config.broker.host,
                 self.config.broker.port, self._window)
        # A broker restart loses non-persistent state: announce everything again.
        root = self.config.topic_root
        self._control_mids.add(self.link.publish(self._status_topic, self._status("online"),
                                                 retain=True))
        self._publish_devices()
        self._publish_anchor("connected")
        self.link.subscribe(f"{root}/cmd/+")
        if self._end_to_end:
            self.link.subscribe(COLLECTOR_STATE_TOPIC)
            self.link.subscribe(f"{root}/ack")

    def _pump(self) -> None:
        if not self.link.connected or self._retry_at is not None:
            return
        # After a refusal, one event at a time until the broker takes one
        # again: a later seq must not get in ahead of a refused earlier one.
        window = 1 if self._probing else self._window
        room = window - len(self._inflight)
        if self._end_to_end:
            if not self._collector_online:
                return  # nobody would commit them: keep buffering
            if self._cursor <= self._watermark:
                self._progress_at = time.monotonic()  # nothing owed until now
            # Bounded, so a slow collector's queue on the broker cannot overflow.
            room = min(room, self.config.delivery.max_unacked - (self._cursor - self._watermark))
        while room > 0:
            # Only after a rewind (a rejected PUBACK) can seqs above the cursor
            # be in flight or delivered already; normally nothing is skipped.
            skip: set[int] = set()
            if self._cursor < self._published_high:
                skip = {q for q in self._inflight_seqs if q > self._cursor}
                skip.update(q for q in self._delivered if q > self._cursor)
            batch = [p for p in self.store.pending(self._cursor, room + len(skip))
                     if p.seq not in skip][:room]
            if not batch:
                break
            for p in batch:
                mid = self.link.publish(p.topic, p.payload, qos=1, wake=False)
                self._inflight[mid] = p.seq
                self._inflight_seqs.add(p.seq)
                self._cursor = max(self._cursor, p.seq)
                self._published_high = max(self._published_high, p.seq)
                self.published += 1
            room -= len(batch)
            self.link.wake()

    def _on_pubacks(self, acks: list[PubAck]) -> None:
        done: list[int] = []
        for a in acks:
            if a.mid in self._control_mids:
                self._control_mids.discard(a.mid)
                continue
            seq = self._inflight.pop(a.mid, None)
            if seq is None:
                continue
            self._inflight_seqs.discard(seq)
            if a.ok:
                self.acked += 1
                if not self._end_to_end:
                    done.append(seq)  # end to end, only the watermark removes events
                self._reject_streak = 0
                self._probing = False
                continue
            # Refused (quota, not authorised, ...): keep it; retry from this
            # seq on, one at a time, after a back-off that grows per probe.
            self.rejected[a.reason] = self.rejected.get(a.reason, 0) + 1
            self._cursor = min(self._cursor, seq - 1)
            if self._retry_at is None:
                delay = _REJECT_RETRY_S[min(self._reject_streak, len(_REJECT_RETRY_S) - 1)]
                self._reject_streak += 1
                self._retry_at = time.monotonic() + delay
                log.warning("broker refused event seq %d: %s; retrying in %.0f s", seq,
                            a.reason, delay)
            self._probing = True
        if done:
            if not self._delivered:
                self._delivered_since = time.monotonic()
            self._delivered.extend(done)

    def _on_collector_state(self, payload: bytes) -> None:
        try:
            state = json.loads(payload).get("state")
        except (ValueError, AttributeError):
            state = None
        online = state == "online"
        if online != self._collector_online:
            log.info("collector %s: %s", "online" if online else "offline",
                     "publishing" if online else "buffering until it is back")
        self._collector_online = online
        self._progress_at = time.monotonic()

    def _on_watermark(self, payload: bytes) -> None:
        try:
            seq = json.loads(payload).get("seq")
        except (ValueError, AttributeError):
            seq = None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            log.warning("ignored a malformed ack watermark on %s/ack", self.config.topic_root)
            return
        if seq <= self._watermark:
            return  # an older collector instance's word, or a repeat
        self._watermark = seq
        self._progress_at = time.monotonic()
        self._cursor = max(self._cursor, seq)
        self.store.remove_through(seq)

    def _check_resend(self, now: float) -> None:
        """Sent events the collector has not acknowledged in time go out again."""
        owed = self._cursor > self._watermark  # the cursor never passes _published_high
        if not (self._end_to_end and self._collector_online and owed):
            return
        if now - self._progress_at < self.config.delivery.resend_after_s:
            return
        log.warning("collector acknowledged nothing above seq %d for %.0f s: sending again",
                    self._watermark, now - self._progress_at)
        self.resent += self._cursor - self._watermark
        self._cursor = self._watermark
        self._progress_at = now

    # -- commands ---------------------------------------------------------------

    def _on_inbound(self, msg: Inbound) -> None:
        root = self.config.topic_root
        if self._end_to_end and msg.topic == COLLECTOR_STATE_TOPIC:
            self._on_collector_state(msg.payload)
            return
        if self._end_to_end and msg.topic == f"{root}/ack":
            self._on_watermark(msg.payload)
            return
        if msg.retain:
            # A retained command would be replayed at every reconnect.
            log.warning("ignored retained command on %s", msg.topic)
            return
        prefix = f"{root}/cmd/"
        if not msg.topic.startswith(prefix):
            return
        name = msg.topic[len(prefix):]
        request_id: str | None = None
        error: str | None = None
        try:
            body = json.loads(msg.payload) if len(msg.payload) <= 65536 else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            error = "payload must be a JSON object of at most 64 KiB"
        else:
            rid = body.get("request_id")
            request_id = rid if isinstance(rid, str) and len(rid) <= 128 else None
            if request_id is None:
                error = "request_id must be a string of at most 128 characters"
            elif name == "doctors":
                error = self._cmd_doctors(body)
            elif name == "operator":
                error = self._cmd_operator(body)
            elif name != "ping":
                error = f"unknown command {name!r}; known: doctors, operator, ping"
        result = {"request_id": request_id, "ok": error is None, "error": error}
        self._control_mids.add(self.link.publish(f"{msg.topic}/result",
                                                 json.dumps(result).encode()))

    def _cmd_operator(self, body: dict[str, Any]) -> str | None:
        desk, op = body.get("desk"), body.get("operator", ...)
        if not isinstance(desk, str) or desk not in self.desks:
            return f"desk must be one of {', '.join(self.desks)}"
        if op is ... or not (op is None or (isinstance(op, str) and 1 <= len(op) <= 64)):
            return "operator must be an operator id of 1 to 64 characters, or null for nobody"
        self.operators.login(desk, op, "command", self.clock.wall_ns())
        log.info("desk %s: operator %s on duty by command", desk, op or "nobody")
        return None

    def _logout(self, desk: object) -> str | None:
        """End the desk's login: back to the roster or the config's operator."""
        if not isinstance(desk, str) or desk not in self.desks:
            return f"desk must be one of {', '.join(self.desks)}"
        ended = self.operators.logout(desk, self.clock.wall_ns())
        log.info("desk %s: %s logged out", desk, (ended.operator if ended else None) or "nobody")
        return None

    def _cmd_doctors(self, body: dict[str, Any]) -> str | None:
        try:
            rev, doctors = validate_doctors(body)
        except ValueError as e:
            return str(e)
        current = self._doctors_now
        if current is not None and rev <= current[0]:
            return f"rev {rev} is not newer than the current rev {current[0]}"
        self.doctors.update(rev, doctors)
        self._doctors_now = (rev, doctors)
        log.info("doctor list rev %d (%d doctors) from the doctors command", rev, len(doctors))
        for dev in self.devices.values():
            if isinstance(dev.worker, TerminalWorker):
                dev.worker.set_doctors((rev, doctors))
        return None

    # -- reporting ---------------------------------------------------------------

    def _device_list(self) -> list[dict[str, Any]]:
        out = []
        for dev in self.devices.values():
            out.append({
                "id": dev.cfg.id, "kind": dev.cfg.kind, "serial": dev.cfg.serial,
                "desk": dev.cfg.desk, "state": dev.state,
                "last_seen": format_wall(dev.last_seen_ns) if dev.last_seen_ns else None,
                "error": dev.error,
            })
        serials = {d.cfg.serial for d in self.devices.values() if d.cfg.serial}
        for usb, kind in self._attached:
            if kind is not None and usb.serial not in serials:
                # Plugged in but not configured: its identity, for the installer.
                out.append({
                    "id": f"usb-{usb.port_path}", "kind": kind, "serial": usb.serial,
                    "desk": None, "state": "unconfigured", "last_seen": None,
                    "error": None, "usb_id": usb.ident, "port_path": usb.port_path,
                })
        return out

    def _publish_devices(self) -> None:
        if not self.link.connected:
            return
        payload = json.dumps({"devices": self._device_list()}).encode()
        self._control_mids.add(self.link.publish(f"{self.config.topic_root}/devices", payload,
                                                 retain=True))

    def _drops(self) -> dict[str, int]:
        drops = dict(self.store.stats().drops)
        for k, v in self.store_errors.items():
            drops[k] = drops.get(k, 0) + v
        return drops

    def health(self) -> dict[str, Any]:
        st = self.store.stats(delivered=self._delivered)
        depth = st.depth
        free = self.store.disk_free()
        oldest = None if st.oldest_created_ms is None else \
            max(0.0, (self.clock.wall_ns() // 1_000_000 - st.oldest_created_ms) / 1000)
        return {
            "queue_depth": depth,
            "oldest_pending_age_s": oldest,
            "store_bytes": st.file_bytes,
            "disk_free_bytes": free,
            "drops": self._drops(),
            "decode_errors": {d.cfg.id: dict(d.decode_errors) for d in self.devices.values()
                              if d.decode_errors},
            "clock_synced": self.clock.synced(),
            "uptime_s": round(time.monotonic() - self._started_mono, 1),
            "alarms": list(self.alarms),
            "delivery": {"mode": self.config.delivery.mode,
                         "collector_online": self._collector_online if self._end_to_end
                         else None,
                         "watermark": self._watermark if self._end_to_end else None,
                         "resent": self.resent},
        }

    def _publish_health(self) -> None:
        if self.link.connected:
            self.link.publish(f"{self.config.topic_root}/health",
                              json.dumps(self.health()).encode(), qos=0)

    def status(self) -> dict[str, Any]:
        h = self.health()
        devices = self._device_list()
        for entry in devices:
            dev = self.devices.get(entry["id"])
            if dev is None:
                continue
            entry.update(presses=dev.presses, duplicates=dev.duplicates, resets=dev.resets,
                         decode_errors=dict(dev.decode_errors),
                         buttons=dev.info.buttons if dev.info else None)
        return {
            "running": True,
            "version": __version__,
            "pid": os.getpid(),
            "site": self.config.site,
            "edge": self.config.edge,
            "since": format_wall(self.started_wall_ns),
            "uptime_s": h["uptime_s"],
            "broker": {"host": self.config.broker.host, "port": self.config.broker.port,
                       "state": self.broker_state, "since": format_wall(self.broker_since_ns),
                       "error": self.broker_error, "window": self._window},
            "queue": {"depth": h["queue_depth"], "oldest_pending_age_s": h["oldest_pending_age_s"],
                      "in_flight": len(self._inflight), "store_bytes": h["store_bytes"],
                      "disk_free_bytes": h["disk_free_bytes"],
                      "last_seq": self.store.last_seq},
            "published": self.published,
            "delivered": self.acked,
            "delivery": h["delivery"],
            "rejected": dict(self.rejected),
            "drops": h["drops"],
            "devices": devices,
            "desks": self._desk_status(),
            "recent": list(self.recent),
            "clock": {"synced": h["clock_synced"], "boot_id": self.clock.boot_id,
                      "anchor": None if self.anchor is None else
                      {"mono_ns": self.anchor[0], "wall": format_wall(self.anchor[1])},
                      "corrected_events": self.corrected},
            "alarms": h["alarms"],
        }

    def _desk_status(self) -> list[dict[str, Any]]:
        now = self.clock.wall_ns()
        out = []
        for desk in self.desks:
            tag = self.operators.who(desk, now)
            since = self.operators.since(desk, now)
            out.append({"desk": desk, "operator": tag.id, "source": tag.source,
                        "since": format_wall(since) if since is not None else None})
        return out

    # -- shutdown ----------------------------------------------------------------

    def _shutdown(self) -> None:
        log.info("stopping: %s", self._stopping)
        for dev in self.devices.values():
            dev.worker.stop()
        self._discovery.stop()
        if self.link.connected:
            mid = self.link.publish(self._status_topic, self._status("offline"), retain=True)
            self._control_mids.add(mid)
            deadline = time.monotonic() + 3.0
            while mid in self._control_mids and time.monotonic() < deadline \
                    and self.link.connected:
                self.turn(0.1)
        self.link.stop()
        if self._delivered:
            self._flush_delivered()
        self.store.close()
        self.doctors.close()
        self.operators.close()

