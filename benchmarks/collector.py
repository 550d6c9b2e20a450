"""Collector benchmark: events/s stored exactly once, as a ratio to a subscriber
that only counts messages, both draining the same backlog from one Mosquitto.

    .venv/bin/python benchmarks/collector.py [--events 10000] [--runs 3]

For each case the consumer's persistent session is created, the consumer is
stopped, N events are published into the broker's queue for it, and the
consumer is started again: the figure is the drain rate from the first event
stored (or counted) to the last, so process start-up is not in it.  Cases:
the counting subscriber (baseline, in this process, paho with automatic
PUBACKs); `feedback-collector run` with SQLite and with PostgreSQL, one
instance and two sharing the subscription.  PostgreSQL is Debian's, started
here on a free port (skipped if it is not installed).

Every run measures the baseline again before its cases, so each ratio is to
the baseline of its own run; the summary gives each case's median ratio and
range over the runs, next to the issue's goal.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from benchmarks._common import start_broker  # noqa: E402
from collector.db import open_database  # noqa: E402
from tests.collector_fixtures import press_event  # noqa: E402

EVENTS_TOPIC = "feedback/v1/+/+/event/+"


def publish(port: int, n: int) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-edge",
                    protocol=MQTTProtocolVersion.MQTTv5)
    c.max_inflight_messages_set(100)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [c.publish(t, p, qos=1) for t, p in (press_event(i) for i in range(1, n + 1))]
    for info in infos:
        info.wait_for_publish(60)
    c.disconnect()
    c.loop_stop()


def drain_rate(count: Callable[[], int], n: int, timeout: float = 180) -> float:
    """Events/s from the first counted to the n-th."""
    deadline = time.monotonic() + timeout
    while (first := count()) == 0:
        if time.monotonic() > deadline:
            raise SystemExit("nothing arrived")
        time.sleep(0.005)
    t0 = time.monotonic()
    while (done := count()) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {done} of {n} arrived")
        time.sleep(0.005)
    return (n - first) / (time.monotonic() - t0)


def forget_session(port: int, client_id: str) -> None:
    """End a parked persistent session: it would keep queueing every later run's
    events (a shared group's too) in the broker."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv5)
    c.connect("127.0.0.1", port, clean_start=True)  # session expiry 0: gone at disconnect
    c.loop_start()
    c.disconnect()
    c.loop_stop()


def baseline(port: int, n: int, run: int = 1) -> float:
    got = [0]
    lock = threading.Lock()

    def on_message(*_: object) -> None:
        with lock:
            got[0] += 1

    def session() -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-counter-{run}",
                        protocol=MQTTProtocolVersion.MQTTv5)
        c.on_message = on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", port, clean_start=False, properties=props)
        c.subscribe(EVENTS_TOPIC, qos=1)
        c.loop_start()
        return c

    c = session()
    time.sleep(0.5)  # let the SUBACK land before the session is parked
    c.disconnect()
    c.loop_stop()
    publish(port, n)
    c = session()
    rate = drain_rate(lambda: got[0], n)
    c.disconnect()
    c.loop_stop()
    forget_session(port, f"bench-counter-{run}")
    return rate


def collector_case(port: int, n: int, work: Path, *, instances: int,
                   db: str, dsn: str | None, run: int = 1) -> float:
    work.mkdir()
    path = work / "collector.sqlite"
    db_toml = f'[database]\npath = "{path}"\n' if dsn is None else f'[database]\ndsn = "{dsn}"\n'
    configs = []
    for i in range(instances):
        cfg = work / f"c{i}.toml"
        # A group and ids of its own per case: a parked session left in a
        # shared group keeps receiving its share of the events.
        cfg.write_text(f'id = "{db}-{instances}-{run}-{i}"\ngroup = "{db}-{instances}-{run}"\n'
                       f'[broker]\nhost = "127.0.0.1"\nport = {port}\n{db_toml}')
        configs.append(cfg)

    def start() -> list[subprocess.Popen[bytes]]:
        return [subprocess.Popen([sys.executable, "-m", "collector.cli", "run", "--config",
                                  str(c), "--log-level", "WARNING"], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for c in configs]

    def stop(procs: list[subprocess.Popen[bytes]]) -> None:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)

    probe = open_database(path if dsn is None else None, dsn)

    def stored() -> int:
        return int(probe.query("SELECT count(*) FROM events")[0][0])

    procs = start()
    # Sessions exist once each instance has said it is online.
    online: set[str] = set()
    watch = mqtt.Client(CallbackAPIVersion.VERSION2,
                        client_id=f"bench-watch-{db}{instances}-{run}",
                        protocol=MQTTProtocolVersion.MQTTv5)
    watch.on_message = lambda _c, _u, m: online.add(m.payload.decode())
    watch.connect("127.0.0.1", port)
    watch.subscribe("feedback/v1/collector/state", qos=1)
    watch.loop_start()
    deadline = time.monotonic() + 30
    while sum(f'"{db}-{instances}-{run}-{i}"' in s for i in range(instances) for s in online) \
            < instances:
        if time.monotonic() > deadline:
            raise SystemExit("collectors did not come up")
        time.sleep(0.05)
    watch.disconnect()
    watch.loop_stop()
    stop(procs)
    publish(port, n)
    procs = start()
    rate = drain_rate(stored, n)
    stop(procs)
    for i in range(instances):
        forget_session(port, f"feedback-collector-{db}-{instances}-{run}-{i}")
    assert stored() == n, "stored more or fewer than published"
    probe.close()
    return rate


CASES = [("sqlite", 1), ("sqlite", 2), ("postgres", 1), ("postgres", 2)]
# The goals of issue 17 (ratio to the counting subscriber).
GOAL = 0.40


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    n = args.events
    ratios: dict[tuple[str, int], list[float]] = {case: [] for case in CASES}
    bases: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker, port = start_broker(work)
        pg = None
        try:
            try:
                from tests.collector_fixtures import Postgres
                pg = Postgres()
            except BaseException as e:  # noqa: BLE001 - pytest.skip raises outside pytest
                print(f"PostgreSQL: not measured ({e})")
            for run in range(1, args.runs + 1):
                base = baseline(port, n, run)
                bases.append(base)
                print(f"run {run}: counting subscriber (baseline): {base:,.0f} events/s drained")
                for db, instances in CASES:
                    if db == "postgres" and pg is None:
                        continue
                    dsn = pg.new_database() if pg is not None and db == "postgres" else None
                    rate = collector_case(port, n, work / f"{db}-{instances}-{run}",
                                          instances=instances, db=db, dsn=dsn, run=run)
                    ratios[(db, instances)].append(rate / base)
                    print(f"run {run}: collector, {db}, {instances} instance(s): {rate:,.0f} "
                          f"events/s stored exactly once = {rate / base:.2f} of the baseline")
        finally:
            if pg is not None:
                pg.stop()
            broker.terminate()
            broker.wait()
    print(f"\n{n:,} events, {args.runs} runs; baseline {statistics.median(bases):,.0f} "
          f"events/s (median; {min(bases):,.0f}-{max(bases):,.0f})")
    print("| figure | goal | measured: median (range) |")
    print("|---|---|---|")
    for (db, instances), got in ratios.items():
        if got:
            print(f"| collector exactly-once intake / counting paho subscriber, {db}, "
                  f"{instances} instance(s) | >= {GOAL:.2f} | {statistics.median(got):.2f} "
                  f"({min(got):.2f}-{max(got):.2f}) |")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
