"""Devices benchmark: the daemon process with 8 simulated devices attached.

    .venv/bin/python benchmarks/devices.py [--seconds 10]

6 consoles (simulator processes on unix sockets) and 2 survey terminals
(simulator processes on real ptys) feed one daemon process, which publishes
to a local Mosquitto.  Prints:
- the daemon's CPU while all 8 are connected and nobody presses (% of a core);
- sustained console presses/s and terminal records/s through the whole
  pipeline (counted at a subscriber), all devices busy at once;
- the daemon's CPU per 1,000 events, and as a ratio to raw paho publishing
  1,000 of the same payloads measured in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import raw_paho, start_broker  # noqa: E402
from firmware_sim.server import control  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark: timed out waiting for {what}")
        threading.Event().wait(0.05)


class Counter:
    def __init__(self, port: int) -> None:
        self.kinds: dict[str, int] = {}
        self.payload = b""
        self.lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-counter",
                        protocol=MQTTProtocolVersion.MQTTv5)
        c.on_connect = lambda cl, *a: cl.subscribe("feedback/+/+/+/event/#", qos=1)
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        kind = json.loads(msg.payload)["kind"]
        with self.lock:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            self.payload = bytes(msg.payload)

    def total(self) -> int:
        with self.lock:
            return sum(self.kinds.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-devices-"))
    broker, port = start_broker(work)
    procs = [broker]
    py = [sys.executable, "-m"]
    try:
        consoles = [work / f"fc3-{i}.sock" for i in range(6)]
        for i, sock in enumerate(consoles):
            procs.append(subprocess.Popen([*py, "firmware_sim.cli", "console", "run", "--socket",
                                           str(sock), "--serial", f"00A1B2C3D4E{i}"],
                                          cwd=ROOT, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        terminals = []
        for i in range(2):
            steps = [{"kind": "answer", "doctor": f"dr-{j % 7}", "q1": "yes", "lang": "en",
                      "after_ms": 1_000_000} for j in range(1)]
            script = work / f"t{i}.json"
            script.write_text(json.dumps(steps))
            link, ctl = work / f"st3-{i}.tty", work / f"st3-{i}.ctl"
            terminals.append((link, ctl))
            procs.append(subprocess.Popen([*py, "firmware_sim.cli", "terminal", "run", "--link",
                                           str(link), "--flash", str(work / f"t{i}.flash"),
                                           "--serial", f"00C0FFEE000{i}", "--control", str(ctl)],
                                          cwd=ROOT, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        wait(lambda: all(s.exists() for s in consoles)
             and all(link.exists() and ctl.exists() for link, ctl in terminals), 20, "sims")
        devices = [f'[[devices]]\nkind = "console"\ndesk = "desk-{i}"\ntransport = "socket"\n'
                   f'socket = "{s}"\nserial = "00A1B2C3D4E{i}"\n' for i, s in enumerate(consoles)]
        devices += [f'[[devices]]\nkind = "terminal"\ndesk = "office-{i}"\nport = "{link}"\n'
                    f'serial = "00C0FFEE000{i}"\n' for i, (link, _) in enumerate(terminals)]
        cfg = work / "edge.toml"
        cfg.write_text(f'site = "bench"\nedge = "devices"\n[broker]\nhost = "127.0.0.1"\n'
                       f'port = {port}\n[store]\npath = "{work}/o.sqlite"\nmin_free_bytes = 0\n'
                       f'[daemon]\ncontrol_socket = "{work}/c.sock"\n' + "\n".join(devices))
        counter = Counter(port)
        daemon = subprocess.Popen([*py, "edge.cli", "run", "--config", str(cfg), "--log-level",
                                   "WARNING"], cwd=ROOT)
        procs.append(daemon)
        from edge.control import query

        def connected() -> bool:
            try:
                st = query(work / "c.sock", timeout=2)
            except OSError:
                return False
            return all(d["state"] == "connected" for d in st["devices"]) and \
                st["broker"]["state"] == "connected"

        wait(connected, 30, "daemon with 8 devices")
        threading.Event().wait(2)
        c0, t0 = cpu_seconds(daemon.pid), time.monotonic()
        threading.Event().wait(args.seconds)
        idle = (cpu_seconds(daemon.pid) - c0) / (time.monotonic() - t0)

        # Busy: every console presses its three buttons in turn (each button
        # every 240 ms, the debounce allows no faster), every terminal gets
        # records as fast as it sends them (one in flight at a time).
        n_press = int(args.seconds * 1000 / 80)
        before = counter.total()
        c0, t0 = cpu_seconds(daemon.pid), time.monotonic()
        for sock in consoles:
            for i in range(n_press):
                control(sock, b"P", json.dumps({"button": i % 3, "hold_ms": 40,
                                                "delay_ms": 200 + i * 80}).encode())
        n_rec = int(args.seconds * 150)
        for _, ctl in terminals:
            for j in range(n_rec):
                control(ctl, b"A", json.dumps({"kind": "answer", "doctor": f"dr-{j % 7}",
                                               "q1": "yes"}).encode())
        expected = before + 6 * n_press + 2 * n_rec
        try:
            wait(lambda: counter.total() >= expected, 10 * args.seconds + 60, "all events")
        except SystemExit:
            print(f"expected {expected - before} new events, counted {counter.kinds} "
                  f"(before: {before})", file=sys.stderr)
            raise
        elapsed = time.monotonic() - t0
        busy_cpu = cpu_seconds(daemon.pid) - c0
        events = counter.total() - before
        raw = raw_paho(port, [counter.payload] * 5000, topic="bench/raw")[1] / 5
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    presses = counter.kinds.get("press", 0)
    answers = counter.kinds.get("answer", 0)
    per_k = busy_cpu / events * 1000
    print(f"8 devices (6 consoles, 2 terminals), daemon process, {args.seconds:.0f} s phases")
    print(f"idle CPU, all connected, nobody pressing   {idle * 100:6.2f} % of one core")
    print(f"sustained, all busy at once                 {events / elapsed:6.0f} events/s "
          f"({presses} presses, {answers} answers in {elapsed:.1f} s)")
    print(f"daemon CPU per 1,000 events                 {per_k * 1000:6.0f} ms   "
          f"{per_k / raw:.1f}x raw paho publishing 1,000 of the same payloads "
          f"({raw * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
