"""Badge readers (keyboard-class: they type the badge number and Enter):
config, worker, and what a scan means.

Protocol: ../shared/devices/keyboard-class.md ("Badge readers"), decoded by
`drivers.keyboard.BadgeDecoder`.  A scan logs the badge's operator in at the
reader's desk, a second scan of the same badge logs them out
(`edge.operators`).  An unknown badge logs in "nobody known" (id null,
source badge) and raises an alarm.  Badge numbers are personal data: never
logged, never in a repr.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

from drivers.keyboard import BadgeDecoder, KeyPress
from edge.contract.toml import Table
from edge.kinds.base import Context, Decision, Device, Env, Kind, Reading
from edge.kinds.keyboard import (
    BootKeyboardWorker,
    UsbKeyboardConfig,
    parse_id,
    parse_identity,
    snippet,
)

__all__ = ["KIND", "Badge", "BadgeConfig", "BadgeScan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BadgeConfig(UsbKeyboardConfig):
    pass


@dataclass(frozen=True, slots=True)
class BadgeScan:
    badge: str = field(repr=False)  # personal data: never in a log line


def parse(t: Table, index: int, desk: str) -> BadgeConfig:
    vid, pid, serial, usb_port = parse_identity(t)
    if t.table("keys") is not None:
        raise t.error("keys", t.data["keys"], "only for kind = \"keyboard\"")
    dev_id = parse_id(t, index, "badge", serial, usb_port)
    t.finish()
    return BadgeConfig(dev_id, "badge", desk, serial, vid, pid, usb_port)


class _BadgeWorker(BootKeyboardWorker):
    # A scan's keys come 100 ms apart at most: read often enough to time them.
    read_timeout_ms = 50

    def __init__(self, cfg: BadgeConfig, env: Env) -> None:
        super().__init__(cfg, env)
        self._badges = BadgeDecoder()

    def _begin(self) -> None:
        self._badges = BadgeDecoder()

    def _keys(self, keys: list[KeyPress], mono: int, wall: int, now_ms: int) -> None:
        self._badges.expire(now_ms)
        for k in keys:
            scan = self._badges.feed(k)
            if scan is not None:
                self._post(Reading(self.cfg.id, BadgeScan(scan.badge), mono, wall))

    def _errors(self) -> dict[str, int]:
        return dict(self._badges.errors)


class Badge(Device):
    cfg: BadgeConfig

    def __init__(self, cfg: BadgeConfig, env: Env) -> None:
        super().__init__(cfg, _BadgeWorker(cfg, env))

    def decide(self, r: Reading, ctx: Context) -> Decision:
        scan = r.data
        assert isinstance(scan, BadgeScan)  # noqa: S101 - posted by _BadgeWorker only
        # Decided in arrival order: presses read before the scan keep the old operator.
        desk = self.cfg.desk
        op = ctx.badges.get(scan.badge.upper())
        if not ctx.operators.badge(desk, op, r.host_wall_ns):
            log.info("desk %s: operator %s logged out by badge", desk, op or "(unknown badge)")
        elif op is None:
            ctx.alarm("unknown_badge", f"unknown badge scanned at desk {desk}", subject=desk)
            log.warning("desk %s: unknown badge (%d characters) scanned", desk, len(scan.badge))
        else:
            log.info("desk %s: operator %s logged in by badge", desk, op)
        return Decision()


KIND: Final = Kind("badge", parse, Badge, snippet, rank=3)
