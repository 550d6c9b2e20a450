"""What operator tagging and the guards add to each press, as a ratio to
encoding the event (JSON), measured in the same process.

    .venv/bin/python benchmarks/tagging.py [--presses 20000]

Cases, each per press: `Operators.who` for a desk with a roster of 20 shifts
(weekday shifts in Europe/Berlin) and no login (the roster is searched),
and with a badge login (found first); `Guards.press` with opening hours
and the burst window; the baseline `encode_event` of the same press.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge.config import GuardsConfig  # noqa: E402
from edge.contract.timefmt import parse_days  # noqa: E402
from edge.events import (  # noqa: E402
    DeviceRef,
    Event,
    EventTime,
    OperatorTag,
    Press,
    encode_event,
    new_event_id,
)
from edge.guards import Guards  # noqa: E402
from edge.operators import Operators, Shift  # noqa: E402

T0 = 1_795_424_400_000_000_000  # Monday 2026-11-23 09:00 Berlin
STEP = 5 * 10**9  # a press every 5 s of wall time


def per_call_us(fn: Callable[[int], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presses", type=int, default=20_000)
    n = ap.parse_args().presses
    event = Event(new_event_id(), "desk-1", DeviceRef("fc3-a", "console", "00A1B2C3D4E5"),
                  Press(0, "good", 1, False), OperatorTag("op-1", "schedule"),
                  EventTime(T0, True, "boot", 10**9))
    base = per_call_us(lambda i: encode_event(event, i + 1, "clinic-3", "reception-1"), n)
    print(f"encode_event (baseline): {base:.1f} us/press")
    with tempfile.TemporaryDirectory() as tmp:
        ops = Operators(Path(tmp), {"desk-1": None, "desk-2": None})
        for k in range(20):
            ops.add_shift(Shift(f"desk-{k % 2 + 1}", f"op-{k}", parse_days("mon-fri"),
                                f"{6 + k % 10:02d}:00", f"{7 + k % 10:02d}:00",
                                "Europe/Berlin"))
        roster = per_call_us(lambda i: ops.who("desk-1", T0 + i * STEP), n)
        print(f"Operators.who, roster of 20 shifts: {roster:.1f} us/press = "
              f"{roster / base:.2f} x encode")
        ops.login("desk-2", "op-17", "badge", T0)
        badge = per_call_us(lambda i: ops.who("desk-2", T0 + 1 + i * 10**6), n)
        print(f"Operators.who, badge login: {badge:.1f} us/press = {badge / base:.2f} x encode")
        ops.close()
    guards = Guards(GuardsConfig(5, 10.0, parse_days("mon-sat"), "08:00", "20:00",
                                 "Europe/Berlin", "flag"))
    g = per_call_us(lambda i: guards.press("desk-1", i * 10**9, T0 + i * STEP, False), n)
    print(f"Guards.press (hours + burst): {g:.1f} us/press = {g / base:.2f} x encode")


if __name__ == "__main__":
    main()
