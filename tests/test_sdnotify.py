"""sd_notify with a real unix datagram socket as NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Broker, Proc, wait_for
from tests.test_pipeline import Site


class Systemd:
    """Plays systemd's side: receives notifications, with their arrival times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            self.got.extend((now, line) for line in data.decode().splitlines())

    def pings(self) -> list[float]:
        return [t for t, line in self.got if line == "WATCHDOG=1"]

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()


def test_ready_status_watchdog_cadence_and_stop_when_the_main_loop_is_stuck(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc]) -> None:
    site = Site(tmp_path, broker, procs)
    systemd = Systemd(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "4000000"}
    daemon = Proc(["edge.cli", "run", "--config", str(site.config)], tmp_path / "daemon.log",
                  env).start()
    try:
        wait_for(lambda: any(line == "READY=1" for _, line in systemd.got), 15, "READY=1")
        wait_for(lambda: any(line.startswith("STATUS=") and "broker connected" in line
                             for _, line in systemd.got), 15, "STATUS with the broker state")
        wait_for(lambda: len(systemd.pings()) >= 4, 15, "watchdog pings")
        gaps = [b - a for a, b in zip(systemd.pings(), systemd.pings()[1:], strict=False)]
        assert all(1.5 < g < 2.6 for g in gaps), gaps  # half of WatchdogSec=4 s
        # A read on the main loop hangs (as on a failing SD card): the shift
        # roster, which the loop re-reads when it changes, becomes a FIFO that
        # nobody writes, so opening it blocks the main loop until a writer comes.
        roster = tmp_path / "state" / "roster.json"
        fifo = tmp_path / "state" / "roster.fifo"
        os.mkfifo(fifo)
        os.replace(fifo, roster)
        try:
            wait_for(lambda: time.monotonic() - systemd.pings()[-1] > 3.5, 10,
                     "the pings to stop while the main loop is stuck")
        finally:
            plain = tmp_path / "state" / "roster.plain"
            plain.write_text("{}")
            with roster.open("w") as w:  # the reader is waiting: this does not block
                w.write("{}")
            os.replace(plain, roster)  # before the loop looks at the roster again (1 s)
        stalled_at = time.monotonic()
        wait_for(lambda: systemd.pings()[-1] > stalled_at, 10, "pings again after the stall")
        daemon.kill(signal.SIGTERM)
        assert any(line == "STOPPING=1" for _, line in systemd.got)
    finally:
        daemon.kill()
        systemd.close()
