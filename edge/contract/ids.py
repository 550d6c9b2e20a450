"""Identifier grammars shared by the config, the commands and the collector
(../shared/mqtt-contract.md: site, edge and device ids appear in topics)."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["DESK_RE", "NAME_RE", "SERIAL_RE"]

# site, edge and device ids: they are topic levels, so no '/', '+', '#'.
NAME_RE: Final = re.compile(r"^[a-z0-9-]{1,32}$")
# The 12 upper-case hex digits printed on a console's or terminal's label.
SERIAL_RE: Final = re.compile(r"^[0-9A-F]{12}$")
DESK_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
