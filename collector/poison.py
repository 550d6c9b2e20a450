"""The store's second line: what no column can hold, and what a refused message
is quarantined as.

Schema validation in `collector.intake` keeps out what the database would
refuse; `collector.store` quarantines what still gets refused, with the
reason and payload made here.  A reason names the error's class and the
field at fault (`field_path`), never a value: a value may be a phone number.

A quarantined message is kept once: its `digest` (of its topic and payload
as delivered) is unique in the `quarantine` table, so a batch tried again
after an outage, delivered again after a crash before its acknowledgement,
or a retained message delivered to each instance and on each reconnect adds
no second row and is not counted twice (it counts under `duplicates`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any, Final

from collector.db import RefusedError

__all__ = ["INT64", "digest", "field_path", "printable", "refusal_reason", "stored_payload",
           "suspect"]

# What a column can hold: BIGINT everywhere; INTEGER is 32 bits on PostgreSQL.
INT64: Final = (-(2**63), 2**63 - 1)
_INT32: Final = (-(2**31), 2**31 - 1)
_INT32_FIELDS: Final = frozenset({("press", "button"), ("press", "score"),
                                  ("presence", "approaches"), ("presence", "engaged")})
_NAME: Final = re.compile(r"[a-z_]{1,32}\Z")


def digest(topic: str, payload: bytes) -> str:
    """A quarantined message's identity: its topic and payload."""
    return hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\0" + payload).hexdigest()


def refusal_reason(kind: str, body: Any, e: Exception) -> str:
    """Why the database refused a message: "store: <error class> at <field>"."""
    error = e.error if isinstance(e, RefusedError) else type(e).__name__
    where = suspect(body) if kind != "quarantine" else None
    return f"store: {error}" + (f" at {where}" if where else "")


def stored_payload(kind: str, body: Any, raw: bytes) -> bytes:
    """The payload to keep for a refused message: as delivered, else its body as JSON."""
    if raw or kind == "quarantine":
        return raw
    try:
        return json.dumps(body, default=repr).encode("utf-8", "backslashreplace")
    except (ValueError, TypeError, RecursionError):
        return b""


def printable(text: str) -> str:
    """`text` as printable ASCII (escapes), at most 300 characters: storable anywhere."""
    out = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out)[:300]


def field_path(parts: Iterable[object]) -> str:
    """A field's path for a reason ("answer/phone", "devices/0/id"): a key that is not
    a plain field name (a key of the sender's choice may be personal data) is '*'."""
    out = [str(p) if isinstance(p, int) or (isinstance(p, str) and _NAME.match(p)) else "*"
           for p in parts]
    return "/".join(out) or "(top)"


def suspect(body: Any, path: tuple[object, ...] = ()) -> str | None:
    """The path of the first value no column can hold: an integer outside 64 bits
    (32 for the INTEGER columns), a string with NUL or an unpaired surrogate."""
    if isinstance(body, dict):
        items: Iterable[tuple[Any, Any]] = body.items()
    elif isinstance(body, list):
        items = enumerate(body)
    else:
        return None
    for k, v in items:
        here = (*path, k)
        if isinstance(k, str) and not _storable_text(k):
            return field_path(here)
        if isinstance(v, bool):
            continue
        if isinstance(v, int):
            lo, hi = _INT32 if here in _INT32_FIELDS else INT64
            if not lo <= v <= hi:
                return field_path(here)
        elif isinstance(v, str):
            if not _storable_text(v):
                return field_path(here)
        elif (found := suspect(v, here)) is not None:
            return found
    return None


def _storable_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in s
