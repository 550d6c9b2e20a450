"""The console firmware model behaves as the device sheet says (manual clock)."""

from __future__ import annotations

import pytest

from drivers.console import (
    ConsoleReport,
    ReportType,
    decode_info,
    decode_report,
    encode_ack,
    encode_resend,
)
from firmware_sim.console import ConsoleFirmware


class Rig:
    def __init__(self) -> None:
        self.t = 1000
        self.out: list[ConsoleReport] = []
        self.fw = ConsoleFirmware("00A1B2C3D4E5", uptime_ms=lambda: self.t, send=self._got)

    def _got(self, raw: bytes) -> None:
        r = decode_report(raw, 3)
        assert isinstance(r, ConsoleReport)
        self.out.append(r)

    def run(self, ms: int) -> None:
        for _ in range(ms):
            self.t += 1
            self.fw.tick()

    def fresh(self) -> list[ConsoleReport]:
        return [r for r in self.out if not r.replay]


def test_power_up_sends_hello_seq_0_in_the_ring() -> None:
    rig = Rig()
    assert rig.out[0].type is ReportType.HELLO
    assert rig.out[0].dev_seq == 0
    assert rig.fw.unacked == 1


def test_bouncing_contact_gives_one_press_stamped_when_it_closed() -> None:
    rig = Rig()
    rig.fw.press(1, hold_ms=150)
    rig.run(400)
    presses = [r for r in rig.fresh() if r.type is ReportType.PRESS]
    assert len(presses) == 1
    assert presses[0].button == 1
    assert presses[0].age_ms == 30  # reported once debounced


def test_two_buttons_within_30ms_are_both_reported() -> None:
    rig = Rig()
    rig.fw.press(0)
    rig.run(10)
    rig.fw.press(2)
    rig.run(300)
    assert [r.button for r in rig.fresh() if r.type is ReportType.PRESS] == [0, 2]


def test_holding_sends_one_hold_after_the_press() -> None:
    rig = Rig()
    rig.fw.press(0, hold_ms=5000)
    rig.run(6000)
    kinds = [r.type for r in rig.fresh()][1:]
    assert kinds == [ReportType.PRESS, ReportType.HOLD]


def test_unacknowledged_events_are_resent_with_backoff_1_2_4_8_8() -> None:
    rig = Rig()
    rig.fw.output_report(encode_ack(0))
    rig.fw.press(0)
    rig.run(200)
    sent_at = next(r.now_uptime for r in rig.fresh() if r.type is ReportType.PRESS)
    rig.run(24_000)
    resend_times = [r.now_uptime for r in rig.out if r.replay]
    gaps = [b - a for a, b in zip([sent_at, *resend_times], resend_times, strict=False)]
    assert gaps[:5] == [1000, 2000, 4000, 8000, 8000]


def test_ack_is_cumulative_and_stops_resending() -> None:
    rig = Rig()
    rig.fw.press(0)
    rig.run(200)
    rig.fw.press(1)
    rig.run(200)
    rig.fw.output_report(encode_ack(2))
    assert rig.fw.unacked == 0
    before = len(rig.out)
    rig.run(10_000)
    assert len(rig.out) == before


def test_resend_command_replays_everything_unacknowledged_oldest_first() -> None:
    rig = Rig()
    for b in (0, 1, 2):
        rig.fw.press(b)
        rig.run(100)
    rig.out.clear()
    rig.fw.output_report(encode_resend())
    assert [(r.dev_seq, r.replay) for r in rig.out] == [(0, True), (1, True), (2, True), (3, True)]


def test_ring_overflow_loses_the_oldest_counts_it_and_flags_the_next_report() -> None:
    rig = Rig()
    for i in range(40):
        rig.fw.press(i % 3)
        rig.run(100)
    info = decode_info(rig.fw.feature_report())
    assert info.lost == 41 - 32  # type: ignore[union-attr]
    assert info.unacked == 32  # type: ignore[union-attr]
    flagged = [r.dev_seq for r in rig.fresh() if r.overflow]
    assert flagged == list(range(32, 41))


def test_power_cut_loses_the_ring_and_restarts_seq_and_uptime() -> None:
    rig = Rig()
    rig.fw.press(0)
    rig.run(200)
    rig.fw.power_cut()
    rig.run(500)
    rig.out.clear()
    rig.fw.power_up()
    assert [(r.type, r.dev_seq, r.now_uptime) for r in rig.out] == [(ReportType.HELLO, 0, 0)]
    assert rig.fw.unacked == 1


def test_unknown_or_malformed_commands_are_ignored() -> None:
    rig = Rig()
    rig.fw.output_report(bytes([2, 0x7F, 0, 0, 0, 0, 0, 0, 0]))
    rig.fw.output_report(b"\x02\x01")
    assert rig.fw.unacked == 1


def test_a_button_the_console_does_not_have_is_refused_and_nothing_is_scripted() -> None:
    rig = Rig()
    for bad in (3, 5, -1):
        with pytest.raises(ValueError, match="3 buttons"):
            rig.fw.press(bad)
    with pytest.raises(ValueError, match="hold_ms"):
        rig.fw.press(0, hold_ms=-1)
    with pytest.raises(ValueError, match="delay_ms"):
        rig.fw.press(0, delay_ms=-5)
    assert rig.fw.idle
    rig.run(3000)  # nothing left behind that a later tick could trip over
    rig.fw.press(2)
    rig.run(300)
    assert [r.button for r in rig.fresh() if r.type is ReportType.PRESS] == [2]
