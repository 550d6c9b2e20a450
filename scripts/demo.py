"""The demo behind scripts/demo: the whole thing on one machine.

A local Mosquitto, the collector (`feedback-collector run`, SQLite in the run
directory), the daemon in `collector` delivery mode, a simulated console on a
unix socket and a simulated survey terminal on a real pty, and a live view of
what goes over the broker.  Buttons are pressed, a patient answers the survey
and leaves a phone number, the broker goes away for a while (the presses wait
in the daemon's store) and comes back, and the collector's reports, callback
list and fleet view are printed.  With --forever it then keeps running for
presses made by hand until Ctrl-C.

Stopping: SIGINT, SIGTERM and SIGHUP are caught (never blocked, so no child
inherits a blocked mask); the handler only records the signal and wakes the
waits.  Every child runs in a session of its own, so a Ctrl-C at the terminal
reaches the demo alone, which stops them in order (the daemon first, so it
says offline) with SIGTERM, then SIGKILL after a grace period, and reaps
every one of them, whenever and however the demo ends.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "demo-run"
MARKER = ".feedback-demo"  # a run directory the demo may empty and reuse
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
LABELS = ["good", "neutral", "bad"]
SITE, EDGE = "demo-clinic", "reception-1"
TERMINAL_SERIAL = "00C0FFEE0001"
PHONE = "+4917012345"
GRACE_S = 5.0  # SIGTERM, then this long before SIGKILL
T = TypeVar("T")


class DemoError(Exception):
    """Something the demo needs did not happen; the message says what and where."""


class Interrupted(Exception):  # noqa: N818 - it is not an error
    """A stop signal arrived; raised by the demo's own waits, never by the handler."""


# The web app's demo users (one per role) and their password: a demo on localhost only.
WEB_USERS = (("quality", "quality_manager"), ("officer", "callback_officer"),
             ("manager", "clinic_manager"), ("admin", "administrator"))
WEB_PASSWORD = "demo-password-1"  # noqa: S105 - printed for the person running the demo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_zone() -> str:
    """This machine's IANA zone, so the reports' days are the user's (else UTC)."""
    from zoneinfo import ZoneInfo  # noqa: PLC0415

    name = os.environ.get("TZ", "").lstrip(":")
    if not name:
        with contextlib.suppress(OSError):
            name = os.readlink("/etc/localtime").partition("zoneinfo/")[2]
    try:
        ZoneInfo(name)
    except (ValueError, OSError):
        return "UTC"
    return name or "UTC"


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Signals:
    """SIGINT, SIGTERM and SIGHUP end the demo.

    The handler records the first one and writes a byte to a pipe: no locks,
    so it cannot deadlock whatever it interrupts, and it never raises, so it
    cannot break off a cleanup half-way.  Waiting is select() on that pipe,
    so every wait returns as soon as a signal has arrived."""

    HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._w, False)
        for s in self.HANDLED:
            signal.signal(s, self._on_signal)
        # A mask inherited from whoever started the demo would be passed on to
        # every child, which would then ignore the SIGTERM that stops it.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.HANDLED)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
        with contextlib.suppress(OSError):
            os.write(self._w, b"!")

    def wait(self, timeout: float) -> bool:
        """Wait at most `timeout` seconds; True once a stop signal has arrived."""
        if self.received is None and timeout > 0:
            select.select([self._r], [], [], timeout)
        return self.received is not None


# The demo's alert webhook: its secret signs every POST (README, "Alerts").
HOOK_SECRET = "demo-hook-secret"  # noqa: S105 - the demo's own receiver checks it


class Hooks:
    """A webhook receiver in this process, standing in for the clinic's system:
    keeps each alert whose signature is right."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                want = "sha256=" + hmac.new(HOOK_SECRET.encode(), body,
                                            hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(self.headers.get("X-Feedback-Signature", ""), want)
                if ok:
                    with hooks.lock:
                        hooks.got.append(json.loads(body))
                self.send_response(204 if ok else 403)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def first(self, kind: str) -> dict[str, Any] | None:
        with self.lock:
            return next((d for d in self.got if d["kind"] == kind), None)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Demo:
    def __init__(self, run_dir: Path, signals: Signals) -> None:
        self.dir = run_dir
        self.signals = signals
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.viewer: mqtt.Client | None = None
        self.sock = run_dir / "fc3.sock"
        self.tty = run_dir / "st3.tty"
        self.flash = run_dir / "st3.flash"
        self.terminal_ctl = run_dir / "st3.ctl"
        self.control = run_dir / "control.sock"
        self.config = run_dir / "edge.toml"
        self.collector_config = run_dir / "collector.toml"
        self.db = run_dir / "collector.sqlite"
        self.web_port = free_port()
        self.metrics_port = free_port()
        self.hooks = Hooks()
        self.rng = random.Random()
        self.tz = local_zone()

    # -- files ----------------------------------------------------------------------

    def write_files(self) -> None:
        run = self.dir
        (run / "doctors.json").write_text(json.dumps({"rev": 1, "doctors": [
            {"id": "dr-petrov", "name": "Dr Petrov", "specialty": "ENT", "photo": None},
            {"id": "dr-ivanova", "name": "Dr Ivanova", "specialty": "GP", "photo": None}]}))
        self.config.write_text(f"""# written by scripts/demo
site = "{SITE}"
edge = "{EDGE}"
tz = "{self.tz}"

[broker]
host = "127.0.0.1"
port = {self.port}
reconnect_min_s = 0.2
reconnect_max_s = 2

[store]
path = "{run}/state/outbox.sqlite"
min_free_bytes = 0

[daemon]
control_socket = "{self.control}"
health_interval_s = 2

[delivery]
mode = "collector"             # an event leaves the Pi when the collector has stored it
resend_after_s = 5

[survey]
doctors_file = "{run}/doctors.json"

[desks.desk-1]
operator = "op-17"

[desks.office-12]              # a doctor's office: the survey terminal at its door

[[devices]]
kind = "console"
desk = "desk-1"
transport = "socket"
socket = "{self.sock}"
serial = "00A1B2C3D4E5"

[[devices]]
kind = "terminal"
desk = "office-12"
serial = "{TERMINAL_SERIAL}"
port = "{self.tty}"
""")
        # Plain TCP is fine to localhost; anonymous, as the demo's broker is.
        self.collector_config.write_text(f"""# written by scripts/demo
id = "demo-1"

[broker]
host = "127.0.0.1"
port = {self.port}
reconnect_min_s = 0.2
reconnect_max_s = 2

[database]
path = "{self.db}"

[reports]
tz = "{self.tz}"

[metrics]
listen = "127.0.0.1:{self.metrics_port}"

[web]                       # no [web.smtp]: nothing is e-mailed in the demo
allowed_hosts = ["127.0.0.1", "localhost"]
base_url = "http://127.0.0.1:{self.web_port}"
webhook_allow = ["127.0.0.1"]   # the demo's own webhook receiver
""")
        (run / "hook.secret").write_text(HOOK_SECRET + "\n")
        (run / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {run}/\nmax_queued_messages 0\nset_tcp_nodelay true\n"
            + ("user root\n" if os.geteuid() == 0 else ""))

    # -- children -------------------------------------------------------------------

    def spawn(self, name: str, args: list[str]) -> None:
        with (self.dir / f"{name}.log").open("ab") as log:
            # A session of its own: Ctrl-C at the terminal is for the demo to handle.
            self.procs[name] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, cwd=ROOT,
                                                start_new_session=True)

    def module(self, name: str, module: str, *args: str) -> None:
        self.spawn(name, [sys.executable, "-m", module, *args])

    def stop(self, *names: str, grace: float = GRACE_S) -> None:
        """SIGTERM to each, SIGKILL to whatever is left after `grace` s; all reaped."""
        procs = [(n, self.procs.pop(n)) for n in names if n in self.procs]
        for _, p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for name, p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"  ({name} did not stop on SIGTERM within {grace:.0f} s: SIGKILL)",
                      flush=True)
            finally:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                    p.wait()

    def close(self) -> None:
        """Stop every child, the daemon first (it publishes offline), and reap them all."""
        try:
            if self.viewer is not None:
                self.viewer.disconnect()
                self.viewer.loop_stop()
        finally:
            try:
                self.stop("daemon")
            finally:
                try:
                    self.stop(*list(self.procs))
                finally:
                    self.hooks.close()

    def check_children(self) -> None:
        for name, p in self.procs.items():
            rc = p.poll()
            if rc is not None:
                log = self.dir / f"{name}.log"
                tail = log.read_text(errors="replace").splitlines()[-15:]
                raise DemoError(f"{name} exited ({rc}); the end of {log}:\n  "
                                + "\n  ".join(tail))

    def pause(self, seconds: float) -> None:
        if self.signals.wait(seconds):
            raise Interrupted

    def wait_until(self, cond: Callable[[], T | None], timeout: float, what: str) -> T:
        """Poll `cond` until it gives something truthy; a signal or a dead child ends it."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_children()
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise DemoError(f"{what}: not within {timeout:.0f} s (logs in {self.dir})")
            self.pause(0.1)

    def cli(self, *args: str, show: bool = True, ok: tuple[int, ...] = (0,),
            stdin: str | None = None) -> str:
        """A one-shot command (its own session too); its output printed in one piece."""
        out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                             cwd=ROOT, input=stdin,
                             stdin=subprocess.DEVNULL if stdin is None else None,
                             start_new_session=True, timeout=60, check=False)
        text = out.stdout + out.stderr
        if show and text.strip():
            print(text.rstrip("\n"), flush=True)
        if self.signals.received is not None:
            raise Interrupted
        if out.returncode not in ok:
            raise DemoError(f"{' '.join(args[:3])} failed ({out.returncode}): {text.strip()}")
        return text

    # -- the parts --------------------------------------------------------------------

    def start_web(self) -> None:
        """The web app's tables, one demo user per role, and its server."""
        cfg = ("--config", str(self.collector_config))
        self.cli("collector.cli", "web", *cfg, "migrate", show=False)
        for name, role in WEB_USERS:
            self.cli("collector.cli", "web", *cfg, "adduser", name, "--role", role,
                     show=False, stdin=WEB_PASSWORD + "\n")
        self.module("web", "collector.cli", "web", *cfg, "serve", "--bind",
                    f"127.0.0.1:{self.web_port}", "--tick-s", "5")

    def start_broker(self) -> None:
        self.spawn("mosquitto", [MOSQUITTO, "-c", str(self.dir / "mosquitto.conf")])

        def accepts() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            except OSError:
                return False
            return True

        self.wait_until(accepts, 10, f"Mosquitto on port {self.port}")

    def daemon_status(self) -> dict[str, Any]:
        from edge.control import query  # noqa: PLC0415 - the project, from the venv

        try:
            return query(self.control, timeout=2)
        except (OSError, ValueError):
            return {}

    def ready(self) -> bool:
        st = self.daemon_status()
        devices = st.get("devices", [])
        return (st.get("broker", {}).get("state") == "connected"
                and st.get("delivery", {}).get("collector_online") is True
                and len(devices) == 2 and all(d["state"] == "connected" for d in devices))

    def drained(self) -> dict[str, Any] | None:
        """The daemon's status once its store holds nothing the collector lacks."""
        st = self.daemon_status()
        if st.get("broker", {}).get("state") == "connected" and \
                st.get("queue", {}).get("depth") == 0:
            return st
        return None

    def fleet_current(self) -> bool:
        """The collector has a health report from after the store drained."""
        from collector.cli import fleet_rows  # noqa: PLC0415
        from collector.db import DatabaseError, open_database  # noqa: PLC0415

        try:
            db = open_database(self.db)
        except (DatabaseError, OSError):
            return False
        try:
            rows = fleet_rows(db, int(time.time() * 1000))
        except Exception:  # noqa: BLE001 - busy or not yet created: ask again
            return False
        finally:
            db.close()
        return any(r["edge"] == f"{SITE}/{EDGE}" and r["state"] == "online"
                   and r["queue"] == 0 for r in rows)

    def press(self, label: str) -> None:
        print(f"  press  {label}", flush=True)
        self.cli("firmware_sim.cli", "console", "press", label, "--socket", str(self.sock))

    def answer(self) -> None:
        print(f"  answer office-12: dr-petrov, q1 no, q2 yes, phone {PHONE}", flush=True)
        self.cli("firmware_sim.cli", "terminal", "answer", "--control",
                 str(self.terminal_ctl), "--doctor", "dr-petrov", "--q1", "no", "--q2", "yes",
                 "--phone", PHONE, show=False)

    def status(self) -> None:
        # Exit 3: running with alarms (here: the clock may well not be synchronised).
        self.cli("edge.cli", "status", "--config", str(self.config), ok=(0, 3))

    def collector(self, *args: str) -> None:
        print(f"\n$ feedback-collector {' '.join(args)}", flush=True)
        self.cli("collector.cli", *args, "--config", str(self.collector_config))

    def watch(self) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="demo-viewer",
                        protocol=MQTTProtocolVersion.MQTTv5)

        def on_connect(client: mqtt.Client, *_: Any) -> None:
            client.subscribe("feedback/v1/#", qos=1)

        shown: dict[str, str] = {}  # per topic: its last line, not repeated

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                line = describe(msg.topic, json.loads(msg.payload))
            except (ValueError, KeyError, TypeError, IndexError):
                line = f"  ?      {msg.topic}: not what the contract says"
            if line and shown.get(msg.topic) != line:
                shown[msg.topic] = line
                print(line, flush=True)

        c.on_connect = on_connect
        c.on_message = on_message
        c.reconnect_delay_set(0.2, 1)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        c.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        c.loop_start()
        return c

    # -- the story ----------------------------------------------------------------------

    def run(self, forever: bool) -> None:
        self.write_files()
        say(f"starting Mosquitto on 127.0.0.1:{self.port}, the collector, a simulated console "
            "and survey terminal, the daemon")
        self.start_broker()
        self.module("collector", "collector.cli", "run", "--config", str(self.collector_config))
        self.start_web()
        self.module("console", "firmware_sim.cli", "console", "run", "--socket", str(self.sock))
        self.module("terminal", "firmware_sim.cli", "terminal", "run", "--link", str(self.tty),
                    "--flash", str(self.flash), "--serial", TERMINAL_SERIAL, "--control",
                    str(self.terminal_ctl))
        self.wait_until(lambda: self.sock.exists() and self.tty.exists()
                        and self.terminal_ctl.exists(), 15, "the simulated devices")
        self.module("daemon", "edge.cli", "run", "--config", str(self.config))
        self.viewer = self.watch()
        self.wait_until(self.ready, 30, "the daemon connected to the broker and both devices, "
                        "the collector online")

        say("a patient presses buttons; each press is stored, ACKed, lit, published")
        for _ in range(5):
            self.press(self.rng.choice(LABELS))
            self.pause(0.5)
        say("a patient answers the survey outside office 12 and asks to be called back")
        self.answer()
        st = self.wait_until(self.drained, 15, "the collector acknowledging everything")
        say(f"the collector has stored everything up to seq {st['delivery']['watermark']}; "
            "only now has the Pi let go of it")

        say("the broker goes away; presses keep being stored on the Pi")
        self.stop("mosquitto")
        self.wait_until(lambda: self.daemon_status().get("broker", {}).get("state")
                        == "disconnected", 10, "the daemon noticing the broker is gone")
        for _ in range(3):
            self.press(self.rng.choice(LABELS))
            self.pause(0.3)
        self.status()

        say("the broker is back: the stored presses arrive, in order, and the collector "
            "acknowledges them")
        self.start_broker()
        self.wait_until(self.drained, 20, "the stored presses delivered and acknowledged")
        self.status()
        self.wait_until(self.fleet_current, 15, "the collector's fleet view up to date")

        say("what the collector makes of it")
        self.collector("report", "loyalty", "--period", "day")
        print("(presses flagged burst, the 6th and later within 10 s at a desk, count only "
              "with --include-burst)", flush=True)
        self.collector("report", "doctors", "--period", "day")
        self.collector("callbacks")
        self.collector("fleet")
        say(f"the quality manager's web app: http://127.0.0.1:{self.web_port}/ (users "
            f"{', '.join(u for u, _ in WEB_USERS)}; password {WEB_PASSWORD}); the patient who "
            "asked to be called back is case #1 in the callback queue")

        say("an unhappy moment: two bad presses; the alert rule \"Reception unhappy\" (2 bad "
            "in 30 minutes at a desk) tells the clinic's system by a signed webhook, "
            "received here (the web app checks its rules every 5 s)")
        cfg = ("--config", str(self.collector_config))
        self.cli("collector.cli", "web", *cfg, "alert-rule", "add", "--name",
                 "Reception unhappy", "--kind", "negative", "--threshold", "2",
                 "--window-min", "30", "--webhook-url", self.hooks.url,
                 "--webhook-secret-file", str(self.dir / "hook.secret"), show=False)
        # Ten seconds on from the last presses, so these two are not taken for a
        # burst (more than 5 in 10 s at a desk), which no report or rule counts.
        self.pause(10)
        for _ in range(2):
            self.press("bad")
            self.pause(0.3)
        alert = self.wait_until(lambda: self.hooks.first("opened"), 30, "the alert's webhook")
        print(f"  webhook {alert['kind']}: {alert['rule']['name']} at {alert['subject']}: "
              f"{alert['value']} (alert {alert['alert_id']}, signature checked)", flush=True)
        token = self.cli("collector.cli", "web", *cfg, "token", "create", "demo",
                         show=False).strip()
        say("other systems read the data through the API (the token is shown once), and "
            "Prometheus the collector's metrics")
        api = f"http://127.0.0.1:{self.web_port}/api/v1"
        print(f"  curl -H 'Authorization: Bearer {token}' '{api}/events?kind=press&limit=5'\n"
              f"  curl -H 'Authorization: Bearer {token}' "
              f"'{api}/reports/loyalty?by=desk&period=day&format=csv'\n"
              f"  curl -H 'Authorization: Bearer {token}' {api}/alerts\n"
              f"  curl http://127.0.0.1:{self.metrics_port}/metrics", flush=True)

        if forever:
            venv = ROOT / ".venv" / "bin"
            say("running until Ctrl-C; press buttons and answer surveys yourself with\n"
                f"   {venv}/feedback-sim console press good --socket {self.sock}\n"
                f"   {venv}/feedback-sim terminal answer --control {self.terminal_ctl} "
                "--doctor dr-ivanova --q1 yes\n"
                f"   {venv}/feedback-edge status --config {self.config}\n"
                f"   {venv}/feedback-collector report loyalty --period day --config "
                f"{self.collector_config}")
            while not self.signals.wait(1.0):
                self.check_children()


def describe(topic: str, body: Any) -> str | None:
    """One line of the live view for a message (None: not shown)."""
    parts = topic.split("/")
    if parts[2] == "collector":
        return f"  collector {body['state']}"
    kind = parts[4]
    if kind == "event":
        flags = f"  {','.join(body['flags'])}" if body["flags"] else ""
        head = f"  event  seq {body['seq']:<4} {body['desk']:<9} "
        if body["kind"] == "press":
            p = body["press"]
            score = "-" if p["score"] is None else f"{p['score']:+d}"
            return (f"{head}{p['label']:<8} score {score}  operator "
                    f"{body['operator']['id'] or '-':<6} at {body['time']['wall']}  "
                    f"age {body['time']['age_ms']} ms{flags}")
        if body["kind"] == "answer":
            a = body["answer"]
            # The phone number is for the callback list, not for a live view.
            return (f"{head}answer   {a['doctor']}: q1 {a['q1']}, q2 {a['q2'] or '-'}"
                    f"{', phone left' if a['phone'] else ''}  at {body['time']['wall']}{flags}")
        return f"{head}{body['kind']}{flags}"
    if kind == "ack":
        return f"  ack    the collector has stored every event up to seq {body['seq']}"
    if kind == "status":
        return f"  status {body['state']}"
    if kind == "devices":
        return "\n".join(f"  device {d['id']} desk {d['desk']}: {d['state']}"
                         for d in body["devices"])
    return None


def prepare(run_dir: Path) -> None:
    """An empty run directory; only one the demo made itself (or its default) is emptied."""
    if run_dir.exists() and any(run_dir.iterdir()) and run_dir != DEFAULT_DIR \
            and not (run_dir / MARKER).exists():
        raise DemoError(f"{run_dir} is not empty and not a demo's run directory; give a new "
                        "or empty directory")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / MARKER).write_text("scripts/demo may empty this directory\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--forever", action="store_true",
                        help="keep running after the scripted part, until Ctrl-C")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"run directory: configs, logs, stores (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    signals = Signals()
    run_dir = args.dir.resolve()
    try:
        prepare(run_dir)
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    demo = Demo(run_dir, signals)
    code = 0
    try:
        demo.run(args.forever)
    except Interrupted:
        code = 128 + (signals.received or signal.SIGINT)
    except DemoError as e:
        print(f"\ndemo: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        say("stopping everything")
        demo.close()
    if code == 0 and signals.received is not None and not args.forever:
        code = 128 + signals.received
    say(f"done; logs, the Pi's store and the collector's database are in {run_dir}")
    return code


if __name__ == "__main__":
    sys.exit(main())
