"""The terminal kind's device-side loss records, driven directly (no threads):
a jump in record ids is a `device_lost` record, unless it is more than a
terminal can have made (issue 14: a jump to 4 billion is not 4 billion losses)."""

from __future__ import annotations

from pathlib import Path

from drivers.terminal import MAX_RECORD_ID, Presence
from edge.alarms import Alarms
from edge.clock import ManualClock
from edge.config import GuardsConfig
from edge.events import DeviceLost
from edge.guards import Guards
from edge.kinds.base import Context, Decision, Env, Reading
from edge.kinds.terminal import MAX_PLAUSIBLE_GAP, Terminal, TerminalConfig, TerminalInput
from edge.operators import Operators

SERIAL = "00C0FFEE0001"


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.clock = ManualClock()
        self.alarms = Alarms()
        self.ctx = Context(self.clock, Operators(tmp, {}), Guards(GuardsConfig(
            1000, 10.0, None, "00:00", "00:00", "UTC", "flag")), self.alarms, led_ms=0,
            send_personal_data=True, badges={})
        env = Env(lambda _m: None, self.clock, tmp, lambda _s: [], lambda: None)
        self.terminal = Terminal(TerminalConfig("st3-a", "terminal", "office-12", SERIAL), env)
        self.terminal.worker.ack = lambda frame_seq: True  # type: ignore[method-assign]
        self.frame = 0

    def record(self, rec_id: int) -> Decision:
        self.frame += 1
        data = TerminalInput(Presence(rec_id, 1, 1, 60_000, 0), SERIAL, self.frame)
        d = self.terminal.decide(Reading("st3-a", data, self.clock.mono_ns(),
                                         self.clock.wall_ns()), self.ctx)
        self.terminal.committed([(d, [True] * len(d.appends))], self.ctx)
        return d

    def losses(self, d: Decision) -> list[int]:
        return [a.event.body.lost for a in d.appends
                if a.event is not None and isinstance(a.event.body, DeviceLost)]


def test_a_jump_in_record_ids_is_announced_as_device_lost(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.record(10)
    d = rig.record(15)
    assert rig.losses(d) == [4]
    assert rig.ctx.discarded == {"device_overflow": 4}
    assert rig.alarms.has("device_lost")


def test_an_implausible_jump_stores_the_record_but_invents_no_losses(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.record(5)
    d = rig.record(MAX_RECORD_ID)  # ~4.3 billion: the flash was reset or the unit replaced
    assert rig.losses(d) == []
    assert [a.event.body.record_id for a in d.appends if a.event is not None] == [  # type: ignore[union-attr]
        MAX_RECORD_ID]
    assert "device_overflow" not in rig.ctx.discarded
    assert rig.terminal.decode_errors.get("id_jump") == 1
    assert rig.alarms.has("device_implausible")
    assert not rig.alarms.has("device_lost")
    # The largest plausible gap is still a count of losses.
    rig2 = Rig(tmp_path)
    rig2.record(1)
    assert rig2.losses(rig2.record(MAX_PLAUSIBLE_GAP + 2)) == [MAX_PLAUSIBLE_GAP]
