"""Press counts per local day, kept in the collector's database for the dashboards.

The dashboards would otherwise count every press of their range on each page
load (a year of a 10-clinic network is 2 million).  Here `reports.press_counts`
(the one implementation of the rules) is applied to one local day at a time,
and its counts are kept: `press_rollup` (site, desk, operator, mood, burst)
and `press_rollup_hours` (hour, mood, burst), per report zone and day.  The
dashboards read them and apply `reports.loyalty_from_counts` and
`reports.bad_by_time_from_counts`, as `feedback-collector report` applies them
to `press_counts` of raw rows.  A day's counts depend only on the presses
within `reports.DAY_MARGIN_MS` of it (the test-HOLD pairing looks an hour
either way), so each day is computed from that window and is exact on its own.

What makes a day's counts stale, and how `refresh` finds it:

- Events received since the last refresh (a new press, a replay from an edge's
  outage, a test HOLD after midnight): the presses with `received_ms` above
  the highest one seen, less `LAG_MS`.  The margin is for an intake
  transaction that commits after a later one (`received_ms` is taken before
  the transaction, which may wait 30 s for SQLite's lock; PostgreSQL intake
  instances run on hosts whose clocks differ).  A day near such a press is
  recomputed only when the number of presses in its window differs from the
  number it was computed from (`rollup_days.presses`): presses are only ever
  added, so the same number is the same presses.
- A timesync anchor stored since (`anchors`, compared with `rollup_anchors`):
  intake re-times that boot's unsynchronised events, moving them from their
  recorded day to their real one; both are recomputed whatever the counts.
- A zone never rolled up: every day with presses.

Marking and computing are separate transactions: the days found stale are
marked (`presses` = -1) together with the new high-water mark and anchors, in
one transaction; then the marked days are computed a few at a time, each
batch in its own transaction, so intake (SQLite: one writer) waits at most for
one batch.  Every transaction first locks the zone's `rollup_state` row, so
two app instances (or the tick and a page) refreshing at once take turns and
share the marked days; a crash leaves the marks for the next refresh.  A
day's rows are replaced (deleted and inserted) in the transaction that
computes it, with the count of presses from the same statement's rows.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from collector import reports
from collector.db import Cursor, Database
from edge.contract.timefmt import WALL_MAX_MS, WALL_MIN_MS

__all__ = ["LAG_MS", "counts", "refresh"]

# How much later than a newer one an intake transaction may commit (module docstring).
LAG_MS: Final = 3_600_000
# Days computed per transaction: about 40,000 presses for a 10-clinic network,
# half a second of the database's write lock.
DAYS_PER_BATCH: Final = 7
_HOUR: Final = 3_600_000
# Rows per INSERT statement (8 parameters each: far below either database's limit).
_ROWS_PER_INSERT: Final = 500

_COLS: Final = ("site", "edge", "seq", "kind", "desk", "device_id", "operator_id", "wall_ms",
                "corrected_ms", "flags", "label", "score", "hold", "button")
# The presses whose time (corrected when known) is in [lo, hi): by `events_by_time`
# for those without a correction, by the partial `events_by_corrected` (kind,
# corrected_ms) for the rest.
# One statement, so on PostgreSQL the rows and their count are one snapshot.
_SELECT: Final = ", ".join(_COLS)
_WINDOW: Final = (
    f"SELECT {_SELECT} FROM events WHERE kind = 'press' AND corrected_ms IS NULL "  # noqa: S608
    f"AND wall_ms >= ? AND wall_ms < ? UNION ALL SELECT {_SELECT} FROM events "
    "WHERE corrected_ms >= ? AND corrected_ms < ? AND kind = 'press'")
_WINDOW_COUNT: Final = (
    "SELECT (SELECT COUNT(*) FROM events WHERE kind = 'press' AND corrected_ms IS NULL "
    "AND wall_ms >= ? AND wall_ms < ?) + (SELECT COUNT(*) FROM events WHERE "
    "corrected_ms >= ? AND corrected_ms < ? AND kind = 'press')")


def _day_bounds(day: date, tz: str) -> tuple[int, int]:
    """[first ms, last ms + 1) of a local day, nominally (from local midnight).

    Where a zone skips midnight this is up to an hour off; DAY_MARGIN_MS has
    that hour."""
    zone = ZoneInfo(tz)
    nxt = day + timedelta(days=1)
    a = datetime(day.year, day.month, day.day, tzinfo=zone)
    b = datetime(nxt.year, nxt.month, nxt.day, tzinfo=zone)
    return int(a.timestamp()) * 1000, int(b.timestamp()) * 1000


def _window(first: date, last: date, tz: str) -> tuple[int, int]:
    """The times whose presses decide the days `first`..`last`."""
    return (_day_bounds(first, tz)[0] - reports.DAY_MARGIN_MS,
            _day_bounds(last, tz)[1] + reports.DAY_MARGIN_MS)


def _days_between(lo: int, hi: int, tz: str) -> set[date]:
    """The local days that times from `lo` to `hi` fall on (only those in range)."""
    lo, hi = max(lo, WALL_MIN_MS), min(hi, WALL_MAX_MS)
    if lo > hi:
        return set()
    first, last = reports.local_day(lo, tz), reports.local_day(hi, tz)
    return {first + timedelta(days=i) for i in range((last - first).days + 1)}


def _days_near(ms: int, tz: str) -> set[date]:
    """The days whose figures a press at `ms` may change (its own, and a neighbour's
    through the test-HOLD pairing)."""
    if not WALL_MIN_MS <= ms <= WALL_MAX_MS:
        return set()  # never counted, never paired
    return _days_between(ms - reports.DAY_MARGIN_MS, ms + reports.DAY_MARGIN_MS, tz)


@dataclass
class _Plan:
    initial: bool
    received_ms: int | None  # the high-water mark after this refresh
    changed_mark: bool
    anchors: list[tuple[str, str, str]] = field(default_factory=list)
    stale: set[date] = field(default_factory=set)

    @property
    def nothing(self) -> bool:
        return not (self.initial or self.changed_mark or self.anchors or self.stale)


def _plan(cur: Cursor, tz: str, now_ms: int) -> _Plan:
    """Which days are stale (module docstring).  Anchors and the high-water mark
    are read before any event: what commits after is seen by the next refresh."""
    cur.execute("SELECT received_ms FROM rollup_state WHERE tz = ?", (tz,))
    row = cur.fetchone()
    mark = None if row is None or row[0] is None else int(row[0])
    cur.execute("SELECT a.site, a.edge, a.boot_id FROM anchors a LEFT JOIN rollup_anchors r "
                "ON r.tz = ? AND r.site = a.site AND r.edge = a.edge AND "
                "r.boot_id = a.boot_id WHERE r.tz IS NULL", (tz,))
    anchors = [(str(s), str(e), str(b)) for s, e, b in cur.fetchall()]
    if mark is None:
        cur.execute("SELECT MAX(received_ms) FROM events")
        top = cur.fetchone()[0]
        plan = _Plan(True, None if top is None else min(int(top), now_ms), False, anchors)
        # Hours, not rows: a year is a few thousand.  Division truncates on
        # PostgreSQL and SQLite alike (towards zero before 1970): an hour
        # either side covers both.  The neighbours in the margin too, so every
        # day a later press is checked against has its count.
        cur.execute("SELECT DISTINCT COALESCE(corrected_ms, wall_ms) / 3600000 FROM events "
                    "WHERE kind = 'press'")
        margin = reports.DAY_MARGIN_MS
        for (hour,) in cur.fetchall():
            plan.stale |= _days_between(int(hour) * _HOUR - _HOUR - margin,
                                        int(hour) * _HOUR + 2 * _HOUR + margin, tz)
        return plan
    # `kind` is tested here, not in SQL: SQLite, without statistics, would take
    # `kind = 'press'` by `events_by_time` and read every press.
    cur.execute("SELECT kind, wall_ms, corrected_ms, received_ms FROM events "
                "WHERE received_ms > ?", (mark - LAG_MS,))
    top, near = mark, set()
    for kind, wall, corrected, received in cur.fetchall():
        if kind != "press":
            continue
        # A clock far ahead on an intake host must not hide the presses after it.
        top = max(top, min(int(received), now_ms))
        near |= _days_near(int(corrected if corrected is not None else wall), tz)
    plan = _Plan(False, top, top != mark, anchors)
    for site, edge, boot_id in anchors:
        # Intake re-timed this boot's unsynchronised presses: their recorded day
        # and their real one (the recorded one only, if out of range).
        cur.execute("SELECT kind, wall_ms, corrected_ms FROM events WHERE site = ? AND "
                    "edge = ? AND boot_id = ? AND synced = 0", (site, edge, boot_id))
        for kind, wall, corrected in cur.fetchall():
            if kind != "press":
                continue  # as above: the edge's own rows, by its index
            plan.stale |= _days_near(int(wall), tz)
            if corrected is not None:
                plan.stale |= _days_near(int(corrected), tz)
    for day in sorted(near - plan.stale):
        cur.execute("SELECT presses FROM rollup_days WHERE tz = ? AND day = ?",
                    (tz, day.isoformat()))
        found = cur.fetchone()
        kept = 0 if found is None else int(found[0])
        if kept < 0:
            continue  # marked already, not computed yet
        lo, hi = _window(day, day, tz)
        cur.execute(_WINDOW_COUNT, (lo, hi, lo, hi))
        if int(cur.fetchone()[0]) != kept:
            plan.stale.add(day)
    return plan


def _lock(db: Database, cur: Cursor, tz: str) -> None:
    """Take the zone's turn: refreshes of one zone run one transaction at a time
    (SQLite's BEGIN IMMEDIATE already holds the whole database)."""
    cur.execute("INSERT INTO rollup_state (tz, received_ms) VALUES (?, NULL) "
                "ON CONFLICT (tz) DO NOTHING", (tz,))
    cur.execute("SELECT received_ms FROM rollup_state WHERE tz = ?"  # noqa: S608 - ours
                + db.for_update, (tz,))
    cur.fetchone()


def _mark(db: Database, cur: Cursor, tz: str, plan: _Plan) -> None:
    for day in sorted(plan.stale):
        cur.execute("INSERT INTO rollup_days (tz, day, presses) VALUES (?, ?, -1) "
                    "ON CONFLICT (tz, day) DO UPDATE SET presses = -1", (tz, day.isoformat()))
    for site, edge, boot_id in plan.anchors:
        cur.execute("INSERT INTO rollup_anchors (tz, site, edge, boot_id) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (tz, site, edge, boot_id) DO NOTHING", (tz, site, edge, boot_id))
    if plan.received_ms is not None:
        cur.execute(f"UPDATE rollup_state SET received_ms = {db.greatest}(COALESCE("  # noqa: S608
                    "received_ms, ?), ?) WHERE tz = ?",
                    (plan.received_ms, plan.received_ms, tz))


def _runs(days: Sequence[date]) -> list[tuple[date, date]]:
    """Sorted days as runs of consecutive days."""
    runs: list[tuple[date, date]] = []
    for d in days:
        if runs and runs[-1][1] + timedelta(days=1) == d:
            runs[-1] = (runs[-1][0], d)
        else:
            runs.append((d, d))
    return runs


def _insert(cur: Cursor, table: str, cols: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        part = rows[start:start + _ROWS_PER_INSERT]
        one = f"({', '.join('?' * len(cols))})"
        cur.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES "  # noqa: S608 - names are ours
                    f"{', '.join([one] * len(part))}", [v for r in part for v in r])


def _compute(cur: Cursor, tz: str, first: date, last: date) -> None:
    """Replace the counts of the days `first`..`last` with those of the presses now."""
    lo, hi = _window(first, last, tz)
    cur.execute(_WINDOW, (lo, hi, lo, hi))
    rows = [dict(zip(_COLS, r, strict=True)) for r in cur.fetchall()]
    got = reports.press_counts(rows, tz, first, last)
    span = (tz, first.isoformat(), last.isoformat())
    cur.execute("DELETE FROM press_rollup WHERE tz = ? AND day >= ? AND day <= ?", span)
    cur.execute("DELETE FROM press_rollup_hours WHERE tz = ? AND day >= ? AND day <= ?", span)
    _insert(cur, "press_rollup", ("tz", "day", "site", "desk", "operator_id", "mood", "burst",
                                  "n"),
            [(tz, day.isoformat(), site, desk, op, m, int(burst), n)
             for (site, desk, op, day, m, burst), n in sorted(got.groups.items())])
    _insert(cur, "press_rollup_hours", ("tz", "day", "hour", "mood", "burst", "n"),
            [(tz, day.isoformat(), hour, m, int(burst), n)
             for (day, hour, m, burst), n in sorted(got.hours.items())])
    # Each day's count of presses in its own window, from these same rows.
    times = sorted(reports.event_ms(r) for r in rows)
    d = first
    while d <= last:
        a, b = _window(d, d, tz)
        n = bisect.bisect_left(times, b) - bisect.bisect_left(times, a)
        cur.execute("INSERT INTO rollup_days (tz, day, presses) VALUES (?, ?, ?) "
                    "ON CONFLICT (tz, day) DO UPDATE SET presses = excluded.presses",
                    (tz, d.isoformat(), n))
        d += timedelta(days=1)


def refresh(db: Database, tz: str, now_ms: int | None = None) -> int:
    """Bring the zone's press counts up to date; return how many days were computed.

    Nothing is written when nothing is stale (a page load's usual case: a few
    indexed reads)."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    with db.transaction(write=False) as cur:
        plan = _plan(cur, tz, now)
        cur.execute("SELECT 1 FROM rollup_days WHERE tz = ? AND presses < 0 LIMIT 1", (tz,))
        pending = cur.fetchone() is not None
    if plan.nothing and not pending:
        return 0
    if not plan.nothing:
        with db.transaction() as cur:
            _lock(db, cur, tz)
            # Again under the lock: another refresh may have done it meanwhile.
            plan = _plan(cur, tz, now)
            _mark(db, cur, tz, plan)
    computed = 0
    while True:
        with db.transaction() as cur:
            _lock(db, cur, tz)
            cur.execute("SELECT day FROM rollup_days WHERE tz = ? AND presses < 0 "  # noqa: S608
                        f"ORDER BY day LIMIT {DAYS_PER_BATCH}", (tz,))
            days = [date.fromisoformat(str(r[0])) for r in cur.fetchall()]
            for first, last in _runs(days):
                _compute(cur, tz, first, last)
        if not days:
            return computed
        computed += len(days)


def counts(db: Database, tz: str, start: date, end: date) -> reports.PressCounts:
    """The kept counts of the local days `start`..`end` (call `refresh` first).

    One statement for both tables, so on PostgreSQL both are of one moment
    (a refresh committing between two would make the slots and the index of
    the same range disagree)."""
    out = reports.PressCounts()
    span = (tz, start.isoformat(), end.isoformat())
    for day, site, desk, op, hour, m, burst, n in db.query(
            "SELECT day, site, desk, operator_id, -1, mood, burst, n FROM press_rollup "
            "WHERE tz = ? AND day >= ? AND day <= ? UNION ALL "
            "SELECT day, NULL, NULL, NULL, hour, mood, burst, n FROM press_rollup_hours "
            "WHERE tz = ? AND day >= ? AND day <= ?", (*span, *span)):
        d = date.fromisoformat(str(day))
        if hour < 0:
            out.groups[(str(site), str(desk), str(op), d, str(m), bool(burst))] += int(n)
        else:
            out.hours[(d, int(hour), str(m), bool(burst))] += int(n)
    return out
