"""The collector's intake fuzzed: no payload stops or subverts it.

Messages are generated from the JSON Schemas' shape (every field valid and in
range), then mutated: a field replaced by a boundary or hostile value (2^63,
-2^63 - 1, 2^64, 1e300, NaN, Infinity, 5.0 where an int belongs, unpaired
surrogates, NUL, very long strings, null, a list, an object), deleted, or an
unknown field added; sometimes the bytes are cut short.  They go through
`collector.intake.classify` and `collector.store.ingest` on a real database.
Nothing may raise, nothing out of the schemas' ranges may be stored, and
every message is stored, a duplicate, or quarantined and counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from collector import store
from collector.db import Database
from collector.intake import classify
from collector.store import Item
from edge.contract.payloads import load_schema
from edge.contract.timefmt import WALL_MAX_MS, WALL_MIN_MS
from tests.collector_fixtures import Backend
from tests.fuzzing import field_paths, hostile_values

SCHEMAS = {name: load_schema(name) for name in ("event", "timesync", "status", "health",
                                                "devices")}
PLAIN = {name: Draft202012Validator(s) for name, s in SCHEMAS.items()}
INT64 = (-(2**63), 2**63 - 1)
KINDS = ("press", "answer", "presence", "abandoned", "dropped", "device_lost")

# -- strategies from the schema -----------------------------------------------------------


# RFC 3339 UTC times as other producers may write them: no fraction, or any number of
# digits; within the contract's range (1960 to 2099), as every time must be.
times = st.builds(lambda at, frac: at.isoformat(timespec="seconds") + frac + "Z",
                  st.datetimes(min_value=datetime(1960, 1, 1),
                               max_value=datetime(2099, 12, 31, 23, 59, 59)),
                  st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,12}", fullmatch=True)))


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target: dict[str, Any] = root
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return target


# The operator id's exact grammar (letters of any script) is enforced in code
# (edge.contract.ids.OPERATOR_RE); the schema's pattern only excludes hostile
# characters, so valid ids come from names and staff numbers like a clinic's.
operator_ids = st.one_of(
    st.sampled_from(["op-17", "4711", "Анна Петрова", "O'Brien", "José María", "o\u2019neil"]),
    st.from_regex(r"[A-Za-z\u0410-\u044f0-9][A-Za-z\u0410-\u044f0-9 ._'-]{0,40}"
                  r"[A-Za-z\u0410-\u044f0-9]", fullmatch=True))


def valid(node: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that satisfy `node` (the keywords these schemas use)."""
    if node.get("$ref") == "#/$defs/operator_id":
        return operator_ids
    if "anyOf" in node:
        return st.one_of(*(valid(n, root) for n in node["anyOf"]))
    node = _resolve(node, root)
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    types = node.get("type", "object")
    options = [types] if isinstance(types, str) else list(types)
    return st.one_of(*(_typed(t, node, root) for t in options))


def _typed(t: str, node: dict[str, Any], root: dict[str, Any]) -> st.SearchStrategy[Any]:
    if t == "integer":
        lo, hi = node.get("minimum", INT64[0]), node.get("maximum", INT64[1])
        return st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi]))
    if t == "number":
        return st.floats(node.get("minimum", 0), node.get("maximum", 1e10))
    if t == "boolean":
        return st.booleans()
    if t == "null":
        return st.none()
    if t == "string":
        if "T[0-9]{2}:" in node.get("pattern", ""):
            return times
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True)
        return st.text(st.characters(exclude_characters="\x00"),
                       min_size=node.get("minLength", 0), max_size=node.get("maxLength", 40))
    if t == "array":
        return st.lists(valid(node.get("items", {}), root), max_size=3,
                        unique=bool(node.get("uniqueItems")))
    props: dict[str, Any] = node.get("properties", {})
    required = [k for k in node.get("required", []) if k in props]
    optional = {k: valid(v, root) for k, v in props.items() if k not in required}
    extra = node.get("additionalProperties")
    fixed = st.fixed_dictionaries({k: valid(props[k], root) for k in required},
                                  optional=optional)
    if isinstance(extra, dict):
        names = node.get("propertyNames", {}).get("pattern", r"^[a-z_]{1,8}$")
        return st.tuples(fixed, st.dictionaries(st.from_regex(names, fullmatch=True),
                                                valid(extra, root), max_size=2)).map(
            lambda p: {**p[1], **p[0]})
    return fixed


@st.composite
def valid_event(draw: st.DrawFn) -> dict[str, Any]:
    """An event the schema accepts: top-level fields, then one kind and its object."""
    schema = SCHEMAS["event"]
    props = schema["properties"]
    kind = draw(st.sampled_from(KINDS))
    body = {k: draw(valid(props[k], schema)) for k in schema["required"] if k != "kind"}
    body["kind"] = kind
    body[kind] = draw(valid(props[kind], schema))
    if body["operator"]["source"] == "none":
        body["operator"]["id"] = None
    return body


HOSTILE_INTS = [2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 2**64, 2**62, 2**53, 2**53 - 1,
                2**31, 2**31 - 1, -(2**31) - 1, -1, 0, 10**30, -(10**30)]
HOSTILE_STRINGS = ["", "\x00", "a\x00b", "\ud800", "clinic-3\n", "x" * 100_000,
                     "x" * 300_000, "2026-02-30T00:00:00Z", "2026-11-23T17:30:00Z",
                     "2026-11-23T17:30:00.123456789Z", "0000-01-01T00:00:00Z",
                     "9999-12-31T23:59:60Z", "2099-12-31T23:59:60Z", "1959-12-31T23:59:59Z",
                     "+4915112345678", "x\nERROR forged", "\x1b[2J"]
hostile = hostile_values(HOSTILE_INTS, HOSTILE_STRINGS)


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Any]) -> Any:
    """`base`'s value with 0 to 3 fields replaced, deleted or added."""
    doc = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        paths = field_paths(doc)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        *up, last = path
        parent = doc
        for p in up:
            parent = parent[p]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(hostile)
        elif action == "delete" and isinstance(parent, dict):
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(hostile)
    return doc


@st.composite
def message(draw: st.DrawFn) -> tuple[str, bytes]:
    """(topic, payload) of an event or a side message, mutated, as bytes on the wire."""
    name = draw(st.sampled_from(["event", "event", "event", "timesync", "status", "health",
                                 "devices"]))
    if name == "event":
        doc = draw(mutated(valid_event()))
        site, edge = "clinic-3", "reception-1"
        if isinstance(doc, dict) and draw(st.integers(0, 4)) < 4:
            # Mostly the topic of the payload's own site and edge, as an edge publishes.
            s, e = doc.get("site"), doc.get("edge")
            if isinstance(s, str) and isinstance(e, str) and re.fullmatch(
                    r"[a-z0-9-]{1,32}", s) and re.fullmatch(r"[a-z0-9-]{1,32}", e):
                site, edge = s, e
        topic = f"feedback/v1/{site}/{edge}/event/dev-1"
    else:
        doc = draw(mutated(valid(SCHEMAS[name], SCHEMAS[name])))
        topic = f"feedback/v1/clinic-3/reception-1/{name}"
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))  # NaN, Infinity as is
    raw = text.encode("utf-8", "surrogatepass")  # unpaired surrogates: not UTF-8
    if draw(st.integers(0, 9)) == 9:
        raw = raw[:draw(st.integers(0, len(raw)))]
    return topic, raw


# -- what must hold ----------------------------------------------------------------------

RANGES = {  # every integer column of `events` and the range the schema allows into it
    "seq": (1, 2**53 - 1), "mono_ns": (-157_788_000_000 * 10**6, 2**62 - 1),
    "wall_ms": (WALL_MIN_MS, WALL_MAX_MS), "corrected_ms": (WALL_MIN_MS, WALL_MAX_MS),
    "score": (-1000, 1000), "button": (0, 254), "hold": (0, 1), "synced": (0, 1),
    "approaches": (0, 2**31 - 1), "engaged": (0, 2**31 - 1), "from_seq": (1, 2**53 - 1),
    "to_seq": (1, 2**53 - 1), "lost": (1, 2**53 - 1),
}


def check_stored(db: Database) -> None:
    """Everything in `events` is in range, its payload passes the plain schema and
    contradicts nothing; no edge but one a stored message named."""
    cols = list(RANGES)
    for row in db.query(f"SELECT {', '.join(cols)}, payload FROM events"):  # noqa: S608
        for col, value in zip(cols, row[:-1], strict=True):
            if value is not None:
                lo, hi = RANGES[col]
                assert type(value) is int, (col, value)
                assert lo <= value <= hi, (col, value)
        body = json.loads(row[-1])
        PLAIN["event"].validate(body)
        if body["kind"] == "dropped":
            assert body["dropped"]["from_seq"] <= body["dropped"]["to_seq"]
        if body["kind"] == "device_lost":
            assert body["device_lost"]["lost"] <= body["device_lost"]["total"]
    for site, edge in db.query("SELECT site, edge FROM edges"):
        assert re.fullmatch(r"[a-z0-9-]{1,32}", site), site
        assert re.fullmatch(r"[a-z0-9-]{1,32}", edge), edge
    for (wall,) in db.query("SELECT wall_ms FROM anchors"):
        assert WALL_MIN_MS <= wall <= WALL_MAX_MS


def check_counted(db: Database) -> None:
    """Every quarantined message is counted under its reason's class."""
    rows = db.query("SELECT reason FROM quarantine")
    counts = store.counters(db)
    per_class: dict[str, int] = {}
    for (reason,) in rows:
        per_class[reason.split(":")[0]] = per_class.get(reason.split(":")[0], 0) + 1
    assert {k: counts.get(f"quarantined:{k}") for k in per_class} == per_class
    assert sum(v for k, v in counts.items() if k.startswith("quarantined:")) == len(rows)


def _fuzz(db: Database, max_examples: int) -> None:
    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(message(), min_size=1, max_size=4))
    def run(batch: list[tuple[str, bytes]]) -> None:
        items = []
        for topic, payload in batch:
            item = classify(topic, payload)
            assert item is not None
            if item.kind == "event":
                PLAIN["event"].validate(item.body)  # what passes is valid by the book too
            items.append(item)
        res = store.ingest(db, items)
        counted = [i for i in items if i.kind in ("event", "quarantine")]
        assert res.stored + res.duplicates + res.quarantined == len(counted)
        # Quarantined, or the same message (topic and payload) quarantined before:
        # kept once, counted as a duplicate.
        assert res.quarantined + res.duplicates >= sum(i.kind == "quarantine" for i in items)

    run()
    check_stored(db)
    check_counted(db)


def test_fuzzed_messages_neither_raise_nor_store_anything_out_of_range(
        backend: Backend) -> None:
    db = backend.open()
    try:
        _fuzz(db, 200 if backend.kind == "sqlite" else 60)
        # Some of each outcome: the generator is not all garbage or all good.
        assert db.query("SELECT count(*) FROM events")[0][0] > 0
        assert db.query("SELECT count(*) FROM quarantine")[0][0] > 0
    finally:
        db.close()


# -- the store's own line: items that never went through classify ------------------------

@st.composite
def unchecked_event_item(draw: st.DrawFn) -> Item:
    """An event item as if classify had let anything through."""
    body = draw(mutated(valid_event()))
    return Item("event", "clinic-3", "reception-1", body=body, topic="feedback/v1/clinic-3/"
                "reception-1/event/dev-1", raw=b"{}")


def test_the_store_quarantines_what_it_cannot_store_and_keeps_the_rest(
        tmp_path: Path) -> None:
    db = Backend("sqlite", tmp_path, None).open()

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(unchecked_event_item(), min_size=1, max_size=4))
    def run(items: list[Item]) -> None:
        res = store.ingest(db, items)  # never raises for bad data
        assert res.stored + res.duplicates + res.quarantined == len(items)

    try:
        run()
        for (reason,) in db.query("SELECT reason FROM quarantine"):
            assert re.fullmatch(r"store: \w+( at [a-z_0-9*/()]+)?", reason), reason
        for (value,) in db.query("SELECT seq FROM events"):
            assert INT64[0] <= value <= INT64[1]
        check_counted(db)
    finally:
        db.close()


def test_every_number_in_the_contract_has_a_documented_range() -> None:
    names = [p.name.removesuffix(".schema.json") for p in
             (Path(__file__).parent.parent / "edge" / "contract" / "schemas").glob("*.json")]
    seen = 0

    def walk(node: Any, where: str, described: bool) -> None:
        nonlocal seen
        if isinstance(node, list):
            for i, n in enumerate(node):
                walk(n, f"{where}/{i}", described)
            return
        if not isinstance(node, dict):
            return
        described = described or "description" in node
        types = node.get("type", [])
        types = [types] if isinstance(types, str) else types
        if {"integer", "number"} & set(types):
            seen += 1
            assert "minimum" in node, where
            assert "maximum" in node, where
            assert INT64[0] <= node["minimum"] <= node["maximum"] <= INT64[1], where
            assert described, f"{where}: no description of its range"
        for k, v in node.items():
            walk(v, f"{where}/{k}", described and k == "additionalProperties")

    for name in names:
        walk(load_schema(name), name, False)
    assert seen >= 25


@pytest.mark.parametrize("make", [
    lambda: {"seq": 2**63}, lambda: {"time": {"mono_ns": 2**63}},
    lambda: {"time": {"age_ms": 2**40}}, lambda: {"seq": 5.5}, lambda: {"seq": True}])
def test_out_of_range_numbers_are_refused_by_the_schema_naming_the_field(
        make: Callable[[], dict[str, Any]]) -> None:
    from tests.collector_fixtures import press_event

    topic, good = press_event(1)
    body = json.loads(good)
    for key, value in make().items():
        body[key] = {**body[key], **value} if isinstance(value, dict) else value
    item = classify(topic, json.dumps(body).encode())
    assert item is not None
    assert item.kind == "quarantine"
    assert item.reason.startswith("invalid: ")
    assert str(2**63) not in item.reason
