"""The daemon's main loop: devices -> durable store -> MQTT.

One thread owns all state: the store, the publisher, the device inventory
and every counter.  Device workers, paho's callbacks, the control socket and
signal handlers only post messages into `inbox`; the loop takes everything
that arrived since its last turn and handles it as one batch:

1. device readings are decided by their kinds (`edge.kinds`) and the new
   events stored in one transaction, fsync'ed in a thread (`edge.committer`);
2. only once that fsync is done (`Synced`) is each device acknowledged (ACK, LED);
3. PUBACKs and the collector's watermark release delivered events
   (`edge.publisher`);
4. the publisher fills its in-flight window from the store, in seq order.

Every timer runs on the injected clock's monotonic time.  Commands are
`edge.commands`, time sync `edge.timesync`, health and status
`edge.reporting`.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge import reporting
from edge.alarms import Alarms
from edge.clock import Clock, SystemClock
from edge.commands import Commands, ControlRequest, json_field, watermark
from edge.committer import Synced
from edge.conditions import Conditions
from edge.config import Config
from edge.contract import topics
from edge.discovery import Attached, DiscoveryWatcher, attached_now
from edge.doctors import DoctorList
from edge.events import Event, encode_event
from edge.guards import Guards
from edge.ingest import Intake, drop_event
from edge.kinds import KINDS
from edge.kinds.base import (
    Context,
    DecodeFailed,
    Device,
    DeviceAlarm,
    DeviceState,
    Env,
    Reading,
)
from edge.link_alarms import LinkAlarms
from edge.link_messages import Connected, Disconnected, Inbound, PubAck, Stable
from edge.logsafe import printable
from edge.mqtt import MqttLink
from edge.operators import Operators
from edge.publisher import Publisher
from edge.sdnotify import Notifier, Watchdog
from edge.store import Store
from edge.timesync import TimeSync

__all__ = ["Daemon", "Stop"]

log = logging.getLogger(__name__)

_MAX_TICK_S = 1.0  # the loop turns at least this often (roster reload, retries)


@dataclass(frozen=True, slots=True)
class Stop:
    reason: str


class Daemon:
    """Args: the config; `clock` (tests inject a ManualClock); `openers`, by
    kind name, replacing how that kind opens its transport (simulators);
    `rng` for the reconnect jitter; `sysfs`, the root USB discovery reads."""

    def __init__(self, config: Config, *, clock: Clock | None = None,
                 openers: Mapping[str, Callable[[Any], Any]] | None = None,
                 rng: random.Random | None = None, sysfs: Path = Path("/sys")) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.started_wall_ns = self.clock.wall_ns()
        self.started_s = self._now()
        self.root = config.topic_root
        self.alarms = Alarms()
        self._state_fault = functools.partial(self.alarms.report, self.clock.wall_ns)
        self.store = Store(config.store.path, self._encode, max_events=config.store.max_events,
                           max_bytes=config.store.max_bytes,
                           min_free_bytes=config.store.min_free_bytes,
                           drop_event=functools.partial(drop_event, self.clock, config.edge),
                           alarms=self.alarms, wall_ns=self.clock.wall_ns,
                           post_synced=self.inbox.put)
        self.link = MqttLink(config.broker, will=(topics.status_topic(self.root),
                                                  reporting.presence(self, "offline")),
                             post=self.inbox.put, rng=rng or random.Random())
        self.link_alarms = LinkAlarms(self.alarms, config.broker, self.clock.wall_ns,
                                      self.started_s)
        doctors = DoctorList(config.store.path.with_name("doctors.json"),
                             config.survey.doctors_file, on_fault=self._state_fault)
        self.desks = sorted({*config.desks, *(d.desk for d in config.devices)})
        self.operators = Operators(config.store.path.parent,
                                   {n: d.operator for n, d in config.desks.items()},
                                   max_login_s=config.max_login_s, on_fault=self._state_fault,
                                   clock=self.clock)
        self._roster_checked = 0.0
        self.ctx = Context(self.clock, self.operators, Guards(config.guards), self.alarms,
                           led_ms=config.led_ms,
                           send_personal_data=config.survey.send_personal_data,
                           badges=config.badges)
        self.devices: dict[str, Device] = {}
        self.commands = Commands(desks=self.desks, operators=self.operators, clock=self.clock,
                                 doctors=doctors, devices=self.devices.values,
                                 status=lambda: reporting.status(self))
        for d in config.devices:
            env = Env(self.inbox.put, self.clock, sysfs, self.store.keys,
                      lambda: self.commands.doctors_now, (openers or {}).get(d.kind))
            self.devices[d.id] = KINDS[d.kind].device(d, env)
        self._doctors = doctors
        self.timesync = TimeSync(self.clock, redo=self.ctx.rejudge, provisional=lambda: bool(
            config.guards.hours_days is not None or self.operators.shifts))
        self.publisher = Publisher(config.broker.window,
                                   collector_mode=config.delivery.mode == "collector",
                                   max_unacked=config.delivery.max_unacked,
                                   resend_after_s=config.delivery.resend_after_s,
                                   now=self.started_s)
        self._sysfs = sysfs
        self._discovery = DiscoveryWatcher(self.inbox.put, sysfs)
        self.attached = Attached(())
        self.notifier = Notifier()
        self.last_turn = self._now()
        self._status_sent = ("", 0.0)
        self.broker_state = "connecting"
        self.broker_since_ns = self.clock.wall_ns()
        self.broker_error: str | None = None
        self._offline_mid: int | None = None
        self._stopping: str | None = None
        self._next_health = self._now() + config.health_interval_s
        self.turns = 0
        # The last stored events for the status page, without personal data.
        self.recent = reporting.Recent()
        self.conditions = Conditions(self.alarms)
        self.intake = Intake(self.store, self.devices, self.ctx, self.recent, config.edge)

    def _now(self) -> float:
        """Monotonic seconds of the injected clock: every timer runs on it."""
        return self.clock.mono_ns() / 1e9

    def _encode(self, event: Event, seq: int) -> tuple[str, bytes]:
        return (topics.event_topic(self.root, event.device.id),
                encode_event(event, seq, self.config.site, self.config.edge))

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        # One scan before READY=1, so "ready" means the hardware was looked at.
        self.attached = attached_now(self._sysfs)
        for dev in self.devices.values():
            dev.start()
        self._discovery.start()
        self.link.start()

    def request_stop(self, reason: str = "stop requested") -> None:
        self.inbox.put(Stop(reason))

    def alive(self) -> bool:
        """For the watchdog: the main loop and the MQTT thread turn, no fsync hangs."""
        limit = max(3.0, (self.notifier.watchdog_s or 0) / 2)
        return (self._now() - self.last_turn < limit and self.link.alive(limit)
                and self.store.sync_stalled_s() < limit)

    def _notify_status(self) -> None:
        last, at = self._status_sent
        # At most once a second; the line is only built when one may be sent.
        if not self.notifier.enabled or self._now() - at < 1.0:
            return
        line = reporting.status_line(self)
        if line != last:
            self._status_sent = (line, self._now())
            self.notifier.send(f"STATUS={line}")

    def run(self) -> None:
        """Run until a Stop message; then publish offline and close cleanly."""
        self.start()
        self.notifier.send("READY=1", f"STATUS={reporting.status_line(self)}")
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

    def _timeout(self) -> float:
        wake = min(self._next_health, self.publisher.next_wake() or self._next_health)
        return max(0.0, min(wake - self._now(), _MAX_TICK_S))

    def turn(self, timeout: float) -> None:
        """Handle everything that arrived (waiting up to `timeout` for the first)."""
        try:
            batch: list[object] = [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            batch = []
        while True:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        self.turns += 1
        self.last_turn = now = self._now()
        # Device states first: a console's layout (its labels) arrives just
        # before the presses it replays on connect, often in the same batch.
        for msg in batch:
            if not isinstance(msg, Reading | PubAck):
                self._handle(msg)
        readings = [m for m in batch if isinstance(m, Reading)]
        if self.intake.ingest(readings, remove=self.publisher.delivered):
            self.publisher.delivered.clear()
        acks = [m for m in batch if isinstance(m, PubAck)]
        for a in acks:
            is_event = self.publisher.on_puback(a.mid, a.ok, a.reason, now)
            self.link_alarms.on_puback(a, is_event)
            if not is_event and a.mid == self._offline_mid:
                self._offline_mid = None
        self.store.retry(now)
        self.store.remove(self.publisher.take_delivered(now))
        self.publisher.tick(now)
        self.link_alarms.tick(now)
        self._pump()
        self._check_clock()
        if now - self._roster_checked >= 1.0:
            self._roster_checked = now
            if self.operators.reload_roster():
                log.info("shift roster reloaded (%d shifts)", len(self.operators.shifts))
            # Small state files that could not be written are tried again.
            self.operators.retry()
            self._doctors.retry()
            self.conditions.check(
                now, self.clock.wall_ns(), self.devices.values(), self.clock.synced(),
                collector_online=self.publisher.delivery_status()["collector_online"],
                oldest_pending_s=reporting.oldest_pending_s(self))
        if now >= self._next_health:
            self._next_health = now + self.config.health_interval_s
            if self.link.connected:
                self.link.publish(topics.health_topic(self.root),
                                  json.dumps(reporting.health(self)).encode(), qos=0)

    def _handle(self, msg: object) -> None:
        if isinstance(msg, DeviceState):
            dev = self.devices.get(msg.device_id)
            if dev is not None:
                dev.on_state(msg, self.clock.wall_ns())
                log.info("device %s (desk %s): %s%s", dev.cfg.id, dev.cfg.desk, msg.state,
                         f" ({msg.error})" if msg.error else "")
                self._publish_devices()
        elif isinstance(msg, Synced):
            self.intake.synced(msg)
        elif isinstance(msg, DecodeFailed):
            dev = self.devices.get(msg.device_id)
            if dev is not None:
                dev.count_decode_error(msg.name)
        elif isinstance(msg, DeviceAlarm):
            self.alarms.report(self.clock.wall_ns, msg.code, msg.device_id, msg.text)
        elif isinstance(msg, Connected):
            self.link_alarms.on_connected()
            self._on_connected(msg)
        elif isinstance(msg, Stable):
            self.link_alarms.on_stable()
        elif isinstance(msg, Disconnected):
            self.link_alarms.on_disconnected(msg, self._now())
            if self.broker_state != "disconnected" or self.broker_error != msg.reason:
                log.warning("broker: %s", msg.reason)
            self.broker_state = "disconnected"
            self.broker_error = msg.reason
            self.broker_since_ns = self.clock.wall_ns()
        elif isinstance(msg, Inbound):
            self._on_inbound(msg)
        elif isinstance(msg, Attached):
            self.attached = msg
            self._publish_devices()
        elif isinstance(msg, ControlRequest):
            msg.reply.put(self.commands.control(msg.request))
        elif isinstance(msg, Stop):
            self._stopping = msg.reason

    # -- time ---------------------------------------------------------------------

    def _check_clock(self) -> None:
        reason = self.timesync.observe()
        if reason is None:
            return
        self._publish_anchor(reason)
        if reason == "synchronised":
            assert self.timesync.anchor is not None  # noqa: S101 - set by observe()
            self.operators.retime(self.clock.boot_id, *self.timesync.anchor)
            n = self.store.rewrite_pending(self.timesync.correct,
                                           skip=frozenset(self.publisher.inflight_seqs))
            self.timesync.corrected += n
            if n:
                log.info("clock synchronised: corrected the time of %d stored events", n)

    def _publish_anchor(self, reason: str) -> None:
        payload = self.timesync.anchor_payload(reason)
        if payload is not None and self.link.connected:  # else sent on the next connect
            self.link.publish(topics.timesync_topic(self.root), payload)

    # -- store -> broker ---------------------------------------------------------

    def _on_connected(self, msg: Connected) -> None:
        self.broker_state = "connected"
        self.broker_error = None
        self.broker_since_ns = self.clock.wall_ns()
        self.publisher.connected(msg.receive_maximum)
        log.info("broker %s:%d connected (window %d)", self.config.broker.host,
                 self.config.broker.port, self.publisher.window)
        # A broker restart loses non-persistent state: announce everything again.
        self.link.publish(topics.status_topic(self.root), reporting.presence(self, "online"),
                          retain=True)
        self._publish_devices()
        self._publish_anchor("connected")
        self.link.subscribe(topics.cmd_topic(self.root, "+"))
        if self.publisher.collector_mode:
            self.link.subscribe(topics.COLLECTOR_STATE_TOPIC)
            self.link.subscribe(topics.ack_topic(self.root))

    def _pump(self) -> None:
        if not self.link.connected:
            return
        now = self._now()
        while (want := self.publisher.wants(now)) is not None:
            batch = self.timesync.hold([p for p in self.store.pending(
                want.after, want.room + len(want.skip)) if p.seq not in want.skip][:want.room])
            if not batch:
                break
            for p in batch:
                self.publisher.sent(self.link.publish(p.topic, p.payload, qos=1, wake=False),
                                    p.seq)
            self.link.wake()

    def _on_inbound(self, msg: Inbound) -> None:
        now = self._now()
        if self.publisher.collector_mode and msg.topic == topics.COLLECTOR_STATE_TOPIC:
            self.publisher.on_collector_state(json_field(msg.payload, "state") == "online", now)
            return
        if self.publisher.collector_mode and msg.topic == topics.ack_topic(self.root):
            seq = watermark(msg.payload)
            if seq is None:
                log.warning("ignored a malformed ack watermark on %s", msg.topic)
                self.commands.count_refused("ack")
            elif self.publisher.on_watermark(seq, now):
                self.store.remove_through(seq)
            return
        if msg.retain:
            # A retained command would be replayed at every reconnect.
            log.warning("ignored retained command on %s", printable(msg.topic))
            self.commands.count_refused("retained")
            return
        name = topics.cmd_name(self.root, msg.topic)
        if name is not None:
            result = self.commands.mqtt(name, msg.payload)
            self.link.publish(topics.result_topic(msg.topic), json.dumps(result).encode())

    def _publish_devices(self) -> None:
        if self.link.connected:
            payload = json.dumps({"devices": reporting.device_list(self)}).encode()
            self.link.publish(topics.devices_topic(self.root), payload, retain=True)

    # -- shutdown ----------------------------------------------------------------

    def _shutdown(self) -> None:
        log.info("stopping: %s", self._stopping)
        for dev in self.devices.values():
            dev.stop()
        self._discovery.stop()
        if self.link.connected:
            self._offline_mid = self.link.publish(topics.status_topic(self.root),
                                                  reporting.presence(self, "offline"), retain=True)
            # Up to 3 s of turns for its PUBACK: counted, not timed, so an
            # injected clock that stands still cannot hold the shutdown.
            for _ in range(30):
                if self._offline_mid is None or not self.link.connected:
                    break
                self.turn(0.1)
        self.link.stop()
        self.store.remove(self.publisher.take_delivered(self._now(), force=True))
        self.store.close()
        self._doctors.close()
        self.operators.close()
