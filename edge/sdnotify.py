"""systemd's service notification protocol: one datagram per message.

READY=1 once the store is open and the devices scanned; STATUS= with the
queue depth and broker state; WATCHDOG=1 only while the daemon's main loop
and its MQTT thread are both alive (checked by `Watchdog`, on its own thread,
so a stuck main loop stops the pings and systemd restarts the service).

Hand-written rather than a dependency: the protocol is a datagram to the
socket named by $NOTIFY_SOCKET, and the PyPI `sdnotify` package has not been
released since 2017.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Mapping

__all__ = ["Notifier", "Watchdog"]


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # An abstract socket is written with a leading '@'.
        self._addr = "\0" + path[1:] if path.startswith("@") else path
        self._sock: socket.socket | None = None
        if path:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> None:
        if self._sock is None:
            return
        # systemd gone or not listening: nothing to tell.
        with contextlib.suppress(OSError):
            self._sock.sendto("\n".join(lines).encode(), self._addr)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Watchdog:
    """Pings systemd at half the watchdog interval while `alive()` says so."""

    def __init__(self, notifier: Notifier, alive: Callable[[], bool]) -> None:
        self._notifier = notifier
        self._alive = alive
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        if self._notifier.watchdog_s:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        interval = (self._notifier.watchdog_s or 0) / 2
        while not self._stop.wait(interval):
            if self._alive():
                self._notifier.send("WATCHDOG=1")

