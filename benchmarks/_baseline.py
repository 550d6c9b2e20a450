"""The baseline both benchmarks compare against: raw paho QoS 1 publishing."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

__all__ = ["raw_paho"]


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
