"""The clinic's names for sites, desks, receptionists and doctors (/names/ and
`feedback-collector web names`): set on the page and by import, shown as typed
(escaped) on the dashboards, the callback queue, the case page and the fleet,
audited, exported and imported back; and only for the quality manager and the
administrator.

The app runs as `feedback-collector web serve` (tests/test_web_dashboards.py's
`serve`) on SQLite and PostgreSQL, read over HTTP with logged-in sessions."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.collector_fixtures import Backend
from tests.test_web_dashboards import (
    Session,
    _today,
    body_rows,
    cli,
    report_csv,
    sample_data,
    serve,
    tables,
)
from tests.web_fixtures import query

__all__ = ["serve"]  # a fixture, used by name

# Quotes, an ampersand and markup: shown as text, never taken as HTML.
SITE = 'Клиника "на" Ленина <b>&</b>'
ANNA = "Анна Петрова"
BORIS = "Борис 'Б.' <i>Смирнов</i>"
DESK = "Стойка 1, регистратура"
OFFICE = "Кабинет 12"
# Cyrillic initials (their letters look Latin: meant as typed in Russian).
PETROV = "Петров И. С."  # noqa: RUF001
IVANOVA = "Иванова А. А."  # noqa: RUF001


def post_name(s: Session, kind: str, key: str, name: str) -> int:
    token = next(c.value or "" for c in s.jar if c.name == "csrftoken")
    return s.request("/names/", {"csrfmiddlewaretoken": token, "kind": kind, "key": key,
                                 "name": name}).status


def export(cfg: Path) -> list[list[str]]:
    return list(csv.reader(io.StringIO(cli(cfg, "web", "names", "export"), newline="")))


def named(rows: list[list[str]], names: dict[str, str], col: int = 0) -> list[list[str]]:
    """The CLI's rows with the group column as the pages show it once named."""
    return [[*r[:col], names.get(r[col], r[col]), *r[col + 1:]] for r in rows]


def assert_escaped(html: str, where: str) -> None:
    """The names' markup is text on the page: escaped, never an element."""
    for tag in ("<b>", "</b>", "<i>", "</i>"):
        assert tag not in html, (where, tag)
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in html, where


@pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
def test_names_set_on_the_page_and_imported_are_shown_everywhere_as_typed(
        backend: Backend, serve: Any, tmp_path: Path) -> None:
    today = _today()
    sample_data(backend, today)
    app = serve(backend)
    admin = app.session("administrator")

    # The identifiers the data holds, each kind in its table, none named yet.
    page = admin.request("/names/")
    assert page.status == 200
    t = tables(page.body)
    listed = {kind: {r[0]: r[1] for r in body_rows(t, f"names-{kind}-table")}
              for kind in ("site", "desk", "operator", "doctor")}
    assert listed["site"] == {"clinic-3": "", "clinic-4": ""}
    assert set(listed["desk"]) == {f"clinic-{s}/desk-{d}" for s in (3, 4) for d in (1, 2)}
    assert listed["operator"] == {"op-anna": "", "op-boris": ""}
    assert listed["doctor"] == {"dr-a": "", "dr-b": "", "dr-c": ""}

    # On the page: a listed site and operator, and a desk no press came from (the
    # terminal's, on the case page).
    assert post_name(admin, "site", "clinic-3", SITE) == 302
    assert post_name(admin, "operator", "op-anna", ANNA) == 302
    assert post_name(admin, "desk", "clinic-3/office-12", OFFICE) == 302
    # Refused: a line break, an unknown kind, an over-long name; nothing stored.
    for kind, key, name in (("site", "clinic-4", "two\nlines"), ("room", "r-1", "x"),
                            ("site", "clinic-4", "x" * 201)):
        assert post_name(admin, kind, key, name) == 200, (kind, name)
    # By the command line: a CSV (UTF-8, with a spreadsheet's byte-order mark) and the
    # doctor list `feedback-collector doctors` sends.
    names_csv = tmp_path / "names.csv"
    names_csv.write_text(f'kind,key,name\ndesk,clinic-3/desk-1,"{DESK}"\n'
                         f'operator,op-boris,"{BORIS}"\n', encoding="utf-8-sig")
    assert "2 names read, 2 changed" in cli(app.cfg, "web", "names", "import", str(names_csv))
    doctors = tmp_path / "doctors.json"
    doctors.write_text(json.dumps({"rev": 3, "doctors": [
        {"id": "dr-a", "name": PETROV, "specialty": "ENT", "photo": None},
        {"id": "dr-b", "name": IVANOVA, "specialty": "GP", "photo": None}]},
        ensure_ascii=False), encoding="utf-8")
    assert "2 names read, 2 changed" in cli(app.cfg, "web", "names", "import", str(doctors))

    t = tables(admin.request("/names/").body)
    assert {r[0]: r[1] for r in body_rows(t, "names-site-table")} == {
        "clinic-3": SITE, "clinic-4": ""}
    assert {r[0]: r[1] for r in body_rows(t, "names-desk-table")}["clinic-3/office-12"] == \
        OFFICE

    # The dashboards: the CLI's figures, with the names in the group column.
    qm = app.session("quality-manager")
    page = qm.request("/reports/")
    assert page.status == 200
    assert_escaped(page.body, "/reports/")
    t = tables(page.body)
    period = ("--period", "week", "--from", t.ranges[0].split()[0], "--to",
              t.ranges[0].split()[2].rstrip(","))
    group_names = {"operator": {"op-anna": ANNA, "op-boris": BORIS},
                   "desk": {"clinic-3/desk-1": DESK}, "site": {"clinic-3": SITE}}
    for by, names in group_names.items():
        shown = body_rows(t, f"loyalty-{by}-table")
        assert shown == named(report_csv(app.cfg, "loyalty", "--by", by, *period), names), by
        assert set(names.values()) <= {r[0] for r in shown}, by
    # The identifier stays at hand (a cell's title); the chart's legend has the name.
    assert 'title="op-anna">Анна Петрова</td>' in page.body
    svg = page.body[page.body.index("<svg"):]
    assert ANNA in svg

    page = qm.request("/reports/doctors/")
    assert_escaped(page.body, "/reports/doctors/")
    t = tables(page.body)
    doctor_names = {"dr-a": PETROV, "dr-b": IVANOVA}
    assert [r[:7] for r in body_rows(t, "doctors-table")] == named(
        report_csv(app.cfg, "doctors", *period), doctor_names)
    assert {r[1] for r in body_rows(t, "doctor-ranking-table")} <= {PETROV, IVANOVA, "dr-c"}
    assert PETROV in page.body[page.body.index("<svg"):]
    # A terminal's site, named.
    rates = body_rows(t, "answer-rate-table")
    assert rates
    assert {r[0] for r in rates} == {f"{SITE}/office-1/st-1"}

    page = qm.request("/reports/fleet/")
    assert_escaped(page.body, "/reports/fleet/")
    fleet = {r[0] for r in body_rows(tables(page.body), "fleet-table")}
    assert fleet == {f"{SITE}/reception-1", "clinic-4/reception-1", f"{SITE}/office-1"}
    assert 'title="clinic-3/reception-1"' in page.body

    # The callback queue and a case: the clinic and the doctor by name.
    page = qm.request("/cases/")
    assert_escaped(page.body, "/cases/")
    queue = body_rows(tables(page.body), "queue")
    assert queue
    assert {r[2] for r in queue} == {SITE}
    assert {r[3] for r in queue} <= {PETROV, IVANOVA, "dr-c"}
    assert PETROV in {r[3] for r in queue}
    assert 'title="dr-a"' in page.body
    rows_only = qm.request("/cases/rows/?show=all").body
    assert PETROV in rows_only
    assert "<b>" not in rows_only
    case_id = re.findall(r'href="/cases/(\d+)/"', page.body)[0]
    page = qm.request(f"/cases/{case_id}/")
    assert page.status == 200
    clinic = re.search(r'<dd class="clinic">(.*?)</dd>', page.body)
    assert clinic
    assert "Клиника &quot;на&quot; Ленина &lt;b&gt;&amp;&lt;/b&gt;" in clinic.group(1)
    assert OFFICE in clinic.group(1)
    doctor = re.search(r'<dd class="doctor"[^>]*>(.*?)</dd>', page.body)
    assert doctor
    assert doctor.group(1) in (PETROV, IVANOVA, "dr-c")

    # Audited: who, what, which identifier (the page's changes as the administrator,
    # the command line's as "(system)").
    audit = query(backend, "SELECT username, detail FROM feedback_auditentry "
                  "WHERE action = 'name_set' ORDER BY id")
    assert [tuple(r) for r in audit] == [
        ("administrator", "site clinic-3"), ("administrator", "operator op-anna"),
        ("administrator", "desk clinic-3/office-12"), ("(system)", "desk clinic-3/desk-1"),
        ("(system)", "operator op-boris"), ("(system)", "doctor dr-a"),
        ("(system)", "doctor dr-b")]
    audit_page = qm.request("/audit/").body
    assert "operator op-anna" in audit_page

    # Export round-trips: cleared on the page (the identifier is shown again), then
    # the export imported back restores every name, exactly.
    before = export(app.cfg)
    assert before[0] == ["kind", "key", "name"]
    assert sorted(before[1:]) == sorted([
        ["site", "clinic-3", SITE], ["operator", "op-anna", ANNA],
        ["desk", "clinic-3/office-12", OFFICE], ["desk", "clinic-3/desk-1", DESK],
        ["operator", "op-boris", BORIS], ["doctor", "dr-a", PETROV],
        ["doctor", "dr-b", IVANOVA]])
    saved = tmp_path / "export.csv"
    saved.write_text(cli(app.cfg, "web", "names", "export"), encoding="utf-8")
    assert post_name(admin, "operator", "op-anna", "") == 302
    assert post_name(admin, "site", "clinic-3", "") == 302
    t = tables(qm.request("/reports/").body)
    assert body_rows(t, "loyalty-site-table") == report_csv(
        app.cfg, "loyalty", "--by", "site", *period)
    assert "op-anna" in {r[0] for r in body_rows(t, "loyalty-operator-table")}
    assert len(export(app.cfg)) == len(before) - 2
    assert "7 names read, 2 changed" in cli(app.cfg, "web", "names", "import", str(saved))
    assert export(app.cfg) == before
    assert len(query(backend, "SELECT id FROM feedback_auditentry "
                     "WHERE action = 'name_set'")) == 7 + 2 + 2


def test_only_the_quality_manager_and_the_administrator_reach_the_names_page(
        tmp_path: Path, serve: Any) -> None:
    backend = Backend("sqlite", tmp_path, None)
    sample_data(backend, _today())
    app = serve(backend)
    for user in ("quality-manager", "administrator"):
        s = app.session(user)
        assert s.request("/names/").status == 200, user
        assert 'href="/names/"' in s.request("/names/").body, user
    for user in ("clinic-manager", "callback-officer"):
        s = app.session(user)
        assert s.request("/names/").status == 403, user
        assert post_name(s, "site", "clinic-3", "taken over") == 403, user
        assert 'href="/names/"' not in s.request("/me/").body, user
    anon = app.session()
    page = anon.request("/names/")
    assert (page.status, page.location) == (302, "/login/?next=/names/")
    # Without the CSRF token even the administrator's change is refused.
    admin = app.session("administrator")
    assert admin.request("/names/", {"kind": "site", "key": "clinic-3",
                                     "name": "x"}).status == 403
    assert query(backend, "SELECT id FROM feedback_displayname") == []
    assert query(backend, "SELECT id FROM feedback_auditentry WHERE action = 'name_set'") == []
    # A bad import changes nothing and says which row.
    bad = tmp_path / "bad.csv"
    bad.write_text("site,clinic-3,Клиника\nsite,clinic-4\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "collector.cli", "web", "--config", str(app.cfg),
                        "names", "import", str(bad)], capture_output=True, text=True,
                       timeout=120, check=False)
    assert r.returncode == 2
    assert "row 2" in r.stderr
    assert query(backend, "SELECT id FROM feedback_displayname") == []
