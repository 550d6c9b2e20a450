"""Fixtures for the web app's browser tests: a real SMTP server (aiosmtpd), the
collector and `feedback-collector web serve` as real processes on the test's
database (SQLite or PostgreSQL), headless Chromium driven by Selenium through
Debian's chromedriver, and screenshots for docs/screenshots/.

Personal data in these tests is made up; it is never printed or logged here.
"""

from __future__ import annotations

import email
import email.policy
import http.cookiejar
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from edge.events import (
    DeviceRef,
    Event,
    EventTime,
    OperatorTag,
    SurveyAnswer,
    encode_event,
    new_event_id,
)
from tests.collector_fixtures import Backend
from tests.conftest import Broker, Proc, Subscriber, free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
# Screenshots go to a temporary directory, or, to refresh the ones the README
# shows, to docs/screenshots/ with FEEDBACK_SCREENSHOTS=docs/screenshots.
SCREENSHOTS = Path(os.environ.get("FEEDBACK_SCREENSHOTS") or
                   Path(tempfile.gettempdir()) / "feedback-web-screenshots")
if not SCREENSHOTS.is_absolute():
    SCREENSHOTS = REPO / SCREENSHOTS
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PASSWORD = "a-long-password"
SITE, EDGE = "clinic-3", "reception-1"

# name -> (role, e-mail, language)
USERS: dict[str, tuple[str, str, str]] = {
    "quality": ("quality_manager", "quality@clinic.example", "en"),
    "officer": ("callback_officer", "officer@clinic.example", "en"),
    "manager": ("clinic_manager", "manager@clinic.example", "en"),
    "admin": ("administrator", "admin@clinic.example", "en"),
}


# -- SMTP -----------------------------------------------------------------------------

class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        with self.sink.lock:
            self.sink.messages.append(Mail(list(envelope.rcpt_tos), msg))
        return "250 OK"


@dataclass
class Mail:
    to: list[str]
    msg: EmailMessage

    @property
    def subject(self) -> str:
        return str(self.msg["Subject"])

    @property
    def body(self) -> str:
        part = self.msg.get_body(("plain",))
        assert part is not None
        return str(part.get_content())


@dataclass
class SmtpSink:
    """A real SMTP server (aiosmtpd) on a free port that keeps what it receives."""

    port: int = 0
    messages: list[Mail] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def to(self, address: str) -> list[Mail]:
        with self.lock:
            return [m for m in self.messages if address in m.to]

    def count(self) -> int:
        with self.lock:
            return len(self.messages)


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    from aiosmtpd.controller import Controller

    sink = SmtpSink(port=free_port())
    controller = Controller(_Handler(sink), hostname="127.0.0.1", port=sink.port)
    controller.start()
    yield sink
    controller.stop()


# -- the app ----------------------------------------------------------------------------

@dataclass
class WebApp:
    url: str  # ends with "/"
    config: Path
    backend: Backend
    broker: Broker
    smtp: SmtpSink
    erase_after_days: int
    proc: Proc

    def cli(self, *args: str) -> str:
        """`feedback-collector web --config ... ARGS`; its standard output."""
        return web_cli(self.config, *args)

    def tick(self, now: datetime) -> str:
        return self.cli("tick", "--now", now.isoformat())

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return query(self.backend, sql, params)


def query(backend: Backend, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Rows of `sql` on the test's database (its own connection, closed after)."""
    db = backend.open()
    try:
        return db.query(sql, params)
    finally:
        db.close()


def web_cli(config: Path, *args: str, stdin: str | None = None) -> str:
    r = subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config", str(config),
                        *args], input=stdin, capture_output=True, text=True, check=False,
                       timeout=120)
    if r.returncode != 0:
        raise AssertionError(f"web {args[0]} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r.stdout


def web_config(path: Path, broker: Broker, backend: Backend, smtp: SmtpSink, *,
               erase_after_days: int = 30) -> Path:
    path.write_text(
        f'id = "central-1"\n\n[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        f"reconnect_min_s = 0.1\nreconnect_max_s = 1\n\n{backend.toml()}\n"
        '[reports]\ntz = "Europe/Berlin"\n\n'
        f'[web]\nstate_dir = "{path.parent}"\nbase_url = "http://127.0.0.1"\n'
        f"erase_after_days = {erase_after_days}\n\n"
        "[web.limits]\nnew = 1\n\n"
        f'[web.smtp]\nhost = "127.0.0.1"\nport = {smtp.port}\nsecurity = "none"\n'
        'from = "Quality team <quality-team@clinic.example>"\n')
    return path


@pytest.fixture
def webapp(tmp_path: Path, broker: Broker, backend: Backend, smtp: SmtpSink,
           procs: Callable[[list[str], Path], Proc],
           subscribe: Callable[[str], Subscriber]) -> WebApp:
    """collector.toml with [web] and [web.smtp]; migrated; a user of each role; the
    collector (`run`) and the app (`web serve`) running on the same database."""
    cfg = web_config(tmp_path / "collector.toml", broker, backend, smtp)
    web_cli(cfg, "migrate")
    for name, (role, mail, lang) in USERS.items():
        web_cli(cfg, "adduser", name, "--role", role, "--email", mail, "--language", lang,
                stdin=PASSWORD + "\n")
    states = subscribe("feedback/v1/collector/state")
    procs(["collector.cli", "run", "--config", str(cfg)], tmp_path / "collector.log")
    # Subscribed (persistent session) before anything is published to it.
    wait_for(lambda: any(m.json().get("state") == "online" for m in states.snapshot()), 30,
             "the collector online")
    log = tmp_path / "web.log"
    proc = procs(["collector.cli", "web", "--config", str(cfg), "serve", "--bind",
                  "127.0.0.1:0", "--tick-s", "3600"], log)

    return WebApp(served_url(proc, log), cfg, backend, broker, smtp, 30, proc)


def served_url(proc: Proc, log: Path, timeout: float = 60) -> str:
    """The URL a `feedback-collector web serve` process prints once it listens."""
    def served() -> str | None:
        if proc.proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"web serve exited ({proc.proc.returncode}): "
                                 f"{proc.log()[-2000:]}")
        m = re.search(r"^feedback-collector web: (http://\S+/)$",
                      log.read_text(errors="replace") if log.exists() else "", re.M)
        return m.group(1) if m else None

    url: str = wait_for(served, timeout, "the web app's URL")
    return url


# -- answers from a survey terminal, through the broker --------------------------------

def answer_message(seq: int, *, phone: str, comment: str, lang: str = "en", q1: str = "no",
                   doctor: str = "dr-petrov", wall: datetime | None = None,
                   record_id: int = 1) -> tuple[str, bytes]:
    """(topic, payload) of a survey answer as the daemon publishes it."""
    wall_ns = int((wall or datetime.now(UTC)).timestamp() * 1e9)
    ev = Event(new_event_id(), "office-12", DeviceRef("st3-a", "terminal", "00C0FFEE0001"),
               SurveyAnswer(record_id, doctor, q1, "yes", phone, comment, lang),
               OperatorTag(None, "none"), EventTime(wall_ns, True, "boot-a", seq * 10**9))
    return (f"feedback/v1/{SITE}/{EDGE}/event/st3-a", encode_event(ev, seq, SITE, EDGE))


# -- plain HTTP with a session (for status codes, which Selenium does not give) ---------

class HttpSession:
    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                  _NoRedirect())

    def request(self, path: str, data: Mapping[str, str | list[str]] | None = None
                ) -> tuple[int, str, str]:
        """(status, Location header, body) of GET (or POST with `data`: a list is a
        field given several times, as checkboxes are) `path`."""
        body = urllib.parse.urlencode(data, doseq=True).encode() if data is not None else None
        req = urllib.request.Request(  # noqa: S310 - http:// to the app under test
            urllib.parse.urljoin(self.base, path), data=body)
        if data is not None:
            req.add_header("Referer", self.base)
        try:
            with self.opener.open(req, timeout=30) as r:
                return r.status, r.headers.get("Location", ""), r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("Location", ""), e.read().decode(errors="replace")

    def csrf(self) -> str:
        return next(c.value for c in self.jar if c.name == "csrftoken" and c.value)

    def post(self, path: str, data: Mapping[str, str | list[str]]) -> tuple[int, str, str]:
        """A form's POST, with the session's CSRF token."""
        return self.request(path, {"csrfmiddlewaretoken": self.csrf(), **data})

    def login(self, user: str, password: str = PASSWORD) -> None:
        self.request("login/")
        status, _, _ = self.request("login/", {
            "csrfmiddlewaretoken": self.csrf(), "username": user, "password": password})
        assert status == 302, f"logging in as {user}: {status}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# -- the browser ------------------------------------------------------------------------

@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """browser(): a new headless Chromium (its own profile: its own session)."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing (Debian packages chromium and "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    drivers: list[Any] = []

    def make() -> Any:
        opts = webdriver.ChromeOptions()
        opts.binary_location = str(CHROMIUM)
        profile = tmp_path / f"chromium-{len(drivers)}"
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                    "--window-size=1280,900", "--lang=en-US"):
            opts.add_argument(arg)
        d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
        d.set_page_load_timeout(60)
        drivers.append(d)
        return d

    yield make
    for d in drivers:
        d.quit()


def login(driver: Any, base: str, user: str, password: str = PASSWORD) -> None:
    """Fill in and send the login form (the caller checks where it landed)."""
    from selenium.webdriver.common.by import By

    driver.get(urllib.parse.urljoin(base, "login/"))
    driver.find_element(By.NAME, "username").send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(password)
    leave_page(driver, lambda: driver.find_element(
        By.CSS_SELECTOR, "form button[type=submit]").click())


def leave_page(driver: Any, action: Callable[[], object], timeout: float = 30) -> None:
    """Do `action` (a click that loads another page) and wait until that page has loaded.
    The page is marked first: a new document has no mark."""
    from selenium.common.exceptions import WebDriverException

    driver.execute_script("window.leavingThisPage = true")
    action()

    def loaded() -> bool:
        try:
            return bool(driver.execute_script(
                "return !window.leavingThisPage && document.readyState === 'complete'"))
        except WebDriverException:  # the old document went away during the call
            return False

    wait_for(loaded, timeout, "the next page", interval=0.05)


def path_of(driver: Any) -> str:
    return str(urllib.parse.urlsplit(driver.current_url).path)


def screenshot(driver: Any, name: str, scroll_to: str | None = None) -> list[Path]:
    """Save the current page at 1280x900 and at 390x844 (a phone) as
    <SCREENSHOTS>/<name>-1280.png and -390.png, scrolled to the element with id
    `scroll_to` if given; the window is restored after."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    saved = []
    for width, height, mobile in ((1280, 900, False), (390, 844, True)):
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
        if scroll_to:
            driver.execute_script("document.getElementById(arguments[0]).scrollIntoView()",
                                  scroll_to)
        # Layout settles on the next frame after the resize.
        driver.execute_async_script(
            "var done = arguments[arguments.length - 1];"
            "requestAnimationFrame(function () { requestAnimationFrame(done); });")
        path = SCREENSHOTS / f"{name}-{width}.png"
        assert driver.save_screenshot(str(path)), f"screenshot {path}"
        # Nothing wider than the screen: wide tables scroll inside their own box.
        page_width = driver.execute_script("return document.documentElement.scrollWidth")
        assert page_width <= width, f"{name} at {width} px is {page_width} px wide ({path})"
        saved.append(path)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    return saved


def url_patterns(config: Path) -> list[tuple[str, str]]:
    """(name, route) of every URL in the app's urlconf, read by Django itself."""
    # Included urlconfs (the alerts app's) are walked, their prefixes joined.
    code = ("import json, pathlib, sys\n"
            "from collector.web.cli import _setup\n"
            "_setup(pathlib.Path(sys.argv[1]))\n"
            "from django.urls import URLResolver\n"
            "from collector.web.urls import urlpatterns\n"
            "def walk(ps, prefix):\n"
            "    for p in ps:\n"
            "        if isinstance(p, URLResolver):\n"
            "            yield from walk(p.url_patterns, prefix + str(p.pattern))\n"
            "        else:\n"
            "            yield (p.name, prefix + str(p.pattern))\n"
            "print(json.dumps(list(walk(urlpatterns, ''))))\n")
    r = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True,
                       text=True, check=True, timeout=60)
    return [(str(n), str(p)) for n, p in json.loads(r.stdout)]
