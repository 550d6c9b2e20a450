"""Abuse and noise guards on presses: they flag, and drop only when told to.

- `burst`: a press that finds `burst_presses` or more presses at the same desk
  within the `burst_window_s` before it (by the monotonic clock, so a wall
  clock step cannot make or hide a burst): the 6th press in 10 s and every
  one after it is flagged, the first five are not (they were already
  published when the burst became a burst).  Presses are taken in arrival
  order, which is time order except for a console's replays.
- `after_hours`: a press whose wall time is outside the opening hours (days,
  from-to, zone) is flagged, or dropped and counted if configured so.  Only a
  trustworthy clock can say so: while the wall clock is not synchronised
  (a Pi without RTC starts in 1970) nothing is dropped; the press is kept with
  `time.synced` false, and when the clock syncs the time is corrected and the
  opening hours judged again (edge.timesync, `rejudge`): flagged then, never
  dropped, since dropping after the fact would leave a hole in the seqs.
- `test`: a console HOLD (a button held for 2 s) is an installer's test; the
  HOLD event is flagged, and reports exclude it and the PRESS of the same
  device and button just before it.
"""

from __future__ import annotations

from collections import deque

from edge.config import GuardsConfig
from edge.operators import Shift

__all__ = ["Guards"]


class Guards:
    def __init__(self, cfg: GuardsConfig) -> None:
        self.cfg = cfg
        self._window_ns = int(cfg.burst_window_s * 1e9)
        self._recent: dict[str, deque[int]] = {}
        # The opening hours are a weekly shift of nobody at no desk in particular.
        self._open = None if cfg.hours_days is None else Shift(
            "opening-hours", "opening hours", cfg.hours_days, cfg.hours_from, cfg.hours_to,
            cfg.hours_tz)

    def is_open(self, wall_ns: int) -> bool:
        return self._open is None or self._open.occurrence(wall_ns) is not None

    def press(self, desk: str, mono_ns: int, wall_ns: int, hold: bool,
              synced: bool = True) -> tuple[list[str], bool]:
        """(flags, drop) for a press at `desk`; `synced`: the wall clock is trustworthy
        (if not, opening hours are judged later, by `rejudge`)."""
        flags: list[str] = []
        if hold:
            flags.append("test")
        else:
            # Only the last `burst_presses` press times matter: this press is
            # part of a burst if the oldest of them is still within the window.
            # O(1) per press however fast a device floods.
            n = self.cfg.burst_presses
            recent = self._recent.setdefault(desk, deque(maxlen=n))
            if len(recent) == n and recent[0] >= mono_ns - self._window_ns:
                flags.append("burst")
            recent.append(mono_ns)
        if synced and not self.is_open(wall_ns):
            if self.cfg.after_hours == "drop":
                return flags, True
            flags.append("after_hours")
        return flags, False

    def rejudge(self, flags: list[str], wall_ns: int) -> list[str]:
        """A press judged on an unsynchronised clock, with its corrected time: its
        flags with `after_hours` as the opening hours say now."""
        flags = [f for f in flags if f != "after_hours"]
        if not self.is_open(wall_ns):
            flags.append("after_hours")
        return flags
