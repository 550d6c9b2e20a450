"""Pipeline benchmark: one local Mosquitto, figures as ratios to raw paho.

    .venv/bin/python benchmarks/pipeline.py [--events 5000]

Prints:
- raw paho QoS 1 publish+PUBACK of the same payloads (window 20): the baseline;
- events/s through the daemon's whole pipeline (device report -> group commit
  with fsync -> publish -> PUBACK -> delete), as a ratio to the baseline;
- press-to-PUBACK latency p50/p99 at a steady 200 presses/s;
- store insert cost (one event per fsync'ed commit) at backlog 10 and 100,000;
- bytes written per event (write() calls, and what reached the block layer);
- RSS of a real daemon process with a simulated console after 500 presses.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
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
        out.append(Reading("fc3-00a1b2c3d4e5", ConsoleInput(r, None), time.monotonic_ns(),
                           time.time_ns()))
    return out


def run_daemon(d: TimedDaemon) -> threading.Thread:
    t = threading.Thread(target=d.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while not d.link.connected and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    return t


def pipeline_throughput(work: Path, port: int, n: int) -> float:
    d = make_daemon(work, port, "throughput")
    t = run_daemon(d)
    batch = reports(n)
    t0 = time.perf_counter()
    for r in batch:
        d.inbox.put(r)
    while d.acked < n:
        threading.Event().wait(0.001)
    elapsed = time.perf_counter() - t0
    d.request_stop()
    t.join(10)
    return n / elapsed


def pipeline_latency(work: Path, port: int, n: int, rate: float) -> tuple[float, float]:
    d = make_daemon(work, port, "latency")
    t = run_daemon(d)
    batch = reports(n)
    posted: list[int] = []
    t0 = time.monotonic()
    for i, r in enumerate(batch):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            threading.Event().wait(delay)
        stamped = Reading(r.device_id, r.data, time.monotonic_ns(), time.time_ns())
        posted.append(stamped.host_mono_ns)
        d.inbox.put(stamped)
    while d.acked < n:
        threading.Event().wait(0.001)
    d.request_stop()
    t.join(10)
    lat = sorted((d.acked_at[i + 1] - posted[i]) / 1e6 for i in range(n))
    return lat[len(lat) // 2], lat[int(len(lat) * 0.99)]


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
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    broker, port = start_broker(work)
    try:
        payloads = [encode_event(sample_event(i), i + 1, "bench", "edge")
                    for i in range(args.events)]
        # Baseline and pipeline interleaved, one ratio per pair: a noisy
        # neighbour slows both halves of a pair alike.
        pairs = []
        for i in range(args.rounds):
            r = raw_paho(port, payloads)[0]
            (work / f"t{i}").mkdir()
            pairs.append((r, pipeline_throughput(work / f"t{i}", port, args.events)))
        ratios = sorted(p / r for r, p in pairs)
        raw = statistics.median(r for r, _ in pairs)
        pipe = statistics.median(p for _, p in pairs)
        p50, p99 = pipeline_latency(work, port, 2000, 200.0)
        costs = store_costs(work)
        rss, hwm = daemon_rss(work, port)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    size = len(payloads[0])
    print(f"payload {size} bytes, {args.events} events per run, {args.rounds} interleaved pairs")
    print(f"raw paho QoS 1, window 20 (baseline)  {raw:8.0f} msg/s   1.00")
    print(f"full pipeline (fsync, publish, delete) {pipe:8.0f} ev/s    "
          f"{statistics.median(ratios):.2f} of raw (pairs {ratios[0]:.2f}..{ratios[-1]:.2f})")
    print(f"press-to-PUBACK at 200 presses/s       p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    print(f"store insert, backlog 10               {costs['insert_us_10']:8.0f} us/event")
    print(f"store insert, backlog 100,000          {costs['insert_us_100000']:8.0f} us/event   "
          f"{costs['insert_us_100000'] / costs['insert_us_10']:.2f} of backlog 10")
    print(f"bytes written per event (insert+delete) {costs['wchar_per_event']:7.0f} by write(), "
          f"{costs['block_bytes_per_event']:.0f} at the block layer")
    print(f"daemon RSS after 500 presses           {rss:8.1f} MB (peak {hwm:.1f} MB)")


if __name__ == "__main__":
    main()
