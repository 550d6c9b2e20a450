"""Times on the wire and in the config files.

`format_wall` is the form of every time in the contract's payloads.  The
weekday, time-of-day and zone syntax is shared by `edge.toml` (opening
hours), the operator roster and `collector.toml` (`[reports] tz`).
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import time
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["DAYS", "WALL_MAX_MS", "WALL_MIN_MS", "WALL_RANGE", "check_zone", "format_ms",
           "format_wall", "parse_days", "parse_hhmm"]

DAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# The range of every wall time in the contract's payloads (an event's time,
# a timesync anchor and what it corrects, status and inventory times), in ms
# since the epoch: from 1960-01-01T00:00:00Z (an unsynchronised Pi reads 1970,
# and a device's replay may be up to 5 years older: the schema's age_ms) to
# 2099-12-31T23:59:59.999Z (nothing real is later than this century).  The
# schemas' patterns bound the year; consumers check the instant (a leap second
# at the end of 2099 is in 2100).  Every time in it converts to a date in any
# zone, so a report never meets a year outside 1..9999.
WALL_MIN_MS: Final = -315_619_200_000
WALL_MAX_MS: Final = 4_102_444_799_999
WALL_RANGE: Final = (dt.date(1960, 1, 1), dt.date(2099, 12, 31))


def format_wall(wall_ns: int) -> str:
    """RFC 3339 UTC with milliseconds, e.g. 2026-11-23T09:14:03.512Z."""
    ms = wall_ns // 1_000_000
    if not WALL_MIN_MS <= ms <= WALL_MAX_MS:
        # Outside the contract's range (only tests and garbage get here) the
        # original form is kept exactly, whatever strftime does with the year.
        seconds, ns = divmod(wall_ns, 1_000_000_000)
        stamp = dt.datetime.fromtimestamp(seconds, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{stamp}.{ns // 1_000_000:03d}Z"
    # Every event and status formats a time: strftime per call was 7% of the
    # daemon's time per event, and consecutive events share their minute.
    minute, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{_minute(minute)}{s:02d}.{ms:03d}Z"


def format_ms(ms: int | None) -> str | None:
    """`ms` since the epoch as RFC 3339 UTC with milliseconds (format_wall's form),
    or None for no time or one outside years 1-9999 (rows stored before the
    range was checked).  By gmtime and one format, whatever the year: the read
    API formats every event it serves (1 µs, against 2.3 by datetime)."""
    if ms is None:
        return None
    s, milli = divmod(ms, 1000)
    try:
        t = time.gmtime(s)
    except (OverflowError, OSError, ValueError):
        return None
    if not 1 <= t.tm_year <= 9999:
        return None
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031 - the fastest form here
        t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec, milli)


_EPOCH_ORDINAL: Final = dt.date(1970, 1, 1).toordinal()


@functools.lru_cache(maxsize=8)
def _minute(minute: int) -> str:
    """"YYYY-MM-DDTHH:MM:" of `minute` minutes since the epoch (within the range)."""
    day, m = divmod(minute, 1440)
    h, m = divmod(m, 60)
    return f"{dt.date.fromordinal(_EPOCH_ORDINAL + day).isoformat()}T{h:02d}:{m:02d}:"


def parse_days(text: str) -> tuple[int, ...]:
    """"mon-fri", "sat,sun", "mon,wed-fri" -> weekday numbers (Monday 0)."""
    out: set[int] = set()
    for part in text.lower().split(","):
        ends = part.strip().split("-")
        if not 1 <= len(ends) <= 2 or any(e not in DAYS for e in ends):
            raise ValueError(f"weekdays like mon-fri or sat,sun, not {text!r}")
        a, b = DAYS.index(ends[0]), DAYS.index(ends[-1])
        out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(b + 1)])
    return tuple(sorted(out))


def parse_hhmm(text: str) -> dt.time:
    m = re.fullmatch(r"(\d{1,2}):(\d{2})", text)
    if not m or int(m[1]) > 24 or int(m[2]) > 59 or (int(m[1]) == 24 and int(m[2]) != 0):
        raise ValueError(f"a time like 08:00, not {text!r}")
    return dt.time(0, 0) if int(m[1]) == 24 else dt.time(int(m[1]), int(m[2]))


def check_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"an IANA time zone like Europe/Berlin, not {name!r}") from e
    return name
