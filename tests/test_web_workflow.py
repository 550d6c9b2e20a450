"""The callback workflow in a real browser (issue 18): headless Chromium through
Debian's chromedriver, the app as `feedback-collector web serve`, answers from a
survey terminal sent through a real Mosquitto to `feedback-collector run`, e-mail
to a real SMTP server, on SQLite and on PostgreSQL.  Time limits and erasure run
`feedback-collector web tick --now ...`: the clock is injected, nothing waits."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select

from tests.conftest import wait_for
from tests.test_collector import publish_all
from tests.web_fixtures import (
    HttpSession,
    WebApp,
    answer_message,
    browser,
    leave_page,
    login,
    path_of,
    screenshot,
    smtp,
    url_patterns,
    webapp,
)

__all__ = ["browser", "smtp", "webapp"]  # fixtures, used by name

# Made-up personal data, distinctive enough to be searched for in every page.
PHONE = "+4917055501234"
COMMENT = "Waited ninety minutes and nobody explained why"
NOTE = "Called back: patient prefers a written answer"
PATIENT_EMAIL = "patient-4711@mail.example"
OUTCOME = "We spoke with the reception team about waiting times"
EN_SUBJECT = "Your feedback: what we did"
RU_CATALOGUE = (Path(__file__).resolve().parent.parent / "collector" / "web" / "locale" / "ru"
                / "LC_MESSAGES" / "django.mo")

Driver = Any


def _no_secrets(text: str, where: str, *, also: tuple[str, ...] = ()) -> None:
    """None of the made-up personal data is in `text` (failures name them, never show them)."""
    secrets = {"phone": PHONE, "comment": COMMENT, "patient e-mail": PATIENT_EMAIL,
               **{f"text {i}": t for i, t in enumerate(also)}}
    leaked = [name for name, value in secrets.items() if value in text]
    assert not leaked, f"{where} shows the {', '.join(leaked)}"


def _submit(driver: Driver, form: str) -> str:
    """Send form `#form`; the message the next page shows (success or error)."""
    leave_page(driver, driver.find_element(By.CSS_SELECTOR,
                                           f"#{form} button[type=submit]").click)
    return " ".join(m.text for m in driver.find_elements(By.CSS_SELECTOR, "main p.msg"))


def _ok(driver: Driver, form: str) -> None:
    msg = _submit(driver, form)
    assert msg == "Saved.", f"{form}: {msg!r}"


def _set_status(driver: Driver, status: str, outcome: str = "") -> None:
    Select(driver.find_element(By.CSS_SELECTOR, "#status-form select[name=status]")
           ).select_by_value(status)
    if outcome:
        box = driver.find_element(By.CSS_SELECTOR, "#status-form textarea[name=outcome]")
        box.clear()
        box.send_keys(outcome)
    _ok(driver, "status-form")
    assert driver.find_element(By.CSS_SELECTOR, "h1 .status").get_attribute("class") == \
        f"status {status}"


def _send_answer(app: WebApp, validate: Callable[[str, Any], None], lang: str = "en") -> None:
    topic, payload = answer_message(1, phone=PHONE, comment=COMMENT, lang=lang)
    validate(topic, json.loads(payload))
    publish_all(app.broker, [(topic, payload)])


def _queue_row(driver: Driver) -> int | None:
    """The first case in the queue.  Read in one script: the page replaces its rows
    every 3 s, and an element found a moment ago may be gone."""
    found = driver.execute_script(
        "var r = document.querySelector('#queue tbody tr[data-case]');"
        "return r ? r.dataset.case : null;")
    return int(found) if found else None


def _queue_state(driver: Driver, case_id: int) -> tuple[list[str], str]:
    """(classes, badge text) of the case's row in the queue."""
    classes, badge = driver.execute_script(
        "var r = document.querySelector('#queue tr[data-case=\"' + arguments[0] + '\"]');"
        "var b = r.querySelector('.badge');"
        "return [r.className, b ? b.textContent : ''];", str(case_id))
    return str(classes).split(), str(badge)


def _logout(driver: Driver) -> None:
    leave_page(driver, driver.find_element(By.CSS_SELECTOR, "header nav form button").click)
    assert path_of(driver) == "/login/"


# -- 1. logging in -------------------------------------------------------------------

def test_each_role_lands_on_its_page_and_five_wrong_passwords_lock_out_only_that_user(
        webapp: WebApp, browser: Callable[[], Driver]) -> None:
    d = browser()
    d.get(webapp.url)
    assert path_of(d) == "/login/"
    screenshot(d, "login")
    for user, page, shot in (("quality", "/cases/", None), ("officer", "/cases/", None),
                             ("manager", "/reports/", "reports-no-data"),
                             ("admin", "/users/", "users")):
        login(d, webapp.url, user)
        assert path_of(d) == page, user
        if shot:
            screenshot(d, shot)
        if user == "admin":
            d.get(webapp.url + "me/")
            screenshot(d, "profile")
        _logout(d)

    for attempt in range(1, 6):
        login(d, webapp.url, "officer", "not-the-password")
        text = d.find_element(By.TAG_NAME, "main").text
        if attempt < 5:
            assert "The user name or password is wrong." in text, attempt
    assert "Too many failed logins" in text
    screenshot(d, "locked_out")
    login(d, webapp.url, "officer")  # the right password, now too late
    assert "Too many failed logins" in d.find_element(By.TAG_NAME, "main").text
    assert path_of(d) == "/login/"

    login(d, webapp.url, "quality")  # another user, same browser and address
    assert path_of(d) == "/cases/"


# -- 2 to 7: one case from the terminal to its erasure --------------------------------

def test_a_callback_case_from_the_terminal_to_its_erasure(
        webapp: WebApp, browser: Callable[[], Driver],
        validate: Callable[[str, Any], None]) -> None:
    app, base = webapp, webapp.url

    # 2. The quality manager's queue is open; the answer arrives through the broker
    #    and the collector, and shows up without a reload.
    qm = browser()
    login(qm, base, "quality")
    assert path_of(qm) == "/cases/"
    qm.execute_script("window.noReload = 'same page'")
    assert _queue_row(qm) is None
    _send_answer(app, validate)
    case_id: int = wait_for(lambda: _queue_row(qm), 30, "the case in the open queue",
                            interval=0.2)
    assert qm.execute_script("return window.noReload") == "same page"
    _no_secrets(qm.page_source, "the queue")

    # 3a. The quality manager assigns it to the officer.
    qm.get(f"{base}cases/{case_id}/")
    Select(qm.find_element(By.CSS_SELECTOR, "#assign-form select[name=assignee]")
           ).select_by_visible_text("officer")
    _ok(qm, "assign-form")

    # 4. Time limit ([web.limits] new = 1 h), clock injected: nothing yet at 30 min;
    #    at 2 h one warning each to the assignee and the quality manager; never again.
    now = datetime.now(UTC)
    assert "warnings sent 0" in app.tick(now + timedelta(minutes=30))
    assert app.smtp.count() == 0
    assert "warnings sent 2" in app.tick(now + timedelta(hours=2))
    for who in ("officer@clinic.example", "quality@clinic.example"):
        mails = app.smtp.to(who)
        assert len(mails) == 1, who
        assert mails[0].subject == f"Case #{case_id} is over its time limit"
        assert f"/cases/{case_id}/" in mails[0].body
    assert "warnings sent 0" in app.tick(now + timedelta(hours=3))
    assert app.smtp.count() == 2
    qm.get(base + "cases/")
    classes, badge = _queue_state(qm, case_id)
    assert "late" in classes
    assert badge == "over the time limit"
    screenshot(qm, "queue")

    # 3b. The officer, in a browser of their own, works on the case.
    off = browser()
    login(off, base, "officer")
    assert path_of(off) == "/cases/"
    leave_page(off, lambda: off.execute_script(
        "document.querySelector(arguments[0]).click()", f"#queue tr[data-case='{case_id}'] a"))
    assert path_of(off) == f"/cases/{case_id}/"
    assert off.find_element(By.CSS_SELECTOR, "dd.phone").text == PHONE
    assert off.find_element(By.CSS_SELECTOR, "dd.comment").text == COMMENT
    off.find_element(By.CSS_SELECTOR, "#email-form input[name=email]").send_keys(PATIENT_EMAIL)
    Select(off.find_element(By.CSS_SELECTOR, "#email-form select[name=lang]")
           ).select_by_value("ru")
    _ok(off, "email-form")
    off.find_element(By.CSS_SELECTOR, "#note-form textarea[name=text]").send_keys(NOTE)
    minutes = off.find_element(By.CSS_SELECTOR, "#note-form input[name=minutes]")
    minutes.clear()
    minutes.send_keys("15")
    _ok(off, "note-form")
    assert "15 minutes" in off.find_element(By.CSS_SELECTOR, "section.card dl").text
    _set_status(off, "in_progress")
    _set_status(off, "investigating")
    assert app.smtp.to(PATIENT_EMAIL) == []
    _set_status(off, "resolved", OUTCOME)
    # The e-mail was sent before the page answered: it is there now.
    (mail,) = app.smtp.to(PATIENT_EMAIL)
    assert OUTCOME in mail.body
    assert mail.msg["From"] == "Quality team <quality-team@clinic.example>"
    # Its language is checked in test_the_patients_email_is_in_the_language_noted.
    screenshot(off, "case")
    screenshot(off, "case-notes", scroll_to="note-form")
    off.get(base + "me/")

    # 5. The clinic manager reaches no case data by any URL.
    cm = HttpSession(base)
    cm.login("manager")
    anonymous = HttpSession(base)
    private = {"queue", "queue_rows", "case", "case_action", "audit", "users"}
    paths: list[tuple[str, str]] = []
    for name, route in url_patterns(app.config):
        for action in (("status", "note", "email", "assign", "phone")
                       if "<str:action>" in route else ("",)):
            path = route.replace("<int:pk>", str(case_id)).replace("<str:action>", action)
            paths.append((name, path))
            if name in ("queue", "queue_rows"):
                paths.append((name, path + "?show=all"))
    assert {name for name, _ in paths} >= private
    for name, path in paths:
        status, location, body = cm.request(path)
        _no_secrets(body, f"{path} (clinic manager)")
        if name in private:
            assert status == 403 or (status == 302 and "/login/" in location), (path, status)
        status, location, body = anonymous.request(path)
        _no_secrets(body, f"{path} (not logged in)")
        if name in private:
            assert (status, location.split("?")[0]) == (302, "/login/"), path
    for action in ("status", "note", "email", "assign"):
        status, _, body = cm.request(f"cases/{case_id}/{action}/", {
            "csrfmiddlewaretoken": cm.csrf(), "status": "closed", "text": "x", "minutes": "1",
            "email": "someone@mail.example", "lang": "en", "assignee": ""})
        assert status == 403, action
        _no_secrets(body, f"POST {action} (clinic manager)")
    assert app.query("SELECT status FROM feedback_case WHERE id = ?", (case_id,)) == \
        [("resolved",)]

    # 7. Closed, then erased erase_after_days later (clock injected).
    _set_status_on_page(off, base, case_id, "closed")
    assert "cases erased 0" in app.tick(datetime.now(UTC) + timedelta(days=1))
    later = datetime.now(UTC) + timedelta(days=app.erase_after_days, hours=1)
    assert "cases erased 1" in app.tick(later)
    off.get(f"{base}cases/{case_id}/")
    assert off.find_element(By.CSS_SELECTOR, "dd.phone").text == "erased"
    assert off.find_element(By.CSS_SELECTOR, "dd.comment").text == "erased"
    assert off.find_element(By.CSS_SELECTOR, "dd.email").text.startswith("erased")
    _no_secrets(off.page_source, "the erased case")
    screenshot(off, "case-erased")
    # Closed: no new e-mail address (it would outlive the erasure).
    assert off.find_elements(By.ID, "email-form") == []
    officer = HttpSession(base)
    officer.login("officer")
    status, _, _ = officer.request(f"cases/{case_id}/email/", {
        "csrfmiddlewaretoken": officer.csrf(), "email": PATIENT_EMAIL, "lang": "en"})
    assert status == 403
    assert app.query("SELECT patient_email FROM feedback_case WHERE id = ?", (case_id,)) == \
        [("",)]
    ((phone, comment, payload),) = app.query(
        "SELECT phone, comment, payload FROM events WHERE kind = 'answer'")
    assert (phone, comment) == (None, None)
    answer = json.loads(payload)["answer"]
    assert (answer["phone"], answer["comment"], answer["q1"]) == (None, None, "no")

    # 6. The audit has every step, and no phone, comment or e-mail address.
    qm.get(base + "audit/")
    # The action's code is in data-action; people read its translated label.
    steps = [tuple(td.get_attribute("data-action") or td.text
                   for td in tr.find_elements(By.TAG_NAME, "td"))
             for tr in qm.find_elements(By.CSS_SELECTOR, "#audit tbody tr")]
    mine = [(who, what, detail) for _, who, what, case, detail in steps
            if case == f"#{case_id}"]
    for step in [("quality", "assign", "officer"), ("officer", "phone_viewed", ""),
                 ("officer", "email_noted", "language ru"), ("officer", "note", "15 min"),
                 ("officer", "status", "new -> in_progress"),
                 ("officer", "status", "in_progress -> investigating"),
                 ("officer", "status", "investigating -> resolved"),
                 ("officer", "mail_sent", "to the patient (ru)"),
                 ("officer", "status", "resolved -> closed"),
                 ("(system)", "late_warning", "new over 1.0 h"),
                 ("(system)", "erased", "phone, comment and e-mail")]:
        assert step in mine, step
    assert [s for s in mine if s[1] == "late_warning"] == [
        ("(system)", "late_warning", "new over 1.0 h")]
    _no_secrets(qm.page_source, "the audit", also=(NOTE,))
    screenshot(qm, "audit")


def _set_status_on_page(driver: Driver, base: str, case_id: int, status: str) -> None:
    driver.get(f"{base}cases/{case_id}/")
    _set_status(driver, status)


# -- 3. the patient's e-mail, in the patient's language ------------------------------

# The Russian catalogue (collector/web/locale/ru) is being added by another helper;
# until its compiled django.mo is there the e-mail goes out in English and this test
# fails as expected; once it lands the condition is false and the test must pass.
@pytest.mark.xfail(not RU_CATALOGUE.exists(), strict=True,
                   reason="the Russian catalogue (collector/web/locale/ru/LC_MESSAGES/"
                          "django.mo) is not there yet: another helper is adding it")
def test_the_patients_email_is_in_the_language_noted(
        webapp: WebApp, browser: Callable[[], Driver],
        validate: Callable[[str, Any], None]) -> None:
    app, base = webapp, webapp.url
    qm = browser()
    login(qm, base, "quality")
    _send_answer(app, validate, lang="en")  # answered in English; the patient asks for ru

    def appeared() -> int | None:
        qm.get(base + "cases/")
        return _queue_row(qm)

    case_id: int = wait_for(appeared, 30, "the case", interval=0.5)
    qm.get(f"{base}cases/{case_id}/")
    qm.find_element(By.CSS_SELECTOR, "#email-form input[name=email]").send_keys(PATIENT_EMAIL)
    Select(qm.find_element(By.CSS_SELECTOR, "#email-form select[name=lang]")
           ).select_by_value("ru")
    _ok(qm, "email-form")
    _set_status(qm, "in_progress")
    _set_status(qm, "resolved", OUTCOME)
    (mail,) = app.smtp.to(PATIENT_EMAIL)
    assert OUTCOME in mail.body
    # The language actually chosen: the English subject and greeting must not be used.
    assert mail.subject.strip() != EN_SUBJECT
    assert "Thank you for telling us about your visit" not in mail.body
    assert any("\u0400" <= ch <= "\u04ff" for ch in mail.subject), "a Cyrillic subject"
