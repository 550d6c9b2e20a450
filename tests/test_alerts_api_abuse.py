"""Issue 19's parts under attack (alerts, read API, metrics): each test is one
attack a review found to succeed, and what holds now.

Personal data here is made up and never printed."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.alert_fixtures import QM, App, Hook, base_time, hook, make_app
from tests.collector_fixtures import Backend
from tests.test_web_api import get, new_token
from tests.test_web_dashboards import _today, sample_data, serve
from tests.web_fixtures import SmtpSink, query, smtp

__all__ = ["hook", "make_app", "serve", "smtp"]  # fixtures, used by name


def _cursor(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def _tick(app: App, now: Any) -> subprocess.CompletedProcess[str]:
    """`web tick --now` without failing on a failed step (the attack is that it fails)."""
    return subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config",
                           str(app.config), "tick", "--now", now.isoformat()],
                          capture_output=True, text=True, timeout=120, check=False)


def _django(cfg: Path, code: str) -> str:
    """Run `code` in a fresh process with the web app's Django set up on `cfg`."""
    boot = ("import sys; from pathlib import Path; from collector.web.cli import _setup; "
            "_setup(Path(sys.argv[1])); exec(sys.argv[2])")
    r = subprocess.run([sys.executable, "-c", boot, str(cfg), code], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


# == Read API =================================================================================

@pytest.mark.parametrize(("path", "what"), [
    # `str.isdigit()` is true for "²", `int("²")` raises ValueError: 500.
    ("/api/v1/events?limit=%C2%B2", "limit=² (superscript two)"),
    ("/api/v1/alerts?after=%C2%B2", "after=² (superscript two)"),
    # A cursor is base64 JSON the client can forge: an int beyond SQLite's 64 bits.
    (f"/api/v1/events?cursor={_cursor(['a', 'b', 10**30, 'x'])}", "cursor seq 10**30"),
    # ... or a lone surrogate, which the database driver cannot encode.
    ("/api/v1/events?cursor=" + _cursor(["\ud800", "b", 1, "x"]), "cursor site U+D800"),
])
def test_api_malformed_parameters_get_400(path: str, what: str, serve: Any,
                                                  tmp_path: Path) -> None:
    """Repro: curl -H "Authorization: Bearer $T" 'http://HOST/api/v1/events?limit=%C2%B2'"""
    app = serve(Backend("sqlite", tmp_path, None))
    token = new_token(app.cfg, "plain")
    r = get(app.base, path, token)
    assert r.status == 400, f"{what}: HTTP {r.status} (want 400 with a JSON error)"
    assert "error" in r.json()


def test_api_report_in_another_zone_keeps_no_counts_for_it(
        serve: Any, tmp_path: Path) -> None:
    """The API is read-only, yet `tz=` on /reports/loyalty with from/to runs
    rollup.refresh for that zone: every day with presses is computed and kept in
    rollup_days/press_rollup per zone, for any of ~600 IANA zones a token names
    (a year of 10 clinics: ~13 s of work and a full copy of the counts each).
    Repro: for z in Asia/Tokyo Pacific/Apia ...; do curl ... \
    '/api/v1/reports/loyalty?from=2026-01-01&to=2026-12-31&tz=$z'; done; \
    SELECT DISTINCT tz FROM rollup_days"""
    backend = Backend("sqlite", tmp_path, None)
    today = _today()
    sample_data(backend, today)
    app = serve(backend)
    token = new_token(app.cfg, "warehouse")
    before = {str(z) for (z,) in query(backend, "SELECT DISTINCT tz FROM rollup_days")}
    span = f"from={(today - timedelta(days=60)).isoformat()}&to={today.isoformat()}"
    for zone in ("Asia/Tokyo", "Pacific/Apia", "America/Lima"):
        r = get(app.base, f"/api/v1/reports/loyalty?by=desk&{span}&tz={zone}", token)
        assert r.status == 200, r.status
    after = {str(z) for (z,) in query(backend, "SELECT DISTINCT tz FROM rollup_days")}
    assert after == before, (f"a read-only token made the collector compute and keep "
                             f"rollups for {len(after - before)} new zones: "
                             f"{sorted(after - before)}")


def test_api_head_has_no_body_and_writes_get_405(serve: Any,
                                                                  tmp_path: Path) -> None:
    """HEAD answers with the full JSON body (HTTP forbids one); POST/PUT/DELETE get
    Django's CSRF 403 HTML page, not the 405 JSON the view and OpenAPI promise.
    Repro: curl -si -X POST -H "Authorization: Bearer $T" http://HOST/api/v1/events"""
    app = serve(Backend("sqlite", tmp_path, None))
    token = new_token(app.cfg, "plain")
    u = urlparse(app.base)
    problems = []
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(f"HEAD /api/v1/events HTTP/1.1\r\nHost: {u.hostname}\r\n"
                     f"Authorization: Bearer {token}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    _, _, body = raw.partition(b"\r\n\r\n")
    if body:
        problems.append(f"HEAD: {len(body)} body bytes after the headers")
    for method in ("POST", "PUT", "DELETE"):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        try:
            conn.request(method, "/api/v1/events", headers={"Authorization": f"Bearer {token}"})
            r = conn.getresponse()
            ctype = r.getheader("Content-Type", "")
            r.read()
        finally:
            conn.close()
        if r.status != 405 or "json" not in ctype:
            problems.append(f"{method}: {r.status} {ctype}")
    assert not problems, problems


# == Alerts ===================================================================================

def test_webhook_retry_sends_the_same_body_though_the_value_changed(
        make_app: Callable[..., App], hook: Hook) -> None:
    """README: "the same body on every try".  The body carries `value`
    ("3 bad of 3 in 30 min"), which every tick rewrites: a retry after one more
    bad press is another body (and signature) for the same alert id and kind.
    Repro: rule negative --threshold 2 + webhook answering 500; 3 bad presses;
    tick; 1 more bad press; tick a minute later: the two POST bodies differ."""
    app = make_app()
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--webhook-url", hook.url)
    hook.statuses = [500]
    t0 = base_time()
    for m in (0, 1, 2):
        app.press(t0 + timedelta(minutes=m), desk="desk-1", label="bad")
    app.tick(t0 + timedelta(minutes=3))
    app.press(t0 + timedelta(minutes=3, seconds=20), desk="desk-1", label="bad")
    app.tick(t0 + timedelta(minutes=4))
    assert [s for s, _, _ in hook.got] == [500, 200]
    (_, h1, b1), (_, h2, b2) = hook.got
    assert h1["X-Feedback-Alert-Id"] == h2["X-Feedback-Alert-Id"]
    assert json.loads(b1)["kind"] == json.loads(b2)["kind"] == "opened"
    assert b1 == b2, ("the retry of one alert's 'opened' sent another body: value "
                      f"{json.loads(b1)['value']!r} then {json.loads(b2)['value']!r}")


class _Recorder(BaseHTTPRequestHandler):
    """Answers every request as `self.server.answer(handler)` says; records it."""

    def _any(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        self.server.got.append((self.command, dict(self.headers.items())))  # type: ignore[attr-defined]
        self.server.answer(self)  # type: ignore[attr-defined]

    do_GET = do_POST = _any  # noqa: N815

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _server(answer: Callable[[BaseHTTPRequestHandler], None]) -> ThreadingHTTPServer:
    s = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    s.got = []  # type: ignore[attr-defined]
    s.answer = answer  # type: ignore[attr-defined]
    threading.Thread(target=s.serve_forever, daemon=True).start()
    return s


@pytest.fixture
def servers() -> Iterator[list[ThreadingHTTPServer]]:
    made: list[ThreadingHTTPServer] = []
    yield made
    for s in made:
        s.shutdown()
        s.server_close()


def test_webhook_redirect_is_not_followed_nor_taken_for_a_delivery(
        make_app: Callable[..., App], servers: list[ThreadingHTTPServer]) -> None:
    """urllib follows a 302 from the webhook URL: the POST becomes a GET without
    the body, to wherever Location points (any host: an internal address), with
    the X-Feedback-Signature and alert id headers; the 200 of that GET marks the
    delivery sent although no receiver got the alert.
    Repro: a webhook answering `302 Location: http://internal/`; tick: the
    attempt says "HTTP 200", state sent, and internal/ got a GET with the headers."""
    def ok(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "0")
        h.end_headers()

    internal = _server(ok)
    servers.append(internal)

    def moved(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", f"http://127.0.0.1:{internal.server_port}/admin/reset")
        h.send_header("Content-Length", "0")
        h.end_headers()

    outer = _server(moved)
    servers.append(outer)
    app = make_app()
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--webhook-url", f"http://127.0.0.1:{outer.server_port}/hook")
    t0 = base_time()
    for m in (0, 1, 2):
        app.press(t0 + timedelta(minutes=m), desk="desk-1", label="bad")
    app.tick(t0 + timedelta(minutes=3))
    states = [(str(s), str(r)) for s, r in app.query(
        "SELECT d.state, a.result FROM alerts_delivery d JOIN alerts_attempt a "
        "ON a.delivery_id = d.id WHERE d.channel = 'webhook'")]
    forwarded = [(m, "X-Feedback-Signature" in h) for m, h in internal.got]  # type: ignore[attr-defined]
    assert not internal.got, (f"the redirect target got {forwarded} (method, signature "  # type: ignore[attr-defined]
                              f"header); delivery recorded as {states}")
    assert states, "no delivery recorded"
    assert states[0][0] != "sent", states


def test_webhook_slow_receiver_cannot_hold_the_tick_past_the_timeout(
        make_app: Callable[..., App], servers: list[ThreadingHTTPServer]) -> None:
    """The 10 s timeout is per socket read: a receiver that sends its status line
    and then a header byte every 0.3 s holds `send_webhook` (and with it the
    tick: case warnings, every other alert) for as long as it likes.  Here the
    timeout is lowered to 1 s in the process and the receiver drips for 5 s.
    Repro: a webhook that writes 'HTTP/1.1 200 OK\\r\\nX: ' then one byte per
    second for an hour; `web tick` does not return for an hour."""
    drip_s = 5.0

    def drip(h: BaseHTTPRequestHandler) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        end = time.monotonic() + drip_s
        try:
            while time.monotonic() < end:
                h.wfile.write(b"a")
                h.wfile.flush()
                threading.Event().wait(0.3)
            h.wfile.write(b"\r\nContent-Length: 0\r\n\r\n")
        except OSError:
            pass

    slow = _server(drip)
    servers.append(slow)
    app = make_app()
    app.rule("--name", "r", "--kind", "negative", "--threshold", "2", "--window-min", "30",
             "--webhook-url", f"http://127.0.0.1:{slow.server_port}/hook")
    out = _django(app.config, (
        "import time\n"
        "from django.utils import timezone\n"
        "from collector.web.alerts import channels\n"
        "from collector.web.alerts.models import Episode, Rule\n"
        "channels.WEBHOOK_TIMEOUT_S = 1\n"
        "rule = Rule.objects.get()\n"
        "t = time.monotonic(); ok, why = channels.send_webhook(rule.webhook_url, "
        "rule.webhook_secret, b'{}', 'alert-1', 'opened')\n"
        "print(round(time.monotonic() - t, 2), ok, why)\n"))
    took = float(out.split()[0])
    assert took < 2.5, f"send_webhook with a 1 s timeout took {took} s ({out.strip()})"


def test_removing_a_rules_webhook_with_a_try_pending_ends_that_delivery_cleanly(
        make_app: Callable[..., App], hook: Hook) -> None:
    """A rule edited to drop its webhook (allowed: it keeps its e-mail) while the
    webhook's 'opened' waits for a retry: `urllib.request.Request('')` raises
    ValueError before send_webhook's try, the tick's alerts step fails ("alerts
    FAILED"), the claimed attempt has no result, and the delivery stays pending
    for ever (re-claimed and crashing again every 10 minutes).
    Repro: rule with --email and --webhook-url; webhook answers 500; tick;
    UPDATE alerts_rule SET webhook_url='' (what the edit form saves); tick."""
    app = make_app()
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--email", QM, "--webhook-url", hook.url)
    hook.statuses = [500]
    t0 = base_time()
    for m in (0, 1, 2):
        app.press(t0 + timedelta(minutes=m), desk="desk-1", label="bad")
    app.tick(t0 + timedelta(minutes=3))
    import sqlite3

    assert app.backend.path is not None
    with sqlite3.connect(app.backend.path) as conn:
        conn.execute("UPDATE alerts_rule SET webhook_url = ''")
    conn.close()
    r = _tick(app, t0 + timedelta(minutes=5))
    assert r.returncode == 0, f"tick: exit {r.returncode}, {r.stdout.strip()}"
    assert "FAILED" not in r.stdout, r.stdout.strip()
    r = _tick(app, t0 + timedelta(minutes=30))
    pending = app.query("SELECT count(*) FROM alerts_delivery WHERE channel = 'webhook' "
                        "AND state = 'pending'")[0][0]
    assert pending == 0, "a webhook delivery of a rule without a webhook stays pending"


def test_a_recipient_added_during_an_alert_gets_no_resolution_of_it(
        make_app: Callable[..., App], smtp: SmtpSink, hook: Hook) -> None:
    """README: "a 'resolved' waits for its 'opened'".  An address added to the
    rule while its alert is open never gets 'opened' but gets 'resolved' of an
    alert it never heard of.
    Repro: rule --email a@; alert opens; edit the rule's e-mails to "a@ b@";
    condition clears; tick: b@ receives only "Resolved: ..."."""
    app = make_app()
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--email", QM, "--webhook-url", hook.url)
    t0 = base_time()
    for m in (0, 1, 2):
        app.press(t0 + timedelta(minutes=m), desk="desk-1", label="bad")
    app.tick(t0 + timedelta(minutes=3))
    assert len(smtp.to(QM)) == 1
    late = "late-colleague@clinic.example"
    import sqlite3

    assert app.backend.path is not None
    with sqlite3.connect(app.backend.path) as conn:
        conn.execute("UPDATE alerts_rule SET emails = ?", (f"{QM}\n{late}",))
    conn.close()
    app.tick(t0 + timedelta(minutes=60))
    got = [m.subject.split(":")[0] for m in smtp.to(late)]
    assert len(smtp.to(QM)) == 2
    assert not got or len(got) == 2, f"the added recipient got only {got}"


# == Metrics ==================================================================================

def test_edge_metrics_token_with_a_non_ascii_character_gets_403(
        ) -> None:
    """/metrics (and the status page) compare `?token=` with hmac.compare_digest on
    str, which raises TypeError for non-ASCII text: the handler dies and the
    scraper gets no answer at all instead of 403 (pre-existing in edge/web.py;
    /metrics inherits it).
    Repro: curl 'http://PI:8480/metrics?token=%C3%A9' -> "Empty reply from server"."""
    from edge.web import StatusPage

    page = StatusPage("127.0.0.1", 0, lambda box, _req: box.put({"error": "no loop"}),
                      token="a-status-token", metrics=True)
    page.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", page.port, timeout=30)
        try:
            conn.request("GET", "/metrics?token=%C3%A9")
            try:
                status: int | str = conn.getresponse().status
            except (http.client.HTTPException, OSError) as e:
                status = type(e).__name__
        finally:
            conn.close()
    finally:
        page.stop()
    assert status == 403, f"/metrics?token=<non-ASCII>: {status}"


@pytest.mark.parametrize("host", ["127.0.0.1", "[::ffff:127.0.0.1]", "169.254.169.254",
                                  "10.1.2.3", "[::1]"])
def test_a_webhook_to_a_private_address_is_refused_when_saved_and_when_sent(
        make_app: Callable[..., App], hook: Hook, host: str) -> None:
    """The quality manager types the URL: without `[web] webhook_allow` the server
    would POST wherever she points it (its loopback services, the cloud's
    metadata address, the clinic's LAN).  Refused when the rule is saved, and,
    for a rule saved while it was allowed, at each try, without a connection."""
    app = make_app(webhook_allow=())
    port = hook.url.split(":")[2].split("/")[0]
    url = f"http://{host}:{port}/hook"
    with pytest.raises(AssertionError) as e:
        app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
                 "--webhook-url", url)
    assert "--webhook-url:" in str(e.value)
    assert "is not a public address" in str(e.value)
    # Saved while the administrator allowed loopback, then no longer allowed.
    allowing = make_app(webhook_allow=("127.0.0.1", "::1", "169.254.0.0/16", "10.0.0.0/8"))
    allowing.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
                  "--window-min", "30", "--webhook-url", url)
    make_app(webhook_allow=())  # the same database, the allowance removed
    t0 = base_time()
    for m in (0, 1):
        app.press(t0 + timedelta(minutes=m), desk="desk-1", label="bad")
    app.tick(t0 + timedelta(minutes=2))
    app.tick(t0 + timedelta(minutes=30))
    assert hook.got == []
    rows = app.query("SELECT d.state, d.attempts, a.result FROM alerts_delivery d JOIN "
                     "alerts_attempt a ON a.delivery_id = d.id")
    assert [(str(s), int(n)) for s, n, _ in rows] == [("failed", 1)], "retried in vain"
    assert "is not a public address" in str(rows[0][2])


def test_a_webhook_allowed_by_host_name_is_delivered(
        make_app: Callable[..., App], hook: Hook) -> None:
    app = make_app(webhook_allow=("localhost",))
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--webhook-url", hook.url.replace("127.0.0.1", "localhost"))
    t0 = base_time()
    for m in (0, 1):
        app.press(t0 + timedelta(minutes=m), desk="desk-1", label="bad")
    app.tick(t0 + timedelta(minutes=2))
    (doc,) = hook.delivered()
    assert doc["kind"] == "opened"
