"""Web benchmark: the dashboards on a year of a 10-clinic network, as ratios to
reading the same raw rows with `queries.report_events`.

    .venv/bin/python benchmarks/web.py [--events 2000000] [--runs 5] [--dsn DSN]

A year of events (ending today) is written straight into a new SQLite
database (or, with `--dsn`, into that PostgreSQL database, which must be an
empty throwaway one): 10 clinics, each with 3 reception desks (a console
each, three receptionists per desk in early and late shifts) open
Monday-Friday 08:00-19:00 and Saturday 09:00-14:00, and 2 survey terminals
(answers, a few with a phone number, and hourly presence counts); presses are
about 95% of the events, with HOLDs, installers' tests and bursts among them.
Then:

- the first refresh of the dashboards' press counts (`collector.rollup`) for
  the whole year, in this process;
- the app is started as `feedback-collector web serve`, a clinic manager logs
  in, and each page is fetched once to warm it, then `--runs` times (median
  and range): /reports/ with the default range (the last eight ISO weeks),
  /reports/ with the year as the range (weeks), /reports/doctors/ (default);
- the baseline of each: the plain read of the raw rows that page's figures
  are of, `queries.report_events` of the same range in this process, median
  of as many runs.
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
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector import queries, rollup  # noqa: E402
from collector.db import EVENT_COLS, open_database  # noqa: E402

TZ = "Europe/Berlin"
PASSWORD = secrets.token_urlsafe(16)  # a throwaway user in a throwaway database


CLINICS = 10
DESKS = 3
CONSOLE_LABELS = (("good", 1, 0), ("good", 1, 0), ("good", 1, 0), ("neutral", 0, 1),
                  ("bad", -1, 2))
COLS = [c for c in EVENT_COLS if c != "lost"]


def default_range(today: date) -> tuple[date, date]:
    monday = today - timedelta(days=today.weekday())
    return monday - timedelta(weeks=7), today


def _opening(day: date) -> tuple[int, int] | None:
    """Opening hours (local), or None when closed."""
    return (8, 19) if day.weekday() < 5 else (9, 14) if day.weekday() == 5 else None


def generate(n: int, first: date, last: date) -> Iterator[tuple[Any, ...]]:
    """About `n` events over the days first..last, each edge's in time (and seq) order."""
    rnd = random.Random(18)
    zone = ZoneInfo(TZ)
    open_hours = sum((h[1] - h[0]) for d in _days(first, last) if (h := _opening(d)))
    # Presses per desk-hour and answers per terminal-hour for n events in all.
    per_hour = n / (open_hours * CLINICS)
    press_rate = per_hour * 0.95 / DESKS
    answer_rate = max(per_hour * 0.05 / 2 - 0.5, 0.5)  # presence counts are the rest
    seqs: dict[tuple[str, str], int] = {}
    ids = iter(range(1, 1 << 62))
    for day in _days(first, last):
        hours = _opening(day)
        if hours is None:
            continue
        for c in range(1, CLINICS + 1):
            site = f"clinic-{c}"
            ops = [[f"op-{c}-{d}-{k}" for k in range(3)] for d in range(DESKS)]
            out: list[tuple[int, str, dict[str, Any]]] = []
            lo = int(datetime(day.year, day.month, day.day, hours[0], tzinfo=zone).timestamp())
            span = (hours[1] - hours[0]) * 3600
            mid = lo + span // 2
            for d in range(DESKS):
                early, late = rnd.sample(ops[d], 2)
                for _ in range(_poisson(rnd, press_rate * (hours[1] - hours[0]))):
                    t = lo + rnd.randrange(span)
                    label, score, button = rnd.choice(CONSOLE_LABELS)
                    r = rnd.random()
                    flags = "burst" if r < 0.01 else ""
                    ev = {"kind": "press", "desk": f"desk-{d + 1}", "device_id": f"fc3-{d + 1}",
                          "device_kind": "console", "operator_id": early if t < mid else late,
                          "operator_source": "roster", "label": label, "score": score,
                          "button": button, "hold": 1 if 0.01 <= r < 0.015 else 0,
                          "flags": flags}
                    out.append((t * 1000 + rnd.randrange(1000), "reception-1", ev))
                    if 0.015 <= r < 0.018:  # an installer's test: the HOLD after the PRESS
                        out.append((t * 1000 + 2500, "reception-1",
                                    {**ev, "hold": 1, "flags": "test"}))
            for term in (1, 2):
                for h in range(hours[1] - hours[0]):
                    answers = _poisson(rnd, answer_rate)
                    for _ in range(answers):
                        q1 = rnd.choice(("yes", "yes", "unsure", "no"))
                        phone = f"+49170{rnd.randrange(10**7):07d}" if q1 == "no" and \
                            rnd.random() < 0.3 else None
                        out.append(((lo + h * 3600 + rnd.randrange(3600)) * 1000, "office-1",
                                    {"kind": "answer", "desk": f"office-{term}",
                                     "device_id": f"st-{term}", "device_kind": "terminal",
                                     "doctor": f"dr-{c}-{term * 4 - rnd.randrange(4)}",
                                     "q1": q1, "q2": rnd.choice(("yes", "no")), "phone": phone,
                                     "comment": "please call" if phone else None}))
                    out.append(((lo + (h + 1) * 3600) * 1000 - 1, "office-1",
                                {"kind": "presence", "desk": f"office-{term}",
                                 "device_id": f"st-{term}", "device_kind": "terminal",
                                 "approaches": answers + rnd.randrange(4),
                                 "engaged": answers}))
            out.sort(key=lambda x: (x[1], x[0]))
            for wall_ms, edge, ev in out:
                seq = seqs[(site, edge)] = seqs.get((site, edge), 0) + 1
                row = {"site": site, "edge": edge, "event_id": f"e{next(ids):012d}",
                       "seq": seq, "operator_id": None, "operator_source": "none",
                       "wall_ms": wall_ms, "corrected_ms": None, "synced": 1,
                       "boot_id": "boot-a", "mono_ns": seq * 10**9, "flags": "",
                       "label": None, "score": None, "hold": None, "button": None,
                       "doctor": None, "q1": None, "q2": None, "phone": None,
                       "comment": None, "approaches": None, "engaged": None,
                       "from_seq": None, "to_seq": None, "reason": None, "payload": "{}",
                       "received_ms": wall_ms + 150, **ev}
                yield tuple(row[c] for c in COLS)


def _days(first: date, last: date) -> Iterator[date]:
    d = first
    while d <= last:
        yield d
        d += timedelta(days=1)


def _poisson(rnd: random.Random, mean: float) -> int:
    # Normal approximation: the means here are tens of events.
    return max(0, round(rnd.gauss(mean, mean ** 0.5)))


def fill(db_path: Path | None, dsn: str | None, n: int, first: date, last: date) -> int:
    """The events as intake stores them, without intake (it is not what is measured)."""
    open_database(db_path, dsn).close()  # the schema
    rows = generate(n, first, last)
    count = 0
    if dsn is not None:
        import psycopg  # only with --dsn

        with psycopg.connect(dsn) as conn, conn.cursor() as cur, \
                cur.copy(f"COPY events ({', '.join(COLS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
                count += 1
        return count
    assert db_path is not None
    conn = sqlite3.connect(db_path)
    with conn:
        while chunk := [r for _, r in zip(range(50_000), rows, strict=False)]:
            conn.executemany(f"INSERT INTO events ({', '.join(COLS)}) VALUES "  # noqa: S608
                             f"({', '.join('?' * len(COLS))})", chunk)
            count += len(chunk)
    conn.close()
    return count


def cli(cfg: Path, *args: str, stdin: str | None = None) -> None:
    subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config", str(cfg), *args],
                   input=stdin, text=True, check=True, capture_output=True)


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _r(xs: list[float]) -> list[float]:
    return [round(x, 3) for x in xs]


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--events", type=int, default=2_000_000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dsn", help="an empty, throwaway PostgreSQL database (default: SQLite)")
    args = ap.parse_args()
    today = datetime.now(ZoneInfo(TZ)).date()
    year = (today - timedelta(days=364), today)
    start, end = default_range(today)
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        work = Path(tmp)
        db_path = None if args.dsn else work / "collector.sqlite"
        cfg = work / "collector.toml"
        database = f'dsn = "{args.dsn}"' if args.dsn else f'path = "{db_path}"'
        cfg.write_text(f'id = "bench"\n[broker]\nhost = "127.0.0.1"\n[database]\n'
                       f'{database}\n[reports]\ntz = "{TZ}"\n[web]\nstate_dir = "{work}"\n')
        t0 = time.perf_counter()
        written = fill(db_path, args.dsn, args.events, *year)
        print(f"{written} events written in {time.perf_counter() - t0:.1f} s", flush=True)
        db = open_database(db_path, args.dsn)
        t0 = time.perf_counter()
        days = rollup.refresh(db, TZ)
        first_refresh_s = time.perf_counter() - t0
        print(f"first refresh: {days} days in {first_refresh_s:.1f} s", flush=True)
        t0 = time.perf_counter()
        rollup.refresh(db, TZ)
        idle_refresh_s = time.perf_counter() - t0
        cli(cfg, "migrate")
        cli(cfg, "adduser", "bench", "--role", "clinic_manager", stdin=PASSWORD + "\n")
        log = work / "web.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "collector.cli", "web", "--config",
                                     str(cfg), "serve", "--bind", "127.0.0.1:0"],
                                    stdout=out, stderr=subprocess.STDOUT)
        pages: dict[str, tuple[float, list[float]]] = {}
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

            def page(path: str, marker: bytes) -> Callable[[], None]:
                def get() -> None:
                    with opener.open(base + path, timeout=600) as r:
                        body = r.read()
                        assert r.status == 200
                        assert marker in body, body[:500]
                return get

            year_q = urllib.parse.urlencode({"period": "week", "start": year[0].isoformat(),
                                             "end": year[1].isoformat()})
            for name, path, marker in (
                    ("dashboard", "/reports/", b"loyalty-operator-table"),
                    ("dashboard_year", f"/reports/?{year_q}", b"loyalty-operator-table"),
                    ("doctors", "/reports/doctors/", b"doctors-table")):
                get = page(path, marker)
                get()  # warm: the page cache, the app's imports, the database connection
                pages[name] = timed(get, args.runs)
        finally:
            proc.terminate()
            proc.wait(30)

        baselines: dict[str, tuple[float, list[float]]] = {}
        n_rows: dict[str, int] = {}
        for name, kinds, (a, b) in (("dashboard", ["press"], (start, end)),
                                    ("dashboard_year", ["press"], year),
                                    ("doctors", ["answer", "presence"], (start, end))):
            def read(kinds: list[str] = kinds, a: date = a, b: date = b,
                     name: str = name) -> None:
                n_rows[name] = len(queries.report_events(db, kinds, a, b))

            read()
            baselines[name] = timed(read, args.runs)
        db.close()
    result: dict[str, Any] = {
        "events": written, "database": "postgres" if args.dsn else "sqlite", "runs": args.runs,
        "year": f"{year[0]}..{year[1]}", "default_range": f"{start}..{end}",
        "first_refresh_s": round(first_refresh_s, 2), "days_computed": days,
        "idle_refresh_s": round(idle_refresh_s, 4),
        "at": datetime.now(UTC).isoformat(timespec="seconds")}
    for name, (median, runs) in pages.items():
        read_s, read_runs = baselines[name]
        result[name] = {"page_s": round(median, 3), "page_runs_s": _r(runs),
                        "rows_read_by_baseline": n_rows[name],
                        "baseline_read_s": round(read_s, 3), "baseline_runs_s": _r(read_runs),
                        "ratio": round(median / read_s, 3)}
    print(json.dumps(result, indent=2))
    for name, (median, runs) in pages.items():
        read_s = baselines[name][0]
        print(f"{name}: {median:.3f} s (runs {min(runs):.3f}-{max(runs):.3f}) = "
              f"{median / read_s:.3f} x the plain read of its {n_rows[name]} raw rows "
              f"({read_s:.3f} s)")


if __name__ == "__main__":
    main()
