"""Pipeline benchmark: one local Mosquitto, figures as ratios to raw paho.

    .venv/bin/python benchmarks/pipeline.py [--events 5000]

Prints:
- raw paho QoS 1 publish+PUBACK of the same payloads (window 20): the baseline;
- events/s through the daemon's whole pipeline (device report -> group commit
  with fsync -> publish -> PUBACK -> delete), as a ratio to the baseline;
- press-to-PUBACK latency p50/p99 at a steady 200 presses/s;
- store insert cost (one event per fsync'ed commit) at backlog 10 and 100,000;
- bytes written per event (write() calls, and what reached the block layer);
- RSS of a real daemon process with a simulated console after 500 presses;
- the daemon's CPU per event in the throughput runs, as a ratio to raw paho's
  CPU per message in the same pair (the process's CPU time: main loop, paho's
  thread and the feeding loop, which only enqueues);
- start-up with 500,000 events queued against 10: `feedback-edge run` to
  READY=1 (a process, its imports included) and opening the Store alone,
  interleaved, one ratio per pair.

- issue 17's figures (`--part issue17`, --runs rounds each): durable ingest
  and backlog drain (a store of --events filled before the daemon connects)
  as ratios to raw paho in the same round; then, in a child process with a
  slow fsync preloaded (benchmarks/slow_fsync.py: +--fsync-ms to every fsync
  and fdatasync), press-to-PUBACK at 200 presses/s against the fsync's own
  p99, and PUBACKs/s with their p50 latency at 3,000 presses/s offered.

Every ratio is printed as the median and range of the rounds (--rounds).
`--part startup` or `--part throughput` runs only those figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import raw_paho, start_broker  # noqa: E402
from benchmarks.slow_fsync import build_shim, preload_env  # noqa: E402
from drivers.console import ConsoleReport, ReportType  # noqa: E402
from edge.config import Config, load_config  # noqa: E402
from edge.daemon import Daemon  # noqa: E402
from edge.events import (  # noqa: E402
    DeviceRef,
    Event,
    EventTime,
    OperatorTag,
    Press,
    encode_event,
    new_event_id,
)
from edge.kinds.base import Reading  # noqa: E402
from edge.kinds.console import ConsoleInput  # noqa: E402
from edge.publisher import Publisher  # noqa: E402
from edge.store import Append, Store  # noqa: E402


def sample_event(i: int) -> Event:
    return Event(new_event_id(), "desk-1", DeviceRef("fc3-00a1b2c3d4e5", "console",
                                                      "00A1B2C3D4E5"),
                 Press(button=i % 3, label="good", score=1), OperatorTag("op-17", "config"),
                 EventTime(time.time_ns(), True, "4f0c8c1e-6c1d-4e1c-9f63-0a8b5a3b8e21",
                           time.monotonic_ns(), 0))


class TimedPublisher(Publisher):
    """The real publisher, noting when each seq's PUBACK is handled."""

    acked_at: dict[int, int]

    def on_puback(self, mid: int, ok: bool, reason: str, now: float) -> bool:
        seq = self.inflight.get(mid)
        if seq is not None:
            self.acked_at[seq] = time.monotonic_ns()
        return super().on_puback(mid, ok, reason, now)


class TimedDaemon(Daemon):
    """The real daemon with a TimedPublisher."""

    publisher: TimedPublisher

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        timed = TimedPublisher(config.broker.window, now=self.started_s)
        timed.acked_at = {}
        self.publisher = timed

    @property
    def acked(self) -> int:
        return self.publisher.acked

    @property
    def acked_at(self) -> dict[int, int]:
        return self.publisher.acked_at


def make_daemon(work: Path, port: int, name: str) -> TimedDaemon:
    cfg = work / f"{name}.toml"
    cfg.write_text(f"""site = "bench"\nedge = "{name}"\n[broker]\nhost = "127.0.0.1"
port = {port}\nwindow = 20\n[store]\npath = "{work}/{name}.sqlite"\nmin_free_bytes = 0
[daemon]\ncontrol_socket = "{work}/{name}.sock"\n[[devices]]\nkind = "console"
desk = "desk-1"\ntransport = "socket"\nsocket = "{work}/none.sock"\nserial = "00A1B2C3D4E5"
""")
    return TimedDaemon(load_config(cfg))


def reports(n: int, start_uptime: int = 10_000) -> list[Reading]:
    out = []
    for i in range(n):
        up = start_uptime + i * 7
        r = ConsoleReport((i + 1) % 256, ReportType.PRESS, i % 3, False, False, up, up + 30)
        out.append(Reading("fc3-00a1b2c3d4e5", ConsoleInput(r), time.monotonic_ns(),
                           time.time_ns()))
    return out


def run_daemon(d: TimedDaemon) -> threading.Thread:
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not d.link.connected and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    return t


def pipeline_throughput(work: Path, port: int, n: int) -> tuple[float, float]:
    """(events/s, CPU seconds of this process) through the whole pipeline."""
    d = make_daemon(work, port, "throughput")
    t = run_daemon(d)
    batch = reports(n)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for r in batch:
        d.inbox.put(r)
    while d.acked < n:
        threading.Event().wait(0.001)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    d.request_stop()
    t.join(10)
    return n / elapsed, cpu


def pipeline_latency(work: Path, port: int, n: int, rate: float) -> tuple[float, float]:
    p50, p99, _, _ = offered_load(work, port, n, rate, "latency")
    return p50, p99


def offered_load(work: Path, port: int, n: int, rate: float,
                 name: str) -> tuple[float, float, float, list[float]]:
    """`n` presses offered at `rate`/s (posted in 2 ms slices, as a USB poll
    would bunch them): (p50 ms, p99 ms, PUBACKs/s, seconds per fsync)."""
    d = make_daemon(work, port, name)
    t = run_daemon(d)
    durable = d.store._durable
    fsyncs = durable.sync.fsync_s if durable is not None and durable.sync else None
    batch = reports(n)
    posted: list[int] = []
    t0 = time.monotonic()
    i = 0
    while i < n:
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        for r in batch[i:due]:
            stamped = Reading(r.device_id, r.data, time.monotonic_ns(), time.time_ns())
            posted.append(stamped.host_mono_ns)
            d.inbox.put(stamped)
        i = max(i, due)
        threading.Event().wait(0.002 if rate > 500 else max(0.0, t0 + i / rate - time.monotonic()))
    while d.acked < n:
        threading.Event().wait(0.001)
    took = (max(d.acked_at.values()) - posted[0]) / 1e9
    d.request_stop()
    t.join(10)
    lat = sorted((d.acked_at[i + 1] - posted[i]) / 1e6 for i in range(n))
    return lat[len(lat) // 2], lat[int(len(lat) * 0.99)], n / took, list(fsyncs or [])


def backlog_drain(work: Path, port: int, n: int) -> float:
    """Events/s publishing a store of `n` events filled before the daemon connects."""
    d = make_daemon(work, port, "drain")
    store = Store(d.config.store.path, d._encode, max_events=10**7,
                  max_bytes=10**12)
    d.store.close()
    events = [sample_event(i) for i in range(n)]
    store.commit([Append(e) for e in events])
    store.close()
    d = make_daemon(work, port, "drain")
    t0 = time.perf_counter()
    t = run_daemon(d)
    while d.acked < n:
        threading.Event().wait(0.001)
    elapsed = time.perf_counter() - t0
    d.request_stop()
    t.join(10)
    return n / elapsed


def io_counters() -> tuple[int, int]:
    wchar = write_bytes = 0
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        if k == "wchar":
            wchar = int(v)
        elif k == "write_bytes":
            write_bytes = int(v)
    return wchar, write_bytes


def store_costs(work: Path) -> dict[str, float]:
    def enc(e: Event, seq: int) -> tuple[str, bytes]:
        return "t", encode_event(e, seq, "bench", "edge")

    s = Store(work / "cost.sqlite", enc, max_events=10**7, max_bytes=10**11)
    out: dict[str, float] = {}
    n = 500
    for backlog in (10, 100_000):
        while s.depth < backlog:
            s.commit([Append(sample_event(i)) for i in range(min(2000, backlog - s.depth))])
        t0 = time.perf_counter()
        for i in range(n):
            s.commit([Append(sample_event(i), ("bench", f"{backlog}:{i}"))])
        out[f"insert_us_{backlog}"] = (time.perf_counter() - t0) / n * 1e6
    # An event's whole life at clinic rates, as the daemon does it: one
    # press per transaction, the previous (delivered) one deleted in it.
    prev = s.last_seq
    w0, b0 = io_counters()
    for i in range(n):
        seq = s.commit([Append(sample_event(i), ("life", str(i)))], remove=[prev]).seqs[0]
        assert seq is not None
        prev = seq
    w1, b1 = io_counters()
    out["wchar_per_event"] = (w1 - w0) / n
    out["block_bytes_per_event"] = (b1 - b0) / n
    s.close()
    return out


def _bench_encode(e: Event, seq: int) -> tuple[str, bytes]:
    return "feedback/v1/bench/edge/event/fc3-00a1b2c3d4e5", encode_event(e, seq, "bench", "edge")


def build_store(path: Path, n: int) -> None:
    s = Store(path, _bench_encode, max_events=10**7, max_bytes=10**12)
    events = [sample_event(i) for i in range(5000)]
    while s.depth < n:
        s.commit([Append(e) for e in events[:min(5000, n - s.depth)]])
    s.close()


def ready_s(work: Path, name: str, store: Path) -> float:
    """Seconds from starting `feedback-edge run` to its READY=1 (no broker listening,
    no devices: nothing but the start-up itself)."""
    cfg = work / f"{name}.toml"
    cfg.write_text(f"""site = "bench"\nedge = "{name}"\n[broker]\nhost = "127.0.0.1"
port = 9\n[store]\npath = "{store}"\nmax_events = 10000000\nmin_free_bytes = 0
[daemon]\ncontrol_socket = "{work}/{name}.sock"\n""")
    notify = work / f"{name}.notify"
    notify.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(60)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(cfg),
                                 "--log-level", "ERROR"], cwd=ROOT,
                                env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                                stderr=subprocess.DEVNULL)
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            elapsed = time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    return elapsed


def open_s(store: Path) -> float:
    t0 = time.perf_counter()
    s = Store(store, _bench_encode, max_events=10**7, max_bytes=10**12)
    elapsed = time.perf_counter() - t0
    assert s.available
    s.close()
    return elapsed


def startup(work: Path, big_n: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Per round, (big, small) for the daemon to READY=1 and for Store() alone."""
    small, big = work / "small" / "outbox.sqlite", work / "big" / "outbox.sqlite"
    build_store(small, 10)
    build_store(big, big_n)
    out: dict[str, list[tuple[float, float]]] = {"ready": [], "open": []}
    for i in range(rounds):
        out["ready"].append((ready_s(work, f"big{i}", big), ready_s(work, f"small{i}", small)))
        out["open"].append((open_s(big), open_s(small)))
    return out


def _ratios(pairs: list[tuple[float, float]]) -> str:
    r = sorted(a / b for a, b in pairs)
    return f"{statistics.median(r):.2f}x (runs {r[0]:.2f}..{r[-1]:.2f}, {len(r)} runs)"


def daemon_rss(work: Path, port: int) -> tuple[float, float]:
    sock = work / "rss-console.sock"
    sim = subprocess.Popen([sys.executable, "-m", "firmware_sim.cli", "console", "run",
                            "--socket", str(sock)], stdout=subprocess.DEVNULL, cwd=ROOT)
    cfg = work / "rss.toml"
    cfg.write_text(f"""site = "bench"\nedge = "rss"\n[broker]\nhost = "127.0.0.1"
port = {port}\n[store]\npath = "{work}/rss.sqlite"\nmin_free_bytes = 0
[daemon]\ncontrol_socket = "{work}/rss-control.sock"\n[[devices]]\nkind = "console"
desk = "desk-1"\ntransport = "socket"\nsocket = "{sock}"\nserial = "00A1B2C3D4E5"
""")
    while not sock.exists():
        threading.Event().wait(0.02)
    daemon = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--config", str(cfg),
                               "--log-level", "WARNING"], cwd=ROOT)
    try:
        from firmware_sim.server import control

        threading.Event().wait(2)
        for i in range(500):
            control(sock, b"P", json.dumps({"button": i % 3, "hold_ms": 40,
                                            "delay_ms": i * 25}).encode())
        threading.Event().wait(500 * 0.025 + 2)
        status = Path(f"/proc/{daemon.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines())
        rss = int(fields["VmRSS"].split()[0]) / 1024
        hwm = int(fields["VmHWM"].split()[0]) / 1024
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(10)
        sim.terminate()
        sim.wait(10)
    return rss, hwm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--startup-events", type=int, default=500_000)
    ap.add_argument("--part", choices=("all", "throughput", "startup", "issue17", "slow"),
                    default="all")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--fsync-ms", type=float, default=7.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    broker, port = start_broker(work)
    try:
        if args.part == "slow":  # the child of issue17, with the slow fsync preloaded
            slow_child(work, port, args)
            return
        if args.part in ("all", "issue17"):
            issue17(work, port, args)
        if args.part in ("all", "throughput"):
            throughput(work, port, args)
        if args.part in ("all", "startup"):
            started = startup(work, args.startup_events, args.rounds)
            big = f"{args.startup_events:,}"
            print(f"start-up, {big} queued / 10 queued, {args.rounds} interleaved pairs")
            for what, pairs in (("feedback-edge run to READY=1", started["ready"]),
                                ("Store() open", started["open"])):
                b = statistics.median(p[0] for p in pairs)
                sm = statistics.median(p[1] for p in pairs)
                print(f"  {what:30s} {b:7.3f} s / {sm:7.3f} s   {_ratios(pairs)}")
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def _range(values: list[float], fmt: str = "{:.2f}") -> str:
    v = sorted(values)
    return (f"{fmt.format(statistics.median(v))} ({fmt.format(v[0])}-{fmt.format(v[-1])}, "
            f"{len(v)} runs)")


def issue17(work: Path, port: int, args: argparse.Namespace) -> None:
    payloads = [encode_event(sample_event(i), i + 1, "bench", "edge")
                for i in range(args.events)]
    ingest, drain = [], []
    for i in range(args.runs):
        raw, _ = raw_paho(port, payloads)
        (work / f"i{i}").mkdir()
        ingest.append(pipeline_throughput(work / f"i{i}", port, args.events)[0] / raw)
        raw, _ = raw_paho(port, payloads)
        drain.append(backlog_drain(work / f"i{i}", port, args.events) / raw)
    print(f"durable ingest / raw paho               {_range(ingest)}   goal >= 0.60")
    print(f"backlog drain / raw paho                {_range(drain)}   goal >= 0.90")
    lib = build_shim(work)
    if lib is None:
        print("slow-fsync runs skipped: no C compiler for the shim")
        return
    env = preload_env(lib, int(args.fsync_ms * 1000))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--part", "slow",
                    "--runs", str(args.runs), "--fsync-ms", str(args.fsync_ms)],
                   env=env, check=True, cwd=ROOT)


def slow_child(work: Path, port: int, args: argparse.Namespace) -> None:
    lat: list[tuple[float, float, float]] = []
    load: list[tuple[float, float]] = []
    for i in range(args.runs):
        (work / f"s{i}").mkdir()
        p50, p99, _, fs = offered_load(work / f"s{i}", port, 2000, 200.0, "slow-latency")
        fs.sort()
        lat.append((p50, p99, fs[int(len(fs) * 0.99)] * 1e3))
        p50_3k, _, rate, _ = offered_load(work / f"s{i}", port, 9000, 3000.0, "slow-load")
        load.append((rate / 3000.0, p50_3k))
    ms = args.fsync_ms
    print(f"fsync +{ms:g} ms (LD_PRELOAD shim), {args.runs} runs")
    print(f"  fsync p99                              {_range([x[2] for x in lat], '{:.1f}')} ms")
    print(f"  press -> PUBACK, 200/s: p50            {_range([x[0] for x in lat], '{:.1f}')} ms")
    print(f"  press -> PUBACK, 200/s: p99            {_range([x[1] for x in lat], '{:.1f}')} ms"
          f"   goal <= fsync p99 + 5 ms")
    print(f"  p99 - fsync p99                        "
          f"{_range([x[1] - x[2] for x in lat], '{:.1f}')} ms")
    print(f"  PUBACKs/s at 3,000/s offered / offered {_range([x[0] for x in load])}"
          f"   goal >= 0.9")
    print(f"  press -> PUBACK p50 at 3,000/s         {_range([x[1] for x in load], '{:.1f}')} ms"
          f"   goal < 50 ms")


def throughput(work: Path, port: int, args: argparse.Namespace) -> None:
    payloads = [encode_event(sample_event(i), i + 1, "bench", "edge")
                for i in range(args.events)]
    # Baseline and pipeline interleaved, one ratio per pair: a noisy
    # neighbour slows both halves of a pair alike.
    pairs, cpu_pairs = [], []
    for i in range(args.rounds):
        r, raw_cpu = raw_paho(port, payloads)
        (work / f"t{i}").mkdir()
        p, cpu = pipeline_throughput(work / f"t{i}", port, args.events)
        pairs.append((p, r))
        cpu_pairs.append((cpu, raw_cpu))
    raw = statistics.median(r for _, r in pairs)
    pipe = statistics.median(p for p, _ in pairs)
    raw_cpu_us = statistics.median(c for _, c in cpu_pairs) / args.events * 1e6
    cpu_us = statistics.median(c for c, _ in cpu_pairs) / args.events * 1e6
    p50, p99 = pipeline_latency(work, port, 2000, 200.0)
    costs = store_costs(work)
    rss, hwm = daemon_rss(work, port)
    size = len(payloads[0])
    print(f"payload {size} bytes, {args.events} events per run, {args.rounds} interleaved pairs")
    print(f"raw paho QoS 1, window 20 (baseline)  {raw:8.0f} msg/s   1.00")
    print(f"full pipeline (fsync, publish, delete) {pipe:8.0f} ev/s    {_ratios(pairs)} of raw")
    print(f"CPU per event: pipeline / raw paho     {cpu_us:6.1f} us / {raw_cpu_us:.1f} us   "
          f"{_ratios(cpu_pairs)}")
    print(f"press-to-PUBACK at 200 presses/s       p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print(f"store insert, backlog 10               {costs['insert_us_10']:8.0f} us/event")
    print(f"store insert, backlog 100,000          {costs['insert_us_100000']:8.0f} us/event   "
          f"{costs['insert_us_100000'] / costs['insert_us_10']:.2f} of backlog 10")
    print(f"bytes written per event (insert+delete) {costs['wchar_per_event']:7.0f} by write(), "
          f"{costs['block_bytes_per_event']:.0f} at the block layer")
    print(f"daemon RSS after 500 presses           {rss:8.1f} MB (peak {hwm:.1f} MB)")


if __name__ == "__main__":
    main()
