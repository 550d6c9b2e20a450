"""One thread per configured device: open it, serve it, retry.

A worker only opens, reads and decodes; every decoded input goes to the
daemon's main loop as a message (`Reading`, `DecodeFailed`, `DeviceState`),
and the main loop decides, stores and only then acknowledges through the
worker.  A device that is missing or goes away is retried every `RETRY_S`,
so unplugging and replugging needs no restart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Final, Generic, TypeVar

from drivers.transport import DeviceGoneError, Transport
from edge.clock import Clock
from edge.kinds.base import DeviceConfig, DeviceState

__all__ = ["READ_TIMEOUT_MS", "RETRY_S", "Worker"]

log = logging.getLogger(__name__)

READ_TIMEOUT_MS: Final = 500
RETRY_S: Final = 1.0

T = TypeVar("T", bound=Transport)


class Worker(Generic[T]):
    """One device's thread; subclasses implement `_serve` for their protocol."""

    kind = "device"

    def __init__(self, cfg: DeviceConfig, open_transport: Callable[[], T],
                 post: Callable[[object], None], clock: Clock) -> None:
        self.cfg = cfg
        self._open = open_transport
        self._post = post
        self._clock = clock
        self._stop = threading.Event()
        self._transport: T | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"dev-{cfg.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(READ_TIMEOUT_MS / 1000 + 2)

    def _write(self, data: bytes) -> bool:
        """Write now (from any thread); False if the device is gone."""
        t = self._transport
        if t is None:
            return False
        try:
            t.write(data)
        except (DeviceGoneError, OSError):
            return False
        return True

    def _serve(self, transport: T) -> None:
        raise NotImplementedError

    def _detached(self) -> None:
        """The transport is gone (called with the lock held)."""
        self._transport = None

    def _run(self) -> None:
        last_error: str | None = None
        while not self._stop.is_set():
            try:
                transport = self._open()
            except (DeviceGoneError, OSError) as e:
                if str(e) != last_error:
                    last_error = str(e)
                    self._post(DeviceState(self.cfg.id, "missing", str(e)))
                self._stop.wait(RETRY_S)
                continue
            last_error = None
            try:
                self._serve(transport)
            except (DeviceGoneError, OSError) as e:
                log.warning("%s %s went away: %s", self.kind, self.cfg.id, e)
                self._post(DeviceState(self.cfg.id, "missing", f"disconnected: {e}"))
            finally:
                with self._lock:
                    self._detached()
                transport.close()
            self._stop.wait(RETRY_S if not self._stop.is_set() else 0)

