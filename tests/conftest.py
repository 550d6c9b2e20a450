"""Real parts for tests: a Mosquitto per test on a free port, real processes,
real sockets and files.  Waiting is always on a condition with a deadline."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.01) -> Any:
    """Poll `cond` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        threading.Event().wait(interval)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests (marker `soak`: an hour or more) run only when `-m` names them,
    so neither `scripts/test` nor `-m vm` starts one."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A real Mosquitto on 127.0.0.1:port, restartable on the same port."""

    def __init__(self, workdir: Path, extra: str = "") -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # Count every delivery: the default 1,000-message queue per client
            # drops silently (shared/measured.md).
            "max_queued_messages 0\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "set_tcp_nodelay true\n"
            # As root, mosquitto would drop to its own user and could not
            # write its persistence file in the test's directory.
            + ("user root\n" if os.geteuid() == 0 else "")
            + extra)
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_for(self._accepts, 10, f"mosquitto on port {self.port}")

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Subscriber:
    """A paho client with a persistent session that records what arrives."""

    port: int
    topic: str
    client_id: str = "test-subscriber"
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    subscribed: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=MQTTProtocolVersion.MQTTv5)

        def on_connect(client: mqtt.Client, *_: Any) -> None:
            client.subscribe(self.topic, qos=1)

        def on_subscribe(*_: Any) -> None:
            self.subscribed.set()

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            with self.lock:
                self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain)))

        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        c.on_message = on_message
        c.reconnect_delay_set(0.1, 0.5)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        c.loop_start()
        self.client = c
        wait_for(self.subscribed.is_set, 10, "subscription")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def snapshot(self, suffix: str = "") -> list[Received]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix) or suffix in m.topic]

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [m.json() for m in self.messages if "/event/" in m.topic]


@pytest.fixture
def subscribe(broker: Broker) -> Iterator[Callable[[str], Subscriber]]:
    subs: list[Subscriber] = []

    def make(topic: str = "feedback/#") -> Subscriber:
        s = Subscriber(broker.port, topic, client_id=f"test-sub-{len(subs)}-{os.getpid()}")
        s.start()
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.stop()


def _schema(name: str) -> dict[str, Any]:
    text = resources.files("edge.contract").joinpath("schemas", name).read_text()
    data: dict[str, Any] = json.loads(text)
    return data


@pytest.fixture(scope="session")
def validate() -> Callable[[str, Any], None]:
    """validate(topic, payload): the published payload matches the contract's schema."""
    validators = {name: jsonschema.Draft202012Validator(_schema(f"{name}.schema.json"))
                  for name in ("event", "status", "devices", "health", "command-result",
                               "timesync")}

    def check(topic: str, payload: Any) -> None:
        parts = topic.split("/")
        kind = parts[4]
        name = {"event": "event", "status": "status", "devices": "devices", "health": "health",
                "cmd": "command-result", "timesync": "timesync"}[kind]
        validators[name].validate(payload)

    return check


def write_config(path: Path, *, port: int, store: Path, devices: list[dict[str, Any]],
                 extra: str = "", site: str = "clinic-3", edge: str = "reception-1") -> Path:
    lines = [f'site = "{site}"', f'edge = "{edge}"', "", "[broker]", 'host = "127.0.0.1"',
             f"port = {port}", "reconnect_min_s = 0.1", "reconnect_max_s = 0.5", "",
             "[store]", f'path = "{store}"', "", "[daemon]",
             f'control_socket = "{path.parent / "control.sock"}"', extra, ""]
    for d in devices:
        lines.append("[[devices]]")
        for k, v in d.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class Proc:
    """A real child process (daemon or simulator) with its output in a file."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.logfile = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", *self.args], stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")


@pytest.fixture
def procs() -> Iterator[Callable[[list[str], Path], Proc]]:
    started: list[Proc] = []

    def make(args: list[str], log: Path) -> Proc:
        p = Proc(args, log).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.kill(signal.SIGKILL)


# The collector's fixtures (PostgreSQL, database backends, collector processes).
from tests.collector_fixtures import backend, collectors, postgres  # noqa: E402, F401
