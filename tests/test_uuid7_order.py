"""event building (edge/events.py, edge/contract/timefmt.py):
UUIDv7 order and uniqueness across a clock stepping back, a saturated
millisecond and a restart; format_wall at every day boundary of the range."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import uuid

from edge.contract.timefmt import format_wall
from edge.events import _Uuid7

T0 = 1_790_000_000_000 * 1_000_000  # 2026, ns


def _ms(u: str) -> int:
    return uuid.UUID(u).int >> 80


def test_ids_strictly_increase_across_a_clock_step_back_and_back_forward() -> None:
    g = _Uuid7()
    times = [T0, T0 + 5_000_000, T0 - 3_600_000_000_000, T0 - 3_600_000_000_000, T0 + 5_000_000,
             T0 + 5_000_001, T0 + 6_000_000, T0 + 86_400_000_000_000]
    ids = [g.next(t) for t in times for _ in range(50)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(u).version == 7 and uuid.UUID(u).variant == uuid.RFC_4122 for u in ids)
    # Never timed before an id already handed out (monotonic, RFC 9562 6.2).
    assert _ms(ids[100]) == (T0 + 5_000_000) // 1_000_000


def test_a_saturated_millisecond_borrows_the_next_and_never_repeats() -> None:
    g = _Uuid7()
    g.next(T0)
    g._rand = (1 << 74) - 2  # at the counter's top
    ids = [g.next(T0) for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert _ms(ids[-1]) == T0 // 1_000_000 + 1
    # The real clock then reaches the borrowed millisecond: still increasing.
    later = [g.next(T0 + 1_000_000) for _ in range(10)]
    assert ids[-1] < later[0]
    assert later == sorted(later)


def test_ids_of_two_processes_at_the_same_millisecond_differ() -> None:
    code = ("from edge.events import _Uuid7\n"
            f"g = _Uuid7()\nprint('\\n'.join(g.next({T0}) for _ in range(2000)))")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.split() for _ in range(2)]
    assert not set(runs[0]) & set(runs[1])


def test_format_wall_at_every_day_boundary_1960_to_2099() -> None:
    day = dt.date(1960, 1, 1)
    end = dt.date(2099, 12, 31)
    while day <= end:
        start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        ns = int(start.timestamp()) * 1_000_000_000
        assert format_wall(ns) == f"{day.isoformat()}T00:00:00.000Z"
        assert format_wall(ns - 1) == (day - dt.timedelta(days=1)).isoformat() \
            + "T23:59:59.999Z" if day > dt.date(1960, 1, 1) else True
        day += dt.timedelta(days=1)
    assert format_wall(951_782_400_000_000_000) == "2000-02-29T00:00:00.000Z"
    assert format_wall(0) == "1970-01-01T00:00:00.000Z"
    assert format_wall(-1) == "1969-12-31T23:59:59.999Z"
