"""Survey terminal ST-3000 (USB CDC-ACM or RS-232, 115200 8N1): protocol core.

Pure code, no I/O: bytes in, frames and host decisions out.  The serial
transport is `drivers.serial_transport`.  Spec: shared/devices/terminal-serial.md.
USB identity (CDC-ACM units): `VID`:`PID` (`USB_MATCHER`); RS-232 units
behind a USB-UART adapter are configured by port instead.

On the wire every frame is COBS(body) followed by one 0x00::

    body (little-endian):
    +-------+--------+----------+----------+------------------+----------+
    | ver 1 | type u8| seq u16  | len u16  | payload (len)    | crc u16  |
    +-------+--------+----------+----------+------------------+----------+
    crc = CRC-16/CCITT-FALSE over ver..payload (poly 0x1021, init 0xFFFF,
          no reflection, no final xor; "123456789" -> 0x29B1)
    payload = one compact UTF-8 JSON object, len <= 16384 (`MAX_PAYLOAD`)

    terminal -> host: 01 HELLO  02 PING  03 PONG  10 ANSWER  11 PRESENCE
                      12 ABANDONED  80 ACK (for DOCTORS and TIME)
    host -> terminal: 02 PING  03 PONG  20 DOCTORS  21 TIME  22 WHO  80 ACK  81 NAK

Frame errors, each counted by name and NAKed with the sheet's reason:
`too_long` (a frame longer than `MAX_WIRE` = 16,500 bytes on the wire, its
0x00 included, so more than 16,499 bytes before the 0x00; or a `len` field
over 16384), `cobs`, `crc`, and, for bodies whose CRC is right but whose
structure is not, `bad_length` (len field differs from the payload) and
`bad_version`, both NAKed as `schema`.  Message errors: `json` (payload not
a JSON object), `schema` (fields of the wrong type or a record breaking the
survey rules), `unknown_type`.

The reader's memory is bounded: `FrameDecoder` never holds more than
16,499 bytes of a frame; the bytes of an overlong one are counted against
the limit before they are kept, and dropped up to the next 0x00.

Where the sheet is silent, our choices:
- Bytes before the first 0x00 after opening are discarded (the sheet's rule),
  and so is an empty frame (two 0x00 in a row), silently: it is the usual
  idle filler and resynchronisation marker, not an error.  Terminals (and
  the simulator) send a lone 0x00 before HELLO so the HELLO is not lost.
- A NAK carries the frame's seq when the body could be read far enough to
  know it (json/schema/unknown_type, and too_long from the `len` field), and
  null after cobs/crc/too_long on the wire.
- A record is identified by (terminal serial, id): the serial from HELLO, or
  from the config until the first HELLO arrives.  Without either a record is
  not stored or ACKed at once: the latest ones (`PARKED_MAX`, by frame seq)
  are kept and stored as soon as a HELLO names the serial, their `age_ms`
  grown by the time they waited, so their real time stays right, and ACKed
  under the seq they came in (a terminal that replays the record after its
  HELLO under a new seq gets that copy ACKed as a duplicate).
- WHO: the host has not heard the terminal's HELLO until it does, whatever
  the config says (the config's serial is a claim; HELLO also brings
  `doctors_rev`, and TIME waits for it).  So after opening the port it sends
  WHO unless a HELLO arrived within `WHO_AFTER_MS` (a CDC-ACM unit sees the
  open and sends one by itself; asking at once would only make it say it
  twice), then again after 2, 4, 8 ... up to 60 s while none comes, and
  at most 1 s after the last WHO whenever the terminal sends a frame without
  having said HELLO (it is there: ask again now rather than at the back-off).
- A stuck terminal: a terminal keeps one record in flight and retransmits it
  until ACKed, so a record the host refuses holds every record behind it.
  When the same refusal repeats `STUCK_AFTER` (5) times with no record
  accepted in between (same frame seq and reason; for frames whose seq is
  unreadable, the same reason with no good frame in between), the host
  reports `Stuck` once per such run; accepting a record ends the run.
- `age_ms` must be a non-negative integer; 0 for a record sent at once.
- Absurd values are refused (NAKed `schema`, counted; retransmitted, such a
  record becomes a stuck one and raises `device_stuck`), so no device can
  publish an event from another century or an id no log can show:
  `age_ms` at most `MAX_AGE_MS` (90 days: what a terminal's flash plausibly
  holds unsent; a clinic notices a dead edge within days, and older records
  would rate staff long gone); record `id` from 0 to `MAX_RECORD_ID`
  (2^32 - 1, a 32-bit counter in flash); PRESENCE `period_ms` at most a day
  and `approaches` at most `MAX_APPROACHES` (100,000) per report; HELLO
  `doctors_rev` below 2^31 (the doctor list's range) and `unacked` at most
  65,535.
- Identifiers follow edge.contract.ids: `doctor` is a doctor id
  (DOCTOR_ID_RE), `lang` a language tag (LANG_RE), the HELLO `serial` a
  device serial (DEVICE_SERIAL_RE); HELLO `model` and `fw` hold no control
  characters.  Free text (the patient's comment) is kept as it is: it may
  span lines, and whoever prints it escapes it; but no string may hold a NUL
  or an unpaired surrogate (`\\ud800` in the JSON), which no database holds,
  the collector refuses and UTF-8 cannot encode: NAKed `schema`.
"""

from __future__ import annotations

import binascii
import json
import re
import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Any, Final

from drivers.usb_match import Matcher
from edge.contract.ids import DEVICE_SERIAL_RE, DOCTOR_ID_RE, LANG_RE

__all__ = [
    "MAX_PAYLOAD",
    "MAX_WIRE",
    "PID",
    "USB_MATCHER",
    "VID",
    "Abandoned",
    "Answer",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "Hello",
    "Presence",
    "Stuck",
    "TerminalHost",
    "cobs_decode",
    "cobs_encode",
    "crc16",
    "encode_frame",
    "parse_message",
]

VID: Final = 0x1209  # pid.codes
PID: Final = 0xFB30
USB_MATCHER: Final = Matcher("terminal", VID, PID)
VERSION: Final = 1
MAX_PAYLOAD: Final = 16_384  # the sheet's limit on `len`
MAX_WIRE: Final = 16_500  # the longest frame on the wire, its 0x00 included
_MAX_COBS: Final = MAX_WIRE - 1  # bytes of one frame held before its 0x00
_HEAD = struct.Struct("<BBHH")
_PHONE = re.compile(r"^\+?[0-9]{5,16}\Z")
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f-\x9f]*\Z")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")  # NUL, unpaired surrogates
MAX_AGE_MS: Final = 90 * 24 * 3600 * 1000  # see "Absurd values" above
MAX_RECORD_ID: Final = 2**32 - 1
MAX_APPROACHES: Final = 100_000
MAX_PERIOD_MS: Final = 24 * 3600 * 1000


class FrameType(IntEnum):
    HELLO = 0x01
    PING = 0x02
    PONG = 0x03
    ANSWER = 0x10
    PRESENCE = 0x11
    ABANDONED = 0x12
    DOCTORS = 0x20
    TIME = 0x21
    WHO = 0x22
    ACK = 0x80
    NAK = 0x81


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (binascii.crc_hqx is exactly that with init 0xFFFF)."""
    return binascii.crc_hqx(data, 0xFFFF)


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result contains no 0x00."""
    out = bytearray()
    for run in data.split(b"\x00"):
        # Runs of 254 bytes or more are split with a 0xFF code.
        rest = run
        while len(rest) >= 0xFE:
            out.append(0xFF)
            out += rest[:0xFE]
            rest = rest[0xFE:]
        out.append(len(rest) + 1)
        out += rest
    return bytes(out)


class CobsError(ValueError):
    pass


def cobs_decode(data: bytes) -> bytes:
    out = bytearray()
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise CobsError("zero byte inside a frame")
        end = i + code
        if end > n:
            raise CobsError("block runs past the end of the frame")
        block = data[i + 1:end]
        if 0 in block:
            raise CobsError("zero byte inside a block")
        out += block
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class FrameError:
    name: str
    # The NAK reason the sheet defines for it, and the seq if known.
    reason: str
    seq: int | None = None


def encode_frame(ftype: int, seq: int, payload: dict[str, Any] | bytes) -> bytes:
    raw = payload if isinstance(payload, bytes) else \
        json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    head = _HEAD.pack(VERSION, ftype, seq & 0xFFFF, len(raw)) + raw
    return cobs_encode(head + struct.pack("<H", crc16(head))) + b"\x00"


def decode_body(body: bytes) -> Frame | FrameError:
    if len(body) < _HEAD.size + 2:
        return FrameError("bad_length", "schema")
    if crc16(body[:-2]) != struct.unpack("<H", body[-2:])[0]:
        return FrameError("crc", "crc")
    ver, ftype, seq, length = _HEAD.unpack(body[:_HEAD.size])
    if ver != VERSION:
        return FrameError("bad_version", "schema", seq)
    payload = body[_HEAD.size:-2]
    if length > MAX_PAYLOAD or len(payload) > MAX_PAYLOAD:
        return FrameError("too_long", "too_long", seq)
    if length != len(payload):
        return FrameError("bad_length", "schema", seq)
    return Frame(ftype, seq, payload)


class FrameDecoder:
    """Byte stream in, frames (or named frame errors) out."""

    def __init__(self, synced: bool = False) -> None:
        # Until the first 0x00 we may be in the middle of a frame.
        self._synced = synced
        self._buf = bytearray()
        self._overlong = False

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished frame held now (never more than MAX_WIRE - 1)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        out: list[Frame | FrameError] = []
        start = 0
        while True:
            end = data.find(0, start)
            stop = len(data) if end < 0 else end
            if not self._overlong:
                # Checked before the bytes are kept: an overlong frame is
                # never held, only skipped up to its 0x00.
                if len(self._buf) + (stop - start) > _MAX_COBS:
                    self._overlong = True
                    self._buf.clear()
                else:
                    self._buf += data[start:stop]
            if end < 0:
                return out
            start = end + 1
            if not self._synced:
                self._synced = True
                self._buf.clear()
                self._overlong = False
                continue
            if self._overlong:
                out.append(FrameError("too_long", "too_long"))
            elif self._buf:
                try:
                    body = cobs_decode(bytes(self._buf))
                except CobsError:
                    out.append(FrameError("cobs", "cobs"))
                else:
                    out.append(decode_body(body))
            self._buf.clear()
            self._overlong = False


# -- messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    serial: str
    model: str
    fw: str
    doctors_rev: int
    unacked: int


@dataclass(frozen=True, slots=True)
class Answer:
    id: int
    doctor: str
    q1: str
    q2: str | None
    phone: str | None
    comment: str | None
    lang: str
    age_ms: int


@dataclass(frozen=True, slots=True)
class Presence:
    id: int
    approaches: int
    engaged: int
    period_ms: int
    age_ms: int


@dataclass(frozen=True, slots=True)
class Abandoned:
    id: int
    doctor: str | None
    step: str
    age_ms: int


@dataclass(frozen=True, slots=True)
class Empty:
    """PING and PONG."""


@dataclass(frozen=True, slots=True)
class Acked:
    ack: int


Message = Hello | Answer | Presence | Abandoned | Empty | Acked
Record = Answer | Presence | Abandoned


class _InvalidError(ValueError):
    pass


def _int(d: dict[str, Any], key: str, low: int = 0, high: int = 2**53) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise _InvalidError(key)
    return v


def _str(d: dict[str, Any], key: str, *, null: bool = False, max_len: int = 256,
         pattern: re.Pattern[str] | None = None) -> Any:
    v = d.get(key)
    if v is None and null and key in d:
        return None
    if not isinstance(v, str) or len(v) > max_len or _UNSTORABLE.search(v) or (
            pattern is not None and not pattern.match(v)):
        raise _InvalidError(key)
    return v


def _id(d: dict[str, Any]) -> int:
    return _int(d, "id", 0, MAX_RECORD_ID)


def _age(d: dict[str, Any]) -> int:
    return _int(d, "age_ms", 0, MAX_AGE_MS)


def _answer(d: dict[str, Any]) -> Answer:
    q1 = _str(d, "q1")
    q2 = _str(d, "q2", null=True)
    phone = _str(d, "phone", null=True, max_len=17)
    comment = _str(d, "comment", null=True, max_len=500)
    if q1 not in ("yes", "no", "unsure") or q2 not in ("yes", "no", None):
        raise _InvalidError("q1/q2")
    # The survey rules the terminal keeps (sheet): q2 only after "no";
    # phone and comment only after q2 "yes"; a phone is 5..16 digits.
    if (q2 is not None) != (q1 == "no"):
        raise _InvalidError("q2 only when q1 is no")
    if q2 != "yes" and (phone is not None or comment is not None):
        raise _InvalidError("phone/comment only when q2 is yes")
    if phone is not None and not _PHONE.match(phone):
        raise _InvalidError("phone")
    return Answer(_id(d), _str(d, "doctor", max_len=64, pattern=DOCTOR_ID_RE), q1, q2, phone,
                  comment, _str(d, "lang", max_len=35, pattern=LANG_RE), _age(d))  # LANG_RE: <= 35


def _presence(d: dict[str, Any]) -> Presence:
    p = Presence(_id(d), _int(d, "approaches", 0, MAX_APPROACHES),
                 _int(d, "engaged", 0, MAX_APPROACHES), _int(d, "period_ms", 0, MAX_PERIOD_MS),
                 _age(d))
    if p.engaged > p.approaches:
        raise _InvalidError("engaged > approaches")
    return p


def _abandoned(d: dict[str, Any]) -> Abandoned:
    step = _str(d, "step")
    if step not in ("q1", "q2", "contact"):
        raise _InvalidError("step")
    return Abandoned(_id(d), _str(d, "doctor", null=True, max_len=64, pattern=DOCTOR_ID_RE),
                     step, _age(d))


def _hello(d: dict[str, Any]) -> Hello:
    return Hello(_str(d, "serial", max_len=32, pattern=DEVICE_SERIAL_RE),
                 _str(d, "model", max_len=64, pattern=_PRINTABLE),
                 _str(d, "fw", max_len=32, pattern=_PRINTABLE),
                 _int(d, "doctors_rev", 0, 2**31 - 1), _int(d, "unacked", 0, 0xFFFF))


_PARSERS: Final = {
    FrameType.HELLO: _hello,
    FrameType.PING: lambda d: Empty(),
    FrameType.PONG: lambda d: Empty(),
    FrameType.ANSWER: _answer,
    FrameType.PRESENCE: _presence,
    FrameType.ABANDONED: _abandoned,
    FrameType.ACK: lambda d: Acked(_int(d, "ack", 0, 0xFFFF)),
}


def parse_message(frame: Frame) -> Message | FrameError:
    """A terminal's frame as a message, or the reason to NAK it."""
    parser = _PARSERS.get(frame.type)  # type: ignore[call-overload]
    if parser is None:
        return FrameError("unknown_type", "unknown_type", frame.seq)
    try:
        body = json.loads(frame.payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # [[[[... nested too deep
        return FrameError("json", "json", frame.seq)
    if not isinstance(body, dict):
        return FrameError("json", "json", frame.seq)
    try:
        msg: Message = parser(body)
    except _InvalidError:
        return FrameError("schema", "schema", frame.seq)
    return msg


# -- the host's side of one terminal ------------------------------------------

LINK_TIMEOUT_MS: Final = 30_000
WHO_AFTER_MS: Final = 300  # a HELLO the terminal sends by itself on open comes first
WHO_RETRY_MS: Final = 2_000  # then 2, 4, 8 ... s while no HELLO comes
WHO_MAX_MS: Final = 60_000
WHO_MIN_GAP_MS: Final = 1_000  # a talking terminal without HELLO is asked again this soon
PARKED_MAX: Final = 4  # records kept while the serial is unknown (one is in flight)
STUCK_AFTER: Final = 5  # the same refusal this many times in a row: Stuck


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the terminal now."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StoreRecord:
    """Store the record; only then send `ack_frame(seq)`."""

    record: Record
    serial: str
    seq: int


@dataclass(frozen=True, slots=True)
class Count:
    """Something to count by name (a frame error, a record without serial)."""

    name: str


@dataclass(frozen=True, slots=True)
class HelloSeen:
    hello: Hello


@dataclass(frozen=True, slots=True)
class Stuck:
    """The terminal sent what the host refuses `times` times in a row, with
    no record accepted in between: the records behind it wait on the terminal.
    `seq` is the refused frame's seq, None when it could not be read."""

    reason: str
    seq: int | None
    times: int


Action = Send | StoreRecord | Count | HelloSeen | Stuck


class TerminalHost:
    """Decisions for one terminal link, from the moment the port was opened
    (`opened_ms`, host monotonic ms); bytes in, actions out (no I/O).

    `doctors` is (rev, list) as the host currently has it; `clock_synced`
    says whether TIME may be sent.  `feed` takes what was read; `poll` gives
    what is due without input (WHO) and `next_due_ms` when that is.
    """

    def __init__(self, serial: str | None, doctors: tuple[int, list[dict[str, Any]]] | None = None,
                 clock_synced: bool = False, opened_ms: int = 0) -> None:
        self.serial = serial
        self.doctors = doctors
        self.clock_synced = clock_synced
        self.hello: Hello | None = None
        self._decoder = FrameDecoder()
        self._seq = 0
        self.last_rx_ms: int | None = None
        self._who_next = opened_ms + WHO_AFTER_MS
        self._who_gap = WHO_RETRY_MS
        self._who_last: int | None = None
        # frame seq -> (record, host ms it arrived), while no serial is known
        self._parked: dict[int, tuple[Record, int]] = {}
        self._refused: tuple[int | None, str] | None = None
        self._refusals = 0

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFF
        return self._seq

    def frame(self, ftype: FrameType, payload: dict[str, Any]) -> bytes:
        return encode_frame(ftype, self._next_seq(), payload)

    def ack_frame(self, seq: int) -> bytes:
        return self.frame(FrameType.ACK, {"ack": seq})

    def time_frame(self, unix_ms: int) -> bytes:
        return self.frame(FrameType.TIME, {"unix_ms": unix_ms})

    def doctors_frame(self) -> bytes | None:
        if self.doctors is None:
            return None
        rev, doctors = self.doctors
        return self.frame(FrameType.DOCTORS, {"rev": rev, "doctors": doctors})

    def link_up(self, host_ms: int) -> bool:
        return self.last_rx_ms is not None and host_ms - self.last_rx_ms <= LINK_TIMEOUT_MS

    # -- WHO -------------------------------------------------------------------

    def next_due_ms(self) -> int | None:
        """When `poll` has something to send (None: nothing until more input)."""
        return None if self.hello is not None else self._who_next

    def poll(self, host_ms: int) -> list[Action]:
        """WHO, while no HELLO has arrived since the port was opened."""
        if self.hello is not None or host_ms < self._who_next:
            return []
        self._who_last = host_ms
        self._who_next = host_ms + self._who_gap
        self._who_gap = min(self._who_gap * 2, WHO_MAX_MS)
        return [Send(self.frame(FrameType.WHO, {}))]

    def _heard_without_hello(self) -> None:
        if self.hello is None and self._who_last is not None:
            self._who_next = min(self._who_next, self._who_last + WHO_MIN_GAP_MS)

    # -- refusals --------------------------------------------------------------

    def _refuse(self, err: FrameError, out: list[Action]) -> None:
        out.append(Count(err.name))
        out.append(Send(self.frame(FrameType.NAK, {"seq": err.seq, "reason": err.reason})))
        key = (err.seq, err.reason)
        if key == self._refused:
            self._refusals += 1
        else:
            self._refused, self._refusals = key, 1
        if self._refusals == STUCK_AFTER:
            out.append(Stuck(err.reason, err.seq, self._refusals))

    def _accepted(self, record: bool) -> None:
        """A good frame: a record ends any run of refusals; any good frame ends
        a run of refusals whose seq was unreadable (noise, not one record)."""
        if record or (self._refused is not None and self._refused[0] is None):
            self._refused, self._refusals = None, 0

    # -- input -----------------------------------------------------------------

    def _record(self, msg: Record, seq: int, host_ms: int, out: list[Action]) -> None:
        if self.serial is not None:
            out.append(StoreRecord(msg, self.serial, seq))
            return
        out.append(Count("no_serial"))
        self._parked.pop(seq, None)
        self._parked[seq] = (msg, host_ms)
        while len(self._parked) > PARKED_MAX:
            del self._parked[next(iter(self._parked))]

    def _unpark(self, serial: str, host_ms: int, out: list[Action]) -> None:
        for seq, (rec, at_ms) in self._parked.items():
            waited = max(0, host_ms - at_ms)
            out.append(StoreRecord(replace(rec, age_ms=rec.age_ms + waited), serial, seq))
        self._parked.clear()

    def feed(self, data: bytes, host_ms: int, wall_ms: int) -> list[Action]:
        out: list[Action] = []
        for item in self._decoder.feed(data):
            self.last_rx_ms = host_ms
            if isinstance(item, FrameError):
                self._refuse(item, out)
                continue
            msg = parse_message(item)
            if isinstance(msg, FrameError):
                self._refuse(msg, out)
                continue
            self._accepted(isinstance(msg, Answer | Presence | Abandoned))
            if isinstance(msg, Hello):
                self.hello = msg
                self.serial = msg.serial
                out.append(HelloSeen(msg))
                if self.doctors is not None and msg.doctors_rev != self.doctors[0]:
                    frame = self.doctors_frame()
                    if frame is not None:
                        out.append(Send(frame))
                if self.clock_synced:
                    out.append(Send(self.time_frame(wall_ms)))
                self._unpark(msg.serial, host_ms, out)
                continue
            self._heard_without_hello()
            if isinstance(msg, Answer | Presence | Abandoned):
                self._record(msg, item.seq, host_ms, out)
            elif item.type == FrameType.PING:
                out.append(Send(self.frame(FrameType.PONG, {})))
            # PONG and ACK (of our DOCTORS / TIME) only prove the link is up.
        return out
