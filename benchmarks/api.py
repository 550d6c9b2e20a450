"""Read-API benchmark: events per second through the paged endpoint, as a ratio
to a plain SQL read of the same rows.

    .venv/bin/python benchmarks/api.py [--events 100000] [--runs 3] [--dsn DSN]

The events are written straight into a new SQLite database (or, with `--dsn`,
into that PostgreSQL database, which must be an empty throwaway one); the app
is started as `feedback-collector web serve` with a token whose rate limit is
out of the way.  Each run pages through every event with `limit=1000` (JSON,
no personal data), following `next_cursor`, from this process over HTTP; the
baseline is this process reading the same rows and columns in the same order
with one plain SELECT (sqlite3 or psycopg).  Median and range of `--runs`.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

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
        conn = sqlite3.connect(path)
        with conn:
            conn.executemany(f"INSERT INTO events ({', '.join(EVENT_COLS)}) VALUES "  # noqa: S608
                             f"({', '.join('?' * len(EVENT_COLS))})", rows)
        conn.close()
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
        conn = sqlite3.connect(path)
        n = len(conn.execute(sql).fetchall())
        conn.close()
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


def _cli(cfg: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config", str(cfg),
                           *args], capture_output=True, text=True, check=True,
                          timeout=300).stdout


def _timed(fn: Any, runs: int) -> tuple[list[float], int]:
    times, n = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t0)
    return times, n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dsn", help="an empty throwaway PostgreSQL database")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        work = Path(tmp)
        path = None if args.dsn else work / "collector.sqlite"
        db_toml = f'dsn = "{args.dsn}"' if args.dsn else f'path = "{path}"'
        cfg = work / "collector.toml"
        cfg.write_text(f'id = "bench"\n[broker]\nhost = "127.0.0.1"\n[database]\n{db_toml}\n'
                       f'[web]\nstate_dir = "{work}"\n')
        rows = _rows(args.events)
        _insert(path, args.dsn, rows)
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
            try:
                _page_through(base, token)  # warm: connections, caches
                api, n_api = _timed(lambda: _page_through(base, token), args.runs)
            except urllib.error.HTTPError as e:
                raise SystemExit(f"the API failed ({e.code}): {log.read_text()[-3000:]}"
                                 ) from None
            plain, n_plain = _timed(lambda: _plain_read(path, args.dsn), args.runs)
        finally:
            proc.kill()
            proc.wait(15)
    assert n_api == n_plain == args.events, (n_api, n_plain)
    rate_api = args.events / statistics.median(api)
    rate_plain = args.events / statistics.median(plain)
    db = "PostgreSQL" if args.dsn else "SQLite"
    print(f"{db}, {args.events:,} events, limit 1000, median of {args.runs} (range):")
    print(f"  API paged:  {rate_api:,.0f} events/s ({statistics.median(api):.2f} s, "
          f"{min(api):.2f}-{max(api):.2f})")
    print(f"  plain SQL:  {rate_plain:,.0f} events/s ({statistics.median(plain):.3f} s, "
          f"{min(plain):.3f}-{max(plain):.3f})")
    print(f"  ratio API / plain: {rate_api / rate_plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
