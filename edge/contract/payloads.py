"""The contract's payloads: JSON Schemas shipped in `edge/contract/schemas/`.

The daemon's tests validate every payload it publishes against them, and the
collector validates every payload it receives with the same files (shared,
not copied).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Final

__all__ = ["EVENT_SCHEMA", "load_schema"]

# The `schema` field of every event; a new major version needs `v2` in the topic.
EVENT_SCHEMA: Final = "feedback.event/1"


def load_schema(name: str) -> dict[str, Any]:
    """One of the contract's JSON Schemas by name ("event", "status", "command-result", ...)."""
    path = resources.files("edge.contract") / "schemas" / f"{name}.schema.json"
    schema: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return schema
