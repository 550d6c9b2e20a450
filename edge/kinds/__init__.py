"""Device kinds: one module each, found here by themselves.

Each module (`console`, `terminal`, `keyboard`, `badge`) holds a kind's config
dataclass and parser, its worker thread, and how its readings become events
and acknowledgements, behind the interface in `edge.kinds.base`, and names
itself in a module-level `KIND`.  Adding a kind is one module here plus its
protocol core and transport in `drivers/`: every module of this package with
a `KIND` is registered, and its driver's USB matcher with it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Final

from drivers.usb_match import Matcher
from edge.contract.ids import DESK_RE
from edge.contract.toml import Table
from edge.kinds.base import DeviceConfig, Kind

__all__ = ["KINDS", "MATCHERS", "parse_device"]


def _discover() -> dict[str, Kind]:
    found: list[Kind] = []
    for module in pkgutil.iter_modules(__path__):
        kind = getattr(importlib.import_module(f"{__name__}.{module.name}"), "KIND", None)
        if isinstance(kind, Kind):
            found.append(kind)
    return {k.name: k for k in sorted(found, key=lambda k: (k.rank, k.name))}


KINDS: Final[dict[str, Kind]] = _discover()
# What `drivers.usb_discovery.classify` matches plugged-in hardware against,
# most specific first (rank: our own VID:PIDs before device classes).
MATCHERS: Final[tuple[Matcher, ...]] = tuple(k.matcher for k in KINDS.values()
                                             if k.matcher is not None)


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
