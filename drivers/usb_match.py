"""What a driver matches on the USB bus, as data.

Each driver module exports its `USB_MATCHER`; `drivers.usb_discovery` collects
them and classifies what is plugged in.  This module imports nothing of ours,
so the drivers can import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Matcher"]


@dataclass(frozen=True, slots=True)
class Matcher:
    """A device `kind` matches by VID:PID (when `vid` is set, `pid` with it),
    and/or by one interface's class triple."""

    kind: str
    vid: int | None = None
    pid: int | None = None
    # (class, subclass, protocol) of one interface; None matches any.
    interface: tuple[int, int | None, int | None] | None = None
