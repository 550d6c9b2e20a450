"""Time sync: when the wall clock becomes trustworthy, and the anchor that
maps this boot's monotonic times to wall times.

`synced` is the kernel's verdict (adjtimex STA_UNSYNC, via `edge.clock`).  A
`timesync` anchor `{boot_id, mono_ns, wall, reason}` (mqtt-contract.md,
schemas/timesync.schema.json) is published when the clock becomes
synchronised, on every connect while synchronised, and when a synchronised
clock steps by more than `STEP_NS`.  When the clock becomes synchronised the
unsynchronised events of this boot still in the store are re-timed from the
anchor (flag `time_corrected`); events already in flight are left to the
collector, which corrects them with the same anchor.  seq and the publishing
order never depend on the wall clock.

Decisions taken on the wall clock (opening hours, the roster's operator) are
provisional while it is unsynchronised (issue 14: a Pi without RTC reads 1970
until NTP answers).  So, where the config makes such decisions, the events of
this boot recorded on an unsynchronised clock are held in the store (`hold`)
until the clock syncs, when they are re-timed and decided again before they
leave; after `HOLD_UNSYNCED_S` without sync (NTP blocked at the site) they go
out as they are, and the collector corrects their times with a later anchor.
Logins made on the unsynchronised clock are re-timed at sync too
(edge.operators.Operators.retime).  Where no decision depends on the wall
clock nothing is held.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Final, Protocol, TypeVar

from edge.clock import Clock
from edge.contract.timefmt import format_wall

__all__ = ["HOLD_UNSYNCED_S", "STEP_NS", "TimeSync"]

log = logging.getLogger(__name__)

STEP_NS: Final = 1_000_000_000
# NTP answers within a minute of the network; beyond this the site blocks it.
HOLD_UNSYNCED_S: Final = 300.0

P = TypeVar("P", bound="_HasPayload")


class _HasPayload(Protocol):
    @property
    def payload(self) -> bytes: ...


class TimeSync:
    """Watches the clock; pure apart from reading `clock`."""

    def __init__(self, clock: Clock,
                 redo: Callable[[dict[str, Any], int], None] | None = None,
                 provisional: Callable[[], bool] = lambda: False) -> None:
        """`redo(event, wall_ns)` takes the decisions that depended on the wall
        clock again (opening hours, the roster's operator) for a stored event
        whose time is being corrected (edge.kinds.base.Context.rejudge);
        `provisional()` whether the config makes such decisions (then `hold`
        keeps unsynchronised events back)."""
        self.clock = clock
        self._redo = redo
        # (synced, wall - mono) at the last look.
        self._seen: tuple[bool, int] | None = None
        self.anchor: tuple[int, int] | None = None  # (mono_ns, wall_ns)
        self.corrected = 0  # stored events re-timed from an anchor
        self._provisional = provisional
        self._unsynced_since: int | None = None  # mono ns when first seen unsynchronised
        self.held = 0  # events held back at the last look

    def observe(self) -> str | None:
        """Look at the clock; the reason for a new anchor ("synchronised" or
        "stepped"), or None when nothing changed."""
        synced = self.clock.synced()
        mono, wall = self.clock.mono_ns(), self.clock.wall_ns()
        offset = wall - mono
        seen, self._seen = self._seen, (synced, offset)
        if not synced:
            if self._unsynced_since is None:
                self._unsynced_since = mono
            return None
        self._unsynced_since = None
        if seen is None or not seen[0]:
            reason = "synchronised"
        elif abs(offset - seen[1]) > STEP_NS:
            # A step while synchronised (an NTP step, an operator's `date`):
            # the new anchor lets the collector map monotonic times to wall times.
            reason = "stepped"
            log.warning("wall clock stepped by %.1f s", (offset - seen[1]) / 1e9)
        else:
            return None
        self.anchor = (mono, wall)
        return reason

    def hold(self, batch: list[P]) -> list[P]:
        """`batch` (stored events in seq order) up to the first one whose
        wall-clock decisions are provisional: recorded in this boot on an
        unsynchronised clock, while it still is and for `HOLD_UNSYNCED_S` at most."""
        self.held = 0
        since = self._unsynced_since
        if since is None or not self._provisional() or \
                self.clock.mono_ns() - since >= HOLD_UNSYNCED_S * 1e9:
            return batch
        # Stored payloads are encode_event's compact JSON: no parse per event.
        marker = f'"boot_id":"{self.clock.boot_id}"'.encode()
        for i, p in enumerate(batch):
            if b'"synced":false' in p.payload and marker in p.payload:
                self.held = len(batch) - i
                return batch[:i]
        return batch

    def anchor_payload(self, reason: str) -> bytes | None:
        """The `timesync` message for the current anchor, or None without one."""
        if self.anchor is None:
            return None
        mono, wall = self.anchor
        return json.dumps({"boot_id": self.clock.boot_id, "mono_ns": mono,
                           "wall": format_wall(wall), "reason": reason}).encode()

    def correct(self, payload: bytes) -> bytes | None:
        """An unsynchronised stored event of this boot, re-timed from the anchor;
        None to leave the payload as it is."""
        if self.anchor is None:
            return None
        try:
            event = json.loads(payload)
            t = event["time"]
            if t["synced"] is not False or t["boot_id"] != self.clock.boot_id:
                return None
            mono, wall = self.anchor
            corrected = wall - (mono - int(t["mono_ns"]))
            t["wall"] = format_wall(corrected)
            t["synced"] = True
            event["flags"] = [*event["flags"], "time_corrected"]
            if self._redo is not None:
                self._redo(event, corrected)
        except (ValueError, KeyError, TypeError):
            return None
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()

    def status(self) -> dict[str, object]:
        """The `clock` object of `status`."""
        return {"synced": self.clock.synced(), "boot_id": self.clock.boot_id,
                "anchor": None if self.anchor is None else
                {"mono_ns": self.anchor[0], "wall": format_wall(self.anchor[1])},
                "corrected_events": self.corrected}
