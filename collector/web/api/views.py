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

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import date
from functools import wraps
from typing import Any

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
from collector.web.api.params import (
    CURSOR_FILTERS,
    DEFAULT_LIMIT,
    EVENT_KINDS,
    BadRequestError,
    day_param,
    encode_cursor,
    instant_param,
    limit_param,
    output_format,
    param,
    with_cursor,
    zone_param,
)
from collector.web.dashboards import read
from collector.web.models import AuditEntry, User
from collector.web.roles import MANAGE, role_required
from edge.contract.timefmt import format_ms

log = logging.getLogger(__name__)

ApiView = Callable[..., HttpResponse]

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
    fmt = output_format(request)
    after = with_cursor(request)
    tz = zone_param(request)
    kinds = [k for k in (param(request, "kind") or "").split(",") if k]
    if not set(kinds) <= set(EVENT_KINDS):
        raise BadRequestError(f"kind is one or more of {', '.join(EVENT_KINDS)}")
    limit = limit_param(request)
    cols, rows = event_page(
        site=param(request, "site"), edge=param(request, "edge"),
        desk=param(request, "desk"), kinds=kinds,
        start_ms=instant_param(request, "from", tz, end=False),
        end_ms=instant_param(request, "to", tz, end=True),
        after=after, limit=limit,
        personal=token.personal_data)
    more = len(rows) > limit
    rows = rows[:limit]
    key = [cols.index(c) for c in _ORDER]
    filters = {n: v for n in CURSOR_FILTERS if (v := param(request, n)) is not None}
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
    period = param(request, "period", reports.PERIODS, "week") or "week"
    by = param(request, "by", GROUPINGS, "operator") or "operator"
    tz = zone_param(request)
    start, end = day_param(request, "from"), day_param(request, "to")
    if (start is None) != (end is None) or (start and end and end < start):
        raise BadRequestError("give from and to together, to not before from")
    if start is not None and end is not None and \
            ((end - start).days > MAX_PERIODS or
             len(reports.periods(start, end, period)) > MAX_PERIODS):
        raise BadRequestError(f"more than {MAX_PERIODS} periods: a longer period or a shorter "
                         "range")
    burst = param(request, "include_burst", ("true", "false"), "false") == "true"
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
    fmt = output_format(request)
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
    limit = limit_param(request)
    after = param(request, "after")
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
