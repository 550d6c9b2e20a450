"""store opening (edge/store_check.py): a store over
SYNC_CHECK_BYTES opens after a partial check; damage past the checked ends is
met by main-loop paths before the background check has reported.  The daemon
must never exit on it (README: "The daemon never exits for any of them")."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from edge.store import Store
from tests.test_store import open_store
from tests.test_store_open import damaged_large_store


def _opened_unchecked(path: Path) -> Store:
    s = open_store(path, announce=True)
    assert s.available, "harness: the partial check must let it open"
    return s


def test_clock_sync_rewrite_on_a_damaged_large_store_does_not_raise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """daemon._check_clock calls rewrite_pending when the clock becomes
    synchronised (a Pi without RTC, seconds after boot) with no try around it."""
    s = _opened_unchecked(damaged_large_store(tmp_path, monkeypatch))
    try:
        s.rewrite_pending(lambda b: b.replace(b'"synced":true', b'"synced":false '))
    except sqlite3.DatabaseError as e:
        pytest.fail(f"rewrite_pending raised into the main loop: {e!r}")
    finally:
        s.checked(30)
        s.close()


def test_collector_watermark_on_a_damaged_large_store_does_not_raise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """daemon._on_inbound calls remove_through(watermark) with no try around it."""
    s = _opened_unchecked(damaged_large_store(tmp_path, monkeypatch))
    try:
        s.remove_through(250)
    except sqlite3.DatabaseError as e:
        pytest.fail(f"remove_through raised into the main loop: {e!r}")
    finally:
        s.checked(30)
        s.close()


def test_after_the_background_check_the_damaged_store_is_moved_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = _opened_unchecked(damaged_large_store(tmp_path, monkeypatch))
    assert s.checked(30)
    s.retry(time.monotonic())
    codes = sorted({a.code for a in s.alarms.active(time.time_ns())})
    assert codes == ["store_corrupt", "store_replaced"]
    s.close()


# -- the same, through the daemon's main loop ------------------------------------

import json  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402

from edge import store as store_mod  # noqa: E402
from edge.config import load_config  # noqa: E402
from edge.daemon import Daemon  # noqa: E402
from edge.store_check import BackgroundCheck  # noqa: E402
from firmware_sim.console import ConsoleFirmware  # noqa: E402
from firmware_sim.link import MemoryTransport  # noqa: E402
from tests.conftest import Broker, Subscriber, wait_for, write_config  # noqa: E402


class _HeldCheck(BackgroundCheck):
    """The background quick_check as on a Pi's SD card with a 500 MB store:
    still running (seconds) when the broker connection is up."""

    release = threading.Event()

    def _run(self, path: Path) -> None:
        _HeldCheck.release.wait(30)
        super()._run(path)


def test_daemon_survives_the_collector_watermark_on_adamaged_large_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broker: Broker,
        subscribe: Callable[[str], Subscriber]) -> None:
    path = damaged_large_store(tmp_path, monkeypatch)
    monkeypatch.setattr(store_mod, "BackgroundCheck", _HeldCheck)
    _HeldCheck.release.clear()
    sub = subscribe("feedback/#")
    root = "feedback/v1/clinic-3/reception-1"
    # The collector's retained watermark, as it is after a restart of the daemon.
    sub.client.publish(f"{root}/ack", json.dumps({"seq": 250}), qos=1,
                       retain=True).wait_for_publish()
    fw = ConsoleFirmware("00A1B2C3D4E5", uptime_ms=lambda: int(time.monotonic() * 1000))
    cfg = load_config(write_config(
        tmp_path / "edge.toml", port=broker.port, store=path,
        devices=[{"kind": "console", "desk": "desk-1", "serial": "00A1B2C3D4E5"}],
        extra='health_interval_s = 1\n[delivery]\nmode = "collector"'))
    daemon = Daemon(cfg, openers={"console": lambda _c: MemoryTransport(fw)},
                    sysfs=tmp_path / "sys")
    (tmp_path / "sys").mkdir(exist_ok=True)
    died: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as e:
            died.append(e)

    turn = daemon.turn

    def watched_turn(timeout: float) -> None:
        try:
            turn(timeout)
        except BaseException as e:
            died.append(e)
            raise

    daemon.turn = watched_turn  # type: ignore[method-assign]
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        wait_for(lambda: died or daemon.publisher.watermark == 250, 15,
                 "the watermark handled (or the daemon dead)")
        _HeldCheck.release.set()
        # Either the main loop died on the damaged page, or it lives on and the
        # background check's verdict moves the store aside (store_corrupt).
        wait_for(lambda: died or daemon.store.alarms.has("store_corrupt"), 15,
                 "store_corrupt, or the daemon's end")
        assert not died, f"the daemon's main loop died: {died[0]!r}"
        assert t.is_alive()
    finally:
        _HeldCheck.release.set()
        daemon.request_stop()
        t.join(10)
        sub.client.publish(f"{root}/ack", b"", qos=1, retain=True)
