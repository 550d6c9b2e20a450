"""Who is on duty at a desk at a given moment.

Four sources, in this precedence (the first that applies wins):

1. an explicit login at the desk, by badge scan or by the `operator` command
   (the later of the two replaces the earlier; the command may also say
   "nobody", which is explicit too), until its logout or its expiry;
2. the shift roster: a shift of that desk covering the moment;
3. the fixed operator of the desk in the config;
4. nobody (`source: none`, id null).

A login with no logout expires at the end of that operator's roster shift at
the desk that covers the login, or else `max_login_s` after it (default
10 hours), so a forgotten logout cannot rate tomorrow's receptionist.

The operator of an event is decided for the moment the event happened (a
replayed press gets the operator of its real press time), so each desk's
logins are kept, and persisted, for as long as a device can still deliver an
event from their time: HISTORY_S, the oldest record a terminal may replay
(90 days of flash, drivers/terminal.py; a console's ring is younger).  Time
bounds the history, not a count of changes; HISTORY_MAX per desk only guards
against a flood of commands.

Storage: two small TinyDB files next to the store, with crash-safe writes:
`roster.json` (edited by `feedback-edge operator add/remove`, read by the
daemon when the file changes) and `logins.json` (written by the daemon).
All times here are UTC nanoseconds since the epoch, passed in by the caller,
so tests control time without sleeping.

Ids follow edge.contract.ids (DESK_RE, OPERATOR_RE): a `Shift` or `Login`
with any other id cannot be made (ValueError), so a hand-edited roster or
logins file cannot bring a line break or escape sequence into a log or an
event; such entries are skipped and reported like any other invalid entry.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from edge.clock import Clock
from edge.contract.ids import DESK_RE, OPERATOR_RULE, valid_operator
from edge.contract.timefmt import DAYS, parse_hhmm
from edge.events import OperatorTag
from edge.state import FaultReport, StateFile, ignore_faults

__all__ = ["Login", "Operators", "Shift"]

log = logging.getLogger(__name__)

HISTORY_S: Final = 90 * 24 * 3600
HISTORY_MAX: Final = 10_000
_NS: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Shift:
    """A recurring shift: `operator` at `desk` on `days`, local `start`..`end` in `tz`.

    An `end` at or before `start` runs past midnight into the next day.
    """

    desk: str
    operator: str
    days: tuple[int, ...]
    start: str
    end: str
    tz: str

    def __post_init__(self) -> None:
        if not DESK_RE.match(self.desk):
            raise ValueError("a desk name is 1 to 64 letters, digits, '_', '.', '-'")
        if not valid_operator(self.operator):
            raise ValueError(f"the operator must be {OPERATOR_RULE}")

    def _zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def occurrence(self, at_ns: int) -> tuple[int, int] | None:
        """(start_ns, end_ns) of the occurrence covering `at_ns`, if any."""
        zone = self._zone()
        local = dt.datetime.fromtimestamp(at_ns / _NS, zone)
        start_t, end_t = parse_hhmm(self.start), parse_hhmm(self.end)
        # The shift covering `at` began today or (overnight shifts) yesterday.
        for back in (0, 1):
            day = local.date() - dt.timedelta(days=back)
            if day.weekday() not in self.days:
                continue
            begin = dt.datetime.combine(day, start_t, zone)
            end_day = day if end_t > start_t else day + dt.timedelta(days=1)
            finish = dt.datetime.combine(end_day, end_t, zone)
            # Wall-clock arithmetic in the zone: a DST change day has a 7 or
            # 9 hour 08:00-16:00 shift in UTC terms, as the roster means.
            b_ns = int(begin.timestamp() * _NS)
            f_ns = int(finish.timestamp() * _NS)
            if b_ns <= at_ns < f_ns:
                return b_ns, f_ns
        return None


@dataclass(frozen=True, slots=True)
class Login:
    desk: str
    operator: str | None  # None: explicitly nobody
    source: str  # badge | command
    since_ns: int
    until_ns: int | None  # logout time or expiry; None while open with no expiry known
    # Made on an unsynchronised clock: that boot and the monotonic time of
    # `since_ns`, so the clock's sync can re-time it (`Operators.retime`).
    boot_id: str | None = None
    mono_ns: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.desk, str) or not DESK_RE.match(self.desk):
            raise ValueError("a desk name is 1 to 64 letters, digits, '_', '.', '-'")
        if self.operator is not None and not valid_operator(self.operator):
            raise ValueError(f"the operator must be {OPERATOR_RULE}")


class Operators:
    """Who is on duty.  Logins live in memory and in logins.json; a login that
    cannot be written (full or read-only disk) still applies, is reported as
    `state_write_failed` through `on_fault` and written again by `retry()`.
    Roster edits (the CLI) raise OSError when the file cannot be written."""

    def __init__(self, state_dir: Path, fixed: dict[str, str | None],
                 max_login_s: float = 10 * 3600,
                 on_fault: FaultReport = ignore_faults, clock: Clock | None = None) -> None:
        self._roster_path = state_dir / "roster.json"
        self._on_fault = on_fault
        self._unsaved: set[str] = set()
        roster = StateFile(self._roster_path)
        logins = StateFile(state_dir / "logins.json")
        self._roster_db = roster.db
        self._logins_db = logins.db
        for f, lost in ((roster, "the shift roster"), (logins, "logins")):
            if f.damaged:
                on_fault("state_unreadable", f.path.name, f"{f.path.name} was unreadable "
                         f"({f.damaged}); {lost} start empty")
        self.fixed = fixed
        self._clock = clock
        self.max_login_ns = int(max_login_s * _NS)
        self._roster_sig: tuple[int, int, int] | None = None
        self.shifts: list[tuple[int, Shift]] = []
        self.reload_roster()
        self.history: dict[str, list[Login]] = {}
        for d in self._logins_db.table("desks").all():
            try:
                self.history[str(d["desk"])] = [Login(**x) for x in d["logins"]]
            except (KeyError, TypeError, ValueError):
                # JSON, but not ours (edited by hand, another version): skip it, loudly.
                on_fault("state_unreadable", "logins.json", "logins.json holds an entry that "
                         "is not a desk's logins; it was skipped")

    # -- roster ---------------------------------------------------------------

    def reload_roster(self) -> bool:
        """Re-read the roster if its file changed (the CLI edits it). True if it did."""
        try:
            st = self._roster_path.stat()
            # Every write is a rename onto the file: a new inode each time,
            # even within one mtime tick.
            sig: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            sig = None
        if sig == self._roster_sig:
            return False
        self._roster_sig = sig
        shifts: list[tuple[int, Shift]] = []
        bad = 0
        for doc in self._roster_db.table("shifts").all():
            try:
                shift = Shift(str(doc["desk"]), str(doc["operator"]),
                              tuple(int(d) for d in doc["days"]), str(doc["start"]),
                              str(doc["end"]), str(doc["tz"]))
                ZoneInfo(shift.tz)
                parse_hhmm(shift.start)
                parse_hhmm(shift.end)
            except (KeyError, TypeError, ValueError, ZoneInfoNotFoundError):
                bad += 1
                continue
            shifts.append((doc.doc_id, shift))
        self.shifts = shifts
        damaged = getattr(self._roster_db.storage, "damaged", None)
        if damaged:
            # Unreadable (e.g. written by root as 0600): no shifts apply, and
            # the alarm stays until the file can be read.
            self._on_fault("state_unreadable", "roster.json", f"roster.json {damaged}; no "
                           "shift in it applies")
        elif bad:
            self._on_fault("state_unreadable", "roster.json", f"roster.json holds {bad} "
                           "shift(s) that are not valid; they are ignored")
        else:
            self._on_fault("state_unreadable", "roster.json", None)
        return True

    def add_shift(self, shift: Shift) -> int:
        ZoneInfo(shift.tz)  # raises ZoneInfoNotFoundError for a bad zone
        parse_hhmm(shift.start)
        parse_hhmm(shift.end)
        doc_id = int(self._roster_db.table("shifts").insert(
            {**asdict(shift), "days": list(shift.days)}))
        self._roster_sig = None
        self.reload_roster()
        return doc_id

    def remove_shift(self, shift_id: int) -> bool:
        removed = self._roster_db.table("shifts").remove(doc_ids=[shift_id])
        self._roster_sig = None
        self.reload_roster()
        return bool(removed)

    def shift_of(self, desk: str, operator: str | None, at_ns: int) -> tuple[int, int] | None:
        for _, s in self.shifts:
            if s.desk == desk and (operator is None or s.operator == operator):
                occ = s.occurrence(at_ns)
                if occ is not None:
                    return occ
        return None

    # -- logins ---------------------------------------------------------------

    def _save(self, desk: str) -> None:
        self._unsaved.add(desk)
        self.retry()

    @property
    def unsaved(self) -> bool:
        """Whether some login is applied but not yet in logins.json."""
        return bool(self._unsaved)

    def retry(self) -> None:
        """Write the logins that could not be written before."""
        if not self._unsaved:
            return
        table = self._logins_db.table("desks")
        try:
            for desk in sorted(self._unsaved):
                doc = {"desk": desk, "logins": [asdict(x) for x in self.history[desk]]}
                ids = [d.doc_id for d in table.all() if d["desk"] == desk]
                if ids:
                    table.update(doc, doc_ids=ids)
                else:
                    table.insert(doc)
                self._unsaved.discard(desk)
        except OSError as e:
            self._on_fault("state_write_failed", "logins.json", "logins.json could not be "
                           f"written ({e.strerror}); logins apply but are not saved")
            log.error("logins.json could not be written: %s", e.strerror)
            return
        self._on_fault("state_write_failed", "logins.json", None)

    def _current(self, desk: str, at_ns: int) -> Login | None:
        for login in reversed(self.history.get(desk, [])):
            if login.since_ns <= at_ns and (login.until_ns is None or at_ns < login.until_ns):
                return login
            if login.since_ns <= at_ns:
                return None  # the latest login before `at` had ended by then
        return None

    def login(self, desk: str, operator: str | None, source: str, at_ns: int) -> None:
        """`operator` is on duty at `desk` from `at_ns` (None: explicitly nobody)."""
        hist = self.history.setdefault(desk, [])
        cur = self._current(desk, at_ns)
        if cur is not None:
            hist[hist.index(cur)] = Login(cur.desk, cur.operator, cur.source, cur.since_ns,
                                          at_ns, cur.boot_id, cur.mono_ns)
        boot_id = mono = None
        c = self._clock
        if c is not None and not c.synced():
            boot_id, mono = c.boot_id, c.mono_ns() - (c.wall_ns() - at_ns)
        hist.append(Login(desk, operator, source, at_ns, self._expiry(desk, operator, at_ns),
                          boot_id, mono))
        # Logins that ended before any event a device may still deliver go.
        horizon = at_ns - HISTORY_S * _NS
        hist[:] = [x for x in hist if x.until_ns is None or x.until_ns >= horizon][-HISTORY_MAX:]
        self._save(desk)

    def _expiry(self, desk: str, operator: str | None, at_ns: int) -> int:
        shift = self.shift_of(desk, operator, at_ns) if operator is not None else None
        return shift[1] if shift is not None else at_ns + self.max_login_ns

    def retime(self, boot_id: str, anchor_mono_ns: int, anchor_wall_ns: int) -> int:
        """The clock is synchronised: logins made earlier in this boot on the
        unsynchronised clock move to their true time (wall = anchor wall - (anchor
        mono - login mono)), their expiry or shift end decided again.  Returns how
        many moved."""
        moved = 0
        for desk, hist in self.history.items():
            for i, x in enumerate(hist):
                if x.boot_id != boot_id or x.mono_ns is None:
                    continue
                since = anchor_wall_ns - (anchor_mono_ns - x.mono_ns)
                until = x.until_ns
                if until is not None:
                    ended = until != self._expiry(desk, x.operator, x.since_ns)
                    # Ended by a logout or the next login on the same clock: shift
                    # it with the start; else its expiry is decided at the true time.
                    until = until + (since - x.since_ns) if ended else \
                        self._expiry(desk, x.operator, since)
                hist[i] = Login(x.desk, x.operator, x.source, since, until)
                moved += 1
            if moved:
                self._unsaved.add(desk)
        if moved:
            log.info("clock synchronised: %d login(s) re-timed", moved)
            self.retry()
        return moved

    def logout(self, desk: str, at_ns: int) -> Login | None:
        cur = self._current(desk, at_ns)
        if cur is None:
            return None
        hist = self.history[desk]
        hist[hist.index(cur)] = Login(cur.desk, cur.operator, cur.source, cur.since_ns, at_ns,
                                      cur.boot_id, cur.mono_ns)
        self._save(desk)
        return cur

    def badge(self, desk: str, operator: str | None, at_ns: int) -> bool:
        """A badge scan: logs `operator` in, or out if they were on duty. True = login."""
        cur = self._current(desk, at_ns)
        if cur is not None and cur.source == "badge" and cur.operator == operator:
            self.logout(desk, at_ns)
            return False
        self.login(desk, operator, "badge", at_ns)
        return True

    # -- the answer -------------------------------------------------------------

    def who(self, desk: str, at_ns: int) -> OperatorTag:
        cur = self._current(desk, at_ns)
        if cur is not None:
            if cur.operator is None:
                # "Nobody" by command, or a badge nobody knows (issue 5).
                return OperatorTag(None, "badge" if cur.source == "badge" else "none")
            return OperatorTag(cur.operator, cur.source)
        for _, s in self.shifts:
            if s.desk == desk and s.occurrence(at_ns) is not None:
                return OperatorTag(s.operator, "schedule")
        fixed = self.fixed.get(desk)
        if fixed is not None:
            return OperatorTag(fixed, "config")
        return OperatorTag.nobody()

    def since(self, desk: str, at_ns: int) -> int | None:
        cur = self._current(desk, at_ns)
        if cur is not None:
            return cur.since_ns
        occ = self.shift_of(desk, None, at_ns)
        return occ[0] if occ is not None else None

    def close(self) -> None:
        self._roster_db.close()
        self._logins_db.close()


def shift_json(shift_id: int, s: Shift) -> dict[str, Any]:
    return {"id": shift_id, "desk": s.desk, "operator": s.operator,
            "days": ",".join(DAYS[d] for d in s.days), "from": s.start, "to": s.end, "tz": s.tz}
