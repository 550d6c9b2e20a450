"""What both benchmarks share: a local Mosquitto, and the baseline they
compare against, raw paho QoS 1 publishing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

__all__ = ["free_port", "raw_paho", "start_broker"]

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Mosquitto on a free port: unlimited queues (every delivery counts) and
    TCP_NODELAY (else each PUBACK waits for a delayed ACK, see README)."""
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nset_tcp_nodelay true\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
        except OSError:
            threading.Event().wait(0.02)
        else:
            return proc, port
    raise SystemExit("mosquitto did not start")


def raw_paho(port: int, payloads: list[bytes], window: int = 20,
             topic: str = "feedback/v1/bench/raw/event/fc3-00a1b2c3d4e5") -> tuple[float, float]:
    """Publish every payload at QoS 1 with an app-level window, wait for every
    PUBACK; returns (messages per second, CPU seconds this process used)."""
    done = threading.Semaphore(0)
    room = threading.Semaphore(window)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw",
                    protocol=MQTTProtocolVersion.MQTTv5)

    def on_publish(*_: object) -> None:
        room.release()
        done.release()

    c.on_publish = on_publish
    c.max_inflight_messages_set(window)
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for p in payloads:
        room.acquire()
        c.publish(topic, p, qos=1)
    for _ in payloads:
        done.acquire()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    c.disconnect()
    c.loop_stop()
    return len(payloads) / elapsed, cpu
