"""The ST-3000 protocol core: framing, messages and host decisions (no I/O)."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cobs import cobs as reference_cobs
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.terminal import (
    MAX_PAYLOAD,
    MAX_WIRE,
    PARKED_MAX,
    STUCK_AFTER,
    WHO_AFTER_MS,
    Answer,
    Count,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    HelloSeen,
    Send,
    StoreRecord,
    Stuck,
    TerminalHost,
    cobs_decode,
    cobs_encode,
    crc16,
    encode_frame,
    parse_message,
)
from edge.doctors import validate_doctors
from firmware_sim.terminal import TerminalFirmware
from tests.terminal_fixtures import COMMENT_RU, sixty_doctors

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
    # The link keeps working: the good PING after the 16,600-byte run is read.
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
    # The record that waited is stored as HELLO names the serial, and its
    # retransmission after HELLO again (a duplicate for the store).
    assert [(type(a).__name__, getattr(a, "seq", None)) for a in actions] == [
        ("HelloSeen", None), ("StoreRecord", 1), ("StoreRecord", 1), ("Send", None)]
    assert isinstance(actions[1], StoreRecord)
    assert actions[1].serial == "00C0FFEE0001"
    pong = FrameDecoder(synced=True).feed(actions[3].data)[0]  # type: ignore[attr-defined]
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


# -- the sheet's 16 KB frame limit ----------------------------------------------



def test_a_500_character_cyrillic_comment_is_one_frame_and_stored() -> None:
    assert len(COMMENT_RU) == 500
    body = {**ANSWER, "comment": COMMENT_RU, "lang": "ru"}
    wire = encode_frame(FrameType.ANSWER, 40, body)
    payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(payload) > 1024  # over the old 1 KB limit: NAKed for ever, holding the rest
    assert len(wire) <= MAX_WIRE
    actions = _host_feed(TerminalHost("00C0FFEE0001"), wire)
    assert len(actions) == 1
    assert isinstance(actions[0], StoreRecord)
    assert actions[0].record.comment == COMMENT_RU  # type: ignore[union-attr]


def test_a_payload_of_16384_bytes_passes_and_one_more_is_too_long() -> None:
    at_limit = b"{" + b" " * (MAX_PAYLOAD - 2) + b"}"
    host = TerminalHost("S1")
    pong = _host_feed(host, encode_frame(FrameType.PING, 7, at_limit))
    assert len(pong) == 1
    assert FrameDecoder(synced=True).feed(pong[0].data)[0].type == FrameType.PONG  # type: ignore[attr-defined,union-attr]
    over = encode_frame(FrameType.ANSWER, 8, at_limit + b" ")
    assert len(over) <= MAX_WIRE  # fits the wire: the len field makes it too_long
    actions = _host_feed(host, over)
    assert actions[0] == Count("too_long")
    nak = FrameDecoder(synced=True).feed(actions[1].data)[0]  # type: ignore[attr-defined]
    assert isinstance(nak, Frame)
    assert json.loads(nak.payload) == {"seq": 8, "reason": "too_long"}


def test_a_frame_over_16500_bytes_on_the_wire_is_too_long_and_the_next_one_is_read() -> None:
    dec = FrameDecoder(synced=True)
    exactly = b"\x01" * (MAX_WIRE - 1) + b"\x00"  # 16,500 bytes with its 0x00: allowed
    assert [getattr(i, "name", "frame") for i in dec.feed(exactly)] != ["too_long"]
    items = dec.feed(b"\x01" * MAX_WIRE + b"\x00" + encode_frame(FrameType.PING, 9, {}))
    assert items[0] == FrameError("too_long", "too_long")
    assert isinstance(items[1], Frame)
    assert items[1].seq == 9


def test_the_reader_never_holds_more_than_one_frame() -> None:
    flood = b"\x01" * 8_000_000  # a babbling line, no delimiter
    dec = FrameDecoder(synced=True)
    tracemalloc.start()
    try:
        for chunk in (flood, flood[:MAX_WIRE - 10], flood[:20], flood):
            assert dec.feed(chunk) == []
            assert dec.buffered <= MAX_WIRE - 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * MAX_WIRE  # checked before it is kept, not after
    assert dec.feed(b"\x00") == [FrameError("too_long", "too_long")]
    assert dec.buffered == 0


def test_sixty_doctors_fit_a_doctors_frame_and_a_list_that_cannot_is_refused() -> None:
    rev, doctors = validate_doctors(sixty_doctors(rev=5))
    frame = TerminalHost("S1", (rev, doctors)).doctors_frame()
    assert frame is not None
    assert 8_000 < len(frame) <= MAX_WIRE
    got = FrameDecoder(synced=True).feed(frame)[0]
    assert isinstance(got, Frame)
    assert json.loads(got.payload)["doctors"] == doctors
    huge = {"rev": 6, "doctors": [{"id": f"dr-{i}", "name": "Щ" * 128, "specialty": "Ж" * 128,
                                   "photo": None} for i in range(100)]}
    with pytest.raises(ValueError, match="at most 16384"):
        validate_doctors(huge)


# -- WHO: a terminal that did not see the host open the port ------------------------

HELLO = {"serial": "00C0FFEE0001", "model": "ST-3000", "fw": "2", "doctors_rev": 1,
         "unacked": 1}


def _types(actions: Sequence[object]) -> list[int]:
    out = []
    for a in actions:
        if isinstance(a, Send):
            f = FrameDecoder(synced=True).feed(a.data)[0]
            assert isinstance(f, Frame)
            out.append(f.type)
    return out


def test_who_after_opening_until_hello_then_never() -> None:
    host = TerminalHost(None, opened_ms=10_000)
    assert host.poll(10_000) == []  # a CDC-ACM unit says HELLO by itself first
    assert host.next_due_ms() == 10_000 + WHO_AFTER_MS
    assert _types(host.poll(10_300)) == [FrameType.WHO]
    assert host.poll(10_301) == []
    assert _types(host.poll(12_300)) == [FrameType.WHO]  # after 2 s, then 4 s ...
    assert host.next_due_ms() == 16_300
    # The terminal talks (a record) without HELLO: asked again 1 s after the last WHO.
    host.feed(b"\x00" + encode_frame(FrameType.ANSWER, 3, ANSWER), 12_500, 0)
    assert host.next_due_ms() == 13_300
    assert _types(host.poll(13_300)) == [FrameType.WHO]
    host.feed(encode_frame(FrameType.HELLO, 4, HELLO), 13_310, 0)
    assert host.next_due_ms() is None
    assert host.poll(100_000) == []


def test_who_also_with_a_configured_serial_but_not_after_a_hello_on_open() -> None:
    configured = TerminalHost("00C0FFEE0001", opened_ms=0)
    assert _types(configured.poll(WHO_AFTER_MS)) == [FrameType.WHO]
    usb = TerminalHost(None, opened_ms=0)
    usb.feed(b"\x00" + encode_frame(FrameType.HELLO, 1, HELLO), 120, 0)
    assert usb.poll(WHO_AFTER_MS) == []


def test_a_record_waiting_for_the_serial_is_stored_when_hello_comes_with_its_real_age() -> None:
    host = TerminalHost(None, opened_ms=0)
    assert host.feed(b"\x00" + encode_frame(FrameType.ANSWER, 21, {**ANSWER, "age_ms": 70}),
                     1_000, 0) == [Count("no_serial")]
    # Retransmissions of the same frame keep one copy, the latest.
    assert host.feed(encode_frame(FrameType.ANSWER, 21, {**ANSWER, "age_ms": 90}),
                     1_020, 0) == [Count("no_serial")]
    actions = host.feed(encode_frame(FrameType.HELLO, 22, HELLO), 1_520, 0)
    stored = [a for a in actions if isinstance(a, StoreRecord)]
    assert stored == [StoreRecord(Answer(**{**ANSWER, "age_ms": 90 + 500}),  # type: ignore[arg-type]
                                  "00C0FFEE0001", 21)]
    assert isinstance(actions[0], HelloSeen)
    many = TerminalHost(None)
    for seq in range(10):
        many.feed(b"\x00" + encode_frame(FrameType.ANSWER, seq, {**ANSWER, "id": seq}), 0, 0)
    released = [a for a in many.feed(encode_frame(FrameType.HELLO, 99, HELLO), 0, 0)
                if isinstance(a, StoreRecord)]
    assert [a.seq for a in released] == list(range(10 - PARKED_MAX, 10))


# -- a terminal stuck on a record the host refuses ------------------------------------


def test_the_same_refused_record_five_times_is_stuck_once_and_a_stored_record_ends_it() -> None:
    host = TerminalHost("S1")
    bad = encode_frame(FrameType.ANSWER, 50, {**ANSWER, "q1": "yes"})  # q2 after yes: schema
    ping = encode_frame(FrameType.PING, 51, {})
    stuck: list[object] = []
    for i in range(STUCK_AFTER + 3):
        # PINGs between the retransmissions do not unstick it.
        stuck += [a for a in _host_feed(host, bad, ping) if isinstance(a, Stuck)]
        assert len(stuck) == (1 if i + 1 >= STUCK_AFTER else 0)
    assert stuck == [Stuck("schema", 50, STUCK_AFTER)]
    _host_feed(host, encode_frame(FrameType.ANSWER, 52, ANSWER))  # a record accepted
    again = [a for _ in range(STUCK_AFTER) for a in _host_feed(host, bad) if isinstance(a, Stuck)]
    assert again == [Stuck("schema", 50, STUCK_AFTER)]
    # Different refused frames are not one stuck record.
    other = TerminalHost("S1")
    assert not [a for i in range(10)
                for a in _host_feed(other, encode_frame(FrameType.ANSWER, 60 + i % 2,
                                                        {**ANSWER, "q1": "yes"}))
                if isinstance(a, Stuck)]


def test_unreadable_frames_in_a_row_are_stuck_but_not_with_good_frames_between() -> None:
    crc = bytearray(encode_frame(FrameType.ANSWER, 5, ANSWER))
    crc[5] ^= 0x01
    ping = encode_frame(FrameType.PING, 6, {})
    noisy = TerminalHost("S1")
    assert not [a for _ in range(10) for a in _host_feed(noisy, bytes(crc), ping)
                if isinstance(a, Stuck)]
    dead = TerminalHost("S1")
    assert [a for _ in range(STUCK_AFTER) for a in _host_feed(dead, bytes(crc))
            if isinstance(a, Stuck)] == [Stuck("crc", None, STUCK_AFTER)]


# -- the simulator's firmware ----------------------------------------------------------


def test_the_firmware_answers_who_with_hello_and_keeps_its_record_in_flight(
        tmp_path: Path) -> None:
    now = [1_000]
    wire: list[bytes] = []
    fw = TerminalFirmware("00C0FFEE0001", tmp_path / "flash", clock_ms=lambda: now[0],
                          send=wire.append)
    fw.answer("dr-a", "yes")
    frames = [f for f in FrameDecoder(synced=True).feed(b"".join(wire)) if isinstance(f, Frame)]
    assert [f.type for f in frames] == [FrameType.HELLO, FrameType.ANSWER]
    in_flight = frames[-1].seq
    wire.clear()
    fw.receive(encode_frame(FrameType.WHO, 1, {}))
    assert wire[0] == b"\x00"  # the lone delimiter before every HELLO
    frames = [f for f in FrameDecoder(synced=True).feed(b"".join(wire)) if isinstance(f, Frame)]
    assert [f.type for f in frames] == [FrameType.HELLO]
    assert json.loads(frames[0].payload)["serial"] == "00C0FFEE0001"
    fw.receive(encode_frame(FrameType.ACK, 2, {"ack": in_flight}))  # the old seq still holds
    assert fw.unacked == 0



@pytest.mark.parametrize(("q1", "q2", "says"), [
    ("no", None, "q1 = no needs q2"),
    ("yes", "yes", "q2 only after q1 = no"),
])
def test_the_simulated_survey_names_the_rule_an_answer_breaks(
        tmp_path: Path, q1: str, q2: str | None, says: str) -> None:
    fw = TerminalFirmware("00C0FFEE0001", tmp_path / "flash", clock_ms=lambda: 1_000,
                          send=lambda _frame: None)
    with pytest.raises(ValueError, match=says):
        fw.answer("dr-a", q1, q2=q2)
