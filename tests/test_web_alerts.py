"""Alerts (issue 19): rules evaluated by `feedback-collector web tick --now T`
on injected time, delivered to a real SMTP server (aiosmtpd) and to a real
HTTP server started here, each message once per episode.

Events enter through the collector's own intake path (`classify` +
`store.ingest`); the offline test kills a real MQTT client whose will the
real collector stores from a real Mosquitto.  Personal data here is made up
and never printed: failures name the field, never its value.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.alert_fixtures import (
    QM,
    SECRET,
    TZ,
    App,
    Hook,
    base_time,
    hook,
    make_app,
    no_personal_data,
)
from tests.collector_fixtures import Backend
from tests.conftest import Broker, Proc, Subscriber, wait_for
from tests.web_fixtures import SmtpSink, smtp

__all__ = ["hook", "make_app", "smtp"]  # fixtures, used by name

# -- the tests ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_an_afternoon_of_bad_presses_alerts_once_and_resolves_once(
        kind: str, make_app: Callable[..., App], smtp: SmtpSink, hook: Hook, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    pg = request.getfixturevalue("postgres") if kind == "postgres" else None
    app = make_app(Backend(kind, tmp_path, pg))
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--site", "clinic-3",
             "--threshold", "3", "--window-min", "30", "--email", QM,
             "--webhook-url", hook.url)
    t0 = base_time()

    def at(minutes: float) -> datetime:
        return t0 + timedelta(minutes=minutes)

    # 13:00-13:05: a calm start; two bad presses at desk-2 stay below the threshold.
    for m, desk, label in ((0, "desk-1", "good"), (1, "desk-2", "bad"), (2, "desk-1", "good"),
                           (3, "desk-2", "bad"), (4, "desk-1", "neutral")):
        app.press(at(m), desk=desk, label=label)
    app.tick(at(5))
    assert smtp.count() == 0
    assert hook.got == []
    # 13:10-13:14: desk-1 turns bad (and a patient leaves a phone and a comment).
    app.answer(at(10))
    for m in (10, 12, 14):
        app.press(at(m), desk="desk-1", label="bad")
    app.tick(at(15))
    assert smtp.count() == 1, "one e-mail for the alert"
    opened = hook.delivered()
    assert [d["kind"] for d in opened] == ["opened"]
    assert opened[0]["subject"] == "clinic-3/desk-1"
    # Bad presses go on: the alert stays open, nothing is sent again.
    for m in (16, 20, 25):
        app.press(at(m), desk="desk-1", label="bad")
        app.tick(at(m + 1))
    assert smtp.count() == 1
    assert len(hook.got) == 1
    # Good presses from 13:30; at 13:40 five bad ones are still within the last
    # 30 minutes, at 13:50 only one (13:25) is.
    for m in (30, 35, 40):
        app.press(at(m), desk="desk-1", label="good")
    app.tick(at(40))
    assert smtp.count() == 1, "resolved too early"
    app.tick(at(50))
    app.tick(at(70))
    assert smtp.count() == 2, "one e-mail for the alert, one for its resolution"
    done = hook.delivered()
    assert [d["kind"] for d in done] == ["opened", "resolved"]
    assert done[0]["alert_id"] == done[1]["alert_id"]
    first, second = smtp.to(QM)
    # The quality manager reads Russian (her account's language).
    assert "clinic-3/desk-1" in first.subject
    assert first.subject.strip().startswith("Оповещение:"), "not in Russian"
    assert second.subject.strip().startswith("Снято:"), "not in Russian"
    assert done[0]["alert_id"] in first.body
    assert done[1]["alert_id"] in second.body
    # What was found, in her language too; the webhook keeps the English value.
    assert "3 плохих из 6 нажатий за 30 мин" in first.body, "the value not in Russian"
    assert "Сработало правило «Desk 1 unhappy»: clinic-3/desk-1." in first.body
    assert opened[0]["value"] == "3 bad of 6 presses in 30 min"
    no_personal_data(smtp, hook)
    ((n,),) = app.query("SELECT count(*) FROM alerts_episode WHERE opened_at IS NOT NULL")
    assert n == 1


def test_a_failing_webhook_gets_the_alert_on_the_third_try_with_the_same_id(
        make_app: Callable[..., App], hook: Hook) -> None:
    app = make_app()
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--webhook-url", hook.url)
    hook.statuses = [500, 500]
    t0 = base_time()
    for m in (0, 1, 2):
        app.press(t0 + timedelta(minutes=m), desk="desk-1", label="bad")
    app.tick(t0 + timedelta(minutes=3))
    assert len(hook.got) == 1
    app.tick(t0 + timedelta(minutes=3, seconds=30))  # before the 1-minute back-off
    assert len(hook.got) == 1
    app.tick(t0 + timedelta(minutes=4))
    assert len(hook.got) == 2
    app.tick(t0 + timedelta(minutes=5))  # the second back-off is 2 minutes
    assert len(hook.got) == 2
    app.tick(t0 + timedelta(minutes=6))
    assert [s for s, _, _ in hook.got] == [500, 500, 200]
    bodies = {body for _, _, body in hook.got}
    assert len(bodies) == 1, "every try sends the same body"
    (doc,) = hook.delivered()
    assert doc["kind"] == "opened"
    results = [r[0] for r in app.query(
        "SELECT result FROM alerts_attempt ORDER BY n")]
    assert results == ["HTTP 500", "HTTP 500", "HTTP 200"]
    app.tick(t0 + timedelta(minutes=20))
    assert len(hook.got) == 3


_EDGE = """
import json, signal, sys, time
import paho.mqtt.client as mqtt
port = int(sys.argv[1])
topic = "feedback/v1/clinic-3/reception-1/status"
now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
def status(state):
    return json.dumps({"state": state, "since": now, "version": "0.1.0", "boot_id": "boot-e"})
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="edge-reception-1")
c.will_set(topic, status("offline"), qos=1, retain=True)
c.connect("127.0.0.1", port)
c.loop_start()
c.publish(topic, status("online"), qos=1, retain=True).wait_for_publish(10)
print("online", flush=True)
signal.pause()  # connected until the test kills it (SIGKILL: no goodbye)
"""


def test_an_edge_killed_raises_offline_after_n_minutes_and_not_before(
        make_app: Callable[..., App], smtp: SmtpSink, broker: Broker,
        procs: Callable[[list[str], Path], Proc], subscribe: Callable[[str], Subscriber],
        tmp_path: Path) -> None:
    app = make_app(broker_port=broker.port)
    app.rule("--name", "Edge offline", "--kind", "offline", "--duration-min", "10",
             "--email", QM)
    states = subscribe("feedback/v1/collector/state")
    procs(["collector.cli", "run", "--config", str(app.config)], tmp_path / "collector.log")
    wait_for(lambda: any(m.json().get("state") == "online" for m in states.snapshot()), 30,
             "the collector online")
    script = tmp_path / "edge.py"
    script.write_text(_EDGE)
    edge = subprocess.Popen([sys.executable, str(script), str(broker.port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert edge.stdout is not None
        assert edge.stdout.readline().strip() == "online"

        def state() -> str | None:
            rows = app.query("SELECT state FROM edges WHERE site = 'clinic-3'")
            return str(rows[0][0]) if rows and rows[0][0] else None

        wait_for(lambda: state() == "online", 30, "the edge online at the collector")
        edge.kill()  # SIGKILL: no goodbye; the broker publishes the will
        edge.wait(10)
    finally:
        if edge.poll() is None:
            edge.kill()
            edge.wait(10)
        if edge.stdout is not None:
            edge.stdout.close()
    wait_for(lambda: state() == "offline", 30, "the edge's will stored")
    ((seen_ms,),) = app.query("SELECT last_seen_ms FROM edges WHERE site = 'clinic-3'")
    went = datetime.fromtimestamp(seen_ms / 1000, UTC)
    app.tick(went + timedelta(minutes=5))
    app.tick(went + timedelta(minutes=9, seconds=50))
    assert smtp.count() == 0, "offline alert before its 10 minutes"
    app.tick(went + timedelta(minutes=10, seconds=10))
    (mail,) = smtp.to(QM)
    assert "clinic-3/reception-1" in mail.subject
    app.tick(went + timedelta(minutes=30))
    assert smtp.count() == 1


def test_quiet_hours_hold_a_health_alarm_until_they_end(
        make_app: Callable[..., App], smtp: SmtpSink, hook: Hook) -> None:
    """A health alarm lasting 10 minutes, raised during quiet hours: nothing is
    sent until they end, then the e-mail and the webhook go; only the alarm's
    code leaves, never its text (which may name a device)."""
    app = make_app()
    t0 = base_time()
    local = t0.astimezone(ZoneInfo(TZ))
    quiet = f"{(local - timedelta(hours=1)):%H:%M}-{(local + timedelta(minutes=30)):%H:%M}"
    app.rule("--name", "Edge alarm", "--kind", "health", "--duration-min", "10",
             "--email", QM, "--webhook-url", hook.url, "--quiet", quiet)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    app.ingest([
        ("feedback/v1/clinic-3/reception-1/status", json.dumps(
            {"state": "online", "since": now, "version": "0.1.0",
             "boot_id": "boot-a"}).encode()),
        ("feedback/v1/clinic-3/reception-1/health", json.dumps(
            {"queue_depth": 0, "oldest_pending_age_s": 0.0, "store_bytes": 4096,
             "disk_free_bytes": 10**9, "drops": {}, "decode_errors": {},
             "clock_synced": True, "uptime_s": 100.0,
             "alarms": ["device_missing: console ZQX-DEVICE at desk desk-1"],
             "delivery": {"mode": "collector", "collector_online": True, "watermark": 0,
                          "resent": 0}}).encode())])
    app.tick(t0)
    app.tick(t0 + timedelta(minutes=11))
    ((opened,),) = app.query("SELECT count(*) FROM alerts_episode WHERE opened_at IS NOT NULL")
    assert opened == 1, "evaluation goes on in quiet hours"
    app.tick(t0 + timedelta(minutes=20))
    assert smtp.count() == 0
    assert hook.got == []
    app.tick(t0 + timedelta(minutes=31))
    (mail,) = smtp.to(QM)
    (doc,) = hook.delivered()
    assert doc["subject"] == "clinic-3/reception-1 device_missing"
    assert doc["value"] == "device_missing"
    for text in (mail.subject + mail.body, json.dumps(doc)):
        assert "ZQX-DEVICE" not in text, "an alarm's text left in an alert"


def test_the_quality_manager_manages_rules_and_sees_alerts_others_do_not(
        make_app: Callable[..., App], procs: Callable[[list[str], Path], Proc],
        tmp_path: Path) -> None:
    from tests.web_fixtures import HttpSession, served_url

    app = make_app()
    app.cli("adduser", "manager", "--role", "clinic_manager", "--language", "en",
            stdin="a-long-password\n")
    log = tmp_path / "web.log"
    proc = procs(["collector.cli", "web", "--config", str(app.config), "serve", "--bind",
                  "127.0.0.1:0", "--tick-s", "3600"], log)
    url = served_url(proc, log)
    qm = HttpSession(url)
    qm.login("quality", "a-long-password")
    qm.request("alerts/rules/new/")
    status, location, _ = qm.request("alerts/rules/new/", {
        "csrfmiddlewaretoken": qm.csrf(), "name": "Site unhappy", "kind": "negative",
        "enabled": "on", "per": "site", "threshold": "4", "window_min": "60",
        "min_count": "10", "duration_min": "15", "emails": QM, "language": "en",
        "webhook_url": "https://hooks.example/feedback", "webhook_secret": SECRET})
    assert (status, location) == (302, "/alerts/rules/")
    # The form offers the kinds the CLI and the metrics know (written out there).
    from collector.web.alerts.cli import KINDS

    form = qm.request("alerts/rules/new/")[2]
    select = form[form.index('name="kind"'):form.index("</select>", form.index('name="kind"'))]
    assert tuple(re.findall(r'<option value="(\w+)"', select)) == KINDS
    status, _, page = qm.request("alerts/rules/")
    assert status == 200
    assert "Site unhappy" in page
    assert SECRET not in qm.request("alerts/rules/1/")[2], "the secret shown back"
    assert qm.request("alerts/")[0] == 200
    # Opening days are checkboxes (Monday to Friday here), kept as ISO weekdays.
    status, location, _ = qm.post("alerts/rules/new/", {
        "name": "Console dead?", "kind": "silence", "enabled": "on", "per": "desk",
        "threshold": "5", "window_min": "60", "min_count": "10", "duration_min": "30",
        "open_from": "08:00", "open_to": "18:00", "open_days": list("12345"), "emails": QM,
        "language": "en"})
    assert (status, location) == (302, "/alerts/rules/")
    assert app.query("SELECT open_days FROM alerts_rule WHERE name = 'Console dead?'") == \
        [("12345",)]
    page = qm.request("alerts/rules/2/")[2]
    checked = re.findall(r'<input type="checkbox" name="open_days" value="(\d)"[^>]* checked',
                         page)
    assert checked == list("12345")
    assert "Воскресенье" in page  # Django's own day names, in her language
    # Who saved which rule is in the audit: the fields, never an address or a URL.
    audit = app.query("SELECT username, action, detail FROM feedback_auditentry WHERE "
                      "action LIKE 'alert_rule%%' ORDER BY id")
    assert [(u, a) for u, a, _ in audit] == [("quality", "alert_rule_saved")] * 2
    assert audit[0][2].startswith("rule 1 added: name, kind, ")
    assert "webhook_url" in audit[0][2]
    assert not any(QM in d or "hooks.example" in d or SECRET in d for _, _, d in audit)
    assert "Site unhappy" in app.cli("alert-rule", "list")
    app.cli("alert-rule", "disable", "1")
    ((enabled, secret),) = app.query("SELECT enabled, webhook_secret FROM alerts_rule "
                                     "WHERE id = 1")
    assert not enabled
    assert secret == SECRET
    other = HttpSession(url)
    other.login("manager", "a-long-password")
    assert other.request("alerts/rules/")[0] == 403
    assert other.request("alerts/")[0] == 403


def test_an_afternoon_pressed_on_real_consoles_alerts_once_and_resolves_once(
        make_app: Callable[..., App], smtp: SmtpSink, hook: Hook, broker: Broker,
        procs: Callable[[list[str], Path], Proc], tmp_path: Path) -> None:
    """The whole way: simulated consoles -> the edge daemon -> Mosquitto -> the
    collector -> the alert tick.  The presses are the daemon's, timed by its
    clock; the afternoon is compressed into seconds and the tick's clock moves
    on by itself."""
    from tests.collector_fixtures import wait_events
    from tests.test_pipeline import Site

    app = make_app(broker_port=broker.port)
    app.rule("--name", "Desk unhappy", "--kind", "negative", "--threshold", "3",
             "--window-min", "30", "--email", QM, "--webhook-url", hook.url)
    procs(["collector.cli", "run", "--config", str(app.config)], tmp_path / "collector.log")
    (tmp_path / "edge").mkdir()
    site = Site(tmp_path / "edge", broker, procs, consoles=2)
    # Compressed into seconds, an afternoon's presses would be flagged as a burst
    # (more than 5 in 10 s at a desk), and bursts are not counted.
    with site.config.open("a") as f:
        f.write("\n[guards]\nburst_presses = 1000\n")
    site.start()
    site.wait_connected()
    good, bad = 0, 2  # the three-level layout's buttons

    def press(console: int, button: int, stored: int) -> None:
        site.press(button, console=console)
        wait_events(app.backend, stored, 30, f"press {stored} stored by the collector")
        # The pipeline is faster than a finger: the next press waits for this
        # one's button to be released and settled, as a patient's would be.
        wait_for(lambda: site.sim(console)["idle"], 10, "the button released")

    # A calm start: desk-1 good twice, desk-2 bad twice (below the threshold).
    for n, (console, button) in enumerate(((0, good), (1, bad), (0, good), (1, bad)), 1):
        press(console, button, n)
    app.tick(datetime.now(UTC))
    assert (smtp.count(), hook.got) == (0, [])
    # desk-1 turns bad: the third bad press in 30 minutes is an alert, once.
    for n in (5, 6, 7):
        press(0, bad, n)
    app.tick(datetime.now(UTC))
    assert [(d["kind"], d["subject"]) for d in hook.delivered()] == [
        ("opened", "clinic-3/desk-1")]
    for n in (8, 9):
        press(0, bad, n)
    app.tick(datetime.now(UTC))
    assert len(hook.got) == 1, "an open alert sent again"
    # Half an hour on, the bad presses have left the window: resolved, once.
    later = datetime.now(UTC) + timedelta(minutes=31)
    app.tick(later)
    app.tick(later + timedelta(minutes=10))
    done = hook.delivered()
    assert [(d["kind"], d["subject"]) for d in done] == [
        ("opened", "clinic-3/desk-1"), ("resolved", "clinic-3/desk-1")]
    assert done[0]["alert_id"] == done[1]["alert_id"]
    assert [m.subject.strip().split(":")[0] for m in smtp.to(QM)] == ["Оповещение", "Снято"]
    ((rows,),) = app.query("SELECT count(*) FROM events WHERE kind = 'press'")
    assert rows == 9
