"""The demo behind scripts/demo: broker, console simulator, daemon and a live view.

It presses a few buttons, takes the broker away for a while (the presses wait
in the daemon's store), brings it back, and shows `feedback-edge status`.
With --forever it then keeps running for presses made by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "demo-run"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
LABELS = ["good", "neutral", "bad"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self) -> None:
        shutil.rmtree(RUN, ignore_errors=True)
        RUN.mkdir()
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.sock = RUN / "fc3.sock"
        self.config = RUN / "edge.toml"
        self.config.write_text(f"""# written by scripts/demo
site = "demo-clinic"
edge = "reception-1"

[broker]
host = "127.0.0.1"
port = {self.port}
reconnect_min_s = 0.2
reconnect_max_s = 2

[store]
path = "{RUN}/state/outbox.sqlite"
min_free_bytes = 0

[daemon]
control_socket = "{RUN}/control.sock"

[desks.desk-1]
operator = "op-17"

[[devices]]
kind = "console"
desk = "desk-1"
transport = "socket"
socket = "{self.sock}"
serial = "00A1B2C3D4E5"
""")
        (RUN / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {RUN}/\nmax_queued_messages 0\nset_tcp_nodelay true\n"
            + ("user root\n" if os.geteuid() == 0 else ""))

    def spawn(self, name: str, args: list[str]) -> None:
        log = (RUN / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def start_broker(self) -> None:
        self.spawn("mosquitto", [MOSQUITTO, "-c", str(RUN / "mosquitto.conf")])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            except OSError:
                threading.Event().wait(0.05)
            else:
                return
        raise SystemExit("demo: mosquitto did not start; see demo-run/mosquitto.log")

    def stop(self, name: str) -> None:
        p = self.procs.pop(name, None)
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(10)

    def watch(self) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-viewer",
                        protocol=MQTTProtocolVersion.MQTTv5)

        def on_connect(client: mqtt.Client, *_: Any) -> None:
            client.subscribe("feedback/v1/#", qos=1)

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            kind = msg.topic.split("/")[4]
            try:
                body = json.loads(msg.payload)
            except ValueError:
                return
            if kind == "event":
                p = body["press"]
                print(f"  event  seq {body['seq']:<4} {body['desk']:<7} {p['label']:<8} "
                      f"score {p['score']:+d}  operator {body['operator']['id'] or '-':<6} "
                      f"at {body['time']['wall']}  age {body['time']['age_ms']} ms"
                      f"{'  ' + ','.join(body['flags']) if body['flags'] else ''}", flush=True)
            elif kind == "status":
                print(f"  status {body['state']}", flush=True)
            elif kind == "devices":
                for d in body["devices"]:
                    print(f"  device {d['id']} desk {d['desk']}: {d['state']}", flush=True)

        c.on_connect = on_connect
        c.on_message = on_message
        c.reconnect_delay_set(0.2, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        c.loop_start()
        return c

    def press(self, label: str) -> None:
        print(f"  press  {label}", flush=True)
        subprocess.run([sys.executable, "-m", "firmware_sim.cli", "console", "press", label,
                        "--socket", str(self.sock)], check=True)

    def status(self) -> None:
        subprocess.run([sys.executable, "-m", "edge.cli", "status", "--config",
                        str(self.config)], check=False)

    def run(self, forever: bool) -> None:
        say(f"starting Mosquitto on 127.0.0.1:{self.port}, a simulated console, the daemon")
        self.start_broker()
        self.spawn("console", [sys.executable, "-m", "firmware_sim.cli", "console", "run",
                               "--socket", str(self.sock)])
        self.spawn("daemon", [sys.executable, "-m", "edge.cli", "run", "--config",
                              str(self.config)])
        viewer = self.watch()
        pause = threading.Event()
        pause.wait(2)
        say("a patient presses buttons; each press is stored, ACKed, lit, published")
        rng = random.Random()
        for _ in range(5):
            self.press(rng.choice(LABELS))
            pause.wait(0.8)
        say("the broker goes away; presses keep being stored on the Pi")
        self.stop("mosquitto")
        for _ in range(3):
            self.press(rng.choice(LABELS))
            pause.wait(0.5)
        pause.wait(1)
        self.status()
        say("the broker is back: the stored presses arrive, in order")
        self.start_broker()
        pause.wait(4)
        self.status()
        if forever:
            say(f"running until Ctrl-C; press buttons yourself with\n"
                f"   .venv/bin/feedback-sim console press good --socket {self.sock}\n"
                f"   .venv/bin/feedback-edge status --config {self.config}")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        viewer.disconnect()
        viewer.loop_stop()

    def close(self) -> None:
        for name in ("daemon", "console", "mosquitto"):
            self.stop(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forever", action="store_true",
                        help="keep running after the scripted presses")
    args = parser.parse_args()
    if args.forever:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    demo = Demo()
    try:
        demo.run(args.forever)
    finally:
        demo.close()
    say(f"done; logs and the store are in {RUN}")


if __name__ == "__main__":
    main()
