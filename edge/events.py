"""What the daemon records, and its wire form on the `event` topic.

Events are immutable.  A device driver produces an `Event` without a sequence
number; the store gives it the next per-edge `seq` in the same transaction that
makes it durable, and the payload published to MQTT is `encode_event(event,
seq, ...)`, byte for byte what ../shared/mqtt-contract.md describes and what
`edge/contract/schemas/event.schema.json` validates.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from json.encoder import encode_basestring as _s
from typing import Any, Final

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


class _Uuid7:
    """UUIDv7 (RFC 9562): 48 bits of Unix ms, version 7, then 74 bits that are
    random for each new millisecond and, within one, count on from the last id
    by a random step (section 6.2, method 2, "monotonic random"), so the ids of
    one process strictly increase and stay unguessable.  A clock that steps
    back counts on from the last id too; a counter that would overflow
    borrows the next millisecond (section 6.2's rollover handling).

    The random bits are os.urandom's, read 4 KiB at a time: one syscall per
    about 280 ids instead of one per id (6% of the daemon's time per event).
    A forked child drops the parent's block and state, so no two processes
    hand out the same bits.
    """

    _BLOCK: Final = 4096

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._buf = b""
        self._pos = 0
        self._ms = -1
        self._rand = 0

    def _random(self, nbytes: int) -> int:
        """`nbytes` fresh random bytes as an int (the caller holds the lock)."""
        if self._pos + nbytes > len(self._buf):
            self._buf, self._pos = os.urandom(self._BLOCK), 0
        pos = self._pos
        self._pos = pos + nbytes
        return int.from_bytes(self._buf[pos:pos + nbytes])

    def next(self, now_ns: int) -> str:
        """The next id, timed `now_ns` (Unix ns); canonical 8-4-4-4-12 lowercase hex."""
        ms = now_ns // 1_000_000
        with self._lock:
            if ms > self._ms:
                self._ms, self._rand = ms, self._random(10) >> 6
            else:
                self._rand += 1 + self._random(4)
                if self._rand >> 74:
                    self._ms, self._rand = self._ms + 1, self._random(10) >> 6
            ms, rand = self._ms, self._rand
        value = ((ms & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76 | (rand >> 62) << 64
                 | 0b10 << 62 | rand & 0x3FFF_FFFF_FFFF_FFFF)
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_UUID7: Final = _Uuid7()


def new_event_id() -> str:
    """A UUIDv7: time-ordered, so ids sort by creation (strictly, within a process)."""
    return _UUID7.next(time.time_ns())


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


# What json.dumps(..., separators=(",", ":"), ensure_ascii=False) makes of
# anything the fast path below does not write itself.
_JSON: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_SCHEMA: Final = _s(EVENT_SCHEMA)


def _value(v: object) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if type(v) is str:
        return _s(v)
    if type(v) is int:
        return int.__repr__(v)
    return _JSON(v)


def _object(d: dict[str, Any]) -> str:
    return "{" + ",".join([f"{_s(k)}:{_value(v)}" for k, v in d.items()]) + "}"


def encode_event(event: Event, seq: int, site: str, edge: str) -> bytes:
    """`event_payload` as compact JSON, UTF-8, byte for byte what
    json.dumps(separators=(",", ":"), ensure_ascii=False) makes of it.

    Written out field by field with json's own string escaper (its C
    version): building the dict and walking it in json.dumps took twice as
    long, on every event.  tests/test_events_fast.py compares the two.
    """
    t = event.time
    d = event.device
    o = event.operator
    kind = _s(event.kind)
    return (f'{{"schema":{_SCHEMA},"event_id":{_s(event.event_id)},"seq":{_value(seq)},'
            f'"site":{_s(site)},"edge":{_s(edge)},"desk":{_s(event.desk)},'
            f'"device":{{"id":{_s(d.id)},"kind":{_s(d.kind)},"serial":{_value(d.serial)}}},'
            f'"kind":{kind},{kind}:{_object(event.body.as_json())},'
            f'"operator":{{"id":{_value(o.id)},"source":{_s(o.source)}}},'
            f'"time":{{"wall":{_s(format_wall(t.wall_ns))},"synced":{_value(t.synced)},'
            f'"boot_id":{_s(t.boot_id)},"mono_ns":{_value(t.mono_ns)},'
            f'"age_ms":{_value(t.age_ms)}}},'
            f'"flags":[{",".join([_value(f) for f in event.flags])}]}}').encode()
