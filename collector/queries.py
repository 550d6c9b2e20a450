"""What reports and the CLI read: events, the fleet, callbacks and visit counts.

Callbacks' handling status and the imported visit counts are written here
too: they belong to the reports, not to intake.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from collector import store
from collector.db import EVENT_COLS, Database

__all__ = ["callbacks_state", "edges", "events", "fleet_rows", "import_visits", "report_events",
           "set_callback", "visits"]


def edges(db: Database) -> list[dict[str, Any]]:
    """Every edge: watermark, max seq, its status, last health and device inventory.

    Not rows that were never seen: an earlier version made those for quarantined
    messages, whose topic's site and edge may be anything (`collector.store`)."""
    cols = ("site", "edge", "watermark", "max_seq", "state", "state_since", "version",
            "boot_id", "last_seen_ms", "health", "health_ms", "devices")
    out = []
    for row in db.query(f"SELECT {', '.join(cols)} FROM edges WHERE last_seen_ms IS NOT NULL "
                        "ORDER BY site, edge"):
        d = dict(zip(cols, row, strict=True))
        d["health"] = json.loads(d["health"]) if d["health"] else None
        d["devices"] = json.loads(d["devices"]) if d["devices"] else None
        out.append(d)
    return out


def events(db: Database, kinds: Iterable[str], start_ms: int | None = None,
           end_ms: int | None = None) -> list[dict[str, Any]]:
    """Events of these kinds whose (corrected) time is in [start_ms, end_ms)."""
    kinds = list(kinds)
    cols = [c for c in EVENT_COLS if c != "payload"]
    sql = (f"SELECT {', '.join(cols)} FROM events WHERE kind IN "
           f"({', '.join('?' * len(kinds))})")
    params: list[Any] = list(kinds)
    t = "COALESCE(corrected_ms, wall_ms)"
    if start_ms is not None:
        sql += f" AND {t} >= ?"
        params.append(start_ms)
    if end_ms is not None:
        sql += f" AND {t} < ?"
        params.append(end_ms)
    sql += " ORDER BY site, edge, seq"
    return [dict(zip(cols, r, strict=True)) for r in db.query(sql, params)]


def callbacks_state(db: Database
                    ) -> dict[tuple[str, str, str], tuple[str, str | None, int | None]]:
    return {(s, e, i): (st, by, ms) for s, e, i, st, by, ms in db.query(
        "SELECT site, edge, event_id, status, handled_by, handled_ms FROM callbacks")}


def set_callback(db: Database, site: str, edge: str, event_id: str, *, status: str, who: str,
                 now_ms: int) -> bool:
    with db.transaction() as cur:
        cur.execute("SELECT 1 FROM events WHERE site = ? AND edge = ? AND event_id = ? "
                    "AND kind = 'answer' AND phone IS NOT NULL", (site, edge, event_id))
        if cur.fetchone() is None:
            return False
        cur.execute("INSERT INTO callbacks (site, edge, event_id, status, handled_by, "
                    "handled_ms) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (site, edge, "
                    "event_id) DO UPDATE SET status = excluded.status, handled_by = "
                    "excluded.handled_by, handled_ms = excluded.handled_ms",
                    (site, edge, event_id, status, who, now_ms))
    return True


def import_visits(db: Database, rows: Iterable[tuple[str, str, str, int]]) -> int:
    n = 0
    with db.transaction() as cur:
        for doctor, start, end, patients in rows:
            cur.execute("INSERT INTO visits (doctor, period_start, period_end, patients) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (doctor, period_start, period_end) "
                        "DO UPDATE SET patients = excluded.patients",
                        (doctor, start, end, patients))
            n += 1
    return n


def visits(db: Database) -> list[tuple[str, str, str, int]]:
    return [(str(d), str(s), str(e), int(p)) for d, s, e, p in db.query(
        "SELECT doctor, period_start, period_end, patients FROM visits")]


def report_events(db: Database, kinds: Iterable[str], start: date | None,
                  end: date | None) -> list[dict[str, Any]]:
    """The events a report of `start`..`end` (local days, both or neither) may count.

    The database filters by UTC time with a day's margin either side, since no
    zone is 24 h off UTC; the report functions then keep the rows of the local
    days.  Shared by `feedback-collector report` and the web dashboards, so both
    count the same rows."""
    bounds: tuple[int | None, int | None] = (None, None)
    if start is not None and end is not None:
        def utc_ms(day: date) -> int:
            return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) * 1000

        bounds = (utc_ms(start - timedelta(days=1)), utc_ms(end + timedelta(days=2)))
    return events(db, kinds, *bounds)


def _age(ms: int | None, now_ms: int) -> str:
    if ms is None:
        return "never"
    s = max(0, (now_ms - ms) // 1000)
    return f"{s} s ago" if s < 120 else f"{s // 60} min ago" if s < 7200 else \
        f"{s // 3600} h ago"


def fleet_rows(db: Database, now_ms: int) -> list[dict[str, Any]]:
    """Every edge as `feedback-collector fleet` and the fleet dashboard show it.

    `last_seen` is for a terminal (English); `last_seen_ms` for a page that says
    it in the reader's language.  `alarms` are the edge's last health report's,
    "code: text" each."""
    # Events each edge's devices lost in the last 24 h, per device (all reasons).
    lost: dict[tuple[str, str], dict[str, int]] = {}
    for d in store.device_losses(db, since_ms=now_ms - 24 * 3600 * 1000):
        per_device = lost.setdefault((d["site"], d["edge"]), {})
        per_device[d["device"]] = per_device.get(d["device"], 0) + d["lost"]
    out = []
    for e in edges(db):
        h = e["health"] or {}
        devices = (e["devices"] or {}).get("devices", [])
        problems = [f"{d['id']} {d['state']}" for d in devices
                    if d.get("state") in ("missing", "error")]
        out.append({
            "edge": f"{e['site']}/{e['edge']}", "state": e["state"] or "unknown",
            "last_seen": _age(e["last_seen_ms"], now_ms), "last_seen_ms": e["last_seen_ms"],
            "queue": h.get("queue_depth"), "oldest_pending_s": h.get("oldest_pending_age_s"),
            "devices": problems, "clock_synced": h.get("clock_synced"),
            "alarms": [str(a) for a in h.get("alarms") or []],
            "watermark": e["watermark"], "max_seq": e["max_seq"],
            "version": e["version"],
            "device_lost_24h": lost.get((e["site"], e["edge"]), {})})
    return out
