"""The console kind's acknowledgements and loss records, driven directly (no
threads): what is ACKed after commits that fail and succeed, and what a lost
counter becomes.  The fault suite (tests/test_faults.py) does the same end to end."""

from __future__ import annotations

from pathlib import Path

from drivers.console import CMD_ACK, REPORT_COMMAND, ConsoleReport, ReportType
from edge.alarms import Alarms
from edge.clock import ManualClock
from edge.config import GuardsConfig
from edge.guards import Guards
from edge.kinds.base import Context, Decision, Env, Reading
from edge.kinds.console import Console, ConsoleConfig, ConsoleInput, ConsoleLoss
from edge.operators import Operators


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.clock = ManualClock()
        self.alarms = Alarms()
        self.ctx = Context(self.clock, Operators(tmp, {}), Guards(GuardsConfig(
            1000, 10.0, None, "00:00", "00:00", "UTC", "flag")), self.alarms, led_ms=0,
            send_personal_data=True, badges={})
        env = Env(lambda _m: None, self.clock, tmp, lambda _s: [], lambda: None)
        self.console = Console(ConsoleConfig("fc3-a", "console", "desk-1", "00A1B2C3D4E5"), env)
        self.sent: list[bytes] = []
        # Host monotonic ms minus device uptime ms (the device's clock runs with ours).
        self.clock_offset_ms = self.clock.mono_ns() // 1_000_000 - 1000
        self.console.worker.send = self._send  # type: ignore[method-assign]

    def _send(self, report: bytes) -> bool:
        self.sent.append(report)
        return True

    def acks(self) -> list[int]:
        """The dev_seqs ACKed, from the output reports as the sheet lays them out."""
        return [data[2] for data in self.sent if data[0] == REPORT_COMMAND
                and data[1] == CMD_ACK]

    def reading(self, data: object) -> Reading:
        return Reading("fc3-a", data, self.clock.mono_ns(), self.clock.wall_ns())

    def decide(self, data: object) -> Decision:
        return self.console.decide(self.reading(data), self.ctx)

    def commit(self, decisions: list[Decision]) -> None:
        """As the intake does after a successful commit: every event stored."""
        self.console.committed([(d, [a.event is not None for a in d.appends])
                                for d in decisions], self.ctx)


    def press(self, dev_seq: int, replay: bool = False) -> ConsoleInput:
        """Press dev_seq happened at device uptime 1000 + 100 * dev_seq ms; a new press
        is read when it happens, a replay now (the device clock runs with the host's)."""
        if not replay:
            self.clock.advance(0.1)
        now = self.clock.mono_ns() // 1_000_000 - self.clock_offset_ms
        return ConsoleInput(ConsoleReport(dev_seq, ReportType.PRESS, dev_seq % 3, replay, False,
                                          1000 + dev_seq * 100, now))


def test_an_ack_never_covers_a_press_whose_commit_failed(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    failed = [rig.decide(rig.press(i)) for i in range(1, 21)]
    rig.console.commit_failed()  # disk full: nothing ACKed, the console keeps them
    assert rig.acks() == []
    rig.commit([rig.decide(rig.press(21))])  # space again: the new press is stored...
    assert rig.acks() == []  # ...but an ACK of 21 would release 1..20 unstored
    rig.commit([rig.decide(rig.press(i, replay=True)) for i in range(1, 21)])
    assert rig.acks() == [21]
    assert failed


def test_presses_overwritten_in_the_ring_do_not_hold_the_ack_forever(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    [rig.decide(rig.press(i)) for i in range(1, 41)]
    rig.console.commit_failed()  # 40 refused; the ring (32) keeps 9..40, lost 8
    loss = rig.decide(ConsoleLoss(total=8, unacked=32))
    rig.commit([loss, *(rig.decide(rig.press(i, replay=True)) for i in range(9, 41))])
    assert rig.acks() == [40]
    assert loss.appends[0].event is not None
    assert loss.appends[0].event.body.as_json() == {"lost": 8, "total": 8,
                                                    "reason": "ring_overflow"}


def test_a_loss_record_whose_commit_failed_is_recorded_whole_later(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.decide(ConsoleLoss(total=8, unacked=32))
    rig.console.commit_failed()
    assert rig.ctx.discarded == {}  # not counted before it is on record
    later = rig.decide(ConsoleLoss(total=9, unacked=32))
    rig.commit([later])
    assert later.appends[0].event is not None
    assert later.appends[0].event.body.as_json()["lost"] == 9
    assert rig.ctx.discarded == {"device_overflow": 9}
    assert rig.alarms.has("device_lost")


def test_a_power_cut_with_unstored_presses_is_a_device_lost_record(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    [rig.decide(rig.press(i)) for i in range(1, 4)]
    rig.console.commit_failed()
    hello = ConsoleInput(ConsoleReport(0, ReportType.HELLO, 0xFF, False, False, 5, 10))
    d = rig.decide(hello)
    lost = [a.event for a in d.appends if a.event is not None]
    assert [e.body.as_json() for e in lost] == [{"lost": 3, "total": 3,
                                                 "reason": "power_loss"}]
    rig.commit([d])
    assert rig.ctx.discarded == {"device_power_loss": 3}


def test_an_implausible_lost_counter_invents_no_losses(tmp_path: Path) -> None:
    """A lost counter of 2^32 - 1 a minute after power-up is a firmware fault, not
    4 billion lost presses (issue 14: absurd device values are refused and counted)."""
    rig = Rig(tmp_path)
    absurd = rig.decide(ConsoleLoss(total=2**32 - 1, unacked=0, uptime_ms=60_000))
    assert absurd.appends == []
    assert rig.console.decode_errors == {"lost_implausible": 1}
    assert rig.alarms.has("device_implausible")
    assert not rig.alarms.has("device_lost")
    # The most a console can have lost in that minute is still a count.
    real = rig.decide(ConsoleLoss(total=60_000 // 100 + 32, unacked=32, uptime_ms=60_000))
    rig.commit([real])
    assert rig.ctx.discarded == {"device_overflow": 632}


def test_a_console_powered_up_with_the_pi_is_a_new_session_even_after_a_short_one(
        tmp_path: Path) -> None:
    """Found by the power-cut tier (tests/vm/test_power_cut.py): after a power cut of
    the whole Pi the console's first HELLO is lost to usbhid's flush at open and only
    its replay is read, with the HELLO key every session has; after a short session
    it was taken for the old one: its lost counter judged against the old session's,
    a new press matching an old key ACKed and not stored."""
    from edge.kinds.console import ConsoleOpened

    old = ["0:0:3:255", "1:2500:1:0", "lost:5", "up:an-earlier-boot:-4000:900000"]
    rig = Rig(tmp_path)
    env = Env(lambda _m: None, rig.clock, tmp_path, lambda _s: list(old), lambda: None)
    rig.console = Console(ConsoleConfig("fc3-a", "console", "desk-1", "00A1B2C3D4E5"), env)
    rig.console.worker.send = rig._send  # type: ignore[method-assign]
    # The Pi booted 1 s ago (mono); the console has been up 3 s: it powered up with the Pi.
    opened = rig.decide(ConsoleOpened(uptime_ms=rig.clock.mono_ns() // 1_000_000 - 100))
    assert opened.forget == (rig.console.scope,)
    hello = rig.decide(ConsoleInput(ConsoleReport(0, ReportType.HELLO, 0xFF, True, False, 0,
                                                  900)))
    assert not hello.duplicate
    same_key = rig.decide(ConsoleInput(ConsoleReport(1, ReportType.PRESS, 0, False, False,
                                                     2500, 2600)))
    assert not same_key.duplicate  # a new press, though its key was the old session's
    assert same_key.appends[-1].event is not None
    lost = rig.decide(ConsoleLoss(total=3, unacked=0, uptime_ms=3000))
    assert [a.event.body.as_json()["lost"] for a in lost.appends if a.event] == [3]
    assert rig.console.resets == 1


def test_a_console_older_than_the_pi_s_boot_keeps_its_session(tmp_path: Path) -> None:
    """A console on a powered hub lives through a Pi reboot: its replays are duplicates."""
    from edge.kinds.console import ConsoleOpened

    old = ["0:0:3:255", "1:2500:1:0", "up:an-earlier-boot:-4000:900000"]
    rig = Rig(tmp_path)
    env = Env(lambda _m: None, rig.clock, tmp_path, lambda _s: list(old), lambda: None)
    rig.console = Console(ConsoleConfig("fc3-a", "console", "desk-1", "00A1B2C3D4E5"), env)
    opened = rig.decide(ConsoleOpened(uptime_ms=rig.clock.mono_ns() // 1_000_000 + 60_000))
    assert opened.forget == ()
    replay = rig.decide(ConsoleInput(ConsoleReport(1, ReportType.PRESS, 0, True, False,
                                                   2500, 61_000)))
    assert replay.duplicate


def test_a_console_whose_uptime_wrapped_keeps_its_session_across_a_daemon_restart(
        tmp_path: Path) -> None:
    """Review of issue 15: the power-up is compared modulo 2^32 ms (49.7 days)."""
    from edge.kinds.console import ConsoleOpened

    rig = Rig(tmp_path)
    now_ms = rig.clock.mono_ns() // 1_000_000
    # Last open an hour ago: the console had powered up 2^32 - 5000 ms before that.
    up = now_ms - 3_600_000 - (2**32 - 5_000)
    old = ["1:2500:1:0", f"up:{rig.clock.boot_id}:{up}:{now_ms - 3_600_000}"]
    env = Env(lambda _m: None, rig.clock, tmp_path, lambda _s: list(old), lambda: None)
    rig.console = Console(ConsoleConfig("fc3-a", "console", "desk-1", "00A1B2C3D4E5"), env)
    # Now its uptime has wrapped: (2^32 - 5000 + 3600000) mod 2^32.
    opened = rig.decide(ConsoleOpened(uptime_ms=3_600_000 - 5_000))
    assert opened.forget == ()
