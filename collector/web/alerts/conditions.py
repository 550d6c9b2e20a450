"""The rule kinds' conditions: for a rule and a time, the subjects where it
holds now, each as a `Finding` (its figures, and when it began if it knows).

Press rules count presses as the reports do (`reports._counted_presses`:
no HOLDs, no installer's tests, no bursts; the mood rules of `reports.mood`),
at their corrected time; the doctor rule counts Q1 answers as the doctor
ranking does, with the answers (not imported visits) as its base.  The
silence rule watches the desks with a press in the last `DESK_MEMORY`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection

from collector import queries, reports
from collector.web.alerts.models import CODE_RE, Kind, Per, Rule
from collector.web.models import Case, Status

__all__ = ["CONDITIONS", "DESK_MEMORY", "Finding"]

# Desks the silence rule watches: those with a press in this long.
DESK_MEMORY: Final = timedelta(days=14)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Finding:
    """What a condition found: figures (described in each reader's language by
    `models.describe`; in English as the episode's `value`, which webhooks
    carry) and, when it has one, when it began."""

    facts: dict[str, Any]
    since: datetime | None = None  # None: from when a tick first saw it


def _ms(t: datetime) -> int:
    return int((t - _EPOCH) // timedelta(milliseconds=1))


def _at(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _zone() -> ZoneInfo:
    return ZoneInfo(settings.CONFIG.tz)


def _read(fn: Callable[[Any], Any]) -> Any:
    from collector.web import dashboards  # noqa: PLC0415 - pygal only when a rule reads

    return dashboards.read(fn)


# -- conditions -----------------------------------------------------------------------------

def _in_scope(rule: Rule, site: str, edge: str | None = None, desk: str | None = None) -> bool:
    return (not rule.site or rule.site == site) and (
        not rule.edge or edge is None or rule.edge == edge) and (
        not rule.desk or desk is None or rule.desk == desk)


def _press_tally(rule: Rule, now: datetime) -> dict[str, dict[str, int]]:
    """Counted presses of the rule's last `window_min` minutes per desk or site:
    group -> mood -> presses."""
    start = now - timedelta(minutes=rule.window_min)
    # An installer's test HOLD cancels the PRESS up to an hour before it: the
    # hour before the window is read too, so the pairing is the reports' own.
    rows = _read(lambda db: queries.events(
        db, ["press"], _ms(start) - reports.TEST_PAIR_MS, _ms(now) + 1))
    tally: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r, mood, burst in reports._counted_presses(rows):  # the reports' own rules
        t = reports.event_ms(r)
        if burst or not _ms(start) < t <= _ms(now):
            continue
        if not _in_scope(rule, r["site"], r["edge"], r["desk"]):
            continue
        group = f"{r['site']}/{r['desk']}" if rule.per == Per.DESK else str(r["site"])
        tally[group][mood] += 1
    return tally


def _negative(rule: Rule, now: datetime) -> dict[str, Finding]:
    out = {}
    for group, moods in _press_tally(rule, now).items():
        bad, total = moods.get("bad", 0), sum(moods.values())
        holds = bad >= rule.threshold if rule.share_pct is None else \
            total >= rule.threshold and bad * 100 >= rule.share_pct * total
        if holds:
            out[group] = Finding({"bad": bad, "total": total, "window": rule.window_min})
    return out


def _loyalty(rule: Rule, now: datetime) -> dict[str, Finding]:
    return _index_below(rule, _press_tally(rule, now), "good", "bad")


def _index_below(rule: Rule, tally: dict[str, dict[str, int]], plus: str, minus: str
                 ) -> dict[str, Finding]:
    """Groups whose index (% `plus` - % `minus` of all counted) is below the
    rule's threshold, of at least `min_count`."""
    out = {}
    for group, counts in tally.items():
        total = sum(counts.values())
        if total < max(1, rule.min_count):
            continue
        index = (counts.get(plus, 0) - counts.get(minus, 0)) * 100 / total
        if index < rule.threshold:
            out[group] = Finding({"index": round(index, 1), "total": total,
                                  "window": rule.window_min})
    return out


def _doctor(rule: Rule, now: datetime) -> dict[str, Finding]:
    """A doctor's index (% yes - % no of Q1, as `reports.doctor_index` counts it,
    with the answers as its base) over the rule's last `window_min` minutes."""
    start = now - timedelta(minutes=rule.window_min)
    rows = _read(lambda db: queries.events(db, ["answer"], _ms(start), _ms(now) + 1))
    tally: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        if not _ms(start) < reports.event_ms(r) <= _ms(now) or \
                not _in_scope(rule, r["site"], r["edge"], r["desk"]):
            continue
        tally[r["doctor"] or "(unknown)"][r["q1"]] += 1
    return _index_below(rule, {f"doctor {d}": c for d, c in tally.items()}, "yes", "no")


def _fleet(rule: Rule, now: datetime) -> list[dict[str, Any]]:
    rows = _read(lambda db: queries.fleet_rows(db, _ms(now)))
    return [r for r in rows if _in_scope(rule, *r["edge"].split("/", 1))]


def _offline(rule: Rule, now: datetime) -> dict[str, Finding]:
    """Offline (its will, or its own goodbye) or silent for the rule's duration;
    either way since its last message."""
    out = {}
    for r in _fleet(rule, now):
        seen = r["last_seen_ms"]
        if seen is None:
            continue
        silent = now - _at(seen) >= timedelta(minutes=rule.duration_min)
        if r["state"] == "offline" or silent:
            out[r["edge"]] = Finding({"state": r["state"], "seen": _at(seen).isoformat()},
                                     since=_at(seen))
    return out


def _health(rule: Rule, now: datetime) -> dict[str, Finding]:
    """An alarm code in the edge's last health report.  Only the code leaves
    here: an alarm's text may name devices (and is the edge's, not ours)."""
    out = {}
    for r in _fleet(rule, now):
        for alarm in r["alarms"]:
            code = alarm.split(":", 1)[0].strip()
            code = code if CODE_RE.match(code) else "alarm"
            if not rule.code or rule.code == code:
                out[f"{r['edge']} {code}"] = Finding({"code": code})
    return out


def _opening(rule: Rule, now: datetime) -> datetime | None:
    """When today's opening hours began, if `now` is within them on a day open."""
    # Rule.clean requires both for this kind.
    assert rule.open_from is not None  # noqa: S101
    assert rule.open_to is not None  # noqa: S101
    local = now.astimezone(_zone())
    if str(local.isoweekday()) not in rule.open_days:
        return None
    start = datetime.combine(local.date(), rule.open_from, _zone())
    end = datetime.combine(local.date(), rule.open_to, _zone())
    return start if start <= local < end else None


def _silence(rule: Rule, now: datetime) -> dict[str, Finding]:
    """No press at a desk for the rule's duration within opening hours: a dead
    console looks like a quiet desk.  The desks are those with a press in the
    last two weeks; the silence counts from the last press or the opening,
    whichever is later, and ends (resolves) at closing time."""
    opened = _opening(rule, now)
    if opened is None:
        return {}
    # At its corrected time when it has one (an edge's clock was set after the
    # press), as reports count it; each half by its own index (collector.rollup).
    span = [_ms(now - DESK_MEMORY), _ms(now)]
    with connection.cursor() as cur:
        cur.execute("SELECT site, edge, desk, MAX(t) FROM ("
                    "SELECT site, edge, desk, wall_ms AS t FROM events WHERE kind = 'press' "
                    "AND corrected_ms IS NULL AND wall_ms >= %s AND wall_ms <= %s UNION ALL "
                    "SELECT site, edge, desk, corrected_ms FROM events WHERE "
                    "corrected_ms >= %s AND corrected_ms <= %s AND kind = 'press') AS p "
                    "GROUP BY site, edge, desk", span + span)
        rows = cur.fetchall()
    last: dict[str, int] = {}
    for site, edge, desk, t in rows:
        if _in_scope(rule, site, edge, desk):
            key = f"{site}/{desk}"
            last[key] = max(last.get(key, 0), int(t))
    out = {}
    for key, t in last.items():
        since = max(_at(t), opened)
        if now - since >= timedelta(minutes=rule.duration_min):
            out[key] = Finding({"since": since.isoformat()}, since)
    return out


def _callback(rule: Rule, now: datetime) -> dict[str, Finding]:
    """A callback case longer in its status than `[web.limits]` allows."""
    out = {}
    for status, seconds in settings.CONFIG.web.limits_s.items():
        for pk, site, edge, since in Case.objects.filter(
                status=status, status_since__lte=now - timedelta(seconds=seconds)).exclude(
                status=Status.CLOSED).values_list("pk", "site", "edge", "status_since"):
            if _in_scope(rule, site, edge):
                out[f"case #{pk}"] = Finding({"status": status,
                                              "hours": round(seconds / 3600, 1)},
                                             since + timedelta(seconds=seconds))
    return out


CONDITIONS: dict[str, Callable[[Rule, datetime], dict[str, Finding]]] = {
    Kind.NEGATIVE: _negative, Kind.OFFLINE: _offline, Kind.HEALTH: _health,
    Kind.SILENCE: _silence, Kind.CALLBACK: _callback, Kind.LOYALTY: _loyalty,
    Kind.DOCTOR: _doctor}
