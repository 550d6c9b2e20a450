"""Read-API benchmark: events per second through the paged endpoint, as a ratio
to a plain SQL read of the same rows.

    .venv/bin/python benchmarks/api.py [--events 100000] [--runs 3]
        [--db sqlite|postgres|both] [--dsn DSN]

`--db` (default sqlite) picks the database the events are written straight
into: `sqlite` a new SQLite file; `postgres` a new database in a throwaway
PostgreSQL cluster started here as benchmarks/collector.py does (Debian's
`postgresql`, `tests.collector_fixtures.Postgres`, on a free port; stopped and
removed at the end); `both` measures SQLite, then PostgreSQL, in this one
process and prints each.  `--dsn` names a PostgreSQL database to use instead
of starting one; it must be an empty throwaway one (without `--db`, it means
`--db postgres`, as it always has).

For each database the app is started as `feedback-collector web serve` with a
token whose rate limit is out of the way.  Each run pages through every event
with `limit=1000` (JSON, no personal data), following `next_cursor`, from this
process over HTTP; the baseline is this process reading the same rows and
columns in the same order with one plain SELECT (sqlite3 or psycopg).  Median
and range of `--runs`, after one warm-up pass through the API.  Then the
loyalty report without a range, from the counts kept per day (the report
zone, UTC here, after one request that counts every day) against the same
report computed from every press row (zone Etc/GMT: the same days, the raw
path); both give the same rows.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector.db import EVENT_COLS, open_database  # noqa: E402

COLS = [c for c in EVENT_COLS if c not in ("payload", "phone", "comment")]


def _rows(n: int) -> list[tuple[Any, ...]]:
    """`n` presses and answers over 10 clinics of 3 edges each."""
    out = []
    base_ms = 1_795_000_000_000
    per_edge = n // 30 + 1
    for k in range(n):
        site, edge, seq = f"clinic-{k // per_edge // 3}", f"edge-{k // per_edge % 3}", \
            k % per_edge + 1
        row: dict[str, Any] = dict.fromkeys(EVENT_COLS)
        answer = seq % 10 == 0
        row.update(site=site, edge=edge, event_id=f"{k:012d}", seq=seq,
                   kind="answer" if answer else "press", desk="desk-1", device_id="d1",
                   device_kind="console", operator_id="op-1", operator_source="config",
                   wall_ms=base_ms + k * 1000, synced=1, boot_id="b", mono_ns=seq,
                   flags="", payload="{}", received_ms=base_ms + k * 1000,
                   label="good", score=1, hold=0, button=0)
        if answer:
            row.update(doctor="dr-a", q1="yes", phone="+4917000000", comment="fine")
        out.append(tuple(row[c] for c in EVENT_COLS))
    return out


def _insert(path: Path | None, dsn: str | None, rows: list[tuple[Any, ...]]) -> None:
    open_database(path, dsn).close()  # the schema
    if path is not None:
        lite = sqlite3.connect(path)
        with lite:
            lite.executemany(f"INSERT INTO events ({', '.join(EVENT_COLS)}) VALUES "  # noqa: S608
                             f"({', '.join('?' * len(EVENT_COLS))})", rows)
        lite.close()
        return
    import psycopg

    assert dsn is not None
    with psycopg.connect(dsn) as conn, conn.cursor() as cur, \
            cur.copy(f"COPY events ({', '.join(EVENT_COLS)}) FROM STDIN") as cp:
        for r in rows:
            cp.write_row(r)


def _plain_read(path: Path | None, dsn: str | None) -> int:
    sql = f"SELECT {', '.join(COLS)} FROM events ORDER BY site, edge, seq, event_id"  # noqa: S608
    if path is not None:
        lite = sqlite3.connect(path)
        n = len(lite.execute(sql).fetchall())
        lite.close()
        return n
    import psycopg

    with psycopg.connect(dsn or "") as conn:
        return len(conn.execute(sql).fetchall())


def _page_through(base: str, token: str) -> int:
    n, cursor = 0, None
    while True:
        req = urllib.request.Request(  # noqa: S310 - http:// to the app started here
            f"{base}/api/v1/events?limit=1000" + (f"&cursor={cursor}" if cursor else ""),
            headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310
            page = json.loads(r.read())
        n += len(page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            return n


def _loyalty(base: str, token: str, tz: str) -> int:
    """The whole-range loyalty report by desk and day in zone `tz`: its rows."""
    req = urllib.request.Request(  # noqa: S310 - http:// to the app started here
        f"{base}/api/v1/reports/loyalty?by=desk&period=day&tz={tz}",
        headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=300) as r:  # noqa: S310
        return len(json.loads(r.read())["rows"])


def _cli(cfg: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config", str(cfg),
                           *args], capture_output=True, text=True, check=True,
                          timeout=300).stdout


def _timed(fn: Callable[[], int], runs: int) -> tuple[list[float], int]:
    times, n = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t0)
    return times, n


@dataclass(frozen=True)
class Result:
    db: str  # "SQLite" or "PostgreSQL"
    events: int
    api: list[float]  # seconds per pass, one a run
    plain: list[float]
    # The loyalty report without a range: from the counts kept per day (the
    # report zone) and from every press row (another zone: the raw path).
    kept: list[float]
    raw: list[float]


def measure(rows: list[tuple[Any, ...]], runs: int, dsn: str | None) -> Result:
    """The API and the plain read over `rows` in a new SQLite file (`dsn` None)
    or in the empty PostgreSQL database `dsn`."""
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        work = Path(tmp)
        path = None if dsn else work / "collector.sqlite"
        db_toml = f'dsn = "{dsn}"' if dsn else f'path = "{path}"'
        cfg = work / "collector.toml"
        cfg.write_text(f'id = "bench"\n[broker]\nhost = "127.0.0.1"\n[database]\n{db_toml}\n'
                       f'[web]\nstate_dir = "{work}"\n')
        _insert(path, dsn, rows)
        _cli(cfg, "migrate")
        token = _cli(cfg, "token", "create", "bench", "--rate", "1000",
                     "--burst", "10000").strip()
        log = work / "web.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "collector.cli", "web", "--config",
                                     str(cfg), "serve", "--bind", "127.0.0.1:0"],
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            base = None
            for _ in range(600):
                m = re.search(r"feedback-collector web: (http://\S+)/", log.read_text())
                if m:
                    base = m.group(1)
                    break
                threading.Event().wait(0.1)
            if base is None:
                raise SystemExit(f"the app did not start: {log.read_text()[-2000:]}")
            url = base
            try:
                _page_through(url, token)  # warm: connections, caches
                api, n_api = _timed(lambda: _page_through(url, token), runs)
            except urllib.error.HTTPError as e:
                raise SystemExit(f"the API failed ({e.code}): {log.read_text()[-3000:]}"
                                 ) from None
            plain, n_plain = _timed(lambda: _plain_read(path, dsn), runs)
            _loyalty(url, token, "UTC")  # the first counts every day once
            kept, n_kept = _timed(lambda: _loyalty(url, token, "UTC"), runs)
            raw, n_raw = _timed(lambda: _loyalty(url, token, "Etc/GMT"), runs)
            assert n_kept == n_raw > 0, (n_kept, n_raw)
        finally:
            proc.kill()
            proc.wait(15)
    assert n_api == n_plain == len(rows), (n_api, n_plain)
    return Result("PostgreSQL" if dsn else "SQLite", len(rows), api, plain, kept, raw)


def report(r: Result) -> None:
    rate_api = r.events / statistics.median(r.api)
    rate_plain = r.events / statistics.median(r.plain)
    print(f"{r.db}, {r.events:,} events, limit 1000, median of {len(r.api)} (range):")
    print(f"  API paged:  {rate_api:,.0f} events/s ({statistics.median(r.api):.2f} s, "
          f"{min(r.api):.2f}-{max(r.api):.2f})")
    print(f"  plain SQL:  {rate_plain:,.0f} events/s ({statistics.median(r.plain):.3f} s, "
          f"{min(r.plain):.3f}-{max(r.plain):.3f})")
    print(f"  ratio API / plain: {rate_api / rate_plain:.3f}")
    kept, raw = statistics.median(r.kept), statistics.median(r.raw)
    print(f"  loyalty report, no range, by desk and day: {kept:.3f} s "
          f"({min(r.kept):.3f}-{max(r.kept):.3f}) from the kept counts, {raw:.3f} s "
          f"({min(r.raw):.3f}-{max(r.raw):.3f}) from every press row = {kept / raw:.3f}",
          flush=True)


class _Cluster(Protocol):
    def new_database(self) -> str: ...
    def stop(self) -> None: ...


def _postgres() -> _Cluster:
    """A throwaway PostgreSQL cluster, as benchmarks/collector.py starts one.
    Imported by name: mypy would otherwise check the tests' conftest with it."""
    try:
        cluster: _Cluster = importlib.import_module("tests.collector_fixtures").Postgres()
    except BaseException as e:  # noqa: BLE001 - pytest.skip raises outside pytest
        raise SystemExit(f"PostgreSQL could not be started: {e}") from None
    return cluster


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--db", choices=("sqlite", "postgres", "both"),
                    help="sqlite (the default), postgres (a throwaway cluster started "
                         "here, or --dsn), or both, one after the other")
    ap.add_argument("--dsn", help="an empty throwaway PostgreSQL database to use for postgres "
                                  "instead of starting a cluster")
    args = ap.parse_args()
    db = args.db or ("postgres" if args.dsn else "sqlite")
    if args.dsn and db == "sqlite":
        ap.error("--dsn is a PostgreSQL database: use it with --db postgres or both")
    rows = _rows(args.events)
    if db in ("sqlite", "both"):
        report(measure(rows, args.runs, None))
    if db in ("postgres", "both"):
        if args.dsn:
            report(measure(rows, args.runs, args.dsn))
        else:
            pg = _postgres()
            try:
                report(measure(rows, args.runs, pg.new_database()))
            finally:
                pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
