"""The ST-3000 protocol core: framing, messages and host decisions (no I/O)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cobs import cobs as reference_cobs
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.terminal import (
    Answer,
    Count,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    Send,
    StoreRecord,
    TerminalHost,
    cobs_decode,
    cobs_encode,
    crc16,
    encode_frame,
    parse_message,
)

CAPTURE = json.loads((Path(__file__).parent / "fixtures" / "terminal_capture.json").read_text())
STREAM = bytes.fromhex(CAPTURE["stream_hex"])


def _describe(items: list[Frame | FrameError]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for it in items:
        if isinstance(it, FrameError):
            out.append({"error": it.name, "nak": it.reason, "seq": it.seq})
            continue
        m = parse_message(it)
        if isinstance(m, FrameError):
            out.append({"type": it.type, "seq": it.seq, "error": m.name, "nak": m.reason})
        else:
            fields = {k: getattr(m, k) for k in getattr(m, "__slots__", ())}
            out.append({"type": it.type, "seq": it.seq, "message": type(m).__name__,
                        "fields": fields})
    return out


def test_crc_check_value() -> None:
    assert crc16(b"123456789") == 0x29B1


def test_golden_capture_whole() -> None:
    assert _describe(FrameDecoder().feed(STREAM)) == CAPTURE["expected"]


def test_golden_capture_byte_by_byte_gives_the_same() -> None:
    dec = FrameDecoder()
    items: list[Frame | FrameError] = []
    for i in range(len(STREAM)):
        items += dec.feed(STREAM[i:i + 1])
    assert _describe(items) == CAPTURE["expected"]


def test_each_bad_frame_gets_the_sheets_nak_reason() -> None:
    naks = {e["error"]: e["nak"] for e in CAPTURE["expected"] if "error" in e}
    assert naks == {"json": "json", "unknown_type": "unknown_type", "schema": "schema",
                    "cobs": "cobs", "bad_length": "schema", "crc": "crc",
                    "too_long": "too_long"}
    # The link keeps working: the good PING after the 1200-byte run is read.
    assert CAPTURE["expected"][-1]["message"] == "Empty"


@settings(max_examples=300)
@given(st.binary(max_size=1500))
def test_cobs_matches_the_reference_implementation(data: bytes) -> None:
    ours = cobs_encode(data)
    assert ours == reference_cobs.encode(data)
    assert 0 not in ours
    assert cobs_decode(ours) == data


@settings(max_examples=300)
@given(st.binary(max_size=3000), st.integers(1, 64))
def test_random_bytes_never_raise_and_whole_equals_chunked(data: bytes, chunk: int) -> None:
    whole = FrameDecoder(synced=True).feed(data)
    dec = FrameDecoder(synced=True)
    parts: list[Frame | FrameError] = []
    for i in range(0, len(data), chunk):
        parts += dec.feed(data[i:i + chunk])
    assert parts == whole
    for item in whole:
        if isinstance(item, Frame):
            parse_message(item)  # must not raise either


@settings(max_examples=300)
@given(st.integers(0, len(STREAM) - 1), st.integers(0, 255))
def test_mutated_capture_never_invents_a_record(pos: int, value: int) -> None:
    mutated = bytearray(STREAM)
    mutated[pos] = value
    good = {json.dumps(e["fields"], sort_keys=True) for e in CAPTURE["expected"]
            if e.get("message") in ("Answer", "Presence", "Abandoned")}
    for item in FrameDecoder().feed(bytes(mutated)):
        if isinstance(item, Frame):
            m = parse_message(item)
            if isinstance(m, Answer):
                fields = {k: getattr(m, k) for k in m.__slots__}
                # A single flipped byte passes the CRC only by not changing the frame.
                assert json.dumps(fields, sort_keys=True) in good


ANSWER = {"id": 5, "doctor": "dr-a", "q1": "no", "q2": "yes", "phone": "+491701234567",
          "comment": "late", "lang": "de", "age_ms": 0}


def _host_feed(host: TerminalHost, *frames: bytes) -> list[object]:
    return list(host.feed(b"\x00" + b"".join(frames), 1000, 1_795_000_000_000))


def test_rule_breaking_answers_are_nacked_schema() -> None:
    host = TerminalHost("00C0FFEE0001")
    breaking = [
        {**ANSWER, "q1": "yes"},  # q2 without "no"
        {**ANSWER, "q2": "no"},  # phone without q2 yes
        {**ANSWER, "phone": "12ab"},
        {**ANSWER, "phone": "+1234"},  # 4 digits
        {**ANSWER, "comment": "x" * 501},
        {**ANSWER, "age_ms": -1},
        {**ANSWER, "id": "5"},
    ]
    for i, body in enumerate(breaking):
        actions = _host_feed(host, encode_frame(FrameType.ANSWER, 10 + i, body))
        assert actions[0] == Count("schema"), body
        assert isinstance(actions[1], Send)
        nak = FrameDecoder(synced=True).feed(actions[1].data)[0]
        assert isinstance(nak, Frame)
        assert nak.type == FrameType.NAK
        assert json.loads(nak.payload) == {"seq": 10 + i, "reason": "schema"}
    ok = _host_feed(host, encode_frame(FrameType.ANSWER, 30, ANSWER))
    assert isinstance(ok[0], StoreRecord)
    assert ok[0].record.phone == "+491701234567"


def test_records_wait_for_a_serial_and_ping_gets_pong() -> None:
    host = TerminalHost(None)
    assert _host_feed(host, encode_frame(FrameType.ANSWER, 1, ANSWER)) == [Count("no_serial")]
    hello = {"serial": "00C0FFEE0001", "model": "ST-3000", "fw": "2", "doctors_rev": 1,
             "unacked": 1}
    actions = _host_feed(host, encode_frame(FrameType.HELLO, 2, hello),
                         encode_frame(FrameType.ANSWER, 1, ANSWER),
                         encode_frame(FrameType.PING, 3, {}))
    assert isinstance(actions[1], StoreRecord)
    assert actions[1].serial == "00C0FFEE0001"
    pong = FrameDecoder(synced=True).feed(actions[2].data)[0]  # type: ignore[attr-defined]
    assert isinstance(pong, Frame)
    assert pong.type == FrameType.PONG


def test_hello_brings_doctors_when_the_revision_differs_and_time_when_synced() -> None:
    doctors = [{"id": "dr-a", "name": "A", "specialty": "ENT", "photo": None}]
    hello = {"serial": "S1", "model": "ST-3000", "fw": "2", "doctors_rev": 6, "unacked": 0}
    same = TerminalHost(None, (6, doctors), clock_synced=False)
    assert len(_host_feed(same, encode_frame(FrameType.HELLO, 1, hello))) == 1  # HelloSeen only
    differs = TerminalHost(None, (7, doctors), clock_synced=True)
    sent = [a for a in _host_feed(differs, encode_frame(FrameType.HELLO, 1, hello))
            if isinstance(a, Send)]
    types = [FrameDecoder(synced=True).feed(s.data)[0].type for s in sent]  # type: ignore[union-attr]
    assert types == [FrameType.DOCTORS, FrameType.TIME]


def test_link_is_down_after_30_s_of_silence() -> None:
    host = TerminalHost("S1")
    host.feed(b"\x00" + encode_frame(FrameType.PING, 1, {}), 1000, 0)
    assert host.link_up(30_999)
    assert not host.link_up(31_001)
