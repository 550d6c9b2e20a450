"""What the daemon records, and its wire form on the `event` topic.

Events are immutable.  A device driver produces an `Event` without a sequence
number; the store gives it the next per-edge `seq` in the same transaction that
makes it durable, and the payload published to MQTT is `encode_event(event,
seq, ...)`, byte for byte what ../shared/mqtt-contract.md describes and what
`edge/contract/schemas/event.schema.json` validates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

import uuid6

from edge.contract.payloads import EVENT_SCHEMA
from edge.contract.timefmt import format_wall

__all__ = [
    "Abandoned",
    "DeviceLost",
    "DeviceRef",
    "Dropped",
    "Event",
    "EventBody",
    "EventTime",
    "OperatorTag",
    "Presence",
    "Press",
    "SurveyAnswer",
    "encode_event",
    "event_payload",
    "new_event_id",
]

OPERATOR_SOURCES: Final = frozenset({"badge", "command", "schedule", "config", "none"})


def new_event_id() -> str:
    """A UUIDv7: time-ordered, so ids sort roughly by creation."""
    return str(uuid6.uuid7())


@dataclass(frozen=True, slots=True)
class DeviceRef:
    id: str
    kind: str
    serial: str | None


@dataclass(frozen=True, slots=True)
class OperatorTag:
    """Who was on duty at the desk when the event happened, and how we know."""

    id: str | None
    source: str

    @classmethod
    def nobody(cls) -> OperatorTag:
        return cls(None, "none")


@dataclass(frozen=True, slots=True)
class EventTime:
    """When the event happened, in both clocks, and how far we trust it.

    `wall_ns` and `mono_ns` already have `age_ms` taken off: they are the
    moment of the press, not of its arrival.
    """

    wall_ns: int
    synced: bool
    boot_id: str
    mono_ns: int
    age_ms: int = 0


@dataclass(frozen=True, slots=True)
class Press:
    kind: str = field(default="press", init=False, repr=False)
    button: int = 0
    label: str = ""
    score: int | None = None
    hold: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"button": self.button, "label": self.label, "score": self.score,
                "hold": self.hold}

    def summary(self) -> str:
        """One line for the status page (no personal data)."""
        return f"{self.label}{' (held)' if self.hold else ''}"


@dataclass(frozen=True, slots=True)
class SurveyAnswer:
    """A patient's answers at a survey terminal.  phone and comment are personal data."""

    kind: str = field(default="answer", init=False, repr=False)
    record_id: int = 0
    doctor: str = ""
    q1: str = ""
    q2: str | None = None
    phone: str | None = field(default=None, repr=False)
    comment: str | None = field(default=None, repr=False)
    lang: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"record_id": self.record_id, "doctor": self.doctor, "q1": self.q1,
                "q2": self.q2, "phone": self.phone, "comment": self.comment, "lang": self.lang}

    def summary(self) -> str:
        return f"answer {self.q1} for {self.doctor}"  # never the phone or comment


@dataclass(frozen=True, slots=True)
class Presence:
    """People counted near a terminal over a period (the answer rate's base)."""

    kind: str = field(default="presence", init=False, repr=False)
    record_id: int = 0
    approaches: int = 0
    engaged: int = 0
    period_ms: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"record_id": self.record_id, "approaches": self.approaches,
                "engaged": self.engaged, "period_ms": self.period_ms}

    def summary(self) -> str:
        return f"presence {self.engaged}/{self.approaches}"


@dataclass(frozen=True, slots=True)
class Abandoned:
    """Someone started the survey and walked away at `step`."""

    kind: str = field(default="abandoned", init=False, repr=False)
    record_id: int = 0
    doctor: str | None = None
    step: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"record_id": self.record_id, "doctor": self.doctor, "step": self.step}

    def summary(self) -> str:
        return f"abandoned at {self.step}"


@dataclass(frozen=True, slots=True)
class Dropped:
    """The edge itself lost events (its store was full)."""

    kind: str = field(default="dropped", init=False, repr=False)
    from_seq: int = 0
    to_seq: int = 0
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"from_seq": self.from_seq, "to_seq": self.to_seq, "reason": self.reason}

    def summary(self) -> str:
        return f"dropped seq {self.from_seq}-{self.to_seq} ({self.reason})"


@dataclass(frozen=True, slots=True)
class DeviceLost:
    """A device lost events before the edge could store them (a console's ring
    overflowed, a terminal's flash was full): `lost` newly, `total` by its own count."""

    kind: str = field(default="device_lost", init=False, repr=False)
    lost: int = 0
    total: int = 0
    reason: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"lost": self.lost, "total": self.total, "reason": self.reason}

    def summary(self) -> str:
        return f"device lost {self.lost} ({self.reason})"


EventBody = Press | SurveyAnswer | Presence | Abandoned | Dropped | DeviceLost


@dataclass(frozen=True, slots=True)
class Event:
    event_id: str
    desk: str
    device: DeviceRef
    body: EventBody
    operator: OperatorTag
    time: EventTime
    flags: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.body.kind


def event_payload(event: Event, seq: int, site: str, edge: str) -> dict[str, Any]:
    t = event.time
    return {
        "schema": EVENT_SCHEMA,
        "event_id": event.event_id,
        "seq": seq,
        "site": site,
        "edge": edge,
        "desk": event.desk,
        "device": {"id": event.device.id, "kind": event.device.kind,
                   "serial": event.device.serial},
        "kind": event.kind,
        event.kind: event.body.as_json(),
        "operator": {"id": event.operator.id, "source": event.operator.source},
        "time": {"wall": format_wall(t.wall_ns), "synced": t.synced, "boot_id": t.boot_id,
                 "mono_ns": t.mono_ns, "age_ms": t.age_ms},
        "flags": list(event.flags),
    }


def encode_event(event: Event, seq: int, site: str, edge: str) -> bytes:
    return json.dumps(event_payload(event, seq, site, edge), separators=(",", ":"),
                      ensure_ascii=False).encode()
