"""The daemon as a black box: a simulated console process -> the daemon process
-> a real Mosquitto -> a subscriber.  Processes are killed with SIGKILL."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge.control import query
from firmware_sim.server import control
from tests.conftest import Broker, Proc, Subscriber, wait_for, write_config


class Site:
    """One edge with simulated consoles, as an installer would set it up."""

    def __init__(self, tmp: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
                 consoles: int = 1, buttons: int = 3, layout: str = "three-level") -> None:
        self.tmp = tmp
        self.procs = procs
        self.sockets = [tmp / f"fc3-{i}.sock" for i in range(consoles)]
        self.serials = [f"00A1B2C3D4E{i}" for i in range(consoles)]
        for sock, serial in zip(self.sockets, self.serials, strict=True):
            procs(["firmware_sim.cli", "console", "run", "--socket", str(sock), "--serial",
                   serial, "--buttons", str(buttons), "--layout", layout], tmp / "sim.log")
            wait_for(sock.exists, 10, f"simulator socket {sock}")
        self.config = write_config(
            tmp / "edge.toml", port=broker.port, store=tmp / "state" / "outbox.sqlite",
            devices=[{"kind": "console", "desk": f"desk-{i + 1}", "transport": "socket",
                      "socket": str(s), "serial": serial}
                     for i, (s, serial) in enumerate(zip(self.sockets, self.serials,
                                                         strict=True))])
        self.control_socket = tmp / "control.sock"
        self.daemon: Proc | None = None

    def start(self) -> None:
        self.daemon = self.procs(["edge.cli", "run", "--config", str(self.config)],
                                 self.tmp / "daemon.log")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.daemon is not None
        self.daemon.kill(sig)

    def status(self) -> dict[str, Any]:
        try:
            return query(self.control_socket, timeout=2)
        except (OSError, ValueError):
            return {}

    def wait_connected(self) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            st = self.status()
            ok = st.get("broker", {}).get("state") == "connected" and all(
                d["state"] == "connected" for d in st.get("devices", []))
            return st if ok else None

        result: dict[str, Any] = wait_for(ready, 20, "daemon connected to broker and devices")
        return result

    def press(self, button: int, console: int = 0, delay_ms: int = 0, hold_ms: int = 60) -> None:
        control(self.sockets[console], b"P", json.dumps(
            {"button": button, "hold_ms": hold_ms, "delay_ms": delay_ms}).encode())

    def sim(self, console: int = 0) -> dict[str, Any]:
        return control(self.sockets[console], b"X", b"state")


@pytest.fixture
def site(tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc]) -> Site:
    return Site(tmp_path, broker, procs)


def _unique(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for e in events:
        if e["event_id"] not in seen:
            seen.add(e["event_id"])
            out.append(e)
    return out


def test_a_press_arrives_schema_valid_and_lights_the_led_after_it_is_stored(
        site: Site, subscribe: Callable[[str], Subscriber],
        validate: Callable[[str, Any], None]) -> None:
    sub = subscribe("feedback/#")
    site.start()
    site.wait_connected()
    site.press(0)
    site.press(2, delay_ms=200)
    wait_for(lambda: len(sub.events()) == 2, 10, "two events")
    for m in sub.snapshot():
        validate(m.topic, m.json())
    good, bad = sub.events()
    assert (good["press"]["label"], good["press"]["score"]) == ("good", 1)
    assert (bad["press"]["label"], bad["press"]["score"]) == ("bad", -1)
    assert (good["seq"], bad["seq"]) == (1, 2)
    assert good["desk"] == "desk-1"
    assert good["device"] == {"id": "fc3-00a1b2c3d4e0", "kind": "console",
                              "serial": "00A1B2C3D4E0"}
    assert good["operator"] == {"id": None, "source": "none"}
    assert good["flags"] == []
    topics = {m.topic for m in sub.snapshot()}
    assert "feedback/v1/clinic-3/reception-1/event/fc3-00a1b2c3d4e0" in topics
    status = [m.json() for m in sub.snapshot("/status")]
    assert status[-1]["state"] == "online"
    # The console was ACKed (nothing left to resend) and each LED lit.
    sim = wait_for(lambda: (s := site.sim()) and s["unacked"] == 0 and s, 5, "ACK")
    assert [led[0] for led in sim["leds"]] == [0, 2]
    st = wait_for(lambda: (s := site.status()) and s["queue"]["depth"] == 0 and s, 5, "empty")
    assert st["delivered"] == 2


def test_broker_outage_500_presses_arrive_in_order_without_gaps(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc],
        subscribe: Callable[[str], Subscriber]) -> None:
    site = Site(tmp_path, broker, procs, buttons=5, layout="five-point")
    sub = subscribe("feedback/+/+/+/event/#")
    site.start()
    site.wait_connected()
    broker.stop()
    wait_for(lambda: site.status().get("broker", {}).get("state") == "disconnected", 10,
             "daemon notices the broker is gone")
    for i in range(500):
        site.press(i % 5, delay_ms=i * 20, hold_ms=40)
    wait_for(lambda: site.status().get("queue", {}).get("depth") == 500, 40,
             "500 presses stored while the broker is down")
    assert sub.events() == []
    broker.start()
    wait_for(lambda: len(_unique(sub.events())) >= 500, 60, "500 events after the outage")
    events = _unique(sub.events())
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, 501))
    assert Counter(e["press"]["button"] for e in events) == dict.fromkeys(range(5), 100)
    walls = [e["time"]["wall"] for e in events]
    assert walls == sorted(walls)
    assert site.sim()["lost"] == 0


def test_presses_while_the_daemon_is_down_arrive_with_their_real_times(
        site: Site, subscribe: Callable[[str], Subscriber]) -> None:
    sub = subscribe("feedback/+/+/+/event/#")
    site.start()
    site.wait_connected()
    site.kill()
    pressed_at: list[float] = []
    for i in range(20):
        site.press(i % 3, delay_ms=i * 100)
        # The firmware stamps the press when the contact settles (3 ms bounce).
        pressed_at.append(time.time() + i * 0.1)
    wait_for(lambda: site.sim()["unacked"] == 20, 10, "20 presses waiting in the ring")
    threading.Event().wait(0.5)  # the presses must be old when they finally arrive
    site.start()
    wait_for(lambda: len(sub.events()) >= 20, 20, "the 20 presses after the daemon started")
    events = _unique(sub.events())
    assert len(events) == 20
    for e, at in zip(events, pressed_at, strict=True):
        wall = time.mktime(time.strptime(e["time"]["wall"][:19], "%Y-%m-%dT%H:%M:%S")) \
            - time.timezone + int(e["time"]["wall"][20:23]) / 1000
        assert abs(wall - at) < 0.25, (e["time"], at)
        assert e["time"]["age_ms"] >= 500
        assert "replayed" in e["flags"]
    # Replayed at connect, in the same batch as the console's layout: still labelled.
    assert [(e["press"]["label"], e["press"]["score"]) for e in events[:3]] == \
        [("good", 1), ("neutral", 0), ("bad", -1)]


@pytest.mark.slow
def test_sigkill_rounds_lose_nothing_and_store_nothing_twice(
        site: Site, subscribe: Callable[[str], Subscriber]) -> None:
    sub = subscribe("feedback/+/+/+/event/#")
    rng = random.Random(20261124)
    stop = threading.Event()
    made: list[int] = []

    def presser() -> None:
        i = 0
        while not stop.is_set():
            site.press(i % 3)
            made.append(i % 3)
            i += 1
            stop.wait(0.07)

    site.start()
    site.wait_connected()
    t = threading.Thread(target=presser)
    t.start()
    try:
        for _ in range(20):
            # Kill at a random moment: mid-read, mid-commit, mid-publish.
            threading.Event().wait(rng.uniform(0.05, 0.8))
            site.kill(signal.SIGKILL)
            site.start()
            wait_for(lambda: site.status().get("broker", {}).get("state") == "connected", 20,
                     "daemon back")
    finally:
        stop.set()
        t.join()
    wait_for(lambda: site.sim()["unacked"] == 0, 20, "console fully acknowledged")
    wait_for(lambda: site.status().get("queue", {}).get("depth") == 0, 20, "outbox drained")
    wait_for(lambda: len(_unique(sub.events())) >= len(made), 20, "every press delivered")
    assert site.sim()["lost"] == 0, "the test pressed faster than the ring can hold"
    events = _unique(sub.events())
    assert len(events) == len(made), "a press was stored twice or lost"
    assert Counter(e["press"]["button"] for e in events) == Counter(made)
    seqs = sorted(e["seq"] for e in events)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_commands_ping_and_bad_commands_get_results(
        site: Site, subscribe: Callable[[str], Subscriber],
        validate: Callable[[str, Any], None]) -> None:
    sub = subscribe("feedback/+/+/+/cmd/+/result")
    root = "feedback/v1/clinic-3/reception-1/cmd"
    pub = sub.client
    # A stale retained command, waiting on the broker when the daemon subscribes.
    pub.publish(f"{root}/ping", json.dumps({"request_id": "r3"}), qos=1, retain=True)
    site.start()
    site.wait_connected()
    pub.publish(f"{root}/ping", json.dumps({"request_id": "r1"}), qos=1)
    pub.publish(f"{root}/ping", b"{not json", qos=1)
    pub.publish(f"{root}/reboot", json.dumps({"request_id": "r2"}), qos=1)
    results = wait_for(lambda: (r := sub.snapshot()) and len(r) >= 3 and r, 10, "results")
    for m in results:
        validate(m.topic, m.json())
    by_id = {m.json()["request_id"]: m.json() for m in results}
    assert by_id["r1"] == {"request_id": "r1", "ok": True, "error": None}
    assert by_id[None]["ok"] is False
    assert "JSON" in by_id[None]["error"]
    assert by_id["r2"]["ok"] is False
    assert "unknown command" in by_id["r2"]["error"]
    assert "r3" not in by_id  # retained commands are ignored
    assert "ignored retained command" in site.daemon.log()  # type: ignore[union-attr]


def test_status_shows_queue_broker_and_devices_and_works_when_the_daemon_is_down(
        site: Site, broker: Broker) -> None:
    import subprocess
    import sys

    site.start()
    site.wait_connected()
    broker.stop()
    site.press(1)
    wait_for(lambda: site.status().get("queue", {}).get("depth") == 1, 10, "one pending")
    out = subprocess.run([sys.executable, "-m", "edge.cli", "status", "--config",
                          str(site.config), "--json"], capture_output=True, check=True)
    st = json.loads(out.stdout)
    assert st["running"] is True
    assert st["broker"]["state"] == "disconnected"
    assert st["queue"]["depth"] == 1
    assert st["devices"][0]["state"] == "connected"
    assert st["devices"][0]["presses"] == 1
    human = subprocess.run([sys.executable, "-m", "edge.cli", "status", "--config",
                            str(site.config)], capture_output=True, check=True, text=True)
    assert "DISCONNECTED" in human.stdout
    assert "1 pending" in human.stdout
    site.kill(signal.SIGKILL)
    down = subprocess.run([sys.executable, "-m", "edge.cli", "status", "--config",
                           str(site.config), "--json"], capture_output=True, check=False)
    assert down.returncode == 1
    st = json.loads(down.stdout)
    assert st["running"] is False
    assert st["queue"]["depth"] == 1


def test_sigterm_publishes_offline_and_the_will_covers_a_crash(
        site: Site, subscribe: Callable[[str], Subscriber],
        validate: Callable[[str, Any], None]) -> None:
    sub = subscribe("feedback/+/+/+/status")
    site.start()
    site.wait_connected()
    site.kill(signal.SIGTERM)
    assert site.daemon is not None
    assert site.daemon.proc is not None
    assert site.daemon.proc.returncode == 0
    wait_for(lambda: [m.json()["state"] for m in sub.snapshot()][-1:] == ["offline"], 10,
             "offline after SIGTERM")
    site.start()
    site.wait_connected()
    wait_for(lambda: [m.json()["state"] for m in sub.snapshot()][-1:] == ["online"], 10,
             "online again")
    site.kill(signal.SIGKILL)
    # The broker notices the dead connection after 1.5 x keepalive at most.
    wait_for(lambda: [m.json()["state"] for m in sub.snapshot()][-1:] == ["offline"], 60,
             "the will after SIGKILL")
    for m in sub.snapshot():
        validate(m.topic, m.json())


def _sim_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware_sim.cli", "console", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def test_a_press_of_a_button_the_console_lacks_is_refused_and_the_simulator_goes_on(
        site: Site) -> None:
    sock = str(site.sockets[0])
    bad = _sim_cli("press", "5", "--socket", sock)
    assert bad.returncode == 2, bad
    assert "no button 5" in bad.stderr
    assert "3 buttons" in bad.stderr
    assert "Traceback" not in bad.stderr
    unknown = _sim_cli("press", "great", "--socket", sock)
    assert unknown.returncode == 2, unknown
    assert "unknown button 'great'" in unknown.stderr
    # The simulator still answers, and its firmware still runs (debounce needs ticks).
    good = _sim_cli("press", "good", "--socket", sock)
    assert good.returncode == 0, good
    wait_for(lambda: site.sim()["sent"] >= 2, 5, "the HELLO and the good press sent")
    assert site.sim()["powered"] is True
    assert "Traceback" not in (site.tmp / "sim.log").read_text()


def test_unplug_drops_the_daemons_link_until_plug(site: Site) -> None:
    from drivers.console import INFO_REPORT_LEN, REPORT_INFO
    from drivers.transport import DeviceGoneError
    from firmware_sim.link import SocketTransport

    site.start()
    site.wait_connected()
    sock = str(site.sockets[0])
    out = _sim_cli("unplug", "--socket", sock)
    assert out.returncode == 0, out
    wait_for(lambda: site.status()["devices"][0]["state"] == "missing", 10,
             "the daemon sees the console missing")
    assert site.sim()["host_attached"] is False
    # While unplugged nobody can attach as the host, and the daemon's retries fail.
    def attach_as_host() -> None:
        t = SocketTransport(site.sockets[0])
        try:
            t.get_feature(REPORT_INFO, INFO_REPORT_LEN)
        finally:
            t.close()

    with pytest.raises(DeviceGoneError):
        attach_as_host()
    assert site.daemon is not None
    wait_for(lambda: "no simulator at" in site.daemon.log(), 10,  # type: ignore[union-attr]
             "a retry that found nothing plugged in")
    assert site.status()["devices"][0]["state"] == "missing"
    assert site.sim()["host_attached"] is False
    # press and state still reach an unplugged console (its buttons have no power).
    assert _sim_cli("press", "good", "--socket", sock).returncode == 0
    out = _sim_cli("plug", "--socket", sock)
    assert out.returncode == 0, out
    wait_for(lambda: site.status()["devices"][0]["state"] == "connected", 10,
             "connected again after plug")
    site.press(0)
    wait_for(lambda: site.status()["devices"][0].get("presses") == 1, 10,
             "a press after plug stored")
