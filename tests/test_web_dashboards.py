"""The dashboards: the web app's figures are `feedback-collector report`'s, on the
same database (SQLite and PostgreSQL), and a clinic manager sees reports only.

Each test runs the app as `feedback-collector web serve` on a free port (Django
can be set up once per process, and these tests use two databases) and reads
its pages over HTTP with a logged-in session, as a browser does."""

from __future__ import annotations

import csv
import http.cookiejar
import io
import json
import random
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from collector import queries, reports, store
from collector.intake import classify
from collector.store import Item
from edge.events import (
    DeviceRef,
    Event,
    EventTime,
    OperatorTag,
    Presence,
    SurveyAnswer,
    encode_event,
    new_event_id,
)
from tests.collector_fixtures import Backend, press_event
from tests.conftest import wait_for
from tests.web_fixtures import browser, leave_page, login, path_of, screenshot

__all__ = ["browser"]  # a fixture, used by name

TZ = "Europe/Berlin"
PASSWORD = "correct-horse-battery"
PHONES = ("+4917612345678", "015112345678")
COMMENTS = ("Rude at the desk, call me ZXQ-COMMENT", "nobody listened ZXQ-SECOND")


# -- events, through the collector's own intake path -----------------------------------------

def answer_event(seq: int, *, doctor: str, q1: str, wall_ns: int, phone: str | None = None,
                 comment: str | None = None, device: str = "st-1") -> tuple[str, bytes]:
    ev = Event(new_event_id(), "office-12", DeviceRef(device, "terminal", "T-0001"),
               SurveyAnswer(seq, doctor, q1, None, phone, comment, "en"),
               OperatorTag.nobody(), EventTime(wall_ns, True, "boot-t", seq * 10**9))
    return (f"feedback/v1/clinic-3/office-1/event/{device}",
            encode_event(ev, seq, "clinic-3", "office-1"))


def presence_event(seq: int, *, approaches: int, wall_ns: int,
                   device: str = "st-1") -> tuple[str, bytes]:
    ev = Event(new_event_id(), "office-12", DeviceRef(device, "terminal", "T-0001"),
               Presence(seq, approaches, approaches, 3_600_000),
               OperatorTag.nobody(), EventTime(wall_ns, True, "boot-t", seq * 10**9))
    return (f"feedback/v1/clinic-3/office-1/event/{device}",
            encode_event(ev, seq, "clinic-3", "office-1"))


def ingest(backend: Backend, msgs: list[tuple[str, bytes]]) -> None:
    items = [classify(t, p) for t, p in msgs]
    assert all(isinstance(i, Item) and i.kind != "quarantine" for i in items), items
    db = backend.open()
    try:
        result = store.ingest(db, [i for i in items if i is not None])
        assert result.quarantined == 0
    finally:
        db.close()


def _ns(day: date, hour: int, minute: int) -> int:
    local = datetime(day.year, day.month, day.day, hour, minute, tzinfo=ZoneInfo(TZ))
    return int(local.timestamp()) * 10**9


def sample_data(backend: Backend, today: date) -> None:
    """Six weeks of presses at two sites, answers with phones and comments,
    presence counts, a visits import, and an edge's status and health."""
    rnd = random.Random(18)
    msgs: list[tuple[str, bytes]] = []
    seqs = {"clinic-3": 0, "clinic-4": 0}
    scores = {"good": (0, 1), "neutral": (1, 0), "bad": (2, -1)}
    for back in range(42):
        day = today - timedelta(days=back)
        for _ in range(rnd.randint(0, 6)):
            site = rnd.choice(("clinic-3", "clinic-4"))
            seqs[site] += 1
            label = rnd.choice(("good", "good", "neutral", "bad"))
            button, score = scores[label]
            msgs.append(press_event(
                seqs[site], site=site, desk=rnd.choice(("desk-1", "desk-2")), label=label,
                score=score, button=button, operator=rnd.choice(("op-anna", "op-boris", None)),
                wall_ns=_ns(day, rnd.randint(7, 19), rnd.randint(0, 59)),
                flags=("burst",) if rnd.random() < 0.05 else ()))
    n = 0
    for back in range(0, 42, 2):
        day = today - timedelta(days=back)
        for doctor in ("dr-a", "dr-b", "dr-c"):
            n += 1
            q1 = rnd.choice(("yes", "yes", "unsure", "no"))
            callback = q1 == "no" and n % 2 == 0
            msgs.append(answer_event(
                n, doctor=doctor, q1=q1, wall_ns=_ns(day, 10, n % 60),
                phone=PHONES[n % 2] if callback else None,
                comment=COMMENTS[n % 2] if callback else None))
        n += 1
        msgs.append(presence_event(n, approaches=rnd.randint(3, 9),
                                   wall_ns=_ns(day, 18, 0)))
    # Two answers with a phone for certain, whatever the dice said.
    for phone, comment in zip(PHONES, COMMENTS, strict=True):
        n += 1
        msgs.append(answer_event(n, doctor="dr-a", q1="no", wall_ns=_ns(today, 9, n % 60),
                                 phone=phone, comment=comment))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    msgs.append(("feedback/v1/clinic-3/reception-1/status", json.dumps(
        {"state": "online", "since": now, "version": "0.1.0", "boot_id": "boot-a"}).encode()))
    msgs.append(("feedback/v1/clinic-3/reception-1/health", json.dumps(
        {"queue_depth": 3, "oldest_pending_age_s": 12.0, "store_bytes": 4096,
         "disk_free_bytes": 10**9, "drops": {}, "decode_errors": {}, "clock_synced": True,
         "uptime_s": 100.0, "alarms": ["device_missing: console fc3-a at desk desk-1"],
         "delivery": {"mode": "collector", "collector_online": True, "watermark": 1,
                      "resent": 0}}).encode()))
    ingest(backend, msgs)
    db = backend.open()
    try:
        monday = today - timedelta(days=today.weekday() + 7)
        queries.import_visits(db, [("dr-b", monday.isoformat(),
                                    (monday + timedelta(days=6)).isoformat(), 40)])
    finally:
        db.close()


# -- the app, served ---------------------------------------------------------------------------

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None


@dataclass
class Page:
    status: int
    body: str
    location: str = ""


class Session:
    """A browser's cookies, and requests that do not follow redirects."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())

    def request(self, path: str, data: dict[str, str] | None = None) -> Page:
        body = None if data is None else urllib.parse.urlencode(data).encode()
        try:
            with self.opener.open(self.base + path, body, timeout=60) as r:
                return Page(r.status, r.read().decode())
        except urllib.error.HTTPError as e:
            with e:
                return Page(e.code, e.read().decode(errors="replace"),
                            e.headers.get("Location", ""))

    def login(self, user: str) -> Session:
        assert self.request("/login/").status == 200
        token = next(c.value or "" for c in self.jar if c.name == "csrftoken")
        page = self.request("/login/", {"username": user, "password": PASSWORD,
                                        "csrfmiddlewaretoken": token})
        assert page.status == 302, page.body[-2000:]
        return self


def cli(cfg: Path, *args: str, stdin: str | None = None) -> str:
    r = subprocess.run([sys.executable, "-m", "collector.cli", *args, "--config", str(cfg)]
                       if args[0] != "web" else
                       [sys.executable, "-m", "collector.cli", "web", "--config", str(cfg),
                        *args[1:]],
                       input=stdin, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


@dataclass
class App:
    cfg: Path
    base: str

    def session(self, user: str | None = None) -> Session:
        s = Session(self.base)
        return s.login(user) if user else s


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """serve(backend): the collector's config for `backend`, the app's tables, one
    user per role, and `feedback-collector web serve` running on it."""
    started: list[subprocess.Popen[bytes]] = []

    def start(backend: Backend) -> App:
        cfg = tmp_path / "collector.toml"
        cfg.write_text(f'id = "c1"\n[broker]\nhost = "127.0.0.1"\n{backend.toml()}'
                       f'[reports]\ntz = "{TZ}"\n[web]\nstate_dir = "{tmp_path}"\n')
        cli(cfg, "web", "migrate")
        for role in ("quality_manager", "clinic_manager", "administrator",
                     "callback_officer"):
            cli(cfg, "web", "adduser", role.replace("_", "-"), "--role", role,
                stdin=PASSWORD + "\n")
        # Callback cases opened now, as the server's minute tick would.
        cli(cfg, "web", "tick")
        log = tmp_path / "web.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "collector.cli", "web", "--config", str(cfg), "serve",
                 "--bind", "127.0.0.1:0"], stdout=out, stderr=subprocess.STDOUT)
        started.append(proc)

        def url() -> str | None:
            assert proc.poll() is None, log.read_text()
            m = re.search(r"feedback-collector web: (http://\S+)/", log.read_text())
            return m.group(1) if m else None

        return App(cfg, wait_for(url, 60, "the web app listening"))

    yield start
    for p in started:
        p.kill()
        p.wait(15)


# -- reading pages ---------------------------------------------------------------------------

class _Tables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: list[list[str]] | None = None
        self._cell: list[str] | None = None
        self.ranges: list[str] = []
        self._range: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id"):
            self._table = self.tables.setdefault(str(a["id"]), [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []
        elif tag == "p" and a.get("class") == "dash-range":
            self._range = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self._table[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "p" and self._range is not None:
            self.ranges.append("".join(self._range).strip())
            self._range = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._range is not None:
            self._range.append(data)


def tables(html: str) -> _Tables:
    p = _Tables()
    p.feed(html)
    return p


def body_rows(t: _Tables, table: str, width: int | None = None) -> list[list[str]]:
    """A table's rows without its header, as the CSV writes them ('—' is no figure)."""
    rows = [["" if c == "—" else c for c in r] for r in t.tables[table][1:]]
    return [r[:width] for r in rows] if width else rows


def report_csv(cfg: Path, *args: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(cli(cfg, "report", *args, "--csv", "-"),
                                       newline="")))[1:]


def _today() -> date:
    return datetime.now(ZoneInfo(TZ)).date()


# -- tests -----------------------------------------------------------------------------------

def _row(day: str, hour: int, label: str, **kw: Any) -> dict[str, Any]:
    """A stored press as `queries.events` returns it (Berlin: UTC+1 in November)."""
    utc = datetime.fromisoformat(f"{day} {hour:02d}:30").replace(tzinfo=UTC) - \
        timedelta(hours=1)
    row = {"site": "clinic-3", "edge": "reception-1", "event_id": f"e{len(label)}{day}{hour}",
           "seq": kw.pop("seq"), "kind": "press", "desk": "desk-1", "device_id": "fc3-a",
           "operator_id": "op-1", "wall_ms": int(utc.timestamp() * 1000),
           "corrected_ms": None, "flags": "", "label": label, "score": None, "button": 0,
           "hold": False}
    row.update(kw)
    return row


def test_bad_presses_by_local_hour_and_weekday_worked_out_by_hand() -> None:
    rows = [
        # Monday 2026-11-23, 09:30 local: bad, good; 10:30: bad.
        _row("2026-11-23", 9, "bad", seq=1), _row("2026-11-23", 9, "good", seq=2),
        _row("2026-11-23", 10, "bad", seq=3),
        # Tuesday 09:30: neutral, and "1" on a five-point layout (bad).
        _row("2026-11-24", 9, "neutral", seq=4), _row("2026-11-24", 9, "1", score=1, seq=5),
        # Not counted: a HOLD, the PRESS before a test HOLD and the HOLD, a burst.
        _row("2026-11-24", 9, "bad", hold=True, seq=6),
        _row("2026-11-24", 11, "bad", button=2, seq=7),
        _row("2026-11-24", 11, "bad", button=2, hold=True, flags="test", seq=8),
        _row("2026-11-24", 12, "bad", flags="burst", seq=9),
        # Sunday 2026-11-29 at 00:30 local is 23:30 UTC on Saturday: Sunday's hour 0.
        _row("2026-11-29", 0, "bad", seq=10),
        # Outside the range asked for.
        _row("2026-11-30", 9, "bad", seq=11),
    ]
    hours, days = reports.bad_presses_by_time(rows, tz=TZ, start=date(2026, 11, 23),
                                              end=date(2026, 11, 29))
    assert [(s.slot, s.bad, s.presses) for s in hours if s.presses] == [
        (0, 1, 1), (9, 2, 4), (10, 1, 1)]
    assert [(s.slot, s.bad, s.presses) for s in days] == [
        (0, 2, 3), (1, 1, 2), (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0), (6, 1, 1)]
    assert len(hours) == 24
    # The slots add up to the loyalty index's presses of the same range.
    (week,) = reports.loyalty_index(rows, by="site", period="week", tz=TZ,
                                    start=date(2026, 11, 23), end=date(2026, 11, 29))
    assert sum(s.presses for s in days) == sum(s.presses for s in hours) == week.base == 6
    assert sum(s.bad for s in days) == week.minus == 4
    # With bursts: Tuesday's 12:30 counts.
    hours, days = reports.bad_presses_by_time(rows, tz=TZ, start=date(2026, 11, 23),
                                              end=date(2026, 11, 29), include_burst=True)
    assert (hours[12].bad, days[1].bad, days[1].presses) == (1, 2, 3)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
def test_the_dashboards_show_the_figures_of_feedback_collector_report(
        backend: Backend, serve: Any) -> None:
    today = _today()
    sample_data(backend, today)
    app = serve(backend)
    qm = app.session("quality-manager")

    # The default: the last eight ISO weeks, this one included, weeks as periods.
    page = qm.request("/reports/")
    assert page.status == 200
    t = tables(page.body)
    monday = today - timedelta(days=today.weekday())
    start, end = monday - timedelta(weeks=7), today
    assert t.ranges == [f"{start} to {end}, days in {TZ}"]
    dates = ("--from", start.isoformat(), "--to", end.isoformat())
    for by in ("operator", "desk", "site"):
        expected = report_csv(app.cfg, "loyalty", "--by", by, "--period", "week", *dates)
        assert expected, by
        assert body_rows(t, f"loyalty-{by}-table") == expected, by
    assert len({r[1] for r in body_rows(t, "loyalty-site-table")}) == 8

    # The same data computed by the one function, read the way the CLI reads it.
    db = backend.open()
    try:
        presses = queries.report_events(db, ["press"], start, end)
    finally:
        db.close()
    hours, days = reports.bad_presses_by_time(presses, tz=TZ, start=start, end=end)
    assert [[int(c) for c in r[1:]] for r in body_rows(t, "bad-hour-table")] == \
        [[s.bad, s.presses] for s in hours]
    assert [[int(c) for c in r[1:]] for r in body_rows(t, "bad-weekday-table")] == \
        [[s.bad, s.presses] for s in days]
    assert body_rows(t, "bad-weekday-table")[0][0] == "Monday"
    assert sum(s.presses for s in days) == sum(
        int(r[5]) for r in body_rows(t, "loyalty-site-table"))

    # Another period and range: days of the last two weeks, months.
    q = f"?period=day&start={today - timedelta(days=13)}&end={today}"
    t = tables(qm.request("/reports/" + q).body)
    assert body_rows(t, "loyalty-desk-table") == report_csv(
        app.cfg, "loyalty", "--by", "desk", "--period", "day", "--from",
        str(today - timedelta(days=13)), "--to", str(today))
    q = f"?period=month&start={start}&end={end}"
    page = qm.request("/reports/doctors/" + q)
    assert page.status == 200
    t = tables(page.body)
    month = ("--period", "month", *dates)
    assert body_rows(t, "doctors-table", 7) == report_csv(app.cfg, "doctors", *month)
    assert body_rows(t, "answer-rate-table") == report_csv(app.cfg, "answer-rate", *month)
    # Weeks: the ranking is of the latest week answered in, its base the answers or
    # the imported visits (dr-b, last week).
    t = tables(qm.request("/reports/doctors/").body)
    doctors = body_rows(t, "doctors-table")
    assert [r[:7] for r in doctors] == report_csv(app.cfg, "doctors", "--period", "week",
                                                  *dates)
    last_week = (monday - timedelta(days=7)).isocalendar()
    key = f"{last_week[0]}-W{last_week[1]:02d}"
    (visits_row,) = [r for r in doctors if r[0] == "dr-b" and r[1] == key]
    assert (visits_row[5], visits_row[7]) == ("40", "visits")
    assert all(r[7] == "answers" for r in doctors if r is not visits_row)
    latest = max(r[1] for r in doctors if int(r[2]) + int(r[3]) + int(r[4]) > 0)
    ranking = body_rows(t, "doctor-ranking-table")
    by_doctor = {r[0]: r for r in doctors if r[1] == latest}
    assert [r[1] for r in ranking] == sorted(
        by_doctor, key=lambda d: (-float(by_doctor[d][6] or -1000), -int(by_doctor[d][5]), d))
    for rank in ranking:
        row = by_doctor[rank[1]]
        assert rank[2:] == [row[6], str(int(row[2]) + int(row[3]) + int(row[4])), row[5],
                            row[7]]

    # Charts: inline SVG, no script, nothing fetched from elsewhere.
    for path in ("/reports/", "/reports/doctors/", "/reports/fleet/"):
        html = qm.request(path).body
        assert "<script" not in html.lower()
        assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", html)
    html = qm.request("/reports/").body
    assert html.count("<svg") == 5
    assert 'viewBox="0 0 480 320"' in html
    assert 'aria-label="Loyalty index per receptionist"' in html

    # The fleet: the edge that sent status and health, its queue and alarm code.
    t = tables(qm.request("/reports/fleet/").body)
    fleet = {r[0]: r for r in body_rows(t, "fleet-table")}
    row = fleet["clinic-3/reception-1"]
    assert row[1] == "online"
    assert row[3:7] == ["3", "12 s", "ok", "device_missing"]
    assert row[7] == "synced"
    assert set(fleet) == {"clinic-3/reception-1", "clinic-4/reception-1",
                          "clinic-3/office-1"}


def test_a_clinic_manager_sees_reports_but_no_cases_phones_or_comments(
        tmp_path: Path, serve: Any) -> None:
    backend = Backend("sqlite", tmp_path, None)
    sample_data(backend, _today())
    app = serve(backend)
    qm = app.session("quality-manager")
    case_ids = sorted(set(re.findall(r'href="/cases/(\d+)/"', qm.request("/cases/").body)))
    assert case_ids, "the tick opened callback cases"
    assert qm.request(f"/cases/{case_ids[0]}/").status == 200

    cm = app.session("clinic-manager")
    pages = ["/reports/", "/reports/doctors/", "/reports/fleet/",
             "/reports/?period=day", "/reports/doctors/?period=month"]
    for user in ("clinic-manager", "quality-manager", "administrator"):
        s = cm if user == "clinic-manager" else app.session(user)
        for path in pages:
            page = s.request(path)
            assert page.status == 200, (user, path)
            text = page.body
            for secret in (*PHONES, *(p.lstrip("+") for p in PHONES), "ZXQ-"):
                assert secret not in text, (user, path, secret)
    for path in ("/cases/", f"/cases/{case_ids[0]}/", "/cases/999999/", "/audit/",
                 "/cases/rows/"):
        assert cm.request(path).status == 403, path
    assert app.session("callback-officer").request("/reports/").status == 403

    # A range the app cannot show: said so, and the default shown instead.
    page = cm.request("/reports/?period=day&start=2020-01-01&end=2026-01-01")
    assert page.status == 200
    assert "more than 400 periods" in page.body
    assert len(tables(page.body).ranges) == 1
    page = cm.request("/reports/?start=2026-02-01&end=2026-01-01")
    assert "“To” is before “From”." in page.body


def test_anonymous_users_are_sent_to_the_login_page(tmp_path: Path, serve: Any) -> None:
    app = serve(Backend("sqlite", tmp_path, None))
    anon = app.session()
    for path in ("/reports/", "/reports/doctors/", "/reports/fleet/"):
        page = anon.request(path)
        assert page.status == 302, path
        assert page.location == "/login/?next=" + urllib.parse.quote(path), page.location


def test_the_dashboards_in_a_browser_in_russian_at_desktop_and_phone_width(
        tmp_path: Path, serve: Any, browser: Callable[[], Any]) -> None:
    """Six weeks of data, a clinic manager who chose Russian: every reports page
    draws its charts, in Russian, no wider than a 390 px phone, without a phone
    number; screenshots of each (tests/web_fixtures.py `screenshot`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    backend = Backend("sqlite", tmp_path, None)
    sample_data(backend, _today())
    app = serve(backend)
    d = browser()
    login(d, app.base + "/", "clinic-manager", PASSWORD)
    assert path_of(d) == "/reports/"
    d.get(app.base + "/me/")
    Select(d.find_element(By.NAME, "language")).select_by_value("ru")
    leave_page(d, lambda: d.find_element(By.CSS_SELECTOR, "#profile button").click())
    for path, name, charts in (("/reports/", "reports", 5), ("/reports/doctors/",
                               "reports-doctors", 2), ("/reports/fleet/", "reports-fleet", 0)):
        d.get(app.base + path)
        assert d.find_element(By.TAG_NAME, "html").get_attribute("lang") == "ru"
        page = d.page_source
        assert len(d.find_elements(By.CSS_SELECTOR, "svg")) >= charts, name
        assert not any(p in page for p in (*PHONES, *COMMENTS)), f"{name}: personal data"
        screenshot(d, name)
    d.get(app.base + "/reports/")
    assert "Индекс лояльности по администраторам" in d.find_element(By.TAG_NAME, "main").text
