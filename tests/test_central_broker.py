"""The shipped central Mosquitto config and the generated ACL, in a real Mosquitto:
an edge writes only below its own root, a collector only commands, acks and
its state."""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from collector.cli import broker_acl
from tests.conftest import Broker, wait_for

CONF = Path(__file__).parents[1] / "collector" / "mosquitto" / "feedback-central.conf"
USERS = {"collector": "c-secret", "clinic-3-reception-1": "e1-secret",
         "clinic-3-reception-2": "e2-secret"}


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "central")
    pw = tmp_path / "central" / "passwd"
    for i, (user, secret) in enumerate(USERS.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(pw), user,
                        secret], check=True, capture_output=True)
    acl = tmp_path / "central" / "acl"
    acl.write_text(broker_acl([("clinic-3", "reception-1", "clinic-3-reception-1"),
                               ("clinic-3", "reception-2", "clinic-3-reception-2")],
                              "collector"))
    text = CONF.read_text()
    # The shipped file as it is, except what only a real server has: TLS
    # files and paths; the test listens in plain TCP on a free local port.
    text = re.sub(r"^(listener|certfile|keyfile|cafile|tls_version) .*$", "", text, flags=re.M)
    text = text.replace("/etc/mosquitto/feedback.passwd", str(pw))
    text = text.replace("/etc/mosquitto/feedback.acl", str(acl))
    text = text.replace("/var/lib/mosquitto/", f"{tmp_path / 'central'}/")
    b.conf.write_text(f"listener {b.port} 127.0.0.1\n{text}"
                      + ("user root\n" if os.geteuid() == 0 else ""))
    b.start()
    yield b
    b.stop()


class Client:
    def __init__(self, port: int, user: str) -> None:
        self.acks: dict[int, int] = {}
        self.subacks: list[int] = []
        self.received: list[str] = []
        self.done = threading.Condition()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{user}",
                        protocol=MQTTProtocolVersion.MQTTv5)
        c.username_pw_set(user, USERS[user])
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = lambda _c, _u, msg: self.received.append(msg.topic)
        connected = threading.Event()
        c.on_connect = lambda *_a: connected.set()
        c.connect("127.0.0.1", port)
        c.loop_start()
        wait_for(connected.is_set, 10, f"{user} connected")
        self.c = c

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        self.acks[mid] = rc.value

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, rcs: list[Any], _p: Any) -> None:
        self.subacks.extend(rc.value for rc in rcs)

    def publish(self, topic: str) -> int:
        mid = self.c.publish(topic, b"{}", qos=1).mid
        wait_for(lambda: mid in self.acks, 10, f"PUBACK for {topic}")
        return self.acks[mid]

    def subscribe(self, topic: str) -> int:
        n = len(self.subacks)
        self.c.subscribe(topic, qos=1)
        wait_for(lambda: len(self.subacks) > n, 10, f"SUBACK for {topic}")
        return self.subacks[-1]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


NOT_AUTHORIZED = 0x87


def test_an_edge_publishes_and_subscribes_below_its_own_root_only(central: Broker) -> None:
    edge = Client(central.port, "clinic-3-reception-1")
    own = "feedback/v1/clinic-3/reception-1"
    other = "feedback/v1/clinic-3/reception-2"
    assert edge.publish(f"{own}/event/fc3-a") < 0x80
    assert edge.publish(f"{own}/cmd/ping/result") < 0x80
    assert edge.publish(f"{other}/event/fc3-a") == NOT_AUTHORIZED
    assert edge.publish(f"{own}/ack") == NOT_AUTHORIZED  # only collectors acknowledge
    assert edge.publish("feedback/v1/collector/state") == NOT_AUTHORIZED
    assert edge.subscribe(f"{own}/cmd/+") < 0x80
    assert edge.subscribe("feedback/v1/collector/state") < 0x80
    # Mosquitto grants the subscription but delivers nothing the ACL does
    # not let this user read: a command for another edge never reaches it.
    edge.subscribe(f"{other}/cmd/+")
    edge2 = Client(central.port, "clinic-3-reception-2")
    edge2.subscribe(f"{other}/cmd/+")
    col = Client(central.port, "collector")
    assert col.publish(f"{other}/cmd/ping") < 0x80
    wait_for(lambda: edge2.received, 10, "the command at its own edge")
    assert col.publish(f"{own}/cmd/ping") < 0x80
    wait_for(lambda: edge.received, 10, "the next command at edge 1")
    assert edge.received == [f"{own}/cmd/ping"]  # not reception-2's
    for c in (edge, edge2, col):
        c.close()


def test_a_collector_reads_everything_and_writes_commands_acks_and_state(
        central: Broker) -> None:
    col = Client(central.port, "collector")
    assert col.subscribe("$share/collectors/feedback/v1/+/+/event/+") < 0x80
    assert col.subscribe("feedback/v1/+/+/status") < 0x80
    assert col.publish("feedback/v1/clinic-3/reception-1/ack") < 0x80
    assert col.publish("feedback/v1/clinic-3/reception-1/cmd/operator") < 0x80
    assert col.publish("feedback/v1/collector/state") < 0x80
    assert col.publish("feedback/v1/clinic-3/reception-1/event/fc3-a") == NOT_AUTHORIZED
    col.close()


def test_the_shipped_config_sets_what_delivery_relies_on() -> None:
    text = CONF.read_text()
    settings = dict(line.split(None, 1) for line in text.splitlines()
                    if line.strip() and not line.startswith("#"))
    assert settings["persistence"] == "true"
    assert int(settings["max_queued_messages"]) >= 100_000
    assert settings["set_tcp_nodelay"] == "true"
    assert settings["allow_anonymous"] == "false"
