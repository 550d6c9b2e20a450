"""Alarms for states of the world that need a person once they have lasted:
a configured device missing or failing, the clock never synchronised, the
collector offline (collector delivery), events waiting too long on the Pi.

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

__all__ = ["CLOCK_GRACE_S", "COLLECTOR_GRACE_S", "DEVICE_GRACE_S", "QUEUE_OLD_S", "Conditions"]

# A replug or a reboot of a terminal takes seconds; a minute is a real absence.
DEVICE_GRACE_S: Final = 60.0
# NTP needs the network; an hour without it at a clinic means it will not come.
CLOCK_GRACE_S: Final = 3600.0
# A collector restart takes seconds; ten minutes offline is an outage.
COLLECTOR_GRACE_S: Final = 600.0
# Presses should reach the collector in seconds; an hour means something is wrong
# (broker, collector, network), whatever the other alarms say.
QUEUE_OLD_S: Final = 3600.0


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
              clock_synced: bool, *, collector_online: bool | None = None,
              oldest_pending_s: float | None = None) -> None:
        """Raise or clear the device, clock and delivery alarms (`now`: monotonic s;
        `collector_online` None outside collector delivery; `oldest_pending_s`: the
        age of the oldest event still on the Pi)."""
        if self._held("collector", now, collector_online is False, COLLECTOR_GRACE_S):
            self._alarms.raise_("collector_offline", "the collector has been offline for "
                                f"{COLLECTOR_GRACE_S / 60:.0f} minutes: presses are kept on the "
                                "Pi and nothing is delivered", wall_ns)
        elif collector_online is not False:
            self._alarms.clear("collector_offline")
        if oldest_pending_s is not None and oldest_pending_s >= QUEUE_OLD_S:
            self._alarms.raise_("queue_old", f"the oldest stored event has waited "
                                f"{oldest_pending_s / 3600:.1f} h to leave the Pi", wall_ns)
        else:
            self._alarms.clear("queue_old")
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
