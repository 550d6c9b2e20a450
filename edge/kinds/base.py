"""What every device kind provides, and what the daemon offers it.

A kind (console, terminal, keyboard, badge) is one module in `edge/kinds/`:
its config dataclass and parser, its worker thread, and how its readings
become events and acknowledgements.  The daemon calls kinds only through
`Device` and `Kind` here and never asks which kind a device is.

Flow of one reading (all on the daemon's main loop except the worker)::

    worker thread --Reading--> main loop: Device.decide(reading, ctx) -> Decision
    every Decision's appends are committed in one transaction (group commit)
    then Device.committed(...) acknowledges what is durable (ACK, LED ...)
    or, if the commit failed, Device.commit_failed() forgets what it assumed.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from edge.clock import Clock
from edge.events import DeviceLost, EventTime, OperatorTag
from edge.store import Append

if TYPE_CHECKING:
    from drivers.usb_discovery import UsbDevice
    from drivers.usb_match import Matcher
    from edge.alarms import Alarms
    from edge.contract.toml import Table
    from edge.guards import Guards
    from edge.kinds.worker import Worker
    from edge.operators import Operators

__all__ = [
    "LOSS_ALARM_S",
    "Context",
    "Decision",
    "DecodeFailed",
    "Device",
    "DeviceAlarm",
    "DeviceConfig",
    "DeviceState",
    "Doctors",
    "Env",
    "Kind",
    "Reading",
]

log = logging.getLogger(__name__)

# A device's own loss is news for an hour (its alarm); the device_lost record stays.
LOSS_ALARM_S: Final = 3600.0
_LOSS_WHY: Final = {
    "ring_overflow": "its ring overflowed while they could not be read",
    "power_loss": "it lost power before they were stored",
    "flash_full": "its flash was full",
}

# (rev, doctors) as the `doctors` command and doctors_file give it.
Doctors = tuple[int, list[dict[str, Any]]]


@dataclass(frozen=True, slots=True)
class DeviceConfig:
    """The fields every `[[devices]]` table has; each kind subclasses it."""

    id: str
    kind: str
    desk: str
    serial: str | None

    def udev_match(self) -> str | None:
        """udev ATTRS matching this device for the site's rules, or None when the
        static rules in systemd/ already cover it (our own VID:PIDs)."""
        return None


# -- messages from workers to the main loop ----------------------------------------


@dataclass(frozen=True, slots=True)
class Reading:
    """One decoded input of a device, for its `Device.decide` on the main loop.

    `data` is the kind's own type; the host times are when the worker read it
    (CLOCK_BOOTTIME ns and UTC ns).
    """

    device_id: str
    data: object
    host_mono_ns: int
    host_wall_ns: int


@dataclass(frozen=True, slots=True)
class DecodeFailed:
    """A malformed report or frame, counted per device under `name`."""

    device_id: str
    name: str


@dataclass(frozen=True, slots=True)
class DeviceAlarm:
    """A worker's alarm about its device: raise `code` with `text` (no personal
    data), or clear it (text None); the device id is the alarm's subject."""

    device_id: str
    code: str
    text: str | None


@dataclass(frozen=True, slots=True)
class DeviceState:
    """connected | missing | error, with the reason and the kind's own details."""

    device_id: str
    state: str
    error: str | None
    details: object = None


# -- what the daemon offers a kind while deciding ------------------------------------


class Context:
    """Tagging and counting, shared by every device: who was on duty, the
    guards, the event's time, counters of events discarded on purpose or lost
    by a device, and alarms."""

    def __init__(self, clock: Clock, operators: Operators, guards: Guards,
                 alarms: Alarms, *, led_ms: int, send_personal_data: bool,
                 badges: dict[str, str]) -> None:
        self.clock = clock
        self.operators = operators
        self.guards = guards
        self.alarms = alarms
        self.led_ms = led_ms
        self.send_personal_data = send_personal_data
        self.badges = badges
        # Events not stored on purpose (after_hours) or lost on a device
        # (device_overflow), by reason: reported under `drops` in health.
        self.discarded: dict[str, int] = {}

    def operator(self, desk: str, at_wall_ns: int) -> OperatorTag:
        """Who was on duty at `desk` when the event happened (not when it is sent)."""
        return self.operators.who(desk, at_wall_ns)

    def guard(self, desk: str, mono_ns: int, wall_ns: int, hold: bool) -> tuple[str, ...] | None:
        """The guards' flags for a press, or None if it is to be dropped (counted)."""
        flags, drop = self.guards.press(desk, mono_ns, wall_ns, hold, self.clock.synced())
        if drop:
            self.count("after_hours")
            return None
        return tuple(flags)

    def rejudge(self, event: dict[str, Any], wall_ns: int) -> None:
        """Decisions taken on an unsynchronised clock, taken again on the corrected
        time `wall_ns` (edge.timesync): a press's `after_hours` flag, and the
        operator where the roster or the config decided (a login is its own record)."""
        if event.get("kind") == "press":
            event["flags"] = self.guards.rejudge(list(event["flags"]), wall_ns)
        operator = event.get("operator")
        if isinstance(operator, dict) and operator.get("source") in ("schedule", "config",
                                                                     "none"):
            tag = self.operators.who(str(event["desk"]), wall_ns)
            if tag.source in ("schedule", "config", "none"):
                event["operator"] = {"id": tag.id, "source": tag.source}

    def event_time(self, mono_ns: int, wall_ns: int, age_ms: int = 0) -> EventTime:
        return EventTime(wall_ns=wall_ns, synced=self.clock.synced(),
                         boot_id=self.clock.boot_id, mono_ns=mono_ns, age_ms=age_ms)

    def count(self, name: str, n: int = 1) -> None:
        self.discarded[name] = self.discarded.get(name, 0) + n

    def lost_on_device(self, cfg: DeviceConfig, outcomes: Sequence[tuple[Decision,
                                                                          Sequence[bool]]]) -> None:
        """Count and alarm the device_lost records of a committed batch, once each:
        only records that were stored (not known before, not in a failed commit)."""
        for decision, stored in outcomes:
            for a, ok in zip(decision.appends, stored, strict=True):
                body = a.event.body if ok and a.event is not None else None
                if not isinstance(body, DeviceLost):
                    continue
                why = _LOSS_WHY.get(body.reason, body.reason)
                self.count("device_power_loss" if body.reason == "power_loss"
                           else "device_overflow", body.lost)
                self.alarm("device_lost", f"{cfg.kind} {cfg.id} at desk {cfg.desk} lost "
                           f"{body.lost} events: {why}", subject=cfg.id, for_s=LOSS_ALARM_S)
                log.warning("device %s: %d events lost (%s)", cfg.id, body.lost, body.reason)

    def alarm(self, code: str, text: str, *, subject: str = "",
              for_s: float | None = None) -> None:
        """Raise alarm `code` (edge.alarms); the text must hold no personal data."""
        self.alarms.raise_(code, text, self.clock.wall_ns(), subject=subject, for_s=for_s)

    def clear_alarm(self, code: str, subject: str) -> None:
        """The condition behind alarm `code` about `subject` is over."""
        self.alarms.clear(code, subject)


@dataclass(slots=True)
class Decision:
    """What one reading means: events (and dedup keys) to store, scopes whose
    keys to forget (a device restarted), whether it was a known duplicate, and
    a token the kind gets back in `committed`."""

    appends: list[Append] = field(default_factory=list)
    forget: tuple[str, ...] = ()
    duplicate: bool = False
    token: object = None


@dataclass(frozen=True, slots=True)
class Env:
    """What a device needs to be built: where to post readings, the clock, the
    sysfs root, the dedup keys already stored for a scope, the doctor list
    (for terminals), and an optional opener replacing how the kind opens its
    transport (tests, simulators)."""

    post: Callable[[object], None]
    clock: Clock
    sysfs: Path
    stored_keys: Callable[[str], list[str]]
    doctors: Callable[[], Doctors | None]
    opener: Callable[[Any], Any] | None = None


class Device(ABC):
    """One configured device at run time: its worker, state and counters."""

    def __init__(self, cfg: DeviceConfig, worker: Worker[Any]) -> None:
        self.cfg = cfg
        self.worker = worker
        self.state = "missing"
        self.error: str | None = None
        self.last_seen_ns: int | None = None
        self.decode_errors: dict[str, int] = {}
        self.stored = 0  # events of this device made durable
        self.duplicates = 0
        self.resets = 0

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def count_decode_error(self, name: str) -> None:
        """A malformed report or frame, counted by the decoder's name for it."""
        n = self.decode_errors[name] = self.decode_errors.get(name, 0) + 1
        # 1st, 2nd, 4th, 8th ...: a babbling device cannot flood the journal.
        if n & (n - 1) == 0:
            log.warning("device %s: malformed report (%s), %d so far", self.cfg.id, name, n)

    def on_state(self, msg: DeviceState, wall_ns: int) -> None:
        """The worker's word on the device (connected, missing, error)."""
        del wall_ns
        self.state, self.error = msg.state, msg.error

    @abstractmethod
    def decide(self, r: Reading, ctx: Context) -> Decision:
        """What the reading means; called in arrival order, before the commit."""

    def committed(self, outcomes: Sequence[tuple[Decision, Sequence[bool]]],
                  ctx: Context) -> None:
        """This batch's decisions are durable; per append, whether it was stored
        (False: the store already had its key).  Acknowledge to the device."""
        del outcomes, ctx

    def commit_failed(self) -> None:
        """The batch did not reach the disk: forget what `decide` assumed stored."""
        return

    def on_doctors(self, doctors: Doctors) -> None:
        """A newer doctor list arrived (the `doctors` command)."""
        del doctors

    def details(self) -> dict[str, Any]:
        """Kind-specific fields for `status` (e.g. a console's buttons)."""
        return {"buttons": None}

    def serial(self) -> str | None:
        """The serial for `status` and the `devices` topic: what the device
        itself reported where its kind learns it (a terminal's HELLO), else
        the config's."""
        return self.cfg.serial


@dataclass(frozen=True, slots=True)
class Kind:
    """A device kind as the config, the daemon and `feedback-edge devices` see it.

    `parse(table, index, desk)` reads one `[[devices]]` table (kind and desk
    already read) and raises ConfigError; `device(cfg, env)` builds the
    run-time `Device`; `snippet(usb)` is the config block for hardware of
    this kind that is plugged in but not configured; `matcher` is the
    driver's USB matcher (None: found as another kind, e.g. badge readers
    look like keyboards); `rank` orders kinds in messages and matching
    (our own VID:PIDs before device classes).
    """

    name: str
    parse: Callable[[Table, int, str], DeviceConfig]
    device: Callable[[Any, Env], Device]
    snippet: Callable[[UsbDevice], list[str]] | None = None
    matcher: Matcher | None = None
    rank: int = 100
