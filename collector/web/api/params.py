"""The read API's query parameters: each read and checked against its grammar
(BadRequestError, a 400, otherwise), and the events cursor.

A cursor is the key of the last event served (site, edge, seq, event_id) and
the filters of its query, as URL-safe base64 of JSON: `?cursor=` alone
continues that query, and a filter given with it must be the same.  The first
form, the key alone, is still read (its client repeats the filters).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.http import HttpRequest

from edge.contract.payloads import load_schema
from edge.contract.timefmt import WALL_RANGE, check_zone

DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000


class BadRequestError(ValueError):
    """A query parameter out of its grammar or range: 400 with the text."""


def param(request: HttpRequest, name: str, choices: Sequence[str] | None = None,
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


def output_format(request: HttpRequest) -> str:
    return param(request, "format", ("json", "csv"), "json") or "json"


def zone_param(request: HttpRequest) -> str:
    name = param(request, "tz")
    if name is None:
        return str(settings.CONFIG.tz)
    try:
        return check_zone(name)
    except ValueError as e:
        raise BadRequestError(f"tz: {e}") from None


def day_param(request: HttpRequest, name: str) -> date | None:
    text = param(request, name)
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


def instant_param(request: HttpRequest, name: str, tz: str, *, end: bool) -> int | None:
    """`from`/`to` of /events as milliseconds: a date is a local day of `tz`
    (`to` inclusive: up to the next day's start), a time has its UTC offset."""
    text = param(request, name)
    if text is None:
        return None
    if len(text) == 10:
        day = day_param(request, name)
        assert day is not None  # noqa: S101 - the text is there
        day += timedelta(days=1) if end else timedelta()
        start = datetime(day.year, day.month, day.day, tzinfo=ZoneInfo(tz))
        return int(start.timestamp() * 1000)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        # A "+" left unescaped in a query string arrives as a space.
        hint = "; write its + as %2B in a URL" if " " in text else ""
        raise BadRequestError(f"{name} is a date (2026-11-01) or a time with its offset "
                              f"(2026-11-01T08:00:00+01:00){hint}") from None
    if when.tzinfo is None:
        raise BadRequestError(f"{name}: a time needs its UTC offset (Z or +01:00)")
    return int(when.timestamp() * 1000)


def limit_param(request: HttpRequest) -> int:
    text = param(request, "limit")
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


def with_cursor(request: HttpRequest) -> tuple[str, str, int, str] | None:
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
