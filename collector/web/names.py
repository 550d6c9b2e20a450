"""Names as the clinic writes them, for the identifiers events carry.

Events name sites, desks, receptionists and doctors by identifiers
(`clinic-3`, `clinic-3/desk-1`, `op-anna`, `dr-petrov`); people read the names
the clinic writes (any Unicode, e.g. Cyrillic).  A page
makes one `Names` and asks it `label(kind, key)` per row: the names of a kind
are read once, on the first question about that kind, so a page costs one
query per kind whatever its rows.  With no name set, a label is the identifier
itself, so the pages still equal `feedback-collector report --csv`.

Every change (page or command line) goes through `set_name`, which audits it
as "name_set" with the kind and identifier (the name itself is in the table).
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from collector.web import cases
from collector.web.models import DisplayName, NameKind, User

KINDS = tuple(k.value for k in NameKind)
MAX_NAME = 200
MAX_KEY = 255
CSV_HEADER = ["kind", "key", "name"]


class NameRefusedError(ValueError):
    """A name or an import file that cannot be stored (the text says why)."""


class Names:
    """One page's names: `label(kind, key)`, one query per kind asked about."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, str]] = {}

    def of(self, kind: str) -> dict[str, str]:
        if kind not in self._by_kind:
            self._by_kind[kind] = dict(
                DisplayName.objects.filter(kind=kind).values_list("key", "name"))
        return self._by_kind[kind]

    def label(self, kind: str, key: str) -> str:
        """The clinic's name for `key`, or `key` when it has none."""
        return self.of(kind).get(key, key)

    def terminal(self, key: str) -> str:
        """A terminal ("site/edge/device") or an edge ("site/edge") with its site named."""
        site, sep, rest = key.partition("/")
        return f"{self.label('site', site)}{sep}{rest}" if sep else self.label("site", key)


class NoNames(Names):
    """Identifiers as they are (figures laid out without the app's database)."""

    def of(self, kind: str) -> dict[str, str]:
        return {}


def check(kind: str, key: str, name: str) -> None:
    """Raises NameRefusedError unless (kind, key, name) may be stored; an empty name clears."""
    if kind not in KINDS:
        raise NameRefusedError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not key or len(key) > MAX_KEY or key != key.strip():
        raise NameRefusedError(f"the identifier must be 1 to {MAX_KEY} characters, without "
                         "spaces around it")
    if len(name) > MAX_NAME:
        raise NameRefusedError(f"a name is at most {MAX_NAME} characters")
    # Line breaks and other control characters would break a table cell, a
    # chart's legend and the exported CSV's one-line-per-name.
    if any(unicodedata.category(c) == "Cc" for c in key + name):
        raise NameRefusedError("no line breaks or control characters")


def set_name(kind: str, key: str, name: str, user: User | None) -> bool:
    """Sets (or, with an empty name, clears) one name; audited when it changed.
    Returns whether it changed."""
    check(kind, key, name)
    with transaction.atomic():
        current = DisplayName.objects.select_for_update().filter(kind=kind, key=key).first()
        if name.strip() == "":
            if current is None:
                return False
            current.delete()
        elif current is None:
            DisplayName.objects.create(kind=kind, key=key, name=name)
        elif current.name == name:
            return False
        else:
            current.name = name
            current.save(update_fields=["name"])
        cases.audit(user, "name_set", None, f"{kind} {key}", now=timezone.now())
    return True


# -- what the data holds -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Seen:
    kind: str
    key: str


def seen(db: Any) -> list[Seen]:
    """The identifiers in the collector's database, cheaply: sites from `edges`
    (an event's edge gets a row there and its last_seen_ms), desks and operators
    from the press counts `collector.rollup` keeps (far fewer rows than
    presses), doctors from the answers (through the (kind, wall_ms) index) and
    the imported visits."""
    out: list[Seen] = []
    out += [Seen("site", str(s)) for (s,) in db.query(
        "SELECT DISTINCT site FROM edges WHERE last_seen_ms IS NOT NULL")]
    out += [Seen("desk", f"{s}/{d}") for s, d in db.query(
        "SELECT DISTINCT site, desk FROM press_rollup")]
    out += [Seen("operator", str(o)) for (o,) in db.query(
        "SELECT DISTINCT operator_id FROM press_rollup WHERE operator_id <> ''")]
    doctors = {str(d) for (d,) in db.query(
        "SELECT DISTINCT doctor FROM events WHERE kind = 'answer' AND doctor IS NOT NULL "
        "AND doctor <> ''")}
    doctors |= {str(d) for (d,) in db.query("SELECT DISTINCT doctor FROM visits")}
    out += [Seen("doctor", d) for d in doctors]
    return out


def listing(seen_keys: Iterable[Seen]) -> dict[str, list[tuple[str, str]]]:
    """Per kind, (identifier, name or "") of everything seen or named, sorted."""
    names = {(n.kind, n.key): n.name for n in DisplayName.objects.all()}
    keys = {(s.kind, s.key) for s in seen_keys} | set(names)
    return {kind: sorted((key, names.get((kind, key), "")) for k, key in keys if k == kind)
            for kind in KINDS}


# -- import and export ---------------------------------------------------------------------

def parse_csv(text: str) -> list[tuple[str, str, str]]:
    """Rows of a `kind,key,name` CSV (a first row "kind,key,name" is a header)."""
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if rows and [c.strip().lower() for c in rows[0]] == CSV_HEADER:
        rows = rows[1:]
    out = []
    for i, row in enumerate(rows, 1):
        if not row:
            continue
        if len(row) != 3:
            raise NameRefusedError(f"row {i}: expected kind,key,name; found {len(row)} fields")
        kind, key, name = row
        try:
            check(kind, key, name)
        except NameRefusedError as e:
            raise NameRefusedError(f"row {i}: {e}") from None
        out.append((kind, key, name))
    return out


def parse_doctors(text: str) -> list[tuple[str, str, str]]:
    """The doctors' names of a doctor list as `feedback-collector doctors` sends it:
    {"rev": N, "doctors": [{"id": ..., "name": ..., ...}]}."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise NameRefusedError(f"not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("doctors"), list):
        raise NameRefusedError('expected {"rev": N, "doctors": [{"id": ..., "name": ...}]}')
    out = []
    for i, d in enumerate(doc["doctors"], 1):
        if not isinstance(d, dict) or not isinstance(d.get("id"), str) or \
                not isinstance(d.get("name"), str):
            raise NameRefusedError(f"doctor {i}: needs a text \"id\" and \"name\"")
        try:
            check("doctor", d["id"], d["name"])
        except NameRefusedError as e:
            raise NameRefusedError(f"doctor {i}: {e}") from None
        out.append(("doctor", d["id"], d["name"]))
    return out


def import_names(rows: list[tuple[str, str, str]], user: User | None) -> int:
    """Stores every row (all or none); returns how many names changed."""
    with transaction.atomic():
        return sum(set_name(kind, key, name, user) for kind, key, name in rows)


def export_csv() -> str:
    out = io.StringIO(newline="")
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for n in DisplayName.objects.order_by("kind", "key"):
        w.writerow([n.kind, n.key, n.name])
    return out.getvalue()
