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


def _pattern(pattern: str) -> str:
    shown = "".join(c if " " <= c <= "~" else f"\\u{ord(c):04x}" for c in pattern)
    return f"`{shown}`".replace("|", "\\|")


def _fields(node: Any, root: dict[str, Any], path: str) -> list[tuple[str, str]]:
    """(field path, its range or grammar) of every bounded number, patterned or
    bounded string, bounded list and object, and the grammar of an object's keys
    (`path/(key)`); `*` in a path is any key, `[]` any item, `(top)` the message."""
    if not isinstance(node, dict):
        return []
    out: list[tuple[str, str]] = []
    ref = node.get("$ref")
    if isinstance(ref, str):
        target: Any = root
        for part in ref.removeprefix("#/").split("/"):
            target = target[part]
        return _fields(target, root, path)
    for alt in node.get("anyOf", []):
        out += _fields(alt, root, path)
    where = path or "(top)"
    if "minimum" in node or "maximum" in node:
        out.append((where, f"{node.get('minimum', '')} to {node.get('maximum', '')}"))
    if "pattern" in node:
        out.append((where, _pattern(node["pattern"])))
    elif "maxLength" in node:
        out.append((where, f"{node.get('minLength', 0)} to {node['maxLength']} characters"))
    if "maxItems" in node:
        out.append((where, f"at most {node['maxItems']} items"))
    if "maxProperties" in node:
        out.append((where, f"at most {node['maxProperties']} keys"))
    names = node.get("propertyNames")
    if isinstance(names, dict) and "pattern" in names:
        out.append((f"{path}/(key)" if path else "(key)", _pattern(names["pattern"])))
    for key, sub in node.get("properties", {}).items():
        out += _fields(sub, root, f"{path}/{key}" if path else key)
    if isinstance(node.get("additionalProperties"), dict):
        out += _fields(node["additionalProperties"], root, f"{path}/*" if path else "*")
    if "items" in node:
        out += _fields(node["items"], root, f"{path}[]")
    return out


def contract_table(names: tuple[str, ...] = ("event", "status", "health", "devices",
                                             "timesync", "ack")) -> list[str]:
    """Markdown rows `| message | field | range or grammar |` of every bounded number
    and patterned string in the named schemas, as README.md lists them."""
    rows = ["| message | field | range or grammar |", "|---|---|---|"]
    for name in names:
        schema = load_schema(name)
        seen: set[tuple[str, str]] = set()
        for field, rule in _fields(schema, schema, ""):
            if (field, rule) not in seen:
                seen.add((field, rule))
                rows.append(f"| {name} | {field} | {rule} |")
    return rows


if __name__ == "__main__":
    print("\n".join(contract_table()))
