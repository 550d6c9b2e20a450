"""Console events timed by the device's clock, and a console without an info
report (issue 15, faults 2 and 3; ../shared/devices/console-hid.md, "What the
host must do").  The worker runs on its thread against the in-memory transport
(reports queued in it wait exactly as in a USB endpoint) and an injected clock;
tests/vm/ does the same against a real kernel USB stack."""

from __future__ import annotations

from pathlib import Path

from drivers.console import UPTIME_MOD, ConsoleReport, DeviceClock, ReportType, encode_report
from edge.clock import ManualClock
from edge.kinds.base import DecodeFailed, DeviceAlarm, DeviceState, Reading
from edge.kinds.console import ConsoleConfig, ConsoleInput, ConsoleWorker
from firmware_sim.console import ConsoleFirmware
from firmware_sim.link import MemoryTransport
from tests.conftest import wait_for
from tests.test_console_kind import Rig

SERIAL = "00A1B2C3D4E5"
HOUR_MS = 3_600_000


# -- the estimator ---------------------------------------------------------------------

def test_fresh_reports_did_not_wait_and_a_stale_one_waited_its_age() -> None:
    c = DeviceClock()
    c.seed(100_000, 40_000)  # offset 60 s
    assert c.waited_ms(100_008, 40_000) == 0  # USB polling jitter: fresh
    assert c.waited_ms(120_000, 40_000) == 20_000  # queued 20 s ago, read now
    assert c.waited_ms(120_001, 59_990) == 0
    assert c.waited_ms(120_000 + 99, 60_000) == 0  # within LATE_MS of the minimum
    assert c.waited_ms(121_000, 60_500) == 500


def test_uptime_wrapping_after_49_days_is_no_delay() -> None:
    c = DeviceClock()
    c.seed(10_000_000, UPTIME_MOD - 1_000)
    assert c.waited_ms(10_002_000, 1_000) == 0  # uptime wrapped past 2^32 ms
    assert c.waited_ms(10_010_000, 4_000) == 5_000


def test_drift_of_two_crystals_is_not_taken_for_waiting() -> None:
    """A device clock 150 ppm slow: after an idle hour its offset grew 540 ms."""
    c = DeviceClock()
    c.seed(0, 0)
    assert c.waited_ms(HOUR_MS, HOUR_MS - 540) == 0
    assert c.waited_ms(HOUR_MS + 1000, HOUR_MS - 540 + 1000 - 5000) == 5_000


def test_without_a_seed_the_first_report_is_the_reference() -> None:
    c = DeviceClock()
    assert c.waited_ms(50_000, 1_000) == 0
    assert c.waited_ms(51_000, 2_000) == 0


# -- the worker and the kind ---------------------------------------------------------

class Bench:
    """A console firmware on the in-memory transport; its uptime runs with `clock`."""

    def __init__(self, *, info: bool = True) -> None:
        self.clock = ManualClock()
        self.offset_ms = 7_000
        self.fw = ConsoleFirmware(SERIAL, uptime_ms=self.uptime)
        self.booted_ms = self.uptime()
        self.clock.advance(60.0)  # the console has been up a minute
        self.transport = MemoryTransport(self.fw)
        if not info:
            # The kernel's f_hid gadget answers GET_REPORT with report_length zeros.
            self.transport.get_feature = lambda report_id, length: bytes(length)  # type: ignore[method-assign]
        self.posts: list[object] = []
        cfg = ConsoleConfig("fc3-a", "console", "desk-1", SERIAL)
        self.worker = ConsoleWorker(cfg, lambda: self.transport, self.posts.append, self.clock)

    def uptime(self) -> int:
        return self.clock.mono_ns() // 1_000_000 - self.offset_ms

    def queue_report(self, dev_seq: int, sent_ago_ms: int, age_ms: int = 5) -> None:
        """A report the firmware queued `sent_ago_ms` ago, unread since (in the endpoint)."""
        now_up = self.uptime() - self.booted_ms - sent_ago_ms
        self.transport._in.put(encode_report(ConsoleReport(
            dev_seq, ReportType.PRESS, 0, False, False, now_up - age_ms, now_up)))

    def readings(self) -> list[ConsoleInput]:
        return [p.data for p in self.posts if isinstance(p, Reading)
                and isinstance(p.data, ConsoleInput) and p.data.report.type is ReportType.PRESS]


def test_a_press_that_waited_in_the_endpoint_is_found_by_the_worker() -> None:
    bench = Bench()
    bench.queue_report(1, sent_ago_ms=20_000)  # pressed while the daemon was stopped
    bench.queue_report(2, sent_ago_ms=0)
    bench.worker.start()
    try:
        got = wait_for(lambda: bench.readings() if len(bench.readings()) == 2 else None, 10,
                       "both reports read")
    finally:
        bench.worker.stop()
    assert [(i.report.dev_seq, i.waited_ms) for i in got] == [(1, 20_000), (2, 0)]


def test_a_press_that_waited_is_timed_by_the_device_clock_and_flagged(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.clock.advance(60.0)  # the Pi has been up a minute, the console since 1 s ago
    rig.clock_offset_ms = rig.clock.mono_ns() // 1_000_000 - 1000
    report = rig.press(1).report
    d = rig.decide(ConsoleInput(report, waited_ms=20_000))
    event = d.appends[0].event
    assert event is not None
    read_ns = rig.clock.mono_ns()
    assert event.time.age_ms == report.age_ms + 20_000
    assert event.time.mono_ns == read_ns - (report.age_ms + 20_000) * 1_000_000
    assert event.time.wall_ns == rig.clock.wall_ns() - (report.age_ms + 20_000) * 1_000_000
    assert "replayed" in event.flags
    assert rig.ctx.discarded == {"late_delivery": 1}
    fresh = next(a.event for a in rig.decide(rig.press(2)).appends if a.event is not None)
    assert "replayed" not in fresh.flags


def test_resends_that_waited_are_duplicates_not_a_device_restart(tmp_path: Path) -> None:
    """Found on a real USB stack (tests/vm/test_devices.py): a press made while
    the daemon was stopped is resent 1, 3 and 7 s later into the endpoint; the
    daemon reads those reports ~100 ms apart, their uptimes seconds apart.
    Judged by read time the device's uptime jumped by 4 s in 0.1 s: taken for
    a restart, the press was stored a second time."""
    rig = Rig(tmp_path)
    rig.clock.advance(60.0)
    rig.clock_offset_ms = rig.clock.mono_ns() // 1_000_000 - 1000  # console up 1 s
    pressed = 1000
    rig.clock.advance(9.0)  # the daemon opens the console 9 s after the press
    decisions = []
    for sent in (pressed + 1000, pressed + 3000, pressed + 7000, None):
        rig.clock.advance(0.1)
        host_ms = rig.clock.mono_ns() // 1_000_000
        now = host_ms - rig.clock_offset_ms if sent is None else sent  # RESEND's is fresh
        report = ConsoleReport(1, ReportType.PRESS, 0, True, False, pressed, now)
        decisions.append(rig.decide(ConsoleInput(report, waited_ms=host_ms - rig.clock_offset_ms
                                                 - now)))
    events = [a.event for d in decisions for a in d.appends if a.event is not None]
    assert len(events) == 1
    assert [d.duplicate for d in decisions] == [False, True, True, True]
    assert rig.console.resets == 0
    assert events[0].time.mono_ns == (rig.clock_offset_ms + pressed) * 1_000_000


def test_a_console_without_an_info_report_is_served_once_not_retried_in_a_loop() -> None:
    bench = Bench(info=False)
    bench.queue_report(1, sent_ago_ms=0)
    bench.worker.start()
    try:
        wait_for(bench.readings, 10, "the press read despite no info report")
    finally:
        bench.worker.stop()
    states = [p for p in bench.posts if isinstance(p, DeviceState)]
    assert [s.state for s in states] == ["connected"]
    assert states[0].error is not None
    assert "no info report" in states[0].error
    assert [p.name for p in bench.posts if isinstance(p, DecodeFailed)] == ["info_unreadable"]
    info = states[0].details
    # No labels in the config: every button the sheet allows, unlabelled, and an alarm.
    assert getattr(info, "buttons", None) == 16
    assert [p.code for p in bench.posts if isinstance(p, DeviceAlarm)] == ["device_unidentified"]


def test_without_a_seed_a_burst_of_waited_resends_is_no_restart() -> None:
    """Review of issue 15: a console without an info report has no device-clock seed,
    so its waited resends (queued 1, 3, 7 s after a press, read 100 ms apart) count
    as fresh; their uptime running ahead of the host's must not read as a restart
    (which forgot the dedup keys and stored the press three times)."""
    from drivers.console import ConsoleHost, Duplicate, Record

    host = ConsoleHost()
    sent = [(1_000, False), (2_000, True), (4_000, True), (8_000, True)]
    actions = [host.on_report(ConsoleReport(1, ReportType.PRESS, 0, replay, False, 900, up),
                              (50_000 + i * 100) * 1_000_000)
               for i, (up, replay) in enumerate(sent)]
    assert isinstance(actions[0], Record)
    assert all(isinstance(a, Duplicate) for a in actions[1:])


def test_a_console_a_few_thousand_ppm_slow_is_not_taken_for_waiting() -> None:
    c = DeviceClock()
    c.seed(0, 0)
    for minute in range(1, 121):  # two hours of presses, the console 2500 ppm slow
        host = minute * 60_000
        assert c.waited_ms(host, host - host * 2500 // 1_000_000) == 0, minute


def test_a_report_that_waited_over_24_days_does_not_become_the_reference() -> None:
    c = DeviceClock()
    c.seed(100_000_000_000, 90_000_000_000)
    waited = 25 * 24 * 3_600_000  # more than 2^31 ms: negative modulo 2^32
    assert c.waited_ms(100_000_000_000, 90_000_000_000 - waited) == waited
    assert c.waited_ms(100_000_001_000, 90_000_001_000) == 0  # the next fresh one is fresh
