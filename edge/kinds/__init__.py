"""Device kinds: one module each, registered here.

Each module (`console`, `terminal`, `keyboard`, `badge`) holds a kind's config
dataclass and parser, its worker thread, and how its readings become events
and acknowledgements, behind the interface in `edge.kinds.base`.  Adding a
kind is one module here plus its protocol core and transport in `drivers/`,
and one line in `KINDS`.
"""

from __future__ import annotations

from typing import Final

from edge.contract.ids import DESK_RE
from edge.contract.toml import Table
from edge.kinds import badge, console, keyboard, terminal
from edge.kinds.base import DeviceConfig, Kind

__all__ = ["KINDS", "parse_device"]

KINDS: Final[dict[str, Kind]] = {k.name: k for k in (console.KIND, terminal.KIND,
                                                       keyboard.KIND, badge.KIND)}


def parse_device(t: Table, index: int, desks: dict[str, object]) -> DeviceConfig:
    """One `[[devices]]` table: its kind and desk here, the rest by the kind.

    Raises ConfigError naming the key, the value and what is allowed.
    """
    names = ", ".join(KINDS)
    name = t.required_string("kind", allowed=f"one of {names}")
    kind = KINDS.get(name)
    if kind is None:
        raise t.error("kind", name, f"must be one of {names}")
    desk = t.required_string("desk", pattern=DESK_RE,
                             allowed="a desk name: 1 to 64 letters, digits, '_', '.', '-'")
    if desks and desk not in desks:
        raise t.error("desk", desk, f"must be one of the [desks] tables: {', '.join(desks)}")
    return kind.parse(t, index, desk)
