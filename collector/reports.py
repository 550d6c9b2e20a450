"""The figures clinics manage by, computed from stored events.

Every function takes rows from `queries.events` and returns plain rows, so
tests check them against figures worked out by hand.  An event's time is its
corrected time (timesync) when known, else its recorded wall time; days,
ISO weeks (Monday first) and months are those of the report's time zone.

- Emotional loyalty index (desk consoles and keyboard-class buttons):
  % good - % bad of the presses.  Three-level labels count as themselves;
  yes/no as good/bad; five-point marks 5-4 good, 3 neutral, 2-1 bad; other
  labels by the sign of their score, and not at all without one.  Not counted:
  HOLDs (a long press is not a vote), a HOLD flagged `test` together with the
  PRESS of the same device and button just before it (an installer's test:
  the last such PRESS by seq within `TEST_PAIR_MS` of the HOLD's time, found
  among all the rows given, so a pair across midnight or across a report's
  last day is one test whatever the range), and, unless asked for, presses
  flagged `burst`.  The pairing only ever looks an hour either way, so a day's
  presses are decided by the rows within `DAY_MARGIN_MS` of that day: that is
  what lets `collector.rollup` count each local day once and keep it.
  The press figures are two steps: `press_counts` (the rules above: which
  presses count, their mood, local day and hour) and the functions that turn
  such counts into rows (`loyalty_from_counts`, `bad_by_time_from_counts`);
  `loyalty_index` and `bad_presses_by_time` are the two applied to raw rows,
  the web dashboards apply the second to counts kept per day.
- Client-attractiveness index per doctor: % yes - % no of the Q1 answers.
  The base is the number of answers, or, where a CSV of visits gives the
  number of patients the doctor served in exactly that period, that number.
- Answer rate per terminal: answers / approaches (presence counts).
- Callback list: answers with Q1 "no" and a phone number, newest first, with
  their handling status; `stale` when still `new` after the configured time.

A period with no counted data is listed with zero counts and no index, never
with an index of 0, which would read as a neutral result.

Times: every report leaves out a row whose time is outside the contract's
range (1960-01-01 to 2099-12-31 UTC, `WALL_MIN_MS`..`WALL_MAX_MS` in
edge.contract.timefmt), which intake no longer stores but a database from
before may hold (a wall time in year 10000 or year 1, a correction into year
10146): no date conversion can fail on what is left, in any zone.
`out_of_range` counts them, so the CLI says how many were left out.

Output: every CSV the collector writes goes through `write_csv`, and every
table printed to a terminal shows its cells through `text_cell`.  Cells come
from patients (comments), devices and edges, so:

- CSV, following OWASP's "CSV Injection" guidance
  (https://owasp.org/www-community/attacks/CSV_Injection; ASVS 5.0 1.2.10):
  every cell is quoted (RFC 4180, quotes doubled), so a separator inside a
  cell (',' here, ';' where a locale's list separator is ';', as in German
  Excel) never starts a new cell in a spreadsheet that reads the file; a text
  cell whose first character, leading whitespace aside, is `=`, `+`, `-`,
  `@`, a tab or a carriage return would run as a formula, so it is written
  with a `'` in front; and because a cell may still be split where the
  quotes are not honoured (a "text to columns" at ';', a tool that splits
  lines), a `'` also goes before such a character that follows a separator
  a locale may use (`,` `;` `|`, a tab, a line break; spaces and quotes
  between aside): "ok;=1+2;" is written "ok;'=1+2;".  Text that a spreadsheet
  would turn into a number and so change stays text with the same `'`: every
  phone number (a `Text` cell: `+4917...`, and `0170...`, which as a number
  loses its 0), and any digit string with a leading zero or more than 15
  digits (a staff number "0042").  The `'` is Excel's and LibreOffice's own
  mark for "this is text", the rule OWASP gives; it shows in the cell, a
  price paid for a file that cannot run or change anything.  The figures
  (integers, and decimals like `-12.5` for an index) are written as they
  are, quoted, and read as numbers.  A multi-line comment stays one cell.
- Terminal: a line break in a cell shows as `⏎`, a tab as a space, and other
  control and format characters (escape sequences, bidi overrides) are
  dropped, so a cell can neither forge table rows nor drive the terminal.
"""

from __future__ import annotations

import calendar
import csv
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import IO, Any, Final
from zoneinfo import ZoneInfo

from edge.contract.timefmt import WALL_MAX_MS, WALL_MIN_MS

__all__ = ["DAY_MARGIN_MS", "PERIODS", "TEST_PAIR_MS", "CallbackRow", "IndexRow", "PressCounts",
           "RateRow", "SlotRow", "Text", "answer_rate", "bad_by_time_from_counts",
           "bad_presses_by_time", "callback_list", "csv_cell", "doctor_index", "event_ms",
           "local_day", "loyalty_from_counts", "loyalty_index", "mood", "out_of_range",
           "period_bounds", "period_key", "period_span", "periods", "press_counts",
           "text_cell", "write_csv"]

PERIODS = ("day", "week", "month")
# How far from an installer's test HOLD the PRESS it cancels may be: the two are
# one push of a button, seconds apart; an hour is far more than any clock step.
TEST_PAIR_MS: Final = 3_600_000
# The rows a local day's press figures depend on: a PRESS is cancelled by a HOLD
# within TEST_PAIR_MS, chosen among the presses within TEST_PAIR_MS of that HOLD
# (2 x), and a zone that skips its midnight starts a day up to an hour off the
# midnight asked for (+ 1 h).
DAY_MARGIN_MS: Final = 2 * TEST_PAIR_MS + 3_600_000
_MOODS = {"good": "good", "yes": "good", "neutral": "neutral", "bad": "bad", "no": "bad"}


def event_ms(row: dict[str, Any]) -> int:
    corrected = row.get("corrected_ms")
    return int(corrected if corrected is not None else row["wall_ms"])


def _representable(row: dict[str, Any]) -> bool:
    return WALL_MIN_MS <= event_ms(row) <= WALL_MAX_MS


def _usable(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose time is in the contract's range (module docstring)."""
    return [r for r in rows if _representable(r)]


def out_of_range(rows: Iterable[dict[str, Any]]) -> int:
    """How many rows every report leaves out: their time is outside the range."""
    return sum(1 for r in rows if not _representable(r))


_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _local(ms: int, tz: str) -> date:
    # Exact integer ms (a float loses them far from 1970); ms in the range only.
    return (_EPOCH + timedelta(milliseconds=ms)).astimezone(ZoneInfo(tz)).date()


def local_day(ms: int, tz: str) -> date:
    """The local day of a time in the contract's range, in zone `tz`."""
    return _local(ms, tz)


def period_key(day: date, period: str) -> str:
    if period == "day":
        return day.isoformat()
    if period == "week":
        y, w, _ = day.isocalendar()
        return f"{y}-W{w:02d}"
    return f"{day.year}-{day.month:02d}"


def period_span(day: date, period: str) -> tuple[date, date]:
    """First and last day of the period holding `day`."""
    if period == "day":
        return day, day
    if period == "week":
        first = day - timedelta(days=day.weekday())
        return first, first + timedelta(days=6) if date.max - first >= timedelta(days=6) \
            else date.max
    return day.replace(day=1), day.replace(day=calendar.monthrange(day.year, day.month)[1])


def _first_day(key: str, period: str) -> date:
    """The first day of the period a `period_key` names."""
    if period == "day":
        return date.fromisoformat(key)
    if period == "week":
        year, week = key.split("-W")
        return date.fromisocalendar(int(year), int(week), 1)
    year, month = key.split("-")
    return date(int(year), int(month), 1)


def periods(start: date, end: date, period: str) -> list[str]:
    """Every period key from `start` to `end` (inclusive), in order."""
    keys: list[str] = []
    d = start
    while d <= end:
        k = period_key(d, period)
        if not keys or keys[-1] != k:
            keys.append(k)
        if d == date.max:
            break
        d += timedelta(days=1)
    return keys


def mood(label: str | None, score: int | None) -> str | None:
    if label in _MOODS:
        return _MOODS[label]
    if label in ("1", "2", "3", "4", "5") and score is not None:
        return "good" if score >= 4 else "neutral" if score == 3 else "bad"
    if score is None:
        return None
    return "good" if score > 0 else "neutral" if score == 0 else "bad"


@dataclass(frozen=True, slots=True)
class IndexRow:
    group: str
    period: str
    plus: int  # good presses / yes answers
    neutral: int  # neutral presses / unsure answers
    minus: int  # bad presses / no answers
    base: int  # what the percentages are of
    index: float | None  # (plus - minus) / base * 100, rounded to 0.1

    def as_list(self) -> list[Any]:
        return [self.group, self.period, self.plus, self.neutral, self.minus, self.base,
                "" if self.index is None else f"{self.index:.1f}"]


def _index(plus: int, minus: int, base: int) -> float | None:
    return None if base <= 0 else round((plus - minus) * 100 / base, 1)


def _flags(row: dict[str, Any]) -> set[str]:
    return set(str(row.get("flags") or "").split())


def _counted_presses(rows: Iterable[dict[str, Any]]
                     ) -> Iterator[tuple[dict[str, Any], str, bool]]:
    """Presses that are votes (of the usable rows), with their mood and whether
    they are flagged `burst`."""
    by_device: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "press" and _representable(r):
            by_device[(r["site"], r["edge"], r["device_id"])].append(r)
    for presses in by_device.values():
        presses.sort(key=lambda r: r["seq"])
        excluded: set[int] = set()
        for i, r in enumerate(presses):
            if r["hold"] and "test" in _flags(r):
                # The PRESS of the same button just before the test HOLD: the
                # last by seq among those within the hour, so the rows of that
                # hour decide it (module docstring).
                t = event_ms(r)
                for j in range(i - 1, -1, -1):
                    prev = presses[j]
                    if not prev["hold"] and prev["button"] == r["button"] \
                            and abs(event_ms(prev) - t) <= TEST_PAIR_MS:
                        excluded.add(prev["seq"])
                        break
        for r in presses:
            if r["hold"] or r["seq"] in excluded:
                continue
            m = mood(r["label"], r["score"])
            if m is not None:
                yield r, m, "burst" in _flags(r)


@dataclass(slots=True)
class PressCounts:
    """Counted presses (`press_counts`), as two tallies of the same presses.

    `groups`: (site, desk, operator id or "", local day, mood, burst) -> presses;
    `hours`: (local day, local hour, mood, burst) -> presses."""

    groups: dict[tuple[str, str, str, date, str, bool], int] = field(
        default_factory=lambda: defaultdict(int))
    hours: dict[tuple[date, int, str, bool], int] = field(
        default_factory=lambda: defaultdict(int))


def press_counts(rows: Iterable[dict[str, Any]], tz: str, start: date | None = None,
                 end: date | None = None) -> PressCounts:
    """The presses that count (module docstring), bursts marked, whose local day
    is from `start` to `end`, tallied by where, who, local day, hour and mood.

    The pairing of test HOLDs with their PRESS uses every row given, in the
    range or not: give the rows within `DAY_MARGIN_MS` of the days asked for."""
    zone = ZoneInfo(tz)
    out = PressCounts()
    for r, m, burst in _counted_presses(rows):
        t = (_EPOCH + timedelta(milliseconds=event_ms(r))).astimezone(zone)
        day = t.date()
        if (start is not None and day < start) or (end is not None and day > end):
            continue
        out.groups[(r["site"], r["desk"], r["operator_id"] or "", day, m, burst)] += 1
        out.hours[(day, t.hour, m, burst)] += 1
    return out


def _group(row: dict[str, Any], by: str) -> str:
    if by == "operator":
        return row["operator_id"] or "(nobody)"
    if by == "desk":
        return f"{row['site']}/{row['desk']}"
    if by == "site":
        return str(row["site"])
    if by == "doctor":
        return row["doctor"] or "(unknown)"
    if by == "terminal":
        return f"{row['site']}/{row['edge']}/{row['device_id']}"
    raise ValueError(f"unknown grouping {by!r}")


def _keys(rows: list[tuple[dict[str, Any], Any]], by: str, period: str, *, tz: str,
          start: date | None, end: date | None) -> tuple[list[str], list[str]]:
    groups = sorted({_group(r, by) for r, _ in rows})
    if start is not None and end is not None:
        return groups, periods(start, end, period)
    return groups, sorted({period_key(_local(event_ms(r), tz), period) for r, _ in rows})


def _in_range(rows: Iterable[dict[str, Any]], tz: str, start: date | None,
              end: date | None) -> list[dict[str, Any]]:
    """The usable rows (`_usable`) whose local day is from `start` to `end`."""
    out = []
    for r in _usable(rows):
        d = _local(event_ms(r), tz)
        if (start is None or d >= start) and (end is None or d <= end):
            out.append(r)
    return out


_GROUPINGS: Final = ("operator", "desk", "site")


def loyalty_from_counts(counts: PressCounts, *, by: str, period: str,
                        start: date | None = None, end: date | None = None,
                        include_burst: bool = False) -> list[IndexRow]:
    """% good - % bad per group (operator, desk or site) and period, from the
    counts of `press_counts` (of the same range)."""
    if by not in _GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}")
    tally: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    keys_seen: set[str] = set()
    for (site, desk, operator, day, m, burst), n in counts.groups.items():
        if n <= 0 or (burst and not include_burst):
            continue
        group = operator or "(nobody)" if by == "operator" else \
            f"{site}/{desk}" if by == "desk" else site
        key = period_key(day, period)
        keys_seen.add(key)
        tally[(group, key)][m] += n
    groups = sorted({g for g, _k in tally})
    keys = periods(start, end, period) if start is not None and end is not None \
        else sorted(keys_seen)
    out = []
    for g in groups:
        for k in keys:
            c = tally.get((g, k), {})
            good, neutral, bad = c.get("good", 0), c.get("neutral", 0), c.get("bad", 0)
            total = good + neutral + bad
            out.append(IndexRow(g, k, good, neutral, bad, total, _index(good, bad, total)))
    return out


def loyalty_index(rows: Iterable[dict[str, Any]], *, by: str, period: str, tz: str,
                  start: date | None = None, end: date | None = None,
                  include_burst: bool = False) -> list[IndexRow]:
    """% good - % bad per group (operator, desk or site) and period."""
    return loyalty_from_counts(press_counts(rows, tz, start, end), by=by, period=period,
                               start=start, end=end, include_burst=include_burst)


def doctor_index(rows: Iterable[dict[str, Any]], *, period: str, tz: str,
                 start: date | None = None, end: date | None = None,
                 visits: Iterable[tuple[str, str, str, int]] = ()) -> list[IndexRow]:
    """% yes - % no of Q1 per doctor and period; base: answers or imported visits."""
    answers = [(r, r["q1"]) for r in _in_range(rows, tz, start, end) if r["kind"] == "answer"]
    counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r, q1 in answers:
        counts[(_group(r, "doctor"), period_key(_local(event_ms(r), tz), period))][q1] += 1
    seen = {(d, date.fromisoformat(a), date.fromisoformat(b)): n for d, a, b, n in visits}
    groups, keys = _keys(answers, "doctor", period, tz=tz, start=start, end=end)
    out = []
    for g in groups:
        for k in keys:
            c = counts.get((g, k), {})
            yes, unsure, no = c.get("yes", 0), c.get("unsure", 0), c.get("no", 0)
            patients = seen.get((g, *period_span(_first_day(k, period), period)))
            base = patients if patients is not None else yes + unsure + no
            out.append(IndexRow(g, k, yes, unsure, no, base, _index(yes, no, base)))
    return out


@dataclass(frozen=True, slots=True)
class RateRow:
    terminal: str
    period: str
    answers: int
    approaches: int
    rate: float | None  # answers / approaches, as a percentage rounded to 0.1

    def as_list(self) -> list[Any]:
        return [self.terminal, self.period, self.answers, self.approaches,
                "" if self.rate is None else f"{self.rate:.1f}"]


def answer_rate(rows: Iterable[dict[str, Any]], *, period: str, tz: str,
                start: date | None = None, end: date | None = None) -> list[RateRow]:
    """Answers per approach counted by the terminal's presence sensor."""
    rows = [r for r in _in_range(rows, tz, start, end) if r["kind"] in ("answer", "presence")]
    answers: dict[tuple[str, str], int] = defaultdict(int)
    approaches: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        key = (_group(r, "terminal"), period_key(_local(event_ms(r), tz), period))
        if r["kind"] == "answer":
            answers[key] += 1
        else:
            approaches[key] += int(r["approaches"] or 0)
    groups, keys = _keys([(r, None) for r in rows], "terminal", period, tz=tz, start=start,
                         end=end)
    out = []
    for g in groups:
        for k in keys:
            a, n = answers.get((g, k), 0), approaches.get((g, k), 0)
            out.append(RateRow(g, k, a, n, None if n == 0 else round(a * 100 / n, 1)))
    return out


def period_bounds(key: str, period: str) -> tuple[date, date]:
    """First and last day of the period a `period_key` names (the days a visits
    import must give for its count to be a doctor's base)."""
    return period_span(_first_day(key, period), period)


@dataclass(frozen=True, slots=True)
class SlotRow:
    slot: int  # local hour 0..23, or local weekday 0 (Monday)..6
    bad: int  # bad presses in the slot
    presses: int  # every counted press in the slot

    def as_list(self) -> list[Any]:
        return [self.slot, self.bad, self.presses]


def bad_by_time_from_counts(counts: PressCounts, *, include_burst: bool = False
                            ) -> tuple[list[SlotRow], list[SlotRow]]:
    """`bad_presses_by_time`'s rows from the counts of `press_counts`."""
    hours = [[0, 0] for _ in range(24)]
    days = [[0, 0] for _ in range(7)]
    for (day, hour, m, burst), n in counts.hours.items():
        if burst and not include_burst:
            continue
        for slot in (hours[hour], days[day.weekday()]):
            slot[0] += n if m == "bad" else 0
            slot[1] += n
    return ([SlotRow(h, bad, n) for h, (bad, n) in enumerate(hours)],
            [SlotRow(d, bad, n) for d, (bad, n) in enumerate(days)])


def bad_presses_by_time(rows: Iterable[dict[str, Any]], *, tz: str,
                        start: date | None = None, end: date | None = None,
                        include_burst: bool = False) -> tuple[list[SlotRow], list[SlotRow]]:
    """Bad presses by local hour of day (24 rows) and by local weekday (7 rows,
    Monday first), each beside all the presses counted in that slot.

    The presses and their moods are those of `loyalty_index` (tests, HOLDs and,
    unless asked for, bursts left out), so the slots of a range add up to its
    index's presses."""
    return bad_by_time_from_counts(press_counts(rows, tz, start, end),
                                   include_burst=include_burst)


@dataclass(frozen=True, slots=True)
class CallbackRow:
    site: str
    edge: str
    event_id: str
    time: str
    doctor: str | None
    phone: str
    comment: str | None
    status: str
    handled_by: str | None
    handled_at: str | None
    stale: bool

    def as_list(self) -> list[Any]:
        return [self.time, self.doctor or "", Text(self.phone), self.comment or "", self.status,
                self.handled_by or "", self.handled_at or "", "STALE" if self.stale else "",
                f"{self.site}/{self.edge}/{self.event_id}"]


def _fmt(ms: int, tz: str) -> str:
    if not WALL_MIN_MS <= ms <= WALL_MAX_MS:
        return "?"
    return (_EPOCH + timedelta(milliseconds=ms)).astimezone(ZoneInfo(tz)).strftime(
        "%Y-%m-%d %H:%M")


def callback_list(rows: Iterable[dict[str, Any]],
                  states: dict[tuple[str, str, str], tuple[str, str | None, int | None]], *,
                  now_ms: int, stale_after_s: float, tz: str) -> list[CallbackRow]:
    """Patients who said no and left a phone number, newest first."""
    out = []
    for r in sorted((r for r in _usable(rows) if r["kind"] == "answer" and r["q1"] == "no"
                     and r["phone"]), key=event_ms, reverse=True):
        status, by, at = states.get((r["site"], r["edge"], r["event_id"]), ("new", None, None))
        t = event_ms(r)
        out.append(CallbackRow(r["site"], r["edge"], r["event_id"], _fmt(t, tz), r["doctor"],
                               r["phone"], r["comment"], status, by,
                               None if at is None else _fmt(at, tz),
                               status == "new" and (now_ms - t) / 1000 > stale_after_s))
    return out


# -- output ---------------------------------------------------------------------------

class Text(str):
    """A cell that stays text in a spreadsheet whatever it looks like (a phone number)."""

    __slots__ = ()


_FORMULA_START: Final = frozenset("=+-@\t\r")
# A figure the reports write, as a spreadsheet reads it back exactly: no leading
# zero, at most 15 digits before the point (a double's).
_FIGURE: Final = re.compile(r"^-?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]+)?\Z")
# Digits a spreadsheet would take for a number, which it is not (not a _FIGURE):
# as a number it would lose leading zeros or digits.
_NUMERIC: Final = re.compile(r"^[0-9]+(?:\.[0-9]+)?\Z")
# A formula start after a separator a locale may use (and spaces or quotes):
# where a cell split there would start.
_SEPARATED_FORMULA: Final = re.compile(r"([,;|\t\n\r\v\f][ \"]*)(?=[=+\-@\t\r])")
_BREAKS: Final = re.compile(r"\r\n|[\n\r\v\f\x85\u2028\u2029]")


def csv_cell(value: Any) -> Any:
    """A value as a CSV cell no spreadsheet runs as a formula or turns into a
    number it is not (module docstring)."""
    if value is None or isinstance(value, bool | int | float):
        return "" if value is None else value
    text = str(value)
    if not isinstance(value, Text):
        if _FIGURE.match(text):
            return text
        if _NUMERIC.match(text):
            return f"'{text}"
    text = _SEPARATED_FORMULA.sub(r"\1'", text)
    first = text.lstrip(" \n")[:1]
    if isinstance(value, Text) and text:
        return f"'{text}"
    return f"'{text}" if first and first in _FORMULA_START else text


def write_csv(out: IO[str], header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> None:
    """The one CSV writer of the collector: every cell quoted and neutralised, one
    record per row."""
    w = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    w.writerow([csv_cell(c) for c in header])
    w.writerows([csv_cell(c) for c in r] for r in rows)


def text_cell(value: Any) -> str:
    """A value as one line of text for a terminal table (module docstring)."""
    text = _BREAKS.sub("\u23ce", str(value)).replace("\t", " ")
    return "".join(c for c in text if unicodedata.category(c) not in ("Cc", "Cf", "Zl", "Zp"))
