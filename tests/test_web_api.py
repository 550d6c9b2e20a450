"""The read API (issue 19), served by a real `feedback-collector web serve` on
SQLite and PostgreSQL: cursor paging over 100,000 events returns each exactly
once while more arrive; a revoked token is refused; a token without
personal-data rights never sees a phone or a comment, one with them does and
the audit says so without the values; the reports' CSV is the CLI's; the rate
limit answers 429; the OpenAPI document validates and describes every route.

Personal data here is made up (tests/test_web_dashboards.py's sample)."""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import pytest

from collector.db import EVENT_COLS
from tests.collector_fixtures import Backend
from tests.test_web_dashboards import (
    COMMENTS,
    PHONES,
    _today,
    cli,
    report_csv,
    sample_data,
    serve,
)
from tests.web_fixtures import query, url_patterns

__all__ = ["serve"]  # a fixture, used by name

BACKENDS = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)
TOKEN_RE = re.compile(r'<code id="token-secret">(fc_[0-9a-f]{8}_[A-Za-z0-9_-]{43})</code>')
SECRETS = (*PHONES, *COMMENTS)


# -- requests with a bearer token --------------------------------------------------------------

class Reply:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)

    def csv(self) -> list[list[str]]:
        return list(csv.reader(io.StringIO(self.text, newline="")))


def get(base: str, path: str, token: str | None = None) -> Reply:
    req = urllib.request.Request(base + path)  # noqa: S310 - http:// to the app under test
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310
            return Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        with e:
            return Reply(e.code, e.headers, e.read())


def new_token(cfg: Any, name: str, *extra: str) -> str:
    return cli(cfg, "web", "token", "create", name, *extra).strip()


def audit(backend: Backend) -> list[tuple[str, str, str]]:
    return [(str(u), str(a), str(d)) for u, a, d in query(
        backend, "SELECT username, action, detail FROM feedback_auditentry ORDER BY id")]


# -- 100,000 events straight into the events table -------------------------------------------

def _rows(n: int, *, first: int, site: str, edge: str, tag: str) -> Iterator[tuple[Any, ...]]:
    """`n` events as rows of `events` (EVENT_COLS order): presses, and every
    tenth an answer with a made-up phone and comment."""
    base_ms = 1_795_000_000_000
    for seq in range(first, first + n):
        answer = seq % 10 == 0
        row = dict.fromkeys(EVENT_COLS)
        row.update(
            site=site, edge=edge, event_id=f"{tag}-{seq:09d}", seq=seq,
            kind="answer" if answer else "press", desk="desk-1", device_id="fc3-a",
            device_kind="terminal" if answer else "console", operator_id="op-1",
            operator_source="config", wall_ms=base_ms + seq * 1000, synced=1,
            boot_id="boot-a", mono_ns=seq * 10**9, flags="", payload="{}",
            received_ms=base_ms + seq * 1000)
        if answer:
            row.update(doctor="dr-a", q1="no", phone=PHONES[0], comment=COMMENTS[0])
        else:
            row.update(label="good", score=1, hold=0, button=0)
        yield tuple(row[c] for c in EVENT_COLS)


def insert(backend: Backend, rows: Sequence[tuple[Any, ...]]) -> None:
    """Fast: one executemany (SQLite) or COPY (PostgreSQL), no intake, no MQTT."""
    if backend.path is not None:
        conn = sqlite3.connect(backend.path, timeout=30)
        with conn:
            conn.executemany(f"INSERT INTO events ({', '.join(EVENT_COLS)}) VALUES "  # noqa: S608
                             f"({', '.join('?' * len(EVENT_COLS))})", rows)
        conn.close()
        return
    import psycopg

    assert backend.dsn is not None
    with psycopg.connect(backend.dsn) as conn, conn.cursor() as cur, \
            cur.copy(f"COPY events ({', '.join(EVENT_COLS)}) FROM STDIN") as cp:
        for r in rows:
            cp.write_row(r)


@BACKENDS
def test_paging_over_100000_events_returns_each_exactly_once_while_more_arrive(
        backend: Backend, serve: Any) -> None:
    app = serve(backend)  # migrated: the events table exists
    edges = [("clinic-3", "office-1"), ("clinic-3", "reception-1"), ("clinic-4", "desk-a")]
    original: set[str] = set()
    rows: list[tuple[Any, ...]] = []
    for i, (site, edge) in enumerate(edges):
        n = 100_000 // 3 + (100_000 % 3 if i == 0 else 0)
        rows.extend(_rows(n, first=1, site=site, edge=edge, tag=f"e{i}"))
    insert(backend, rows)
    original = {f"{r[0]}/{r[1]}/{r[2]}" for r in rows}
    assert len(original) == 100_000
    token = new_token(app.cfg, "warehouse", "--rate", "1000", "--burst", "10000")

    seen: list[str] = []
    order: list[tuple[str, str, int, str]] = []
    cursor, pages, added = "", 0, 0
    while True:
        reply = get(app.base, f"/api/v1/events?limit=1000{'&cursor=' + cursor if cursor else ''}",
                    token)
        assert reply.status == 200, reply.text
        assert not any(s in reply.text for s in SECRETS)  # no personal-data rights
        page = reply.json()
        assert all("phone" not in e and "comment" not in e and "payload" not in e
                   for e in page["events"])
        seen.extend(e["id"] for e in page["events"])
        order.extend((e["site"], e["edge"], e["seq"], e["event_id"]) for e in page["events"])
        pages += 1
        # New events between pages: later seqs of an edge already paged, of the
        # edge being paged, of one not reached yet, and an edge sorting first.
        new: list[tuple[Any, ...]] = []
        for j, (site, edge) in enumerate([*edges, ("clinic-0", "aaa")]):
            new.extend(_rows(3, first=200_000 + pages * 10, site=site, edge=edge,
                             tag=f"e{j}" if j < 3 else "new"))
        insert(backend, new)
        added += len(new)
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert pages < 200, "paging does not end"
    assert len(seen) == len(set(seen)), "an event served twice"
    assert original <= set(seen), f"{len(original - set(seen))} events never served"
    # Added events of edges still ahead of the cursor were served too, once.
    assert len(seen) > 100_000
    # Every event served in the stable order.
    assert order == sorted(order)

    # Filters: one edge's answers, as the table holds them.
    got = 0
    cursor = ""
    while True:
        reply = get(app.base, "/api/v1/events?site=clinic-4&edge=desk-a&kind=answer&limit=5000"
                    + (f"&cursor={cursor}" if cursor else ""), token)
        assert reply.status == 200, reply.text
        page = reply.json()
        assert {(e["site"], e["edge"], e["kind"]) for e in page["events"]} <= \
            {("clinic-4", "desk-a", "answer")}
        got += len(page["events"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    (n,), = query(backend, "SELECT COUNT(*) FROM events WHERE site = 'clinic-4' AND "
                  "edge = 'desk-a' AND kind = 'answer'")
    assert got == n > 3000
    assert get(app.base, "/api/v1/events?cursor=nonsense", token).status == 400
    # A cursor continues its own query: its filters need not be repeated (the
    # README's second request), and a different one is refused.
    first = get(app.base, "/api/v1/events?site=clinic-4&edge=desk-a&kind=answer&limit=100",
                token).json()
    cursor = first["next_cursor"]
    alone = get(app.base, f"/api/v1/events?cursor={cursor}&limit=2000", token).json()
    assert {(e["site"], e["edge"], e["kind"]) for e in alone["events"]} == \
        {("clinic-4", "desk-a", "answer")}
    assert len(alone["events"]) == 2000
    assert get(app.base, f"/api/v1/events?cursor={cursor}&kind=answer", token).status == 200
    other = get(app.base, f"/api/v1/events?cursor={cursor}&kind=press", token)
    assert other.status == 400
    assert "cursor" in other.json()["error"]
    assert get(app.base, "/api/v1/events?kind=bogus", token).status == 400
    unescaped = get(app.base, "/api/v1/events?from=2026-11-30T11:59:11+03:00", token)
    assert unescaped.status == 400
    assert "%2B" in unescaped.json()["error"]
    # Every filter at a realistic length: the cursor grows past other parameters' 200.
    every = ("site=clinic-4&edge=desk-a&kind=answer,press&from=2020-01-01T00:00:00%2B03:00"
             "&to=2099-12-31T23:59:59%2B03:00&tz=America/Argentina/Buenos_Aires")
    first = get(app.base, f"/api/v1/events?{every}&limit=10", token).json()
    assert len(first["next_cursor"]) > 200
    page = get(app.base, f"/api/v1/events?cursor={first['next_cursor']}&limit=10", token)
    assert page.status == 200, page.text
    second = [e["id"] for e in page.json()["events"]]
    assert len(second) == 10
    # A cursor of the first form (the key alone) from before an upgrade: its client
    # repeats the filters, as it had to.
    import base64
    import json

    last = first["events"][-1]
    old = base64.urlsafe_b64encode(json.dumps(
        [last["site"], last["edge"], last["seq"], last["event_id"]]).encode()).decode()
    page = get(app.base, f"/api/v1/events?{every}&limit=10&cursor={old.rstrip('=')}", token)
    assert page.status == 200, page.text
    assert [e["id"] for e in page.json()["events"]] == second


@BACKENDS
def test_tokens_personal_data_reports_limits_and_openapi(backend: Backend, serve: Any) -> None:
    today = _today()
    sample_data(backend, today)
    app = serve(backend)

    # Nothing without a live token.
    assert get(app.base, "/api/v1/events").status == 401
    assert get(app.base, "/api/v1/events", "fc_00000000_" + "A" * 43).status == 401
    refused = get(app.base, "/api/v1/fleet", "not-a-token")
    assert refused.status == 401
    assert "error" in refused.json()
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    # A session is not a token.
    assert app.session("quality-manager").request("/api/v1/fleet").status == 401

    # A token made on the page (quality manager), shown once.
    qm = app.session("quality-manager")
    page = qm.request("/api-tokens/")
    assert page.status == 200
    csrf = next(c.value or "" for c in qm.jar if c.name == "csrftoken")
    made = qm.request("/api-tokens/", {"csrfmiddlewaretoken": csrf, "name": "partner",
                                       "rate_per_s": "100", "burst": "100"})
    assert made.status == 200, made.body[-2000:]
    m = TOKEN_RE.search(made.body)
    assert m is not None, made.body[-3000:]
    plain = m.group(1)
    assert plain not in qm.request("/api-tokens/").body  # once
    assert app.session("clinic-manager").request("/api-tokens/").status == 403

    # Without personal-data rights: no phone or comment, in JSON or CSV.
    for fmt in ("json", "csv"):
        r = get(app.base, f"/api/v1/events?format={fmt}&limit=10000", plain)
        assert r.status == 200, r.text
        assert not any(s in r.text for s in SECRETS), fmt
    rows = get(app.base, "/api/v1/events?format=csv&kind=answer&limit=10000", plain).csv()
    assert "phone" not in rows[0]
    assert "comment" not in rows[0]
    assert len(rows) > 20
    answers = get(app.base, "/api/v1/events?kind=answer&limit=10000", plain).json()["events"]
    assert answers
    assert all("phone" not in e for e in answers)
    assert not any(a == "api_personal_data" for _u, a, _d in audit(backend))

    # With them: the phones and comments, and an audit entry without the values.
    pd = new_token(app.cfg, "callcentre", "--personal-data", "--rate", "100", "--burst", "100")
    r = get(app.base, "/api/v1/events?kind=answer&limit=10000", pd)
    assert r.status == 200
    served = {e["phone"] for e in r.json()["events"] if e.get("phone")}
    assert served == set(PHONES)
    assert {e["comment"] for e in r.json()["events"] if e.get("comment")} == set(COMMENTS)
    csv_rows = get(app.base, "/api/v1/events?kind=answer&format=csv&limit=10000", pd).csv()
    phone_col = csv_rows[0].index("phone")
    # The CSV writer keeps a phone text in a spreadsheet with a leading quote.
    assert {c[phone_col] for c in csv_rows[1:] if c[phone_col]} == {f"'{p}" for p in PHONES}
    entries = audit(backend)
    reads = [e for e in entries if e[1] == "api_personal_data"]
    assert len(reads) == 2
    assert all(u == "api:callcentre" for u, _a, _d in reads)
    assert [e for e in entries if e[1] == "api_token_created"] == [
        ("quality-manager", "api_token_created",
         f"partner ({plain.split('_')[1]}), personal data: no"),
        ("(system)", "api_token_created", f"callcentre ({pd.split('_')[1]}), personal data: yes")]
    for e in entries:
        assert not any(s in " ".join(e) for s in (*SECRETS, plain, pd)), e
        # fc_<prefix>_<secret>: the secret may itself hold "_" (URL-safe base64).
        assert plain.split("_", 2)[2] not in " ".join(e)
        assert pd.split("_", 2)[2] not in " ".join(e)

    # The reports: the CLI's CSV, figure for figure, in Python's csv module.
    monday = today - timedelta(days=today.weekday())
    start, end = monday - timedelta(weeks=5), today
    dates = ("--from", start.isoformat(), "--to", end.isoformat())
    q = f"from={start}&to={end}"
    for what, args in (("loyalty", ("--by", "desk", "--period", "week")),
                       ("loyalty", ("--by", "operator", "--period", "day")),
                       ("doctors", ("--period", "week")),
                       ("answer-rate", ("--period", "day"))):
        params = "&".join(f"{a.lstrip('-')}={b}" for a, b in zip(args[::2], args[1::2],
                                                                  strict=True))
        r = get(app.base, f"/api/v1/reports/{what}?{params}&{q}&format=csv", plain)
        assert r.status == 200, r.text
        expected = report_csv(app.cfg, what, *args, *dates)
        assert expected, what
        got = r.csv()
        assert got[1:] == expected, (what, args)
        j = get(app.base, f"/api/v1/reports/{what}?{params}&{q}", plain).json()
        assert j["columns"] == got[0]
        assert [[_cell(v) for v in row.values()] for row in j["rows"]] == expected
    # Without a range: every stored day, as the CLI without --from/--to (loyalty
    # from the counts kept per day, the others from the rows).
    r = get(app.base, "/api/v1/reports/doctors?period=month&format=csv", plain)
    assert r.csv()[1:] == report_csv(app.cfg, "doctors", "--period", "month")
    r = get(app.base, "/api/v1/reports/loyalty?by=desk&period=day&format=csv", plain)
    assert r.csv()[1:] == report_csv(app.cfg, "loyalty", "--by", "desk", "--period", "day")
    assert len(r.csv()) > 10
    assert get(app.base, f"/api/v1/reports/loyalty?from={end}&to={start}", plain).status == 400
    assert get(app.base, "/api/v1/reports/loyalty?by=nobody", plain).status == 400

    # The fleet and the alerts.
    edges = get(app.base, "/api/v1/fleet", plain).json()["edges"]
    assert "clinic-3/reception-1" in [e["edge"] for e in edges]
    alerts = get(app.base, "/api/v1/alerts", plain)
    assert alerts.status == 200
    assert isinstance(alerts.json()["alerts"], list)

    # Revoked, on the page and by the command line: refused from then on.
    (pk,), = query(backend, "SELECT id FROM api_apitoken WHERE name = 'partner'")
    csrf = next(c.value or "" for c in qm.jar if c.name == "csrftoken")
    assert qm.request(f"/api-tokens/{pk}/revoke/", {"csrfmiddlewaretoken": csrf}).status == 302
    assert get(app.base, "/api/v1/fleet", plain).status == 401
    cli(app.cfg, "web", "token", "revoke", "callcentre")
    assert get(app.base, "/api/v1/events", pd).status == 401
    actions = [a for _u, a, _d in audit(backend)]
    assert actions.count("api_token_revoked") == 2
    listed = cli(app.cfg, "web", "token", "list")
    assert "partner\t" in listed
    assert "revoked" in listed
    assert plain.split("_", 2)[2] not in listed

    # The rate limit: a burst of 2, then 429 with Retry-After.
    slow = new_token(app.cfg, "slow", "--rate", "0.001", "--burst", "2")
    assert [get(app.base, "/api/v1/fleet", slow).status for _ in range(2)] == [200, 200]
    limited = get(app.base, "/api/v1/fleet", slow)
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) > 100
    # Another token's bucket is its own.
    other = new_token(app.cfg, "other", "--rate", "0.001", "--burst", "1")
    assert get(app.base, "/api/v1/fleet", other).status == 200

    # The OpenAPI document: public, valid OpenAPI 3.1, every route and only those.
    from openapi_spec_validator import validate

    doc = get(app.base, "/api/v1/openapi.json").json()
    validate(doc)
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/" + r.removeprefix("api/v1/") for r in api_routes(app.cfg)}


def _cell(value: Any) -> str:
    """A JSON figure as the CSV writes it."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def api_routes(cfg: Any) -> list[str]:
    """The API's routes (under api/v1/), read from the app's urlconf by Django itself."""
    routes = [route for _, route in url_patterns(cfg) if route.startswith("api/v1/")]
    assert len(routes) == 7, routes
    return routes

