"""MQTT intake: every message validated, stored once, acknowledged after commit.

Events come through the shared subscription
`$share/{group}/feedback/v1/+/+/event/+`, so several collector instances
split the load; status, devices, health and timesync are subscribed by every
instance (retained messages are not delivered on shared subscriptions, and
storing them twice is harmless).

paho runs with `manual_ack=True`: on_message only queues the message; the
main loop commits a batch in one transaction and only then sends the PUBACKs,
in arrival order.  A collector killed before its commit never acknowledged
the batch, and the broker delivers it again to the persistent session
(clean_start false, a week's session expiry) or to another instance.

A PUBACK names a message by its id, which means something only on the broker
connection the message came on.  A message still held (the database was down)
when the collector reconnects to the broker is stored but not acknowledged:
the broker sends it again under the same id if it kept the session (that copy
is acknowledged, the first would be a second PUBACK for it), and if it lost
the session, the id may by then name another message, not yet stored.

Payloads that are larger than `MAX_PAYLOAD_BYTES`, are not JSON, carry an
unknown schema version or fail the schema are stored in `quarantine` with the
reason and counted; they are acknowledged too (delivering them again would not
make them valid).  Reasons name the failing field and rule, never its value: a
value may be a phone number (an unknown schema version is named only when it
is a version, `feedback.event/N`).  Every number in the schemas has a range
within 64 bits, so what passes them fits the database's columns; every string
of a side message has a grammar or a length, every list and object a size.
Beyond the schema, `classify` refuses what the JSON Schema text cannot say or
Python's validator reads loosely: NaN and Infinity (not JSON), a string the
databases cannot hold (NUL, an unpaired surrogate), a time that is not a real
date ("2026-02-30") or outside the contract's range (`WALL_MIN_MS` ..
`WALL_MAX_MS`: the patterns bound the year, this the instant), a `dropped`
range whose end is below its start, a `device_lost` count above the device's
total, a trailing newline where a pattern ends in `$` (ECMA-262's `$`, the
schemas' dialect, does not match before one; Python's does), a side message's
topic whose site or edge is not a name.  `classify` never raises: whatever it
cannot read is quarantined.  A message the database still refuses is
quarantined by `store.ingest`; only a database outage holds up intake.  A
quarantined message creates no edge: its topic's site and edge may be
anything.

Every value from a message that the collector logs goes through
`collector.poison.printable` (escaped, one line, cut): no message can forge a
log line or drive a terminal, whatever a future schema lets through.

After each commit the instance publishes, retained, every watermark that
moved (`{root}/ack`: `{"collector", "seq"}`); a sweep every 2 s moves
watermarks past events committed by other instances.  The instance's
presence is `feedback/v1/collector/state` (retained, offline as the will);
when another instance's will marks the collectors offline while this one is
up, it says online again, so edges keep publishing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jsonschema_rs
import paho.mqtt.client as mqtt
from jsonschema import Draft202012Validator, ValidationError, validators
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from collector import store
from collector.config import CollectorConfig
from collector.db import Database, DatabaseError, EdgeKey
from collector.poison import field_path, printable
from collector.store import IngestResult, Item, wall_ms
from edge.contract import topics
from edge.contract.broker import set_credentials
from edge.contract.ids import NAME_RE, event_id_fault
from edge.contract.payloads import EVENT_SCHEMA, load_schema
from edge.contract.timefmt import WALL_MAX_MS, WALL_MIN_MS, format_wall

__all__ = ["MAX_PAYLOAD_BYTES", "BatchObserver", "Intake", "classify", "log_result"]

log = logging.getLogger(__name__)

_SIDE = frozenset(topics.SIDE_MESSAGES)
SESSION_EXPIRY_S = 7 * 24 * 3600
# The largest payload intake reads (any kind): an event is a few hundred bytes
# (a 500-character comment at most), a side message a few KiB; the inventory
# and health are stored whole.  Larger ones are quarantined before parsing.
MAX_PAYLOAD_BYTES = 256 * 1024
# An unknown schema version is named in the reason only if it is a version.
_VERSION = re.compile(r"feedback\.event/[0-9]{1,4}\Z")

@functools.lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    """A schema's pattern with ECMA-262's end: `$` does not match before a trailing
    newline there (Python's does, so "clinic-3\\n" would pass `^[a-z0-9-]{1,32}$`)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _pattern(validator: Any, pattern: str, instance: Any, _schema: Any
             ) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _regex(pattern).search(instance):
        yield ValidationError(f"does not match {pattern!r}")


_Validator = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {"pattern": _pattern})
_NAMES = ("event", *topics.SIDE_MESSAGES)
_VALIDATORS = {name: _Validator(load_schema(name)) for name in _NAMES}
# The same schemas compiled (Rust): 2 us an event where the reference
# validator takes 200.  It only answers "valid"; a reason is always worked out
# by the reference validator above, so reasons stay what they were.
_COMPILED = {name: jsonschema_rs.Draft202012Validator(load_schema(name)) for name in _NAMES}


def _why(name: str, body: Any) -> str | None:
    try:
        if _COMPILED[name].is_valid(body):
            return None
    except Exception:  # noqa: BLE001, S110 - what it cannot take (an unpaired
        pass           # surrogate, not UTF-8) the reference validator judges
    return _reference_why(name, body)


def _reference_why(name: str, body: Any) -> str | None:
    errors = sorted(_VALIDATORS[name].iter_errors(body), key=lambda e: list(e.path))
    if not errors:
        return None
    e = errors[0]
    return f"invalid: {field_path(e.absolute_path)} fails {e.validator}"


class _NotJsonError(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotJsonError(f"{name} is not JSON")


def _number(text: str) -> int | float:
    """A JSON number with a fraction or exponent: an integer if it is one (JSON
    Schema counts 5.0 as the integer 5), so what is stored is an int."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _loads(payload: bytes) -> Any:
    return json.loads(payload, parse_constant=_no_constant, parse_float=_number)


def _unstorable(body: Any, path: tuple[object, ...] = ()) -> str | None:
    """The path of the first string (key or value) no database can hold: NUL (not in
    PostgreSQL's text) or an unpaired surrogate (not UTF-8)."""
    if isinstance(body, str):
        return None if _storable(body) else field_path(path)
    if isinstance(body, dict):
        for k, v in body.items():
            if not _storable(k):
                return field_path(path)
            if (found := _unstorable(v, (*path, k))) is not None:
                return found
    elif isinstance(body, list):
        for i, v in enumerate(body):
            if (found := _unstorable(v, (*path, i))) is not None:
                return found
    return None


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check(kind: str, site: str, edge: str, body: Any) -> str | None:
    """Why a message is to be quarantined, or None."""
    if kind == "event":
        version = body.get("schema") if isinstance(body, dict) else None
        if version != EVENT_SCHEMA:
            # Never the value itself: it may be anything, a phone number too.
            shown = isinstance(version, str) and _VERSION.match(version)
            return "schema: unknown version" + (f" {version!r}" if shown else "")
    why = _why(kind, body)
    if why is not None:
        return why
    where = _unstorable(body)
    if where is not None:
        return f"invalid: {where} fails text"  # NUL or an unpaired surrogate
    if kind == "event":
        if (body["site"], body["edge"]) != (site, edge):
            return "topic: site/edge differ from the payload's"
        if (where := event_id_fault(body)) is not None:
            return f"invalid: {where} fails its grammar"
        if (why := _contradiction(body)) is not None:
            return why
    for where, wall in _times(kind, body):
        try:
            ms = wall_ms(wall)
        except ValueError:
            return f"invalid: {where} fails date-time"
        if not WALL_MIN_MS <= ms <= WALL_MAX_MS:
            return f"invalid: {where} fails range"
    if not (NAME_RE.match(site) and NAME_RE.match(edge)):
        return "topic: site/edge are not names"
    return None


def _times(kind: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, value) of every wall time in a schema-valid message."""
    if kind == "event":
        return [("time/wall", body["time"]["wall"])]
    if kind == "timesync":
        return [("wall", body["wall"])]
    if kind == "status":
        return [("since", body["since"])]
    if kind == "devices":
        return [(f"devices/{i}/last_seen", d["last_seen"])
                for i, d in enumerate(body["devices"]) if d["last_seen"] is not None]
    return []


def _contradiction(event: dict[str, Any]) -> str | None:
    """Why a schema-valid event contradicts itself, or None: a dropped range ending
    before it starts, a device's loss above its own total count."""
    kind = event["kind"]
    body = event[kind]
    if kind == "dropped" and body["to_seq"] < body["from_seq"]:
        return "invalid: dropped/to_seq fails >= from_seq"
    if kind == "device_lost" and body["lost"] > body["total"]:
        return "invalid: device_lost/lost fails <= total"
    return None


def classify(topic: str, payload: bytes) -> Item | None:
    """What a message is, validated; None for topics the collector does not store.

    Never raises: a payload it cannot read is a quarantine item.
    """
    split = topics.split_topic(topic)
    if split is None:
        return None
    site, edge, rest = split
    if rest[0] == "event" and len(rest) == 2:
        kind = "event"
    elif len(rest) == 1 and rest[0] in _SIDE:
        kind = rest[0]
    else:
        return None  # commands, results, acks: not intake's business
    if len(payload) > MAX_PAYLOAD_BYTES:
        return Item("quarantine", site, edge, topic=topic, raw=payload,
                    reason=f"size: payload over {MAX_PAYLOAD_BYTES} bytes")
    try:
        body = _loads(payload)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        return Item("quarantine", site, edge, topic=topic, raw=payload,
                    reason=f"json: {type(e).__name__}")
    try:
        why = _check(kind, site, edge, body)
    except Exception as e:  # noqa: BLE001 - a payload must never stop intake
        why = f"invalid: {type(e).__name__}"
    if why is not None:
        return Item("quarantine", site, edge, topic=topic, raw=payload, reason=why)
    return Item(kind, site, edge, body=body, topic=topic, raw=payload)


def log_result(res: IngestResult) -> None:
    """Log what a commit did that people should know of; every value from a
    message escaped (`printable`)."""
    if res.quarantined:
        log.warning("%d message(s) quarantined (see `feedback-collector quarantine`)",
                    res.quarantined)
    for site, edge, lo, hi, reason in res.dropped_ranges:
        log.warning("edge %s/%s dropped seq %d..%d (%s)", printable(site), printable(edge),
                    lo, hi, printable(reason))
    for site, edge, device, lost, reason in res.device_losses:
        log.warning("edge %s/%s: device %s lost %d event(s) (%s)", printable(site),
                    printable(edge), printable(device), lost, printable(reason))


@dataclass(slots=True)
class _Connected:
    pass


@dataclass(slots=True)
class _Delivery:
    """A message, and the broker connection (counted from 1) it came on."""

    msg: mqtt.MQTTMessage
    connection: int


class BatchObserver(Protocol):
    """Told of every committed batch, once per batch (collector/metrics.py counts)."""

    def batch(self, items: Sequence[Item], res: IngestResult, commit_s: float) -> None: ...


class Intake:
    def __init__(self, cfg: CollectorConfig, db: Database) -> None:
        self.cfg = cfg
        self.db = db
        # Metrics, when [metrics] is configured: called per batch, never per message.
        self.observer: BatchObserver | None = None
        self._commit_s = 0.0  # how long the last successful commit took
        self.inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.stop_event = threading.Event()
        # Duplicates and quarantined payloads are counted in the database;
        # failures to reach the database can only be counted here.
        self.db_errors = 0
        # Broker connections so far (the paho thread counts them, before it
        # delivers any message on the new one).
        self._connection = 0
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.broker.client_id,
                        protocol=MQTTProtocolVersion.MQTTv5, manual_ack=True)
        set_credentials(c, cfg.broker)
        c.will_set(topics.COLLECTOR_STATE_TOPIC, self._state("offline"), qos=1, retain=True)
        c.reconnect_delay_set(int(max(1, cfg.broker.reconnect_min_s)),
                              int(max(1, cfg.broker.reconnect_max_s)))
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        self._client = c

    def _state(self, state: str) -> bytes:
        return json.dumps({"state": state, "since": format_wall(time.time_ns()),
                           "collector": self.cfg.id}).encode()

    # -- paho thread: record and return ----------------------------------------------

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.warning("broker refused the connection: %s", rc)
            return
        self._connection += 1
        every = topics.ANY_ROOT
        c.subscribe([(topics.shared_events_filter(self.cfg.group), 1),
                     (topics.status_topic(every), 1), (topics.devices_topic(every), 1),
                     (topics.health_topic(every), 0), (topics.timesync_topic(every), 1),
                     (topics.COLLECTOR_STATE_TOPIC, 1)])
        c.publish(topics.COLLECTOR_STATE_TOPIC, self._state("online"), qos=1, retain=True)
        self.inbox.put(_Connected())

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not self.stop_event.is_set():
            log.warning("broker connection lost: %s", rc)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.inbox.put(_Delivery(msg, self._connection))

    # -- main loop ------------------------------------------------------------------

    def start(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self._client.connect_async(self.cfg.broker.host, self.cfg.broker.port,
                                   self.cfg.broker.keepalive_s, clean_start=False,
                                   properties=props)
        self._client.loop_start()

    def run(self) -> None:
        self.start()
        next_sweep = time.monotonic() + 2.0
        try:
            while not self.stop_event.is_set():
                batch = self._take(timeout=0.5)
                if batch:
                    self._process(batch)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + 2.0
                    self._sweep()
        finally:
            self.close()

    def _take(self, timeout: float) -> list[object]:
        try:
            batch = [self.inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < self.cfg.batch:
            try:
                batch.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        return batch

    def _process(self, batch: list[object]) -> None:
        deliveries = [d for d in batch if isinstance(d, _Delivery)]
        msgs = [d.msg for d in deliveries]
        if any(isinstance(m, _Connected) for m in batch):
            self._publish_watermarks(self._all_watermarks())
        items: list[Item] = []
        for m in msgs:
            try:
                topic = m.topic
            except UnicodeDecodeError:  # the broker checks topics are UTF-8; still
                # Escaped, not a constant: the topic is part of the quarantine's digest.
                escaped = m._topic.decode("utf-8", "backslashreplace")
                items.append(Item("quarantine", topic=f"(not UTF-8) {escaped}",
                                  raw=bytes(m.payload), reason="topic: not UTF-8"))
                continue
            if topic == topics.COLLECTOR_STATE_TOPIC:
                self._on_collector_state(bytes(m.payload))
                continue
            item = classify(topic, bytes(m.payload))
            if item is not None:
                items.append(item)
        res = self._commit(items) if items else IngestResult()
        if res is None:
            return  # stopping before the commit: unacknowledged, so delivered again
        if self.observer is not None and items:
            self.observer.batch(items, res, self._commit_s)
        self._ack(deliveries)
        log_result(res)
        self._publish_watermarks(res.watermarks)

    def _ack(self, deliveries: list[_Delivery]) -> None:
        """Acknowledge what came on the current broker connection (see the module's
        docstring for the rest)."""
        earlier = 0
        for d in deliveries:
            if d.msg.qos == 0:
                continue
            if d.connection != self._connection:
                earlier += 1
                continue
            self._client.ack(d.msg.mid, d.msg.qos)
        if earlier:
            log.info("%d message(s) from an earlier broker connection stored but not "
                     "acknowledged: the broker sends them again or has forgotten them",
                     earlier)

    def _commit(self, items: list[Item]) -> IngestResult | None:
        delay = 0.5
        while True:
            # Only the attempt that worked is timed: an outage's waits are not commits.
            started = time.perf_counter()
            try:
                res = store.ingest(self.db, items)
            except DatabaseError as e:
                self.db_errors += 1
                log.error("database: %s; the batch is not acknowledged, retrying in %.1f s "
                          "(%d database errors so far)", printable(str(e)), delay,
                          self.db_errors)
                if self.stop_event.wait(delay):
                    return None
                delay = min(delay * 2, 30.0)
            else:
                self._commit_s = time.perf_counter() - started
                return res

    def _sweep(self) -> None:
        try:
            self._publish_watermarks(store.sweep(self.db))
        except DatabaseError as e:
            self.db_errors += 1
            log.error("database: %s (%d database errors so far)", printable(str(e)),
                      self.db_errors)

    def _all_watermarks(self) -> dict[EdgeKey, int]:
        try:
            return store.watermarks(self.db)
        except DatabaseError as e:
            log.error("database: %s", printable(str(e)))
            return {}

    def _publish_watermarks(self, marks: dict[EdgeKey, int]) -> None:
        for (site, edge), seq in marks.items():
            if not (NAME_RE.match(site) and NAME_RE.match(edge)):
                continue  # a row from before quarantines stopped creating edges
            body = json.dumps({"collector": self.cfg.id, "seq": seq}).encode()
            self._client.publish(topics.ack_topic(topics.topic_root(site, edge)), body, qos=1,
                                 retain=True)

    def _on_collector_state(self, payload: bytes) -> None:
        try:
            state = json.loads(payload)
        except (ValueError, RecursionError):
            state = {}
        if isinstance(state, dict) and state.get("state") == "offline" \
                and not self.stop_event.is_set():
            # Another instance's will: this one is still here.
            self._client.publish(topics.COLLECTOR_STATE_TOPIC, self._state("online"), qos=1,
                                 retain=True)

    def close(self) -> None:
        info = self._client.publish(topics.COLLECTOR_STATE_TOPIC, self._state("offline"), qos=1,
                                    retain=True)
        with contextlib.suppress(RuntimeError):  # not connected: the will says offline
            info.wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()
