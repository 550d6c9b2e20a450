"""The FC-3 protocol core: golden capture, fuzzing, encoder bytes, host decisions."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.console import (
    EVENT_REPORT_LEN,
    ConsoleDecoder,
    ConsoleHost,
    ConsoleReport,
    Duplicate,
    NewSession,
    Record,
    ReportType,
    button_labels,
    decode_info,
    decode_report,
    encode_ack,
    encode_beep,
    encode_report,
    encode_resend,
    encode_show,
)

CAPTURE = json.loads((Path(__file__).parent / "fixtures" / "console_capture.json").read_text())


def _as_dict(r: ConsoleReport) -> dict[str, object]:
    return {"seq": r.dev_seq, "type": r.type.name, "button": r.button, "replay": r.replay,
            "overflow": r.overflow, "event_uptime": r.event_uptime, "now_uptime": r.now_uptime}


def test_golden_capture_decodes_to_the_expected_reports_and_errors() -> None:
    dec = ConsoleDecoder(buttons=3)
    got = [_as_dict(r) for hexed in CAPTURE["reports"] for r in dec.feed(bytes.fromhex(hexed))]
    assert got == CAPTURE["expected"]
    assert dec.errors == CAPTURE["expected_errors"]


def test_decoding_is_the_same_report_by_report_or_after_a_reencode_roundtrip() -> None:
    for hexed in CAPTURE["reports"]:
        raw = bytes.fromhex(hexed)
        r = decode_report(raw, 3)
        if isinstance(r, ConsoleReport):
            assert encode_report(r) == raw


def test_known_report_bytes() -> None:
    raw = bytes.fromhex("01 05 01 02 00 10270000 20270000")
    r = decode_report(raw, 3)
    assert r == ConsoleReport(5, ReportType.PRESS, 2, False, False, 10000, 10016)
    assert r.age_ms == 16


def test_age_survives_the_uptime_wrap() -> None:
    r = ConsoleReport(1, ReportType.PRESS, 0, True, False, 0xFFFF_FF00, 0x0000_0100)
    assert r.age_ms == 0x200
    assert isinstance(decode_report(encode_report(r), 3), ConsoleReport)


def test_command_encodings_match_the_sheet() -> None:
    assert encode_ack(7) == bytes([2, 1, 7, 0, 0, 0, 0, 0, 0])
    assert encode_ack(256 + 7) == encode_ack(7)
    assert encode_show(1, 2, 1500) == bytes([2, 2, 1, 2, 0xDC, 0x05, 0, 0, 0])
    assert encode_resend() == bytes([2, 3, 0, 0, 0, 0, 0, 0, 0])
    assert encode_beep(200) == bytes([2, 4, 200, 0, 0, 0, 0, 0, 0])


def test_info_report() -> None:
    raw = bytes([3, 1, 1, 4, 3, 1, 32, 2, 0]) + (5000).to_bytes(4, "little") + \
        (7).to_bytes(4, "little")
    info = decode_info(raw)
    assert not hasattr(info, "name")
    assert (info.buttons, info.layout, info.unacked, info.now_uptime, info.lost) == \
        (3, 1, 2, 5000, 7)  # type: ignore[union-attr]
    assert decode_info(raw[:-1]).name == "bad_length"  # type: ignore[union-attr]


def test_layouts_give_labels_and_scores() -> None:
    assert button_labels(1, 3) == (("good", 1), ("neutral", 0), ("bad", -1))
    assert button_labels(2, 2) == (("yes", 1), ("no", -1))
    assert button_labels(3, 5)[0] == ("5", 5)
    assert button_labels(0, 2) == (("button-0", None), ("button-1", None))
    assert button_labels(1, 3, ("happy", "meh", "sad"), (2, 0, -2))[2] == ("sad", -2)


@settings(max_examples=500)
@given(st.binary(max_size=40), st.integers(min_value=1, max_value=16))
def test_random_reports_never_raise_and_errors_are_named(data: bytes, buttons: int) -> None:
    dec = ConsoleDecoder(buttons)
    out = dec.feed(data)
    assert len(out) + sum(dec.errors.values()) == 1
    assert set(dec.errors) <= {"bad_length", "bad_report_id", "unknown_type", "bad_button",
                               "bad_flags", "bad_uptime"}
    for r in out:
        assert r.button < buttons or (r.type is ReportType.HELLO and r.button == 0xFF)


@settings(max_examples=500)
@given(st.sampled_from(CAPTURE["reports"][:-5]), st.integers(0, EVENT_REPORT_LEN - 1),
       st.integers(0, 255))
def test_mutated_capture_reports_decode_or_fail_by_name(hexed: str, pos: int, value: int) -> None:
    raw = bytearray(bytes.fromhex(hexed))
    raw[pos] = value
    dec = ConsoleDecoder(3)
    out = dec.feed(bytes(raw))
    # Nothing is invented: a decoded report is exactly what the bytes say.
    for r in out:
        assert encode_report(r) == bytes(raw)


def _press(dev_seq: int, up: int, now: int | None = None, replay: bool = False,
           button: int = 0, kind: ReportType = ReportType.PRESS) -> ConsoleReport:
    return ConsoleReport(dev_seq, kind, button, replay, False, up, up + 30 if now is None else now)


def test_host_records_new_presses_and_drops_replayed_duplicates() -> None:
    h = ConsoleHost()
    assert isinstance(h.on_report(_press(0, 0, kind=ReportType.HELLO, button=0xFF), 0),
                      NewSession)
    first = h.on_report(_press(1, 1000), 1_000_000_000)
    assert isinstance(first, Record)
    again = h.on_report(_press(1, 1000, now=2030, replay=True), 2_000_000_000)
    assert isinstance(again, Duplicate)
    assert isinstance(h.on_report(_press(2, 1500, replay=True), 2_100_000_000), Record)


def test_host_keeps_its_decisions_across_a_restart_through_stored_keys() -> None:
    h = ConsoleHost()
    h.on_report(_press(0, 0, kind=ReportType.HELLO, button=0xFF), 0)
    keys = [h.on_report(_press(s, 1000 * s), s * 10**9).key  # type: ignore[union-attr]
            for s in (1, 2, 3)]
    restarted = ConsoleHost(["0:0:3:255", *keys])
    # The device replays its unacknowledged HELLO and presses after the restart.
    assert isinstance(restarted.on_report(_press(0, 0, now=4000, replay=True,
                                                 kind=ReportType.HELLO, button=0xFF), 0),
                      Duplicate)
    assert isinstance(restarted.on_report(_press(3, 3000, now=4000, replay=True), 0), Duplicate)
    assert isinstance(restarted.on_report(_press(4, 3900, now=4000), 0), Record)


def test_a_fresh_hello_or_uptime_going_backwards_starts_a_new_session() -> None:
    h = ConsoleHost()
    h.on_report(_press(0, 0, kind=ReportType.HELLO, button=0xFF), 0)
    h.on_report(_press(1, 50_000), 50 * 10**9)
    # Power cut: the same seq and uptime again are a new press, not a duplicate.
    assert isinstance(h.on_report(_press(0, 0, kind=ReportType.HELLO, button=0xFF), 60 * 10**9),
                      NewSession)
    assert isinstance(h.on_report(_press(1, 50_000), 110 * 10**9), Record)
    # Reset without a HELLO reaching us (ring overflowed): uptime went backwards.
    back = h.on_report(_press(9, 100, now=200), 111 * 10**9)
    assert isinstance(back, Record)
    assert back.new_session


def test_a_replayed_hello_after_a_power_cycle_is_a_new_session() -> None:
    h = ConsoleHost()
    h.on_report(_press(0, 0, now=0, kind=ReportType.HELLO, button=0xFF), 0)
    h.on_report(_press(1, 500), 10**9)
    # Unplugged for 10 s; the new HELLO was sent before hidraw was open and
    # arrives replayed, identical in every byte but now_uptime.
    again = h.on_report(_press(0, 0, now=1500, replay=True, kind=ReportType.HELLO,
                               button=0xFF), 12 * 10**9)
    assert isinstance(again, NewSession)
    # Whereas a lost ACK: the same HELLO replayed while the device kept running.
    h2 = ConsoleHost()
    h2.on_report(_press(0, 0, now=0, kind=ReportType.HELLO, button=0xFF), 0)
    assert isinstance(h2.on_report(_press(0, 0, now=1000, replay=True, kind=ReportType.HELLO,
                                          button=0xFF), 10**9), Duplicate)


def test_uptime_wrap_after_49_days_is_not_a_reset() -> None:
    h = ConsoleHost()
    start_host_ns = 10**12
    h.on_report(_press(7, 2**32 - 1000, now=2**32 - 900), start_host_ns)
    after = h.on_report(_press(8, 100, now=200), start_host_ns + 1_100 * 10**6)
    assert isinstance(after, Record)
    assert not after.new_session
