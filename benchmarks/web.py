"""Web benchmark: how long the main dashboard (/reports/) takes on a larger
database, as a ratio to reading the same rows with `queries.events`.

    .venv/bin/python benchmarks/web.py [--events 200000] [--runs 5]

N presses are written straight into a new SQLite database (two sites, eight
desks, twenty receptionists, spread over the dashboard's default range, the
last eight ISO weeks), the app is started as `feedback-collector web serve`,
a clinic manager logs in, and the dashboard is fetched once to warm the page
cache and the app, then `--runs` times: the median is the figure.  The
baseline is the plain read the dashboard starts with, `queries.report_events`
(that is, `queries.events` with the report's bounds) of the same range, in
this process, median of as many runs; "figures" is the `collector.reports`
functions the page calls, on those rows, without rendering.
"""

from __future__ import annotations

import argparse
import http.cookiejar
import json
import random
import re
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector import queries, reports  # noqa: E402
from collector.db import EVENT_COLS, open_database  # noqa: E402

TZ = "Europe/Berlin"
PASSWORD = secrets.token_urlsafe(16)  # a throwaway user in a throwaway database


def default_range(today: date) -> tuple[date, date]:
    monday = today - timedelta(days=today.weekday())
    return monday - timedelta(weeks=7), today


def fill(db_path: Path, n: int, start: date, end: date) -> None:
    """N presses as intake stores them, without intake (it is not what is measured)."""
    rnd = random.Random(18)
    db = open_database(db_path)  # the schema
    lo = int(datetime(start.year, start.month, start.day, 7, tzinfo=ZoneInfo(TZ)).timestamp())
    hi = int(datetime(end.year, end.month, end.day, 7, tzinfo=ZoneInfo(TZ)).timestamp())
    labels = (("good", 1, 0), ("good", 1, 0), ("neutral", 0, 1), ("bad", -1, 2))
    cols = [c for c in EVENT_COLS if c != "lost"]
    rows = []
    seqs: dict[tuple[str, str], int] = {}
    for i in range(n):
        site = f"clinic-{i % 2 + 1}"
        edge = f"reception-{i % 4 // 2 + 1}"
        seq = seqs[(site, edge)] = seqs.get((site, edge), 0) + 1
        label, score, button = rnd.choice(labels)
        wall_ms = (lo + rnd.randrange(hi - lo) // 86400 * 86400 + rnd.randrange(12 * 3600)) \
            * 1000
        rows.append({
            "site": site, "edge": edge, "event_id": f"e{i:08d}", "seq": seq, "kind": "press",
            "desk": f"desk-{rnd.randrange(4) + 1}", "device_id": "fc3-a",
            "device_kind": "console", "operator_id": f"op-{rnd.randrange(20):02d}",
            "operator_source": "badge", "wall_ms": wall_ms, "corrected_ms": None,
            "synced": 1, "boot_id": "boot-a", "mono_ns": seq * 10**9,
            "flags": "burst" if rnd.random() < 0.01 else "", "label": label, "score": score,
            "hold": 0, "button": button, "doctor": None, "q1": None, "q2": None,
            "phone": None, "comment": None, "approaches": None, "engaged": None,
            "from_seq": None, "to_seq": None, "reason": None, "payload": "{}",
            "received_ms": wall_ms})
    db.close()
    # sqlite3's own executemany: the Database wrapper runs one statement at a time.
    conn = sqlite3.connect(db_path)
    with conn:
        conn.executemany(f"INSERT INTO events ({', '.join(cols)}) VALUES "  # noqa: S608
                         f"({', '.join('?' * len(cols))})", [[r[c] for c in cols] for r in rows])
    conn.close()


def cli(cfg: Path, *args: str, stdin: str | None = None) -> None:
    subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config", str(cfg), *args],
                   input=stdin, text=True, check=True, capture_output=True)


def timed(fn: Any, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    today = datetime.now(ZoneInfo(TZ)).date()
    start, end = default_range(today)
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        work = Path(tmp)
        db_path = work / "collector.sqlite"
        cfg = work / "collector.toml"
        cfg.write_text(f'id = "bench"\n[broker]\nhost = "127.0.0.1"\n[database]\n'
                       f'path = "{db_path}"\n[reports]\ntz = "{TZ}"\n[web]\n'
                       f'state_dir = "{work}"\n')
        t0 = time.perf_counter()
        fill(db_path, args.events, start, end)
        print(f"{args.events} presses written in {time.perf_counter() - t0:.1f} s")
        cli(cfg, "migrate")
        cli(cfg, "adduser", "bench", "--role", "clinic_manager", stdin=PASSWORD + "\n")
        log = work / "web.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "collector.cli", "web", "--config",
                                     str(cfg), "serve", "--bind", "127.0.0.1:0"],
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not (m := re.search(r"(http://\S+)/", log.read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the app did not start: {log.read_text()}")
                threading.Event().wait(0.05)
            base = m.group(1)
            jar = http.cookiejar.CookieJar()
            opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
            opener.open(base + "/login/").read()
            token = next(c.value or "" for c in jar if c.name == "csrftoken")
            opener.open(base + "/login/", urllib.parse.urlencode(
                {"username": "bench", "password": PASSWORD,
                 "csrfmiddlewaretoken": token}).encode()).read()

            def page() -> None:
                with opener.open(base + "/reports/", timeout=600) as r:
                    body = r.read()
                    assert r.status == 200
                    assert b"loyalty-operator-table" in body, body[:500]

            page()  # warm: the page cache, the app's imports, the database connection
            page_s, page_all = timed(page, args.runs)
        finally:
            proc.terminate()
            proc.wait(30)

        db = open_database(db_path)
        rows: list[dict[str, Any]] = []

        def read() -> None:
            rows[:] = queries.report_events(db, ["press"], start, end)

        read()
        read_s, read_all = timed(read, args.runs)

        def figures() -> None:
            for by in ("operator", "desk", "site"):
                reports.loyalty_index(rows, by=by, period="week", tz=TZ, start=start, end=end)
            reports.bad_presses_by_time(rows, tz=TZ, start=start, end=end)

        figures_s, _ = timed(figures, args.runs)
        db.close()
    result = {"events": args.events, "rows_read": len(rows), "runs": args.runs,
              "range": f"{start}..{end}", "dashboard_s": round(page_s, 3),
              "dashboard_runs_s": [round(t, 3) for t in page_all],
              "baseline_read_s": round(read_s, 3),
              "baseline_runs_s": [round(t, 3) for t in read_all],
              "figures_s": round(figures_s, 3), "ratio": round(page_s / read_s, 2),
              "at": datetime.now(UTC).isoformat(timespec="seconds")}
    print(json.dumps(result, indent=2))
    print(f"dashboard {page_s:.2f} s for {len(rows)} presses = {page_s / read_s:.2f} x the "
          f"plain read ({read_s:.2f} s); the report functions {figures_s:.2f} s of it")


if __name__ == "__main__":
    main()
