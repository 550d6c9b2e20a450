"""The quality manager's web app under abuse: personal data kept too long or
leaked, roles bypassed, warnings repeated or lost, login throttling dodged.

Each test is one attack (found by a review of issue 18) and what holds.  The
app runs as a real `feedback-collector web serve` subprocess on a real
database; answers enter through the collector's own intake path (`classify` +
`store.ingest`); e-mail goes to a real SMTP server (aiosmtpd), some of which
refuse or hold messages on purpose.  Personal data here is made up and never
printed: failures name the field, never its value.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from collector import store
from collector.intake import classify
from tests.collector_fixtures import Backend
from tests.conftest import Proc, free_port, wait_for
from tests.web_fixtures import (
    PASSWORD,
    HttpSession,
    Mail,
    SmtpSink,
    answer_message,
    query,
    served_url,
    smtp,
    web_cli,
    webapp,
)

__all__ = ["smtp", "webapp"]  # fixtures, used by name

PHONE = "+4917055598761"
COMMENT = "ZQX waited two hours at the desk ZQX"
PATIENT_EMAIL = "patient-9913@mail.example"
OUTCOME = "We talked to the desk team about waiting times"
SECRETS = {"phone": PHONE, "comment": COMMENT, "patient e-mail": PATIENT_EMAIL}

USERS = {  # name -> (role, e-mail)
    "quality": ("quality_manager", "quality@clinic.example"),
    "officer": ("callback_officer", "officer@clinic.example"),
    "officer2": ("callback_officer", "officer2@clinic.example"),
    "manager": ("clinic_manager", "manager@clinic.example"),
    "admin": ("administrator", "admin@clinic.example"),
}


def _leaked(text: str | bytes, secrets: dict[str, str] | None = None) -> list[str]:
    """Names of the made-up personal data found in `text` (never the values)."""
    secrets = SECRETS if secrets is None else secrets
    if isinstance(text, bytes):
        return [name for name, v in secrets.items() if v.encode() in text]
    return [name for name, v in secrets.items() if v in text]


# -- SMTP servers with faults ---------------------------------------------------------

class _FaultyHandler:
    """aiosmtpd handler: refuses some recipients; optionally holds the first DATA
    until a second one arrives (so two senders overlap), at most `hold_s`."""

    def __init__(self, sink: SmtpSink, refuse: set[str], hold_s: float) -> None:
        self.sink, self.refuse, self.hold_s = sink, refuse, hold_s
        self.datas = 0
        self.second: asyncio.Event | None = None

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any,  # noqa: N802
                          address: str, rcpt_options: Any) -> str:
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        import email
        import email.policy

        if self.hold_s:
            if self.second is None:
                self.second = asyncio.Event()
            self.datas += 1
            if self.datas == 1:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.second.wait(), self.hold_s)
            else:
                self.second.set()
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.sink.lock:
            self.sink.messages.append(Mail(list(envelope.rcpt_tos), msg))  # type: ignore[arg-type]
        return "250 OK"


@pytest.fixture
def faulty_smtp() -> Iterator[Callable[..., SmtpSink]]:
    from aiosmtpd.controller import Controller

    controllers: list[Any] = []

    def start(refuse: set[str] | None = None, hold_s: float = 0.0) -> SmtpSink:
        sink = SmtpSink(port=free_port())
        c = Controller(_FaultyHandler(sink, refuse or set(), hold_s), hostname="127.0.0.1",
                       port=sink.port)
        c.start()
        controllers.append(c)
        return sink

    yield start
    for c in controllers:
        c.stop()


# -- the app ----------------------------------------------------------------------------

class Session(HttpSession):
    """HttpSession with extra request headers (X-Forwarded-For ...)."""

    def __init__(self, base: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(base)
        self.headers = headers or {}

    def request(self, path: str, data: dict[str, str] | None = None,
                method: str | None = None) -> tuple[int, str, str]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        req = urllib.request.Request(  # noqa: S310 - the app under test
            urllib.parse.urljoin(self.base, path), data=body, method=method)
        for k, v in self.headers.items():
            req.add_header(k, v)
        if data is not None:
            # As a browser behind the TLS-terminating proxy would send it.
            proto = self.headers.get("X-Forwarded-Proto", "http")
            req.add_header("Referer", proto + self.base[self.base.index(":"):])
        try:
            with self.opener.open(req, timeout=60) as r:
                return r.status, r.headers.get("Location", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Location", ""), e.read().decode(errors="replace")

    def try_login(self, user: str, password: str = PASSWORD) -> tuple[int, str, str]:
        self.request("login/")
        return self.request("login/", {"csrfmiddlewaretoken": self.csrf(), "username": user,
                                       "password": password})


@dataclass
class App:
    url: str
    config: Path
    backend: Backend
    state_dir: Path
    log: Path
    proc: Proc | None
    seq: list[int]

    def session(self, user: str | None = None, headers: dict[str, str] | None = None
                ) -> Session:
        s = Session(self.url, headers)
        if user:
            s.login(user)
        return s

    def tick(self, now: datetime) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config",
                               str(self.config), "tick", "--now", now.isoformat()],
                              capture_output=True, text=True, timeout=120, check=False)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return query(self.backend, sql, params)

    def ingest(self, msgs: list[tuple[str, bytes]], *, quarantine: bool = False) -> None:
        items = [classify(t, p) for t, p in msgs]
        assert all(i is not None for i in items)
        assert all((i.kind == "quarantine") == quarantine for i in items if i), \
            [i.kind for i in items if i]
        db = self.backend.open()
        try:
            store.ingest(db, [i for i in items if i is not None])
        finally:
            db.close()

    def answer(self, *, phone: str = PHONE, comment: str = COMMENT, lang: str = "en",
               q1: str = "no") -> int:
        """A callback answer stored; its case opened (the queue's sync); the case id."""
        self.seq[0] += 1
        self.ingest([answer_message(self.seq[0], phone=phone, comment=comment, lang=lang,
                                    q1=q1)])
        before = {r[0] for r in self.query("SELECT id FROM feedback_case")}
        qm = self.session("quality")
        assert qm.request("cases/")[0] == 200
        new = {r[0] for r in self.query("SELECT id FROM feedback_case")} - before
        assert len(new) == 1, new
        return int(new.pop())


def _config(path: Path, backend: Backend, *, smtp: SmtpSink | None, behind_proxy: bool,
            erase_after_days: int) -> Path:
    smtp_toml = "" if smtp is None else (
        f'\n[web.smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nsecurity = "none"\n'
        'from = "Quality team <quality-team@clinic.example>"\n')
    path.write_text(
        f'id = "central-1"\n\n[broker]\nhost = "127.0.0.1"\n\n{backend.toml()}\n'
        '[reports]\ntz = "Europe/Berlin"\n\n'
        f'[web]\nstate_dir = "{path.parent}"\nbase_url = "http://127.0.0.1"\n'
        f"erase_after_days = {erase_after_days}\n"
        f"behind_proxy = {'true' if behind_proxy else 'false'}\n\n"
        f"[web.limits]\nnew = 1\n{smtp_toml}")
    return path


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., App]]:
    started: list[Proc] = []

    def make(backend: Backend | None = None, *, smtp: SmtpSink | None = None,
             behind_proxy: bool = False, erase_after_days: int = 30,
             serve: bool = True) -> App:
        backend = backend or Backend("sqlite", tmp_path, None)
        cfg = _config(tmp_path / "collector.toml", backend, smtp=smtp,
                      behind_proxy=behind_proxy, erase_after_days=erase_after_days)
        web_cli(cfg, "migrate")
        for name, (role, mail) in USERS.items():
            web_cli(cfg, "adduser", name, "--role", role, "--email", mail, "--language", "en",
                    stdin=PASSWORD + "\n")
        log = tmp_path / "web.log"
        if not serve:
            return App("", cfg, backend, tmp_path, log, None, [0])
        proc = Proc(["collector.cli", "web", "--config", str(cfg), "serve", "--bind",
                     "127.0.0.1:0", "--tick-s", "3600"], log).start()
        started.append(proc)

        return App(served_url(proc, log), cfg, backend, tmp_path, log, proc, [0])

    yield make
    for p in started:
        p.kill()


def _to_status(s: Session, case: int, *statuses: str, outcome: str = OUTCOME) -> None:
    for st in statuses:
        status, location, _ = s.post(f"cases/{case}/status/", {"status": st, "outcome": outcome})
        assert (status, location) == (302, f"/cases/{case}/"), (st, status)


def _assign(app: App, case: int, who: str) -> None:
    ((uid,),) = app.query("SELECT id FROM feedback_user WHERE username = ?", (who,))
    qm = app.session("quality")
    assert qm.post(f"cases/{case}/assign/", {"assignee": str(uid)})[0] == 302


def _all_text_in_database(app: App) -> dict[str, str]:
    """table -> every row of it as text (SQLite): to search for values."""
    db = app.backend.open()
    try:
        tables = [r[0] for r in db.query(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        out = {}
        for t in tables:
            rows = db.query(f'SELECT * FROM "{t}"')  # noqa: S608 - names from sqlite_master
            out[t] = "\n".join(repr(r) + "".join(
                v.decode("utf-8", "replace") for v in r if isinstance(v, bytes)) for r in rows)
        return out
    finally:
        db.close()


# == 1. Erasure completeness =================================================================

def test_without_smtp_no_file_keeps_the_patients_email(
        make_app: Callable[..., App]) -> None:
    """Without [web.smtp] mail goes to state_dir/outgoing-mail/ (README: "never lost").
    The resolution e-mail's file keeps the patient's address after the case's erasure."""
    app = make_app(smtp=None)
    case = app.answer()
    qm = app.session("quality")
    assert qm.post(f"cases/{case}/email/", {"email": PATIENT_EMAIL, "lang": "en"})[0] == 302
    _to_status(qm, case, "in_progress", "resolved", "closed")
    r = app.tick(datetime.now(UTC) + timedelta(days=31))
    assert r.returncode == 0, r.stderr[-500:]
    assert "cases erased 1" in r.stdout, r.stdout
    assert app.query("SELECT erased_at IS NOT NULL FROM feedback_case WHERE id = ?",
                     (case,)) == [(1,)]
    found = {p.name: _leaked(p.read_bytes(), {"patient e-mail": PATIENT_EMAIL})
             for p in (app.state_dir / "outgoing-mail").glob("*")}
    found = {k: v for k, v in found.items() if v}
    assert not found, f"after erasure, outgoing-mail files still hold the patient e-mail: " \
                      f"{sorted(found)}"


def test_a_quarantined_answers_phone_and_comment_are_erased_in_time(
        make_app: Callable[..., App]) -> None:
    """An answer with Q1 "no" and a phone whose comment is 501 characters fails the
    event schema: it is quarantined whole (raw payload).  No case is ever opened (the
    patient is never called back) and no tick ever erases its phone or comment."""
    app = make_app(smtp=None)
    topic, payload = answer_message(1, phone=PHONE, comment=COMMENT)
    body = json.loads(payload)
    body["answer"]["comment"] = COMMENT + " " + "x" * 480  # 501+ characters
    app.ingest([(topic, json.dumps(body).encode())], quarantine=True)
    qm = app.session("quality")
    qm.request("cases/")
    for days in (31, 400, 3000):
        assert app.tick(datetime.now(UTC) + timedelta(days=days)).returncode == 0
    kept = app.query("SELECT payload FROM quarantine")
    assert kept, "the answer was not quarantined"
    leaked = sorted({n for (p,) in kept for n in _leaked(bytes(p))})
    cases = app.query("SELECT count(*) FROM feedback_case")[0][0]
    assert not leaked, (f"years later the quarantine table still holds the {leaked}; "
                        f"cases opened for this callback request: {cases}")


def test_erased_phone_and_comment_are_not_left_in_the_sqlite_files(
        make_app: Callable[..., App]) -> None:
    """After erasure the rows say NULL, but the SQLite file (free space of the
    rewritten page) or its WAL still hold the old bytes: no secure_delete, no VACUUM."""
    app = make_app(smtp=None)
    case = app.answer()
    qm = app.session("quality")
    _to_status(qm, case, "in_progress", "resolved", "closed")
    assert "cases erased 1" in app.tick(datetime.now(UTC) + timedelta(days=31)).stdout
    assert app.query("SELECT phone, comment FROM events WHERE kind = 'answer'") == \
        [(None, None)]
    assert app.backend.path is not None
    files = list(app.backend.path.parent.glob(app.backend.path.name + "*"))
    found = {p.name: _leaked(p.read_bytes(), {"phone": PHONE, "comment": COMMENT})
             for p in files}
    found = {k: v for k, v in found.items() if v}
    assert not found, f"erased values still readable in the database files: {found}"


def test_no_table_keeps_a_closed_cases_personal_data_after_erasure(
        make_app: Callable[..., App], faulty_smtp: Callable[..., SmtpSink]) -> None:
    """Every table, every row, after a full case (e-mail noted, resolved with a mail,
    closed, erased): events, callbacks, sessions, axes, audit, notes ... (logical)."""
    smtp = faulty_smtp()
    app = make_app(smtp=smtp)
    case = app.answer()
    _assign(app, case, "officer")
    off = app.session("officer")
    assert off.request(f"cases/{case}/")[0] == 200
    assert off.post(f"cases/{case}/email/", {"email": PATIENT_EMAIL, "lang": "en"})[0] == 302
    assert off.post(f"cases/{case}/note/", {"text": "called, 5 min", "minutes": "5"})[0] == 302
    _to_status(off, case, "in_progress", "resolved", "closed")
    assert len(smtp.to(PATIENT_EMAIL)) == 1
    assert "cases erased 1" in app.tick(datetime.now(UTC) + timedelta(days=31)).stdout
    hits = {t: _leaked(text) for t, text in _all_text_in_database(app).items()}
    hits = {t: v for t, v in hits.items() if v}
    assert not hits, f"after erasure these tables still hold personal data: {hits}"


def test_a_case_left_at_could_not_reach_is_erased_in_time(
        make_app: Callable[..., App]) -> None:
    """"Could not reach" has no time limit and is not "closed": a case nobody closes
    keeps its phone and comment for ever, and no warning ever reminds anyone."""
    app = make_app(smtp=None)
    case = app.answer()
    _to_status(app.session("quality"), case, "unreachable")
    r = app.tick(datetime.now(UTC) + timedelta(days=3 * 365))
    assert r.returncode == 0
    assert "warnings sent 0" in r.stdout
    ((phone,),) = app.query("SELECT phone FROM events WHERE kind = 'answer'")
    erased = phone is None
    assert erased, "3 years after 'could not reach' the phone is still stored"


# == 2. Time-limit warnings =================================================================

def test_one_refused_recipient_does_not_repeat_the_warning_to_the_others(
        make_app: Callable[..., App], faulty_smtp: Callable[..., SmtpSink]) -> None:
    """The assignee's address is refused by the SMTP server (a typo in their profile):
    check_limits does not mark the case, so every tick (every minute in `serve`) sends
    the quality manager the same warning again, for ever."""
    smtp = faulty_smtp(refuse={"officer@clinic.example"})
    app = make_app(smtp=smtp)
    case = app.answer()
    _assign(app, case, "officer")
    later = datetime.now(UTC) + timedelta(hours=2)
    for minute in range(3):
        assert app.tick(later + timedelta(minutes=minute)).returncode == 0
    got = len(smtp.to("quality@clinic.example"))
    assert got == 1, f"the quality manager got the same time-limit warning {got} times"


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_two_ticks_at_once_send_the_warning_once(
        kind: str, make_app: Callable[..., App], faulty_smtp: Callable[..., SmtpSink],
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Two app instances (or `serve`'s own tick and the systemd timer's) tick at the
    same minute: nothing locks the late cases, both send.  The SMTP server holds the
    first message until the second arrives (at most 10 s), so the overlap is certain."""
    pg = request.getfixturevalue("postgres") if kind == "postgres" else None
    smtp = faulty_smtp(hold_s=10)
    app = make_app(Backend(kind, tmp_path, pg), smtp=smtp, serve=False)
    app.ingest([answer_message(1, phone=PHONE, comment=COMMENT)])
    now = datetime.now(UTC)
    assert "cases opened 1" in app.tick(now).stdout
    later = (now + timedelta(hours=2)).isoformat()
    cmd = [sys.executable, "-m", "collector.cli", "web", "--config", str(app.config), "tick",
           "--now", later]
    ticks = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for t in ticks:
        t.communicate(timeout=120)
        assert t.returncode == 0
    got = len(smtp.to("quality@clinic.example"))
    assert got == 1, f"two simultaneous ticks sent the time-limit warning {got} times"


# == 3. Malformed but valid e-mail addresses ===============================================

# A quoted local part may hold \x0b (vertical tab): Django's EmailField accepts it, and
# Python's email package treats it as a line break when writing the header.
CONTROL_EMAIL = '"p\x0bX-Injected:1"@mail.example'


def test_an_address_the_mail_library_refuses_is_refused_and_never_stops_a_tick(
        make_app: Callable[..., App], faulty_smtp: Callable[..., SmtpSink]) -> None:
    """/me/ refuses an address with a control character (Django's EmailField alone
    accepts it; Python's e-mail package refuses the header with a non-OSError).  One
    already stored (older data, a database edit) makes check_limits skip that colleague:
    the tick goes on to erase what is due."""
    smtp = faulty_smtp()
    app = make_app(smtp=smtp)
    old = app.answer()
    qm = app.session("quality")
    _to_status(qm, old, "in_progress", "resolved", "closed")
    app.answer()  # a second case, left new: late at the next tick
    status, _, _ = qm.post("me/", {"language": "en", "email": CONTROL_EMAIL})
    assert status == 200, "the profile form took an address the mail library refuses"
    app.query("UPDATE feedback_user SET email = ? WHERE username = 'quality'",
              (CONTROL_EMAIL,))
    r = app.tick(datetime.now(UTC) + timedelta(days=31))
    erased = app.query("SELECT erased_at IS NOT NULL FROM feedback_case WHERE id = ?", (old,))
    error = re.findall(r"^(\w+(?:\.\w+)*(?:Error|Exception)):", r.stderr, re.M)
    ok = r.returncode == 0 and erased == [(1,)]
    assert ok, (f"tick exited {r.returncode} ({error[-1:]}); the closed case erased: "
                f"{bool(erased and erased[0][0])}")


def test_a_patient_email_with_a_control_character_is_refused_and_never_logged(
        make_app: Callable[..., App], faulty_smtp: Callable[..., SmtpSink]) -> None:
    """Resolving a case whose noted e-mail holds \\x0b: the status is committed, the mail
    raises HeaderParseError (not OSError, so not caught), the page is a 500, and the
    server's error log line carries the patient's address."""
    smtp = faulty_smtp()
    app = make_app(smtp=smtp)
    case = app.answer()
    qm = app.session("quality")
    assert qm.post(f"cases/{case}/email/", {"email": CONTROL_EMAIL, "lang": "en"})[0] == 302
    _to_status(qm, case, "in_progress")
    status, _, _ = qm.post(f"cases/{case}/status/", {"status": "resolved", "outcome": OUTCOME})
    log = app.log.read_text(errors="replace")
    in_log = "p\\x0bX-Injected" in log or "X-Injected:1" in log
    ok = (status, in_log) == (302, False)
    assert ok, (
        f"resolving answered {status}; the patient e-mail in the server log: {in_log}")


# == 4. Roles ==================================================================================

def test_an_administrator_never_knows_the_password_of_an_account_they_make(
        make_app: Callable[..., App]) -> None:
    """The administrator's role is "users, reports", never a phone.  /users/ makes an
    account of any role, but without a password: its owner sets one from an e-mailed
    link, so the administrator cannot log in as a quality manager they made."""
    app = make_app(smtp=None)
    case = app.answer()
    admin = app.session("admin")
    status, _, _ = admin.post("users/", {
        "username": "shadow", "email": "shadow@clinic.example", "role": "quality_manager",
        "language": "en", "password1": "Zt7-long-password-xx",
        "password2": "Zt7-long-password-xx"})
    assert status == 302
    assert app.query("SELECT password LIKE '!%' FROM feedback_user "
                     "WHERE username = 'shadow'") == [(1,)], "the account got a password"
    shadow = app.session()
    assert shadow.try_login("shadow", "Zt7-long-password-xx")[0] != 302
    assert shadow.try_login("shadow", "")[0] != 302
    status, _, body = admin.request(f"cases/{case}/")
    assert status == 403
    assert not _leaked(body)


def test_roles_and_urls_hold(make_app: Callable[..., App]) -> None:
    """Held: clinic manager and the other officer get nothing by URL, method, parameter,
    fragment or error page; no CSRF-less POST works; no open redirect on login."""
    app = make_app(smtp=None)
    case = app.answer()
    _assign(app, case, "officer")
    cm, other, off = app.session("manager"), app.session("officer2"), app.session("officer")
    for who, s in (("manager", cm), ("officer2", other)):
        for path in (f"cases/{case}/", f"cases/{case}/?show=all", "cases/rows/?show=all",
                     "cases/?show=all", f"cases/{case}/status/", f"cases/{case}/phone/",
                     "audit/", "reports/", "reports/doctors/", "reports/fleet/",
                     f"cases/{case + 1000}/", "nope/", f"cases/{case}/../{case}/"):
            for method in ("GET", "HEAD", "OPTIONS"):
                status, _, body = s.request(path, method=method)
                names = _leaked(body)
                assert names == [], (who, path, method, names)
        for action in ("status", "note", "email", "assign"):
            status, _, body = s.post(f"cases/{case}/{action}/", {
                "status": "in_progress", "text": "x", "minutes": "1",
                "email": "x@mail.example", "lang": "en", "assignee": ""})
            names = _leaked(body)
            assert (status, names) == (403, []), (who, action, status, names)
    # The officer's own rows fragment holds no phone; the officer cannot assign.
    names = _leaked(off.request("cases/rows/?show=all")[2])
    assert names == [], names
    ((uid,),) = app.query("SELECT id FROM feedback_user WHERE username = 'officer'")
    assert off.post(f"cases/{case}/assign/", {"assignee": str(uid)})[0] == 403
    # /me/ with a role field: the profile form has no role, so nothing changes.
    cm.post("me/", {"language": "en", "email": "m@clinic.example", "role": "quality_manager",
                    "is_staff": "on", "is_superuser": "on"})
    assert app.query("SELECT role, is_superuser FROM feedback_user WHERE username = "
                     "'manager'") == [("clinic_manager", 0)]
    # CSRF: a POST without the token (session cookie only) is refused.
    status, _, _ = off.request(f"cases/{case}/status/", {"status": "in_progress"})
    assert status == 403
    # Crafted transitions: new -> closed, new -> resolved without an outcome.
    qm = app.session("quality")
    for data in ({"status": "closed"}, {"status": "resolved", "outcome": "x"},
                 {"status": "bogus"}):
        qm.post(f"cases/{case}/status/", data)
    assert app.query("SELECT status FROM feedback_case WHERE id = ?", (case,)) == [("new",)]
    # Login next=: only local paths.
    for nxt in ("//evil.example/", "https://evil.example/", "/\\evil.example",
                "\\\\evil.example", "http:/evil.example", " //evil.example"):
        s = app.session()
        s.request("login/?" + urllib.parse.urlencode({"next": nxt}))
        status, location, _ = s.request("login/", {
            "csrfmiddlewaretoken": s.csrf(), "username": "quality", "password": PASSWORD,
            "next": nxt})
        assert status == 302, (nxt, location)
        assert "evil" not in location, (nxt, location)


# == 5. Login throttling =======================================================================

def test_behind_the_proxy_a_lockout_is_per_client_address(
        make_app: Callable[..., App]) -> None:
    """behind_proxy = true: axes reads REMOTE_ADDR only (no django-ipware, no
    AXES_IPWARE_* settings), which is the proxy's.  The README's "that pair" is the user
    name alone: anyone on the internet locks out any user by name with 5 tries."""
    app = make_app(smtp=None, behind_proxy=True)
    attacker = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    victim = {"X-Forwarded-For": "198.51.100.20", "X-Forwarded-Proto": "https"}
    for _ in range(5):
        app.session(headers=attacker).try_login("quality", "wrong-password")
    status, _, _ = app.session(headers=victim).try_login("quality")
    assert status == 302, "the real user, from another client address, is locked out"
    status, _, _ = app.session(headers=attacker).try_login("quality")
    assert status == 429, "the address that guessed 5 times is not locked out"


def test_login_throttle_is_not_bypassed_by_name_variants_or_forwarded_for(
        make_app: Callable[..., App]) -> None:
    """Held: whitespace/case variants of the user name and X-Forwarded-For (without
    behind_proxy) neither reset nor escape the lockout."""
    app = make_app(smtp=None)
    variants = ["officer", " officer", "officer ", "\tofficer", "OFFICER", "Officer",
                "\uff4ffficer"]
    for i, name in enumerate(variants):
        app.session(headers={"X-Forwarded-For": f"203.0.113.{i + 1}"}).try_login(
            name, "wrong-password")
    for name in ("officer", " officer", "\uff4ffficer"):
        status, _, _ = app.session(headers={"X-Forwarded-For": "198.51.100.1"}).try_login(
            name, PASSWORD)
        assert status != 302, f"{name!r} logged in after {len(variants)} failures"


# == 6. Logs ===================================================================================

@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_no_personal_data_in_the_servers_or_collectors_logs(
        webapp: Any, tmp_path: Path) -> None:
    """A whole case through the real broker and collector: view, e-mail noted, note,
    resolved (mail sent), a wrong login, a 404 with the phone in the path and query,
    closed, erased.  Held if neither web.log nor collector.log has a value."""
    from tests.test_collector import publish_all

    app = webapp
    publish_all(app.broker, [answer_message(1, phone=PHONE, comment=COMMENT)])
    qm = Session(app.url)
    qm.login("quality")
    wait_for(lambda: qm.request("cases/")[0] == 200
             and app.query("SELECT id FROM feedback_case"), 30, "the case")
    ((case,),) = app.query("SELECT id FROM feedback_case")
    assert qm.request(f"cases/{case}/")[0] == 200
    assert qm.post(f"cases/{case}/email/", {"email": PATIENT_EMAIL, "lang": "en"})[0] == 302
    assert qm.post(f"cases/{case}/note/", {"text": "ok", "minutes": "3"})[0] == 302
    _to_status(qm, case, "in_progress", "resolved")
    qm.request("cases/" + urllib.parse.quote(PHONE) + "/?q=" + urllib.parse.quote(COMMENT))
    Session(app.url).try_login(PATIENT_EMAIL, "wrong-password")
    _to_status(qm, case, "closed")
    app.tick(datetime.now(UTC) + timedelta(days=31))
    assert {"web.log", "collector.log"} <= {p.name for p in tmp_path.glob("*.log")}
    logs = {p.name: _leaked(p.read_text(errors="replace")) for p in tmp_path.glob("*.log")}
    logs = {k: v for k, v in logs.items() if v}
    assert logs == {}, f"personal data in logs: {logs}"


# == 7. The audit's append-only claim ========================================================

def test_the_audit_is_append_only_in_the_database_too(make_app: Callable[..., App]) -> None:
    """AuditEntry refuses save() of an existing row and delete() of one instance, but
    QuerySet.update()/delete() and deleting a Case (on_delete=SET_NULL rewrites audit
    rows) go straight to SQL; the database itself (same account as the app) allows
    UPDATE and DELETE on feedback_auditentry."""
    app = make_app(smtp=None)
    case = app.answer()
    assert app.session("quality").request(f"cases/{case}/")[0] == 200
    code = ("import json, pathlib, sys\n"
            "from collector.web.cli import _setup\n"
            "_setup(pathlib.Path(sys.argv[1]))\n"
            "from collector.web.models import AuditEntry, Case\n"
            "out = {}\n"
            "out['update'] = AuditEntry.objects.filter(action='phone_viewed')"
            ".update(detail='rewritten')\n"
            "Case.objects.filter(pk=int(sys.argv[2])).delete()\n"
            "out['case_nulled'] = AuditEntry.objects.filter(case__isnull=True).count()\n"
            "out['delete'] = AuditEntry.objects.all().delete()[0]\n"
            "print(json.dumps(out))\n")
    r = subprocess.run([sys.executable, "-c", code, str(app.config), str(case)],
                       capture_output=True, text=True, timeout=120, check=False)
    done = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-300:]}
    assert done.get("update", 0) == 0, f"audit rows rewritten through the ORM: {done}"
    assert done.get("delete", 0) == 0, f"audit rows deleted through the ORM: {done}"
