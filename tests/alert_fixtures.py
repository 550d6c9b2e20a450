"""Alert tests' parts (issue 19): a real HTTP receiver for webhooks, the web
app on its own database with a quality manager, and events put in through the
collector's intake path (`classify` + `store.ingest`) at injected times.
Personal data here is made up and never printed."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from collector import store
from collector.intake import classify
from tests.collector_fixtures import Backend, press_event
from tests.web_fixtures import SmtpSink, answer_message, query, web_cli

TZ = "Europe/Berlin"
SECRET = "hook-secret-3f9a"
PHONE = "+4917055598761"
COMMENT = "ZQX the desk ignored me ZQX"
QM = "quality@clinic.example"


# -- a webhook receiver ------------------------------------------------------------------

@dataclass
class Hook:
    """A real HTTP server answering each POST with the next status of `statuses`
    (then 200), keeping every request's headers and body."""

    statuses: list[int] = field(default_factory=list)
    got: list[tuple[int, dict[str, str], bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def delivered(self) -> list[dict[str, Any]]:
        """Bodies of the requests answered 2xx, each checked against its signature."""
        out = []
        with self.lock:
            got = list(self.got)
        for status, headers, body in got:
            want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["X-Feedback-Signature"], want), "bad signature"
            doc = json.loads(body)
            assert headers["X-Feedback-Alert-Id"] == doc["alert_id"]
            if 200 <= status < 300:
                out.append(doc)
        return out


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with h.lock:
                status = h.statuses.pop(0) if h.statuses else 200
                h.got.append((status, dict(self.headers.items()), body))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    h.url = f"http://127.0.0.1:{server.server_port}/hook"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield h
    server.shutdown()
    server.server_close()


# -- the app -----------------------------------------------------------------------------

@dataclass
class App:
    config: Path
    backend: Backend
    tmp: Path
    seq: dict[str, int] = field(default_factory=dict)

    def cli(self, *args: str, stdin: str | None = None) -> str:
        return web_cli(self.config, *args, stdin=stdin)

    def tick(self, now: datetime) -> str:
        out = self.cli("tick", "--now", now.isoformat())
        assert "FAILED" not in out, out
        return out

    def rule(self, *args: str) -> int:
        secret = self.tmp / "hook.secret"
        secret.write_text(SECRET + "\n")
        return int(self.cli("alert-rule", "add", *args, "--webhook-secret-file",
                            str(secret)).strip())

    def ingest(self, msgs: list[tuple[str, bytes]]) -> None:
        items = [classify(t, p) for t, p in msgs]
        assert all(i is not None and i.kind != "quarantine" for i in items)
        db = self.backend.open()
        try:
            store.ingest(db, [i for i in items if i is not None])
        finally:
            db.close()

    def press(self, at: datetime, *, desk: str, label: str) -> None:
        n = self.seq["p"] = self.seq.get("p", 0) + 1
        score = {"good": 1, "neutral": 0, "bad": -1}[label]
        self.ingest([press_event(n, desk=desk, label=label, score=score,
                                 wall_ns=int(at.timestamp()) * 10**9, boot_id="boot-p")])

    def two_bad_presses(self) -> datetime:
        """Bad presses at desk-1 at `base_time()` and a minute later; returns the first's time."""
        t0 = base_time()
        self.press(t0, desk="desk-1", label="bad")
        self.press(t0 + timedelta(minutes=1), desk="desk-1", label="bad")
        return t0

    def answer(self, at: datetime, *, q1: str = "no", doctor: str = "dr-petrov") -> None:
        """A survey answer; with Q1 "no" a callback request with a phone and a
        comment (which no alert may carry)."""
        n = self.seq["a"] = self.seq.get("a", 0) + 1
        self.ingest([answer_message(n, phone=PHONE, comment=COMMENT, wall=at, q1=q1,
                                    doctor=doctor)])

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return query(self.backend, sql, params)


def alerts_config(path: Path, backend: Backend, smtp: SmtpSink, broker_port: int = 1883,
                  webhook_allow: tuple[str, ...] = ("127.0.0.1",)) -> Path:
    """The collector's config; webhooks may reach `webhook_allow` (the test's
    receivers listen on loopback, which a webhook may not reach unless listed)."""
    allow = ", ".join(f'"{a}"' for a in webhook_allow)
    path.write_text(
        f'id = "central-1"\n\n[broker]\nhost = "127.0.0.1"\nport = {broker_port}\n'
        f"reconnect_min_s = 0.1\nreconnect_max_s = 1\n\n{backend.toml()}\n"
        f'[reports]\ntz = "{TZ}"\n\n'
        f'[web]\nstate_dir = "{path.parent}"\nbase_url = "http://127.0.0.1"\n'
        f"webhook_allow = [{allow}]\n\n"
        f'[web.smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nsecurity = "none"\n'
        'from = "Quality team <quality-team@clinic.example>"\n')
    return path


@pytest.fixture
def make_app(tmp_path: Path, smtp: SmtpSink) -> Callable[..., App]:
    def make(backend: Backend | None = None, broker_port: int = 1883,
             webhook_allow: tuple[str, ...] = ("127.0.0.1",)) -> App:
        backend = backend or Backend("sqlite", tmp_path, None)
        cfg = alerts_config(tmp_path / "collector.toml", backend, smtp, broker_port,
                            webhook_allow)
        web_cli(cfg, "migrate")
        web_cli(cfg, "adduser", "quality", "--role", "quality_manager", "--email", QM,
                "--language", "ru", stdin="a-long-password\n")
        return App(cfg, backend, tmp_path)

    return make


def base_time() -> datetime:
    """Today's 13:00 in the clinic's zone, or yesterday's if that is still ahead
    (event times must not be in the future of the real clock's day)."""
    now = datetime.now(ZoneInfo(TZ))
    t = now.replace(hour=13, minute=0, second=0, microsecond=0)
    return (t if t <= now else t - timedelta(days=1)).astimezone(UTC)


def no_personal_data(smtp: SmtpSink, hook: Hook) -> None:
    texts = [m.subject + m.body for m in smtp.messages] + \
        [body.decode() for _, _, body in hook.got]
    for name, value in (("phone", PHONE), ("comment", COMMENT)):
        leaked = [i for i, t in enumerate(texts) if value in t]
        assert not leaked, f"alert messages {leaked} carry the {name}"
