"""The read API's endpoints (`/api/v1/...`) and the token page (`/api-tokens/`).

Every API endpoint but the OpenAPI document takes `Authorization: Bearer
<token>` and nothing else (a session cookie is ignored: an integration is not
a person logged in), answers 401 with a JSON error without a live token and
429 with Retry-After over the token's rate limit, and only reads.

Personal data (a patient's phone number and comment) leaves only through
`/events`, only to a token made with `personal_data`, and every page of events
that carries any is audited: the token's name, how many events had it, never
the values.  The stored payload (which holds them too) is never served.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import date, datetime, timedelta
from functools import wraps
from typing import Any
from zoneinfo import ZoneInfo

from django import forms
from django.conf import settings
from django.db import DatabaseError as DjangoDatabaseError
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from collector import queries, reports, rollup
from collector.db import EVENT_COLS, Database, DatabaseError
from collector.web.api import openapi, tokens
from collector.web.api.models import DEFAULT_BURST, DEFAULT_RATE_PER_S, ApiToken
from collector.web.dashboards import read
from collector.web.models import AuditEntry, User
from collector.web.roles import MANAGE, role_required
from edge.contract.payloads import load_schema
from edge.contract.timefmt import WALL_RANGE, check_zone, format_ms

log = logging.getLogger(__name__)

ApiView = Callable[..., HttpResponse]

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
# More periods than any report needs (27 years of days); the CLI has no bound,
# an endpoint anyone with a token can call needs one.
MAX_PERIODS = 10_000
# Personal data: served to tokens with `personal_data` only (module docstring).
PERSONAL = ("phone", "comment")
# What an event is served as: its columns less the payload (which repeats the
# answer's phone and comment) and the personal ones, then those for a token
# that may have them.  `id` (site/edge/event_id) and `time` lead.
_PLAIN = tuple(c for c in EVENT_COLS if c not in ("payload", *PERSONAL))
_BOOLS = frozenset(("synced", "hold"))
# The stable order pages follow, and the cursor's key (README, "Read API").
_ORDER = ("site", "edge", "seq", "event_id")


# -- errors and authentication -----------------------------------------------------------

def error(status: int, message: str, **headers: str) -> JsonResponse:
    response = JsonResponse({"error": message}, status=status)
    for k, v in headers.items():
        response[k.replace("_", "-")] = v
    return response


class BadRequestError(ValueError):
    """A query parameter out of its grammar or range: 400 with the text."""


def api_view(view: ApiView) -> ApiView:
    """GET (and HEAD, without a body) only, a live bearer token, within its rate
    limit.  Exempt from CSRF: a bearer token is no cookie a browser sends by
    itself, and a write method gets the documented 405, not the CSRF page."""
    @csrf_exempt
    @wraps(view)
    def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = _answer(request, *args, **kwargs)
        if request.method == "HEAD":
            # wsgiref (`web serve`) sends whatever body it is given.
            response.content = b""
        return response

    def _answer(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.method not in ("GET", "HEAD"):
            return error(405, "read-only: GET only", Allow="GET")
        try:
            token = tokens.authenticate(request.headers.get("Authorization", ""))
            if token is None:
                # The same answer for a missing, malformed, unknown or revoked token.
                return error(401, "a live API token is needed: Authorization: Bearer <token>",
                             WWW_Authenticate='Bearer realm="feedback-collector"')
            verdict = tokens.take(token, now=timezone.now())
            if not verdict.allowed:
                return error(429, f"over this token's rate limit ({token.rate_per_s:g} "
                             f"requests/s, burst {token.burst})",
                             Retry_After=str(verdict.retry_after_s))
            return view(request, token, *args, **kwargs)
        except BadRequestError as e:
            return error(400, str(e))
        except (DatabaseError, DjangoDatabaseError) as e:
            log.warning("api: the database failed: %s", type(e).__name__)
            return error(503, "the collector's database cannot be reached; try again",
                         Retry_After="30")
    return wrapper


# -- parameters ---------------------------------------------------------------------------

def _param(request: HttpRequest, name: str, choices: Sequence[str] | None = None,
           default: str | None = None) -> str | None:
    value = request.GET.get(name)
    if value is None or value == "":
        return default
    if choices is not None and value not in choices:
        raise BadRequestError(f"{name} is one of {', '.join(choices)}")
    if len(value) > 200:
        raise BadRequestError(f"{name} is too long")
    if not value.isprintable():
        # PostgreSQL refuses a NUL in text: that is the request's fault, not an outage.
        raise BadRequestError(f"{name} holds control characters")
    return value


def _format(request: HttpRequest) -> str:
    return _param(request, "format", ("json", "csv"), "json") or "json"


def _tz(request: HttpRequest) -> str:
    name = _param(request, "tz")
    if name is None:
        return str(settings.CONFIG.tz)
    try:
        return check_zone(name)
    except ValueError as e:
        raise BadRequestError(f"tz: {e}") from None


def _day(request: HttpRequest, name: str) -> date | None:
    text = _param(request, name)
    if text is None:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise BadRequestError(f"{name} is a date like 2026-11-01") from None
    lo, hi = WALL_RANGE
    if not lo <= day <= hi:
        raise BadRequestError(f"{name} must be within {lo}..{hi}")
    return day


def _instant(request: HttpRequest, name: str, tz: str, *, end: bool) -> int | None:
    """`from`/`to` of /events as milliseconds: a date is a local day of `tz`
    (`to` inclusive: up to the next day's start), a time has its UTC offset."""
    text = _param(request, name)
    if text is None:
        return None
    if len(text) == 10:
        day = _day(request, name)
        assert day is not None  # noqa: S101 - the text is there
        day += timedelta(days=1) if end else timedelta()
        start = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz))
        return int(start.timestamp() * 1000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequestError(f"{name} is a date (2026-11-01) or a time with its offset "
                         "(2026-11-01T08:00:00+01:00)") from None
    if when.tzinfo is None:
        raise BadRequestError(f"{name}: a time needs its UTC offset (Z or +01:00)")
    return int(when.timestamp() * 1000)


def _limit(request: HttpRequest) -> int:
    text = _param(request, "limit")
    if text is None:
        return DEFAULT_LIMIT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise BadRequestError(f"limit is 1 to {MAX_LIMIT}")
    return int(text)


# The filters of /events a cursor carries: its next page is of the same query
# whether or not the client repeats them.
CURSOR_FILTERS = ("site", "edge", "desk", "kind", "from", "to", "tz")
# base64 of the JSON of a key and seven filters of at most 200 characters each.
MAX_CURSOR = 4096
# The event kinds of the contract.
EVENT_KINDS = tuple(load_schema("event")["properties"]["kind"]["enum"])


def encode_cursor(key: Sequence[Any], filters: dict[str, str]) -> str:
    doc = {"k": list(key), "f": filters}
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()
                                    ).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[tuple[str, str, int, str], dict[str, str] | None]:
    """(the key of the last event served, the filters of its query; None for a
    cursor of the first form, a key alone, whose client repeats its filters).
    Raises BadRequestError for anything this API did not give."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        key, filters = (raw["k"], raw["f"]) if isinstance(raw, dict) else (raw, None)
        site, edge, seq, event_id = key
        if not (isinstance(site, str) and isinstance(edge, str) and isinstance(event_id, str)
                and isinstance(seq, int) and not isinstance(seq, bool)):
            raise TypeError
        if filters is not None and not (
                isinstance(filters, dict) and set(filters) <= set(CURSOR_FILTERS) and all(
                    isinstance(v, str) and v.isprintable() and len(v) <= 200
                    for v in filters.values())):
            raise TypeError
        # What the databases can hold: a BIGINT seq, text that encodes as UTF-8
        # and holds no NUL.
        if not -2**63 <= seq < 2**63:
            raise ValueError
        for text_value in (site, edge, event_id):
            text_value.encode()
            if "\x00" in text_value:
                raise ValueError
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeError):
        raise BadRequestError("cursor is not one this API gave") from None
    return (site, edge, seq, event_id), filters


def _with_cursor(request: HttpRequest) -> tuple[str, str, int, str] | None:
    """The cursor's key, with its query's filters put into `request.GET` (a
    filter given again must be the same: a cursor continues its own query)."""
    cursor = request.GET.get("cursor") or None
    if cursor is None:
        return None
    # Longer than other parameters: the key and up to seven filters of 200.
    if len(cursor) > MAX_CURSOR or not cursor.isprintable():
        raise BadRequestError("cursor is not one this API gave")
    key, filters = decode_cursor(cursor)
    if filters is None:
        return key
    params = request.GET.copy()
    for name in CURSOR_FILTERS:
        given = params.get(name) or None
        if given is not None and given != filters.get(name):
            raise BadRequestError(f"{name} differs from the query the cursor continues: "
                                  "repeat its filters, or leave them out")
        if name in filters:
            params[name] = filters[name]
    request.GET = params  # type: ignore[assignment]  # a copy is mutable; nothing writes it after
    return key


# -- output -------------------------------------------------------------------------------

def csv_response(header: Sequence[Any], rows: Iterable[Sequence[Any]], filename: str,
                 **headers: str) -> HttpResponse:
    """CSV through the collector's one writer (`reports.write_csv`: every cell
    quoted, nothing a spreadsheet runs as a formula)."""
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    for k, v in headers.items():
        response[k.replace("_", "-")] = v
    reports.write_csv(response, header, rows)  # type: ignore[arg-type]
    return response


# -- /events ------------------------------------------------------------------------------

def event_page(*, site: str | None = None, edge: str | None = None, desk: str | None = None,
               kinds: Sequence[str] = (), start_ms: int | None = None,
               end_ms: int | None = None, after: tuple[str, str, int, str] | None = None,
               limit: int = DEFAULT_LIMIT, personal: bool = False
               ) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Up to `limit` + 1 events after the cursor key `after`, in key order; the
    columns read and the rows.  Keyset paging: the next page starts strictly
    after the last key served, so an event is on exactly one page however many
    are added meanwhile (README, "Read API")."""
    cols = [*_PLAIN, *(PERSONAL if personal else ())]
    where: list[str] = []
    params: list[Any] = []
    for col, value in (("site", site), ("edge", edge), ("desk", desk)):
        if value is not None:
            where.append(f"{col} = %s")
            params.append(value)
    if kinds:
        where.append(f"kind IN ({', '.join(['%s'] * len(kinds))})")
        params.extend(kinds)
    t = "COALESCE(corrected_ms, wall_ms)"
    if start_ms is not None:
        where.append(f"{t} >= %s")
        params.append(start_ms)
    if end_ms is not None:
        where.append(f"{t} < %s")
        params.append(end_ms)
    if after is not None:
        # Row values (SQL's lexicographic order, both databases): the first on
        # the index's columns, so the scan starts at the cursor (spelled out with
        # ORs, SQLite started at the cursor's site and walked all of it, every page).
        where.append("(site, edge, seq) >= (%s, %s, %s) AND "
                     "(site, edge, seq, event_id) > (%s, %s, %s, %s)")
        params.extend([*after[:3], *after])
    # SQLite has no statistics: with a kind or time filter it would read every row
    # of that kind by `events_by_time` and sort them, for each page.  In key order
    # a pass over all pages reads each row once.
    hint = " INDEXED BY events_by_seq" if connection.vendor == "sqlite" else ""
    sql = (f"SELECT {', '.join(cols)} FROM events{hint}"  # noqa: S608 - constant names
           + (f" WHERE {' AND '.join(where)}" if where else "")
           + f" ORDER BY {', '.join(_ORDER)} LIMIT %s")
    params.append(limit + 1)
    with connection.cursor() as cur:
        cur.execute(sql, params)
        return cols, cur.fetchall()


def _event_dicts(cols: Sequence[str], rows: Iterable[Sequence[Any]]
                 ) -> Iterable[dict[str, Any]]:
    """Each row as the API's event: `id`, `time`, then the columns (booleans as
    booleans).  Positions are found once per page, not per row."""
    keys = ("id", "time", *cols)
    bools = [cols.index(b) for b in _BOOLS]
    site, edge, eid, corrected, wall = (cols.index(c) for c in (
        "site", "edge", "event_id", "corrected_ms", "wall_ms"))
    for row in rows:
        vals = list(row)
        for i in bools:
            if vals[i] is not None:
                vals[i] = bool(vals[i])
        t = row[corrected] if row[corrected] is not None else row[wall]
        yield dict(zip(keys, (f"{row[site]}/{row[edge]}/{row[eid]}", format_ms(t), *vals),
                       strict=True))


def _event_csv(cols: Sequence[str], rows: Iterable[Sequence[Any]]) -> Iterable[list[Any]]:
    keys = ("id", "time", *cols)
    for d in _event_dicts(cols, rows):
        if d.get("phone") is not None:
            d["phone"] = reports.Text(d["phone"])  # stays text in a spreadsheet
        yield [d[c] for c in keys]


@api_view
def events(request: HttpRequest, token: ApiToken) -> HttpResponse:
    fmt = _format(request)
    after = _with_cursor(request)
    tz = _tz(request)
    kinds = [k for k in (_param(request, "kind") or "").split(",") if k]
    if not set(kinds) <= set(EVENT_KINDS):
        raise BadRequestError(f"kind is one or more of {', '.join(EVENT_KINDS)}")
    limit = _limit(request)
    cols, rows = event_page(
        site=_param(request, "site"), edge=_param(request, "edge"),
        desk=_param(request, "desk"), kinds=kinds,
        start_ms=_instant(request, "from", tz, end=False),
        end_ms=_instant(request, "to", tz, end=True),
        after=after, limit=limit,
        personal=token.personal_data)
    more = len(rows) > limit
    rows = rows[:limit]
    key = [cols.index(c) for c in _ORDER]
    filters = {n: v for n in CURSOR_FILTERS if (v := _param(request, n)) is not None}
    next_cursor = encode_cursor([rows[-1][i] for i in key], filters) if more else None
    if token.personal_data:
        _audit_personal(token, cols, rows)
    if fmt == "csv":
        extra = {"X_Next_Cursor": next_cursor} if next_cursor else {}
        return csv_response(["id", "time", *cols], _event_csv(cols, rows), "events.csv",
                            **extra)
    # Compact: a tenth fewer bytes to send and parse on a page of a thousand.
    return JsonResponse({"events": list(_event_dicts(cols, rows)), "next_cursor": next_cursor},
                        json_dumps_params={"separators": (",", ":")})


def _audit_personal(token: ApiToken, cols: Sequence[str], rows: Sequence[Sequence[Any]]
                    ) -> None:
    """A page that hands out phones or comments is in the audit: which token, how
    many events, never the values.  Written here, not by `cases.audit`, whose
    `who` is a user: here it is the token (`api:NAME`)."""
    idx = [cols.index(c) for c in PERSONAL]
    n = sum(1 for r in rows if any(r[i] is not None and r[i] != "" for i in idx))
    if n:
        AuditEntry.objects.create(at=timezone.now(), username=f"api:{token.name}",
                                  action="api_personal_data", case=None,
                                  detail=f"events: {n} with phone or comment "
                                         f"(token {token.prefix})")


# -- /reports/... ------------------------------------------------------------------------

REPORTS = ("loyalty", "doctors", "answer-rate")
GROUPINGS = ("operator", "desk", "site")


def _report(request: HttpRequest, what: str) -> tuple[list[str], list[list[Any]],
                                                      dict[str, Any]]:
    """The header and rows `feedback-collector report WHAT --csv` writes (its
    `as_list`), and the JSON's description of them."""
    period = _param(request, "period", reports.PERIODS, "week") or "week"
    by = _param(request, "by", GROUPINGS, "operator") or "operator"
    tz = _tz(request)
    start, end = _day(request, "from"), _day(request, "to")
    if (start is None) != (end is None) or (start and end and end < start):
        raise BadRequestError("give from and to together, to not before from")
    if start is not None and end is not None and \
            ((end - start).days > MAX_PERIODS or
             len(reports.periods(start, end, period)) > MAX_PERIODS):
        raise BadRequestError(f"more than {MAX_PERIODS} periods: a longer period or a shorter "
                         "range")
    burst = _param(request, "include_burst", ("true", "false"), "false") == "true"
    meta: dict[str, Any] = {"report": what, "period": period, "tz": tz,
                            "from": start.isoformat() if start else None,
                            "to": end.isoformat() if end else None}
    header: list[str]
    rows: list[list[Any]]
    if what == "loyalty":
        meta.update(by=by, include_burst=burst)
        if tz == settings.CONFIG.tz:
            # The counts kept per day, as the dashboards read them (collector.rollup:
            # the same rules, tested equal to the CLI's figures), over the range or,
            # without one, every day kept: a request reads counts, not every press
            # ever stored.  Only the report zone's: a token naming another zone
            # gets the raw computation, never a whole year counted and kept for a
            # zone nobody configured.
            def load(db: Database) -> reports.PressCounts:
                rollup.refresh(db, tz)
                return rollup.counts(db, tz, start or date.min, end or date.max)
            index = reports.loyalty_from_counts(read(load), by=by, period=period, start=start,
                                                end=end, include_burst=burst)
            meta["left_out"] = 0
        else:
            events = read(lambda db: queries.report_events(db, ["press"], start, end))
            meta["left_out"] = reports.out_of_range(events)
            index = reports.loyalty_index(events, by=by, period=period, tz=tz,
                                          start=start, end=end, include_burst=burst)
        header = [by, period, "good", "neutral", "bad", "presses", "index"]
        rows = [r.as_list() for r in index]
    elif what == "doctors":
        answers, visits = read(lambda db: (
            queries.report_events(db, ["answer"], start, end), queries.visits(db)))
        meta["left_out"] = reports.out_of_range(answers)
        header = ["doctor", period, "yes", "unsure", "no", "base", "index"]
        rows = [r.as_list() for r in reports.doctor_index(
            answers, period=period, tz=tz, start=start, end=end, visits=visits)]
    else:
        evs = read(lambda db: queries.report_events(db, ["answer", "presence"], start, end))
        meta["left_out"] = reports.out_of_range(evs)
        header = ["terminal", period, "answers", "approaches", "rate %"]
        rows = [r.as_list() for r in reports.answer_rate(evs, period=period, tz=tz,
                                                         start=start, end=end)]
    return header, rows, meta


def _figure(value: Any) -> Any:
    """A figure of `as_list` for JSON: the index and rate are written "" when
    there is none (CSV); JSON says null, and a number otherwise."""
    if value == "":
        return None
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@api_view
def report(request: HttpRequest, token: ApiToken, what: str) -> HttpResponse:
    if what not in REPORTS:
        return error(404, f"reports are {', '.join(REPORTS)}")
    fmt = _format(request)
    header, rows, meta = _report(request, what)
    if fmt == "csv":
        return csv_response(header, rows, f"{what}.csv")
    # Groups and periods stay text (a desk may be called "12"); counts are ints.
    return JsonResponse({**meta, "columns": header, "rows": [
        dict(zip(header, [*r[:2], *(_figure(v) for v in r[2:])], strict=True))
        for r in rows]})


# -- /fleet, /alerts ---------------------------------------------------------------------

@api_view
def fleet(request: HttpRequest, token: ApiToken) -> HttpResponse:
    rows = read(lambda db: queries.fleet_rows(db, int(time.time() * 1000)))
    return JsonResponse({"edges": rows})


@api_view
def alerts(request: HttpRequest, token: ApiToken) -> HttpResponse:
    """Alerts raised (collector/web/alerts: one per rule, subject and episode),
    oldest first, paged by their row id; never personal data (alerts carry none)."""
    from collector.web.alerts.models import Episode  # noqa: PLC0415

    del token
    limit = _limit(request)
    after = _param(request, "after")
    if after is not None and not (after.isascii() and after.isdigit() and len(after) < 19):
        raise BadRequestError("after is an alert's id")
    rows = list(Episode.objects.filter(opened_at__isnull=False, pk__gt=int(after or 0))
                .select_related("rule").order_by("pk")[:limit + 1])
    more = len(rows) > limit
    out = [{"id": e.pk, "alert_id": str(e.alert_id), "rule": e.rule.name,
            "kind": e.rule.kind, "subject": e.subject, "since": e.since.isoformat(),
            "opened_at": e.opened_at.isoformat() if e.opened_at else None,
            "resolved_at": e.resolved_at.isoformat() if e.resolved_at else None,
            "value": e.value} for e in rows[:limit]]
    return JsonResponse({"alerts": out, "next_after": out[-1]["id"] if more else None})


# -- /openapi.json -----------------------------------------------------------------------

def openapi_document(request: HttpRequest) -> HttpResponse:
    """Public: it describes the API and holds no data."""
    if request.method not in ("GET", "HEAD"):
        return error(405, "read-only: GET only", Allow="GET")
    return JsonResponse(openapi.document(settings.CONFIG.web.base_url))


# -- the token page (quality managers) ---------------------------------------------------

class TokenForm(forms.Form):
    name = forms.RegexField(label=gettext_lazy("Name"), regex=r"^[A-Za-z0-9_.-]{1,64}$",
                            max_length=64, help_text=gettext_lazy(
                                "The integration's name: letters, digits, '.', '_', '-'."))
    personal_data = forms.BooleanField(
        label=gettext_lazy("May read phone numbers and comments"), required=False)
    rate_per_s = forms.FloatField(label=gettext_lazy("Requests per second"),
                                  initial=DEFAULT_RATE_PER_S, min_value=tokens.MIN_RATE_PER_S,
                                  max_value=tokens.MAX_RATE_PER_S)
    burst = forms.IntegerField(label=gettext_lazy("Burst (requests at once)"),
                               initial=DEFAULT_BURST, min_value=1, max_value=tokens.MAX_BURST)


def _user(request: HttpRequest) -> User:
    assert isinstance(request.user, User)  # noqa: S101 - role_required ran first
    return request.user


@role_required(*MANAGE)
def token_page(request: HttpRequest) -> HttpResponse:
    """The tokens, and a form for a new one.  A new token's text is in this
    response only (not a redirect, not the session): shown once."""
    form = TokenForm(request.POST or None)
    secret = None
    made = None
    if request.method == "POST" and form.is_valid():
        d = form.cleaned_data
        try:
            made, secret = tokens.create(d["name"], personal_data=d["personal_data"],
                                         user=_user(request), now=timezone.now(),
                                         rate_per_s=d["rate_per_s"], burst=d["burst"])
        except tokens.TokenError:
            form.add_error("name", _("A live token already has that name."))
        else:
            form = TokenForm()
    response = render(request, "api/tokens.html", {
        "form": form, "secret": secret, "made": made,
        "tokens": ApiToken.objects.all()[:500]})
    if secret is not None:
        response["Cache-Control"] = "no-store"
    return response


@role_required(*MANAGE)  # first: other roles get 403 whatever the method
@require_POST
def token_revoke(request: HttpRequest, pk: int) -> HttpResponse:
    token = get_object_or_404(ApiToken, pk=pk)
    tokens.revoke(token, user=_user(request), now=timezone.now())
    return redirect("api_tokens")
