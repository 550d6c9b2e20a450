"""The read API's OpenAPI 3.1 document, served at /api/v1/openapi.json.

Written by hand as data (no framework generates it here); tests/test_web_api.py
validates it with openapi-spec-validator and checks that it describes every
route of collector/web/api/urls.py and nothing else.
"""

from __future__ import annotations

from typing import Any

from collector.db import EVENT_COLS

_ERROR = {"$ref": "#/components/responses/Error"}


def _param(name: str, description: str, schema: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


_FORMAT = _param("format", "json (default) or csv (every cell quoted, formula-safe)",
                 {"type": "string", "enum": ["json", "csv"], "default": "json"})
_TZ = _param("tz", "IANA zone whose local days count; default: the collector's [reports] tz")
_LIMIT = _param("limit", "rows per page", {"type": "integer", "minimum": 1, "maximum": 10000,
                                           "default": 1000})
_PERIOD = _param("period", "day, ISO week or month",
                 {"type": "string", "enum": ["day", "week", "month"], "default": "week"})
_DAY_FROM = _param("from", "first local day (with `to`; neither: every stored day)",
                   {"type": "string", "format": "date"})
_DAY_TO = _param("to", "last local day, inclusive", {"type": "string", "format": "date"})
_FAILURES = {"400": _ERROR, "401": _ERROR, "429": {"$ref": "#/components/responses/Limited"},
             "503": _ERROR}


def _csv_or_json(schema_ref: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {
        "application/json": {"schema": {"$ref": schema_ref}},
        "text/csv": {"schema": {"type": "string"}}}}


def _report(name: str, columns: list[str], summary: str, extra: list[dict[str, Any]]
            ) -> dict[str, Any]:
    return {"get": {
        "operationId": f"report_{name.replace('-', '_')}", "summary": summary,
        "description": "The figures of `feedback-collector report "
                       f"{name}`; the CSV has its columns: {', '.join(columns)}.",
        "parameters": [*extra, _PERIOD, _DAY_FROM, _DAY_TO, _TZ, _FORMAT],
        "responses": {"200": _csv_or_json("#/components/schemas/Report", "the report"),
                      **_FAILURES}}}


def _event_schema() -> dict[str, Any]:
    props: dict[str, Any] = {
        "id": {"type": "string", "description": "site/edge/event_id: stable"},
        "time": {"type": ["string", "null"], "format": "date-time",
                 "description": "corrected time if known, else the recorded wall time"}}
    ints = {"seq", "wall_ms", "corrected_ms", "mono_ns", "score", "button", "approaches",
            "engaged", "from_seq", "to_seq", "received_ms", "lost"}
    for c in EVENT_COLS:
        if c == "payload":
            continue
        kind = "integer" if c in ints else "boolean" if c in ("synced", "hold") else "string"
        props[c] = {"type": [kind, "null"]}
    props["phone"]["description"] = props["comment"]["description"] = \
        "only for a token with personal-data rights (then each page is audited)"
    return {"type": "object", "properties": props,
            "required": ["id", "site", "edge", "event_id", "seq", "kind"]}


def document(base_url: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "feedback-collector read API", "version": "1.0.0",
                 "description": "Read-only access to the collector's events, reports, "
                                "alerts and fleet, one bearer token per integration "
                                "(made and revoked by a quality manager at /api-tokens/ "
                                "or with `feedback-collector web token`). Over a token's "
                                "rate limit: 429 with Retry-After."},
        "servers": [{"url": base_url.rstrip("/") + "/api/v1"}],
        "security": [{"bearer": []}],
        "paths": {
            "/events": {"get": {
                "operationId": "events", "summary": "stored events, cursor-paged",
                "description": "In the stable order (site, edge, seq, event_id); pass "
                               "`next_cursor` back as `cursor` for the next page (CSV: the "
                               "X-Next-Cursor header). Every event is on exactly one page "
                               "of a pass, whatever arrives meanwhile. A cursor carries its "
                               "query's filters: `cursor` alone continues that query; a "
                               "filter given with it must be the same (else 400).",
                "parameters": [
                    _param("site", "only this site"), _param("edge", "only this edge"),
                    _param("desk", "only this desk"),
                    _param("kind", "only these kinds, comma-separated: press, answer, "
                                   "presence, abandoned, dropped, device_lost"),
                    _param("from", "events from this local day (a date) or instant (RFC "
                                   "3339 with offset)"),
                    _param("to", "events up to this local day, inclusive, or before this "
                                 "instant"),
                    _param("cursor", "next_cursor of the page before (with its filters)"),
                    _LIMIT, _TZ,
                    _FORMAT],
                "responses": {"200": {
                    "description": "a page of events",
                    "headers": {"X-Next-Cursor": {
                        "description": "CSV only: the cursor of the next page, if any",
                        "schema": {"type": "string"}}},
                    "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/EventPage"}},
                        "text/csv": {"schema": {"type": "string"}}}}, **_FAILURES}}},
            "/reports/loyalty": _report(
                "loyalty", ["BY", "PERIOD", "good", "neutral", "bad", "presses", "index"],
                "emotional loyalty index (% good - % bad) per group and period",
                [_param("by", "grouping", {"type": "string",
                                           "enum": ["operator", "desk", "site"],
                                           "default": "operator"}),
                 _param("include_burst", "count presses flagged burst",
                        {"type": "string", "enum": ["true", "false"], "default": "false"})]),
            "/reports/doctors": _report(
                "doctors", ["doctor", "PERIOD", "yes", "unsure", "no", "base", "index"],
                "doctor index (% yes - % no of Q1) per doctor and period", []),
            "/reports/answer-rate": _report(
                "answer-rate", ["terminal", "PERIOD", "answers", "approaches", "rate %"],
                "answers per approach per terminal and period", []),
            "/fleet": {"get": {
                "operationId": "fleet", "summary": "every edge, as feedback-collector fleet",
                "responses": {"200": {"description": "the edges", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        "edges": {"type": "array", "items": {"type": "object"}}}}}}},
                    **_FAILURES}}},
            "/alerts": {"get": {
                "operationId": "alerts", "summary": "alerts, oldest first, paged by id",
                "description": "Each alert (one per rule, subject and episode) with its "
                               "rule, subject, times and value; never personal data.",
                "parameters": [_param("after", "next_after of the page before",
                                      {"type": "integer", "minimum": 0}), _LIMIT],
                "responses": {"200": {"description": "a page of alerts", "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        "alerts": {"type": "array", "items": {"type": "object"}},
                        "next_after": {"type": ["integer", "null"]},
                        "note": {"type": "string"}}}}}}, **_FAILURES}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "this document", "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {
                    "application/json": {"schema": {"type": "object"}}}}}}},
        },
        "components": {
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "fc_<prefix>_<secret>, one per integration"}},
            "responses": {
                "Error": {"description": "an error", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}}},
                "Limited": {"description": "over the token's rate limit",
                            "headers": {"Retry-After": {
                                "description": "seconds until a request is allowed",
                                "schema": {"type": "integer"}}},
                            "content": {"application/json": {
                                "schema": {"$ref": "#/components/schemas/Error"}}}}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "string"}},
                          "required": ["error"]},
                "Event": _event_schema(),
                "EventPage": {"type": "object", "properties": {
                    "events": {"type": "array",
                               "items": {"$ref": "#/components/schemas/Event"}},
                    "next_cursor": {"type": ["string", "null"]}},
                    "required": ["events", "next_cursor"]},
                "Report": {"type": "object", "properties": {
                    "report": {"type": "string"}, "period": {"type": "string"},
                    "by": {"type": "string"}, "tz": {"type": "string"},
                    "from": {"type": ["string", "null"]}, "to": {"type": ["string", "null"]},
                    "left_out": {"type": "integer", "description": "events whose time is "
                                 "outside the collector's range, not counted"},
                    "columns": {"type": "array", "items": {"type": "string"}},
                    "rows": {"type": "array", "items": {"type": "object"}}},
                    "required": ["report", "columns", "rows"]},
            },
        },
    }
