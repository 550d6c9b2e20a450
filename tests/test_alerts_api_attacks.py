"""Issue 19 under attack, second round (alert rules and their engine, webhook
address checks, the read API, metrics): each test here is one attack that a
review found to succeed; it fails while the fault is there.

Everything runs on real parts (tests/alert_fixtures.py): the collector's
intake on SQLite or PostgreSQL, `feedback-collector web tick --now` and
`web alert-rule add` as processes, a real SMTP server and real HTTP
receivers.  Personal data here is made up and never printed."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.alert_fixtures import QM, App, Hook, base_time, hook, make_app
from tests.collector_fixtures import postgres
from tests.conftest import wait_for
from tests.test_web_api import get, new_token
from tests.test_web_dashboards import serve
from tests.web_fixtures import SmtpSink, smtp

__all__ = ["hook", "make_app", "postgres", "serve", "smtp"]  # fixtures, used by name


def _tick(app: App, now: Any) -> subprocess.CompletedProcess[str]:
    """`web tick --now` without failing on a failed step."""
    return subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config",
                           str(app.config), "tick", "--now", now.isoformat()],
                          capture_output=True, text=True, timeout=120, check=False)


def _add_rule(app: App, *args: str) -> subprocess.CompletedProcess[str]:
    """`web alert-rule add` (with the test's webhook secret) without failing."""
    secret = app.tmp / "hook.secret"
    secret.write_text("hook-secret-3f9a\n")
    return subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config",
                           str(app.config), "alert-rule", "add", *args,
                           "--webhook-secret-file", str(secret)],
                          capture_output=True, text=True, timeout=120, check=False)


# == Webhook address checks ===================================================================

@pytest.mark.parametrize(("host", "what"), [
    # NAT64 (RFC 6052 well-known prefix): an IPv6-only server whose network has a
    # NAT64 gateway (DNS64/NAT64 clouds) reaches 10.0.5.5 of the LAN through it.
    ("64:ff9b::a00:505", "NAT64 of 10.0.5.5"),
    ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254 (cloud metadata)"),
    # 6to4 (RFC 3056): 2002:AABB:CCDD::/48 is the IPv4 address AA.BB.CC.DD's.
    ("2002:a00:505::1", "6to4 of 10.0.5.5"),
    # IPv4-compatible (deprecated ::a.b.c.d) and SIIT IPv4-translated (::ffff:0:a.b.c.d).
    ("::a00:505", "IPv4-compatible 10.0.5.5"),
    ("::ffff:0:a00:505", "IPv4-translated 10.0.5.5"),
    # Site-local (deprecated, RFC 3879): never a public address.
    ("fec0::5", "site-local fec0::/10"),
])
def test_webhook_to_an_ipv6_form_of_a_private_address_is_refused(
        make_app: Callable[..., App], host: str, what: str) -> None:
    """Attack: the quality manager types a webhook URL whose host is an IPv6
    address that embeds (or is translated to) a private IPv4 address.
    `channels._allowed` unwraps IPv4-mapped addresses (::ffff:a.b.c.d) only, and
    Python 3.11's `is_global` is True for 64:ff9b::/96, 2002::/16, ::/96,
    ::ffff:0:0:0/96 and fec0::/10, so the rule is saved and each try connects.
    Repro: [web] webhook_allow empty; `web alert-rule add ... --webhook-url
    'http://[64:ff9b::a00:505]/hook'` succeeds (channels.webhook_addresses
    returns the address instead of raising WebhookRefusedError).
    Impact: on a server with NAT64 (IPv6-only clouds) or a 6to4 relay the POST
    reaches the clinic's LAN or the metadata service: the SSRF guard's promise
    ("public addresses only") does not hold.  Fix: check the embedded IPv4
    address (`sixtofour`, the low 32 bits for 64:ff9b::/96, ::/96, ::ffff:0:0:0/96)
    with the same rule, and refuse the deprecated and special ranges."""
    app = make_app(webhook_allow=())
    r = _add_rule(app, "--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
                  "--webhook-url", f"http://[{host}]:8080/hook")
    refused = r.returncode != 0 and "is not a public address" in r.stderr
    assert refused, f"{what}: a webhook to [{host}] was saved (rule {r.stdout.strip()})"


# == Episodes on a clock that steps back ======================================================

def test_a_tick_behind_the_last_one_neither_resolves_nor_reopens_an_alert(
        make_app: Callable[..., App], hook: Hook) -> None:
    """Attack: ticks whose `now` is earlier than the previous tick's (README: "every
    minute, from a systemd timer (several hosts may)": two hosts whose clocks differ
    by a minute; or a clock stepped back by NTP).  The earlier tick does not see
    presses that the later one counted (they are in its future), so the open
    alert is resolved at a time before it was raised, and the next tick raises
    a new alert for the same trouble.
    Repro: rule negative --threshold 2; bad presses at t0, t0+1m; tick t0+2m
    (opened); tick t0+30s (a host 90 s behind): resolved_at < opened_at;
    tick t0+3m: a second "opened" with a new alert id.
    Impact: receivers get opened / resolved / opened for one unbroken condition,
    a resolution dated before its opening, and a duplicate alert.  Fix: never
    resolve or raise with a `now` before the episode's own times (skip, or
    treat the tick's `now` as max(now, last tick's now))."""
    app = make_app()
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--webhook-url", hook.url)
    t0 = app.two_bad_presses()
    app.tick(t0 + timedelta(minutes=2))
    app.tick(t0 + timedelta(seconds=30))  # a host whose clock is 90 s behind
    app.tick(t0 + timedelta(minutes=3))
    backwards = app.query("SELECT id FROM alerts_episode WHERE resolved_at < opened_at")
    kinds = [doc["kind"] for doc in hook.delivered()]
    ids = {doc["alert_id"] for doc in hook.delivered()}
    said = (f"one unbroken condition sent {kinds} under {len(ids)} alert ids; "
            f"{len(backwards)} episode(s) resolved before they were raised")
    assert not backwards, said
    assert kinds == ["opened"], said
    assert len(ids) == 1, said


def test_a_tick_behind_one_that_resolved_an_alert_does_not_raise_it_again(
        make_app: Callable[..., App], hook: Hook) -> None:
    """The other half of a tick behind: one host resolved the alert at a later
    time; a tick whose `now` is earlier still sees the condition, finds no open
    episode and would raise a new alert for what is over."""
    app = make_app()
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--webhook-url", hook.url)
    t0 = app.two_bad_presses()
    app.tick(t0 + timedelta(minutes=2))
    app.tick(t0 + timedelta(minutes=40))  # the presses have left the window: resolved
    app.tick(t0 + timedelta(minutes=3))  # a host behind: the condition holds for it
    assert [d["kind"] for d in hook.delivered()] == ["opened", "resolved"]
    assert app.query("SELECT count(*) FROM alerts_episode") == [(1,)]


# == Delivery: two ticks at once ==============================================================

class _Held:
    """A webhook receiver that holds the first request until `release` is set,
    and answers every request 200; keeps each request's alert id and kind."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.got: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        held = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                with held.lock:
                    held.got.append((self.headers["X-Feedback-Alert-Id"],
                                     self.headers["X-Feedback-Alert-Kind"]))
                    first = len(held.got) == 1
                if first:
                    held.release.wait(60)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def held() -> Iterator[_Held]:
    h = _Held()
    yield h
    h.close()


def test_a_long_tick_s_fresh_claim_is_not_taken_for_a_dead_one(
        make_app: Callable[..., App], held: _Held) -> None:
    """Attack: a tick that runs long (webhooks may take 10 s each, e-mails 20 s
    per SMTP step: 60 slow deliveries are 10 minutes) while another host's tick
    starts (README: "several hosts may").  Every Attempt is claimed with
    `at = ` the tick's *start* time, so each claim the long tick makes after its
    first 10 minutes is already older than STALE_CLAIM to the other tick, whose
    `_release_stale_claims` declares it "no result recorded (the tick stopped)"
    and sends the message again while the first tick is still sending it.
    Repro (a tick that started 11 minutes ago, simulated with --now): tick A at
    T is inside its webhook POST; tick B at T+11m runs: the receiver gets a
    second POST of the same alert and kind.
    Impact: duplicate e-mails and webhooks from "two ticks at once", which the
    README says send each try once; the attempt rows are overwritten.  Fix:
    stamp a claim with the time it is made (wall clock, or the tick's `now`
    plus the time elapsed), or release only claims whose tick is known dead
    (a lease renewed while sending)."""
    app = make_app()
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "60", "--webhook-url", held.url)
    t0 = app.two_bad_presses()
    a = subprocess.Popen([sys.executable, "-m", "collector.cli", "web", "--config",
                          str(app.config), "tick", "--now",
                          (t0 + timedelta(minutes=2)).isoformat()],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: held.got, 60, "tick A's webhook POST")
        b = _tick(app, t0 + timedelta(minutes=13))
    finally:
        held.release.set()
        a.communicate(timeout=60)
    assert b.returncode == 0, b.stdout + b.stderr[-2000:]
    assert len(held.got) == 1, (
        f"the receiver got {len(held.got)} POSTs of one message {set(held.got)}: tick B "
        "took tick A's claim, made while A was sending, for a dead tick's")


def test_a_dead_ticks_claim_is_released_and_its_message_sent_once(
        make_app: Callable[..., App], hook: Hook) -> None:
    """The other side of the claim: a tick that claimed a try and died (the row
    has no result) leaves it to the next tick once the claim is ten minutes old
    by the host's clock; the message then goes, once."""
    from datetime import UTC, datetime

    app = make_app()
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "60", "--webhook-url", hook.url)
    hook.statuses = [500]
    t0 = app.two_bad_presses()
    app.tick(t0 + timedelta(minutes=2))  # try 1: 500
    ((delivery,),) = app.query("SELECT id FROM alerts_delivery")
    # Try 2, claimed eleven minutes ago by a tick that died before sending.
    dead = datetime.now(UTC) - timedelta(minutes=11)

    def django_time(t: datetime) -> str:  # as Django keeps a UTC time in SQLite
        return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")

    db = app.backend.open()
    try:
        with db.transaction() as cur:
            cur.execute("INSERT INTO alerts_attempt (delivery_id, n, at, claimed_at, result, "
                        "ok) VALUES (?, 2, ?, ?, '', NULL)",
                        (delivery, django_time(t0 + timedelta(minutes=3)), django_time(dead)))
    finally:
        db.close()
    app.tick(t0 + timedelta(minutes=4))
    assert [s for s, _, _ in hook.got] == [500, 200]
    results = [str(r) for (r,) in app.query("SELECT result FROM alerts_attempt ORDER BY n")]
    assert results == ["HTTP 500", "no result recorded (the tick stopped)", "HTTP 200"]
    app.tick(t0 + timedelta(minutes=30))
    assert len(hook.got) == 2


# == Rule kinds ===============================================================================

def test_silence_counts_a_press_at_its_corrected_time(
        make_app: Callable[..., App], hook: Hook) -> None:
    """Attack: presses recorded before the Pi's clock was synchronised (no RTC:
    it boots at 1970 or at fake-hwclock's last shutdown) get `corrected_ms` from
    the edge's timesync anchor, and every report and the other rules count
    them at that time (COALESCE(corrected_ms, wall_ms)).  The silence rule's
    query filters on `wall_ms` alone (`wall_ms >= now - 14 days AND wall_ms <=
    now`), so it never sees them.
    Repro: silence rule 08:00-18:00, 30 min, desk-1; a synced press yesterday;
    today three presses from boot "boot-z" with wall 1970 corrected by its
    anchor to 13:00 - 20/10/2 minutes; tick at 13:00: "no presses since 08:00".
    Impact: a false "console dead?" alert (and its resolution) for a desk that
    is pressed all along, whenever an edge was unsynchronised; the same
    presses raise or hold negative/loyalty alerts at their corrected time.
    Fix: filter on COALESCE(corrected_ms, wall_ms) (as queries.events does)."""
    import json
    from zoneinfo import ZoneInfo

    from tests.collector_fixtures import press_event

    app = make_app()
    app.rule("--name", "Console dead?", "--kind", "silence", "--open", "08:00-18:00",
             "--days", "1234567", "--duration-min", "30", "--desk", "desk-1",
             "--webhook-url", hook.url)
    t0 = base_time()  # 13:00 in the clinic
    app.press(t0 - timedelta(days=1), desk="desk-1", label="good")
    boot_wall_ns = 5 * 10**9  # the clock at 1970 after boot
    msgs = []
    anchor_mono = 2000 * 10**9  # 2000 s after boot: t0 - 2 min
    for i, minutes in enumerate((20, 10, 2)):
        mono = anchor_mono - (minutes - 2) * 60 * 10**9
        msgs.append(press_event(50 + i, desk="desk-1", label="good", score=1, synced=False,
                                wall_ns=boot_wall_ns + mono, mono_ns=mono, boot_id="boot-z"))
    # Synchronised since: the edge's anchor for that boot.
    anchor_wall = (t0 - timedelta(minutes=2)).astimezone(ZoneInfo("UTC"))
    msgs.append(("feedback/v1/clinic-3/reception-1/timesync", json.dumps(
        {"boot_id": "boot-z", "mono_ns": anchor_mono, "reason": "synchronised",
         "wall": anchor_wall.strftime("%Y-%m-%dT%H:%M:%S.000Z")}).encode()))
    app.ingest(msgs)
    corrected = app.query("SELECT corrected_ms FROM events WHERE boot_id = 'boot-z' "
                          "ORDER BY seq")
    assert [int(c) for (c,) in corrected] == [
        int((t0 - timedelta(minutes=m)).timestamp() * 1000) for m in (20, 10, 2)]
    app.tick(t0)
    raised = [(doc["subject"], doc["value"]) for doc in hook.delivered()]
    assert raised == [], (f"desk-1 was pressed 2 minutes ago (corrected time), yet the "
                          f"silence rule raised {raised}")


# == Channels =================================================================================

@pytest.mark.parametrize("name", ["Desk 1\nunhappy", "Desk 1\r\nBcc: x@evil.example"])
def test_a_rule_name_with_a_line_break_is_refused_or_its_mail_still_goes_out(
        make_app: Callable[..., App], smtp: SmtpSink, name: str) -> None:
    """Attack: a rule's name with a line break (the CLI's --name, or a POST of the
    rule form: forms.CharField strips only the ends).  The name is the mail's
    Subject ("Alert: NAME at SUBJECT"); Django refuses a header with a line
    break (BadHeaderError, a ValueError in MAIL_ERRORS), so every try fails.
    Repro: `web alert-rule add --name $'Desk 1\\nunhappy' --kind negative
    --threshold 2 --email quality@...` is saved; two bad presses; tick: the
    delivery's try says "BadHeaderError"; retried 12 times, then given up.
    Impact: an alert rule that was accepted reaches none of its e-mail
    recipients, ever (header injection itself is stopped by Django).  Fix:
    refuse control characters in Rule.name (clean), or fold them to spaces in
    the subject."""
    app = make_app()
    r = _add_rule(app, "--name", name, "--kind", "negative", "--threshold", "2",
                  "--window-min", "30", "--email", QM)
    if r.returncode != 0:
        return  # refused when saved: fine
    t0 = app.two_bad_presses()
    app.tick(t0 + timedelta(minutes=2))
    tries = [str(x) for (x,) in app.query("SELECT result FROM alerts_attempt")]
    assert len(smtp.to(QM)) == 1, (f"rule {name!r} was saved, but its alert mail was not "
                                   f"sent: {tries}")


def test_a_long_valid_address_does_not_stop_its_rule_on_postgresql(
        make_app: Callable[..., App], smtp: SmtpSink, hook: Hook, postgres: Any,
        tmp_path: Path) -> None:
    """Attack: an e-mail recipient of 296 to 320 characters, which Django's
    validate_email (and so Rule.clean) accepts: its delivery's channel
    "mail:<address>" overflows Delivery.channel (max_length 300).  On
    PostgreSQL the INSERT fails (DataError) inside `_mark`'s transaction, which
    rolls back the raising too; `evaluate` logs "rule N could not be evaluated:
    DataError" and the next tick does the same.
    Repro (PostgreSQL): rule negative --threshold 2 --email <64>@<63>.<63>.<63>.<59>.com
    --email quality@... --webhook-url ...; two bad presses; tick: nothing is
    raised, no message to anyone, at any tick.
    Impact: one long (valid) address silences the whole rule, for every
    recipient and the webhook, with nothing on the rule's pages.  Fix:
    Delivery.channel of at least 5 + 320 characters (or refuse longer addresses
    in Rule.clean)."""
    from tests.collector_fixtures import Backend

    app = make_app(Backend("postgres", tmp_path, postgres))
    too_long = "a" * 64 + "@" + ".".join(["b" * 63] * 3) + "." + "c" * 59 + ".com"
    assert len(too_long) == 320
    r = _add_rule(app, "--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
                  "--email", too_long, "--webhook-url", hook.url)
    assert r.returncode == 2
    assert "--email: an address of at most 254 characters" in r.stderr
    # The longest SMTP carries (RFC 5321) is kept and raised with the rest.
    longest = "a" * 64 + "@" + ".".join(["b" * 63] * 2) + "." + "c" * 57 + ".com"
    assert len(longest) == 254
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--email", longest, "--email", QM,
             "--webhook-url", hook.url)
    t0 = app.two_bad_presses()
    app.tick(t0 + timedelta(minutes=2))
    raised = app.query("SELECT count(*) FROM alerts_episode WHERE opened_at IS NOT NULL")
    said = (f"alerts raised: {raised[0][0]}, webhooks: {len(hook.delivered())}, "
            f"mails to {QM}: {len(smtp.to(QM))}")
    assert raised[0][0] == 1, said
    assert len(hook.delivered()) == 1, said
    assert len(smtp.to(QM)) == 1, said


def test_a_resolved_does_not_go_where_its_opened_was_given_up(
        make_app: Callable[..., App], hook: Hook) -> None:
    """Attack: a webhook receiver down for longer than the "opened" message's 12
    tries (about seven hours), while the condition clears meanwhile.  The
    "resolved" is queued for the webhook (its "opened" was still pending then)
    and waits only while the "opened" is *pending*: the tick that gives the
    "opened" up sends the "resolved" at once.
    Repro: rule negative + webhook answering 500 twelve times; two bad presses;
    tick; the condition clears; tick every two hours: at the 12th try the
    "opened" is given up and, the receiver being back, its "resolved" is
    delivered.
    Impact: the receiver's only message about the alert is "resolved" for an
    alert id it never saw opened, against the README ("A 'resolved' goes only
    where its 'opened' went").  Fix: give the "resolved" up with its "opened"
    (or send it only after an "opened" that was sent)."""
    app = make_app()
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--webhook-url", hook.url)
    hook.statuses = [500] * 12
    t0 = app.two_bad_presses()
    for k in range(12):  # opened's tries 1..12; the condition clears at the second tick
        app.tick(t0 + timedelta(minutes=2) + timedelta(hours=2 * k))
    states = {(str(k), str(s)) for k, s in app.query("SELECT kind, state FROM alerts_delivery")}
    assert ("opened", "failed") in states, states
    got = [doc["kind"] for doc in hook.delivered()]
    assert "resolved" not in got, (f"the receiver got {got} (2xx) for an alert whose "
                                   "'opened' never reached it")
    # Given up with its reason on the alert's page.
    assert app.query("SELECT a.result FROM alerts_attempt a JOIN alerts_delivery d ON "
                     "d.id = a.delivery_id WHERE d.kind = 'resolved'") == [
        ("not sent: its opening was given up",)]



@pytest.mark.parametrize("scope", [("--edge", "reception-2"), ("--desk", "desk-9")])
def test_a_callback_rule_keeps_to_its_scope(
        make_app: Callable[..., App], hook: Hook, scope: tuple[str, str]) -> None:
    """Attack: a callback rule scoped to an edge or a desk (README: "A rule
    watches one kind of trouble within a scope (a site, desk or edge, or
    all)"; the form and `--edge`/`--desk` accept it for every kind).
    `_callback` compares the site only, so the rule alerts on every late case
    of the site, or of every site when only the edge or desk is given.
    Repro: rule callback --edge reception-2 + webhook; a callback request
    answered at clinic-3/reception-1 (desk office-12); tick; tick 4 h 2 min later
    ([web.limits] new = 4 h): "opened" for that case.
    Impact: the team of another building or desk is alerted (and paged) for
    cases that are not theirs; a rule meant for one desk fires for all.  Fix:
    apply the rule's edge (Case.edge) and desk (the answer's desk) in
    `_callback`, or refuse those fields for the callback kind."""
    app = make_app()
    r = _add_rule(app, "--name", "Late callbacks elsewhere", "--kind", "callback", *scope,
                  "--webhook-url", hook.url)
    if r.returncode != 0:
        return  # the scope refused for this kind: fine
    t0 = base_time()
    app.answer(t0)  # clinic-3/reception-1, desk office-12
    app.tick(t0 + timedelta(minutes=1))  # the case opens
    app.tick(t0 + timedelta(hours=4, minutes=2))
    got = [(doc["kind"], doc["subject"]) for doc in hook.delivered()]
    assert got == [], (f"a rule scoped {scope[0]} {scope[1]} alerted {got} for a case of "
                       "clinic-3/reception-1, desk office-12")



@pytest.mark.parametrize("kind", ["offline", "health"])
def test_an_edge_rule_scoped_to_a_desk_keeps_to_that_desk(
        make_app: Callable[..., App], hook: Hook, kind: str) -> None:
    """Attack: an offline (or health) rule scoped to a desk, as the form and
    `--desk` accept for every kind.  `_fleet` calls `_in_scope(rule, site, edge)`
    without a desk, and `_in_scope` lets a missing desk through, so the rule
    watches every edge of every site.
    Repro: rule offline --desk desk-9 --duration-min 15 + webhook; one press at
    clinic-3/reception-1 desk-1 (the edge's only desk); tick an hour later:
    "opened" for clinic-3/reception-1.
    Impact: a rule meant for one desk's console pages its recipients for every
    edge of the fleet.  Fix: map the desk to the edges that serve it (events,
    devices), or refuse a desk scope for edge kinds."""
    from datetime import UTC, datetime

    app = make_app()
    r = _add_rule(app, "--name", "Desk 9's edge", "--kind", kind, "--desk", "desk-9",
                  "--duration-min", "15", "--webhook-url", hook.url)
    if r.returncode != 0:
        return  # the scope refused for this kind: fine
    app.press(base_time(), desk="desk-1", label="good")
    if kind == "health":
        import json

        app.ingest([("feedback/v1/clinic-3/reception-1/health", json.dumps(
            {"queue_depth": 0, "oldest_pending_age_s": 0.0, "store_bytes": 4096,
             "disk_free_bytes": 10**9, "drops": {}, "decode_errors": {},
             "clock_synced": True, "uptime_s": 100.0,
             "alarms": ["clock_unsynced: the clock has not been synchronised"],
             "delivery": {"mode": "collector", "collector_online": True, "watermark": 0,
                          "resent": 0}}).encode())])
    app.tick(datetime.now(UTC) + timedelta(hours=1))  # last_seen is intake's real time
    app.tick(datetime.now(UTC) + timedelta(hours=2))
    got = [(doc["kind"], doc["subject"]) for doc in hook.delivered()]
    assert got == [], f"a {kind} rule scoped to desk-9 alerted {got}"


# == Rules edited while their alerts are open =================================================

def test_changing_a_rules_kind_ends_its_open_alerts(
        make_app: Callable[..., App], hook: Hook, procs: Callable[[list[str], Path], Any],
        tmp_path: Path) -> None:
    """Attack: the quality manager edits a rule's kind on its page (the form
    allows it) while one of its alerts is open.  Episodes are keyed by (rule,
    subject) only, and "site/desk" is the subject of negative and loyalty
    alike: the open negative alert simply goes on as a loyalty alert, already
    raised, though loyalty must hold for `duration_min` (60) first, and no
    "opened" of the new kind is ever sent.
    Repro: rule negative --threshold 2 + webhook; two bad presses; tick (opened,
    kind negative); on /alerts/rules/1/ save kind loyalty, threshold 0, minimum
    presses 1, 60 minutes; tick 3 minutes later: the alert is still open and
    raised; later its "resolved" says kind loyalty.
    Impact: the receiver's alert id is opened as one rule and resolved as
    another; a loyalty alert counts as raised without its duration (and in
    /metrics' alerts_open{kind="loyalty"}).  Fix: end a rule's open episodes
    when its kind, grouping or scope changes (store them on the episode and
    compare in `_apply`, or end them when the rule is saved)."""
    from tests.web_fixtures import HttpSession, served_url

    app = make_app()
    rule = app.rule("--name", "Desk 1", "--kind", "negative", "--threshold", "2",
                    "--window-min", "30", "--webhook-url", hook.url)
    t0 = app.two_bad_presses()
    app.tick(t0 + timedelta(minutes=2))
    assert [d["rule"]["kind"] for d in hook.delivered()] == ["negative"]
    log = tmp_path / "web.log"
    proc = procs(["collector.cli", "web", "--config", str(app.config), "serve", "--bind",
                  "127.0.0.1:0", "--tick-s", "3600"], log)
    qm = HttpSession(served_url(proc, log))
    qm.login("quality", "a-long-password")
    status, _, _ = qm.post(f"alerts/rules/{rule}/", {
        "name": "Desk 1", "kind": "loyalty", "enabled": "on", "site": "", "desk": "",
        "edge": "", "per": "desk", "threshold": "0", "window_min": "30", "share_pct": "",
        "min_count": "1", "duration_min": "60", "code": "", "open_from": "", "open_to": "",
        "open_days": list("1234567"), "emails": "", "language": "en",
        "webhook_url": hook.url, "webhook_secret": "", "quiet_start": "", "quiet_end": ""})
    assert status == 302, f"the rule form: {status}"
    assert app.query("SELECT kind FROM alerts_rule") == [("loyalty",)]
    app.tick(t0 + timedelta(minutes=5))  # loyalty holds (index -100) for 3 minutes only
    still = app.query("SELECT subject, opened_at FROM alerts_episode WHERE resolved_at IS NULL "
                      "AND opened_at IS NOT NULL")
    assert not still, (f"the negative alert goes on as a raised loyalty alert {still} after "
                       "3 of its 60 minutes")

def test_a_window_the_rule_form_accepts_can_be_evaluated(
        make_app: Callable[..., App], hook: Hook) -> None:
    """Attack: a very long window.  window_min is a PositiveIntegerField (up to
    2,147,483,647 minutes) and Rule.clean asks only for at least a minute; a
    window over about 1,064,000,000 minutes (2,025 years) puts `now - window`
    before year 1: OverflowError in `_press_tally` at every tick, logged as
    "rule N could not be evaluated: OverflowError", while the tick's output
    says "alerts 0" (no FAILED).
    Repro: `web alert-rule add --kind negative --threshold 2 --window-min
    2000000000 ...` is saved; two bad presses; tick: nothing raised, ever.
    Impact: a saved rule that silently never alerts.  Fix: bound window_min
    (and duration_min) in Rule.clean (say to a few years), or clamp the start."""
    app = make_app()
    r = _add_rule(app, "--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
                  "--window-min", "2000000000", "--webhook-url", hook.url)
    if r.returncode != 0:
        return  # refused when saved: fine
    t0 = app.two_bad_presses()
    out = _tick(app, t0 + timedelta(minutes=2))
    assert [d["kind"] for d in hook.delivered()] == ["opened"], (
        f"a saved rule raised nothing: tick said {out.stdout.strip()!r}, log "
        f"{[ln for ln in out.stderr.splitlines() if 'could not be evaluated' in ln]}")



# == Read API =================================================================================

@pytest.mark.parametrize(("param", "what"), [
    ("site=clinic-3%00", "a NUL in site="),
    ("kind=press%00", "a NUL in kind="),
    ("cursor=WyJhXHUwMDAwIiwgImIiLCAxLCAieCJd", 'a cursor ["a\\u0000", "b", 1, "x"]'),
])
def test_api_a_nul_in_a_parameter_is_a_400_not_an_outage(
        serve: Any, tmp_path: Path, postgres: Any, param: str, what: str) -> None:
    """Attack: a NUL character in a filter or in a forged cursor (decode_cursor
    checks that its texts encode as UTF-8, which "\\u0000" does).  PostgreSQL
    refuses NUL in text parameters (DataError), which `api_view` takes for an
    outage: 503 "the collector's database cannot be reached; try again" with
    Retry-After: 30, and "api: the database failed: DataError" in the log.
    Repro (PostgreSQL): curl -H "Authorization: Bearer $T"
    'http://HOST/api/v1/events?site=clinic-3%00' -> 503.
    Impact: any token holder makes the API report database outages at will
    (monitoring of 5xx, clients told to retry the same request for ever).
    Fix: refuse control characters in parameters and cursors with 400 (or
    map DataError to 400)."""
    from tests.collector_fixtures import Backend

    app = serve(Backend("postgres", tmp_path, postgres))
    token = new_token(app.cfg, "plain")
    r = get(app.base, f"/api/v1/events?{param}", token)
    assert r.status == 400, f"{what}: HTTP {r.status} {r.body[:120]!r}"


# == Metrics ==================================================================================

def test_collector_metrics_a_dripping_client_cannot_hold_every_scrape(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack: /metrics of `feedback-collector run` is wsgiref's one-thread
    server; `_Quiet.timeout` (10 s) is per socket read, so a client that sends
    its request line and then one header byte every few seconds keeps the only
    thread for as long as it likes, and every Prometheus scrape waits behind
    it (the server has no authentication: anyone who reaches the port).  Here
    the timeout is lowered to 1 s in the process and the client drips a byte
    every 0.4 s (pacing: the attack itself) until the scrape is done.
    Repro: printf 'GET /metrics HTTP/1.1\\r\\nX: ' | nc HOST 9108, then a byte every
    5 s: `curl http://HOST:9108/metrics` hangs until the client stops.
    Impact: scrapes time out (`up` 0 / no collector figures) for as long as
    one idle client wants.  Fix: a threaded server (ThreadingMixIn with a
    bounded pool) and a deadline for the whole request, not per read."""
    import socket
    import time
    import urllib.request

    from collector import metrics
    from collector.config import MetricsConfig
    from tests.conftest import free_port

    monkeypatch.setattr(metrics._Quiet, "timeout", 1)

    class Intake:
        observer = None
        db_errors = 0

    class Cfg:
        metrics = MetricsConfig("127.0.0.1", free_port())
        db_path = tmp_path / "collector.sqlite"
        dsn = None

    server = metrics.serve(Cfg(), Intake())  # type: ignore[arg-type]
    assert server is not None
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    stop, started = threading.Event(), threading.Event()

    def drip() -> None:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            started.set()  # connected first: the one thread takes it first
            end = time.monotonic() + 60
            try:
                while time.monotonic() < end and not stop.is_set():
                    s.sendall(b"a")
                    stop.wait(0.4)
            except OSError:
                pass

    dripper = threading.Thread(target=drip, daemon=True)
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
        dripper.start()
        wait_for(started.is_set, 10, "the dripping client connected")
        # With one thread this scrape would wait behind the dripper (which drips
        # for 60 s unless stopped) and time out.
        with urllib.request.urlopen(url, timeout=10) as r:
            assert r.status == 200
            assert b"feedback_collector_database_up" in r.read()
        assert dripper.is_alive(), "the dripper had stopped: the scrape proved nothing"
    finally:
        stop.set()
        dripper.join(10)
        server.shutdown()
        server.server_close()
