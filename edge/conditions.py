"""Alarms for states of the world that need a person once they have lasted:
a configured device missing or failing, the clock never synchronised.

The daemon calls `check()` about once a second with its monotonic time; an
alarm is raised when a condition has held for its grace time and cleared
as soon as it is over.  (The broker's conditions are the MQTT link's,
edge.link_alarms.LinkAlarms; the store's are the store's, edge/store.py.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from edge.alarms import Alarms
from edge.kinds.base import Device

__all__ = ["CLOCK_GRACE_S", "DEVICE_GRACE_S", "Conditions"]

# A replug or a reboot of a terminal takes seconds; a minute is a real absence.
DEVICE_GRACE_S: Final = 60.0
# NTP needs the network; an hour without it at a clinic means it will not come.
CLOCK_GRACE_S: Final = 3600.0


class Conditions:
    def __init__(self, alarms: Alarms) -> None:
        self._alarms = alarms
        self._since: dict[str, float] = {}  # condition key -> monotonic s it began

    def _held(self, key: str, now: float, true: bool, grace: float) -> bool:
        if not true:
            self._since.pop(key, None)
            return False
        return now - self._since.setdefault(key, now) >= grace

    def check(self, now: float, wall_ns: int, devices: Iterable[Device],
              clock_synced: bool) -> None:
        """Raise or clear the device and clock alarms (`now`: monotonic s)."""
        for dev in devices:
            bad = dev.state != "connected"
            if self._held(f"device:{dev.cfg.id}", now, bad, DEVICE_GRACE_S):
                what = "missing" if dev.state == "missing" else f"in error ({dev.error})"
                self._alarms.raise_("device_missing", f"{dev.cfg.kind} {dev.cfg.id} at desk "
                                    f"{dev.cfg.desk} is {what}", wall_ns, subject=dev.cfg.id)
            elif not bad:
                self._alarms.clear("device_missing", dev.cfg.id)
        if self._held("clock", now, not clock_synced, CLOCK_GRACE_S):
            self._alarms.raise_("clock_unsynced", "the clock has not been synchronised for an "
                                "hour (is NTP reachable?); times are corrected once it is",
                                wall_ns)
        elif clock_synced:
            self._alarms.clear("clock_unsynced")
