"""The alert rule kinds not covered by test_web_alerts.py: no presses during
opening hours, a callback past its time limit, loyalty and a doctor's index
below a threshold; each through `feedback-collector web tick --now T` on
injected time, to a real SMTP server and a real webhook receiver, once when
raised and once when resolved; and the collector's /metrics counting them.

Events enter through the collector's intake path (tests/alert_fixtures.py).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.alert_fixtures import QM, TZ, App, Hook, base_time, hook, make_app, no_personal_data
from tests.conftest import Broker, Proc, free_port, wait_for
from tests.test_metrics import _try_scrape, scrape, value
from tests.web_fixtures import HttpSession, SmtpSink, served_url, smtp

__all__ = ["hook", "make_app", "smtp"]  # fixtures, used by name

ZONE = ZoneInfo(TZ)


def _local(day: date, hh: int, mm: int = 0) -> datetime:
    return datetime.combine(day, time(hh, mm), ZONE).astimezone(UTC)


def _kinds(hook: Hook) -> list[tuple[str, str]]:
    return [(d["kind"], d["subject"]) for d in hook.delivered()]


def test_a_desk_silent_in_opening_hours_alerts_and_a_press_or_closing_time_resolves_it(
        make_app: Callable[..., App], smtp: SmtpSink, hook: Hook) -> None:
    """Open 08:00-18:00 Monday to Friday; 30 minutes without a press at a desk
    that has had presses is an alert; the silence counts from the last press or
    the opening, whichever is later; closing time and days closed end it."""
    app = make_app()
    app.rule("--name", "Console dead?", "--kind", "silence", "--open", "08:00-18:00",
             "--days", "12345", "--duration-min", "30", "--email", QM,
             "--webhook-url", hook.url)
    today = datetime.now(ZONE).date()
    wed = today - timedelta(days=(today.isoweekday() - 3) % 7 + 7)  # a past Wednesday
    assert wed.isoweekday() == 3
    app.press(_local(wed, 9), desk="desk-1", label="good")
    app.press(_local(wed, 9, 5), desk="desk-2", label="good")
    app.tick(_local(wed, 9, 20))
    app.press(_local(wed, 9, 25), desk="desk-2", label="neutral")
    app.tick(_local(wed, 9, 29))
    assert hook.got == [], "silent for 29 minutes only"
    app.tick(_local(wed, 9, 31))
    assert _kinds(hook) == [("opened", "clinic-3/desk-1")]
    app.press(_local(wed, 9, 40), desk="desk-1", label="bad")
    app.tick(_local(wed, 9, 41))
    assert _kinds(hook) == [("opened", "clinic-3/desk-1"), ("resolved", "clinic-3/desk-1")]
    app.tick(_local(wed, 10))  # desk-2 silent since 09:25
    assert _kinds(hook)[2:] == [("opened", "clinic-3/desk-2")]
    app.tick(_local(wed, 18))  # closing time ends every silence
    assert _kinds(hook)[3:] == [("resolved", "clinic-3/desk-2")]
    app.tick(_local(wed, 19))
    # Thursday: the silence counts from the opening, not from Wednesday's presses.
    thu = wed + timedelta(days=1)
    app.tick(_local(thu, 8, 20))
    assert len(hook.got) == 4, "an alert before 30 minutes of opening hours"
    app.tick(_local(thu, 8, 31))
    assert sorted(_kinds(hook)[4:]) == [("opened", "clinic-3/desk-1"),
                                        ("opened", "clinic-3/desk-2")]
    app.tick(_local(thu, 18, 1))
    # Saturday is not a day open: nothing, all day.
    sat = wed + timedelta(days=3)
    for hh in (8, 10, 12, 17):
        app.tick(_local(sat, hh, 45))
    assert len(hook.got) == 8
    assert [k for k, _ in _kinds(hook)].count("opened") == 4
    assert smtp.count() == 8, "each message also by e-mail"


def test_a_silence_broken_and_back_between_two_ticks_is_a_new_alert(
        make_app: Callable[..., App], hook: Hook) -> None:
    """Ticks an hour apart (the server was down): the press in between ended
    the first silence, so it is resolved and the second is an alert of its own."""
    app = make_app()
    app.rule("--name", "Console dead?", "--kind", "silence", "--open", "08:00-18:00",
             "--duration-min", "30", "--webhook-url", hook.url)
    today = datetime.now(ZONE).date()
    day = today - timedelta(days=2)
    app.press(_local(day, 9), desk="desk-1", label="good")
    app.tick(_local(day, 9, 31))
    app.press(_local(day, 9, 40), desk="desk-1", label="good")
    app.tick(_local(day, 10, 15))
    got = hook.delivered()
    assert [(d["kind"], d["since"]) for d in got] == [
        ("opened", _local(day, 9).isoformat()), ("resolved", _local(day, 9).isoformat()),
        ("opened", _local(day, 9, 40).isoformat())]
    assert got[0]["alert_id"] == got[1]["alert_id"] != got[2]["alert_id"]


def test_a_callback_past_its_limit_alerts_once_without_the_phone_and_resolves_when_taken(
        make_app: Callable[..., App], smtp: SmtpSink, hook: Hook,
        procs: Callable[[list[str], Path], Proc], tmp_path: Path) -> None:
    """`[web.limits] new` is 4 hours by default: a case still new after them is
    an alert naming the case, never the patient's phone or comment; moving the
    case on (in progress, from the web app) resolves it."""
    app = make_app()
    app.rule("--name", "Late callbacks", "--kind", "callback", "--email", QM,
             "--webhook-url", hook.url)
    t0 = base_time()
    app.answer(t0)
    app.tick(t0 + timedelta(minutes=1))  # the case opens, new since this tick
    ((case, status),) = app.query("SELECT id, status FROM feedback_case")
    assert status == "new"
    app.tick(t0 + timedelta(hours=4))
    assert hook.got == [], "before its 4 hours"
    app.tick(t0 + timedelta(hours=4, minutes=2))
    assert _kinds(hook) == [("opened", f"case #{case}")]
    app.tick(t0 + timedelta(hours=5))
    assert len(hook.got) == 1, "once per episode"
    log = tmp_path / "web.log"
    proc = procs(["collector.cli", "web", "--config", str(app.config), "serve", "--bind",
                  "127.0.0.1:0", "--tick-s", "3600"], log)
    qm = HttpSession(served_url(proc, log))
    qm.login("quality", "a-long-password")
    assert qm.request(f"cases/{case}/")[0] == 200
    assert qm.post(f"cases/{case}/status/", {"status": "in_progress", "outcome": ""})[0] == 302
    app.tick(datetime.now(UTC) + timedelta(minutes=1))
    assert _kinds(hook) == [("opened", f"case #{case}"), ("resolved", f"case #{case}")]
    # The quality manager also gets the case's own time-limit warning (cases.py).
    (opened, resolved) = [m for m in smtp.to(QM) if "Late callbacks" in m.subject]
    assert f"case #{case}" in opened.subject
    assert f"case #{case}" in resolved.subject
    no_personal_data(smtp, hook)


def test_loyalty_below_the_threshold_for_its_duration_alerts_and_a_dip_does_not(
        make_app: Callable[..., App], smtp: SmtpSink, hook: Hook) -> None:
    """Index (% good - % bad) of the last 60 minutes below 0, of at least 5
    presses, for 20 minutes: an alert; below for 10 minutes only, or of too few
    presses: none."""
    app = make_app()
    app.rule("--name", "Desk mood", "--kind", "loyalty", "--per", "desk", "--threshold", "0",
             "--window-min", "60", "--min-count", "5", "--duration-min", "20",
             "--webhook-url", hook.url, "--email", QM)
    t0 = base_time()

    def at(minutes: int) -> datetime:
        return t0 + timedelta(minutes=minutes)

    # desk-2: four bad presses, too few to be an index.
    for m in (0, 1, 2, 3):
        app.press(at(m), desk="desk-2", label="bad")
    # desk-1 dips to -20 at 13:04, and is back at +14 at 13:14.
    for m, label in ((0, "good"), (1, "bad"), (2, "good"), (3, "bad"), (4, "bad")):
        app.press(at(m), desk="desk-1", label=label)
    app.tick(at(5))
    app.press(at(13), desk="desk-1", label="good")
    app.press(at(14), desk="desk-1", label="good")
    app.tick(at(15))
    app.tick(at(30))
    assert hook.got == [], "a 10-minute dip, or too few presses, raised an alert"
    ((episodes,),) = app.query("SELECT count(*) FROM alerts_episode")
    assert episodes == 0, "a dip that cleared left an episode"
    # From 13:40 desk-1 turns bad: 4 good and 5 bad at 13:41, below 0 from then.
    for m in (40, 41, 42, 43):
        app.press(at(m), desk="desk-1", label="bad")
        app.tick(at(m))
    app.tick(at(60))
    assert hook.got == [], "held 19 minutes only"
    app.tick(at(61))
    assert _kinds(hook) == [("opened", "clinic-3/desk-1")]
    (doc,) = hook.delivered()
    assert doc["value"].startswith("index -"), "the index is in the alert"
    # Good presses again: the last hour's index is back above 0.
    for m in (70, 71, 72, 73, 74, 75):
        app.press(at(m), desk="desk-1", label="good")
    app.tick(at(76))
    assert _kinds(hook) == [("opened", "clinic-3/desk-1"), ("resolved", "clinic-3/desk-1")]
    assert smtp.count() == 2


def test_a_doctor_index_below_the_threshold_alerts_for_that_doctor_only(
        make_app: Callable[..., App], smtp: SmtpSink, hook: Hook) -> None:
    """% yes - % no of Q1 over the last week, at least 4 answers, below 0 for an
    hour: an alert naming the doctor; more yes answers resolve it."""
    app = make_app()
    app.rule("--name", "Doctor ranking", "--kind", "doctor", "--threshold", "0",
             "--window-min", str(7 * 24 * 60), "--min-count", "4", "--duration-min", "60",
             "--webhook-url", hook.url, "--email", QM)
    t0 = base_time() - timedelta(days=3)
    for h, doctor, q1 in ((0, "dr-petrov", "no"), (1, "dr-petrov", "no"),
                          (2, "dr-petrov", "yes"), (3, "dr-petrov", "no"),
                          (0, "dr-ivanova", "yes"), (1, "dr-ivanova", "yes"),
                          (2, "dr-ivanova", "no"), (3, "dr-ivanova", "unsure")):
        app.answer(t0 + timedelta(hours=h), q1=q1, doctor=doctor)
    app.tick(t0 + timedelta(hours=3, minutes=1))
    app.tick(t0 + timedelta(hours=3, minutes=59))
    assert hook.got == [], "before its hour"
    app.tick(t0 + timedelta(hours=4, minutes=2))
    assert _kinds(hook) == [("opened", "doctor dr-petrov")]
    (doc,) = hook.delivered()
    assert doc["value"] == "index -50.0 of 4 answers in 10080 min"
    for h in (5, 6):
        app.answer(t0 + timedelta(hours=h), q1="yes", doctor="dr-petrov")
    app.tick(t0 + timedelta(hours=6, minutes=1))
    assert _kinds(hook) == [("opened", "doctor dr-petrov"), ("resolved", "doctor dr-petrov")]
    # A week on, the answers have left the window: below the minimum, nothing.
    app.tick(t0 + timedelta(days=8))
    assert len(hook.got) == 2
    # (The "no" answers left phones: their cases' time-limit warnings go too.)
    assert len([m for m in smtp.to(QM) if "Doctor ranking" in m.subject]) == 2
    no_personal_data(smtp, hook)


@pytest.mark.parametrize(("args", "field"), [
    (["--kind", "silence", "--open", "18:00-08:00"], "--open"),
    (["--kind", "silence", "--open", "08:00-18:00", "--days", "1238"], "--days"),
    (["--kind", "silence", "--open", "08:00-18:00", "--days", "11"], "--days"),
    (["--kind", "silence", "--open", "08:00-18:00", "--days", ""], "--days"),
    (["--kind", "silence"], "--open"),
    (["--kind", "loyalty", "--threshold", "-100"], "--threshold"),
    (["--kind", "doctor", "--threshold", "101"], "--threshold"),
    (["--kind", "doctor", "--window-min", "0"], "--window-min"),
])
def test_a_rule_that_cannot_hold_as_meant_is_refused_with_its_field(
        make_app: Callable[..., App], args: list[str], field: str) -> None:
    app = make_app()
    with pytest.raises(AssertionError) as e:
        app.cli("alert-rule", "add", "--name", "r", "--email", QM, *args)
    assert f"alert-rule: {field}:" in str(e.value)
    assert app.query("SELECT count(*) FROM alerts_rule") == [(0,)]


def test_collector_metrics_count_open_alerts_by_kind_and_messages_by_state(
        make_app: Callable[..., App], hook: Hook, broker: Broker,
        procs: Callable[[list[str], Path], Proc], tmp_path: Path) -> None:
    app = make_app(broker_port=broker.port)
    port = free_port()
    with app.config.open("a") as f:
        f.write(f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    app.rule("--name", "Desk 1 unhappy", "--kind", "negative", "--threshold", "2",
             "--window-min", "30", "--webhook-url", hook.url)
    proc = procs(["collector.cli", "run", "--config", str(app.config)],
                 tmp_path / "collector.log")
    url = f"http://127.0.0.1:{port}/metrics"

    m = wait_for(lambda: _try_scrape(url, proc), 20, "the collector's /metrics")
    assert value(m, "feedback_collector_alerts_open", kind="negative") == 0
    assert value(m, "feedback_collector_alert_messages", state="sent") == 0
    t0 = base_time()
    for minute in (0, 1):
        app.press(t0 + timedelta(minutes=minute), desk="desk-1", label="bad")
    hook.statuses = [503]
    app.tick(t0 + timedelta(minutes=2))
    m = scrape(url)
    assert value(m, "feedback_collector_alerts_open", kind="negative") == 1
    assert value(m, "feedback_collector_alerts_open", kind="silence") == 0
    assert value(m, "feedback_collector_alert_messages", state="pending") == 1
    app.tick(t0 + timedelta(minutes=40))  # the retry goes, then the alert resolves
    m = scrape(url)
    assert value(m, "feedback_collector_alerts_open", kind="negative") == 0
    assert value(m, "feedback_collector_alert_messages", state="sent") == 2
    assert value(m, "feedback_collector_alert_messages", state="failed") == 0
