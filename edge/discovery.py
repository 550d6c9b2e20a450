"""What is plugged in, watched for the device inventory.

Configured devices are found by their own workers (which retry every
second); this is what lets `status` and the `devices` topic list hardware
that is plugged in but not configured, within `interval` seconds of plugging
it in.  Matching is `drivers.usb_discovery` (each driver's USB matcher).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from drivers.usb_discovery import UsbDevice, classify, scan
from edge.kinds import MATCHERS

__all__ = ["Attached", "DiscoveryWatcher", "attached_now"]


@dataclass(frozen=True, slots=True)
class Attached:
    """What is plugged in now, with the kind we would read it as (None: not ours)."""

    devices: tuple[tuple[UsbDevice, str | None], ...]


def attached_now(root: Path) -> Attached:
    return Attached(tuple((d, classify(d, MATCHERS)) for d in scan(root)))


class DiscoveryWatcher:
    """Rescans sysfs every `interval` s and posts Attached when anything changed."""

    def __init__(self, post: Callable[[object], None], root: Path = Path("/sys"),
                 interval: float = 2.0) -> None:
        self._post = post
        self._root = root
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._interval + 1)

    def _run(self) -> None:
        last: Attached | None = None
        while not self._stop.is_set():
            now = attached_now(self._root)
            if now != last:
                last = now
                self._post(now)
            self._stop.wait(self._interval)
