"""Fixtures for the collector's tests: a real PostgreSQL (Debian's package,
started here on a free port) next to SQLite, collector processes, and events
built the way the daemon builds them."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from collector.db import Database, open_database
from edge.events import (
    DeviceLost,
    DeviceRef,
    Event,
    EventTime,
    OperatorTag,
    Press,
    encode_event,
    new_event_id,
)

if TYPE_CHECKING:
    from tests.conftest import Broker, Proc
# tests.conftest imports this module's fixtures: its helpers are imported
# where they are used, so either module can be imported first.


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class Postgres:
    """A throwaway PostgreSQL cluster (as the postgres user when run as root)."""

    def __init__(self) -> None:
        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            pytest.skip("PostgreSQL is not installed (Debian package postgresql; scripts/test "
                        "installs it when run as root)")
        self.pg_ctl = pg_ctl
        self.dir = Path(tempfile.mkdtemp(prefix="feedback-pg-"))
        self.dir.chmod(0o755)
        from tests.conftest import free_port

        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run([initdb, "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres",
                   "--no-sync", "-E", "UTF8"])
        self.start()

    def start(self) -> None:
        """Start the server (again: same port and data directory); return once it accepts."""
        self._run([self.pg_ctl, "-D", str(self.dir / "data"), "-l", str(self.dir / "log"),
                   "-w", "-o", f"-p {self.port} -k {self.dir} -c listen_addresses='' "
                   "-c fsync=off -c max_connections=50", "start"])

    def halt(self, mode: str = "immediate") -> None:
        """Stop the server, keeping its data: `immediate` is a crash (every connection
        cut, recovery on the next start), `fast` a clean shutdown."""
        self._run([self.pg_ctl, "-D", str(self.dir / "data"), "-m", mode, "-w", "stop"])

    def _run(self, cmd: list[str]) -> None:
        r = subprocess.run([*self._as, *cmd], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise AssertionError(f"{cmd[0]} failed: {r.stdout}{r.stderr}")

    def dsn(self, db: str = "postgres") -> str:
        return f"host={self.dir} port={self.port} user=postgres dbname={db}"

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self) -> None:
        """Stop the server (if a test left it running) and remove the cluster."""
        if (self.dir / "data" / "postmaster.pid").exists():
            self.halt()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    yield pg
    pg.stop()


class Backend:
    """Where a test's collector keeps its data: an SQLite file or a PostgreSQL database."""

    def __init__(self, kind: str, tmp: Path, pg: Postgres | None) -> None:
        self.kind = kind
        self.path = tmp / "collector.sqlite" if kind == "sqlite" else None
        self.dsn = pg.new_database() if pg is not None else None

    def toml(self) -> str:
        if self.path is not None:
            return f'[database]\npath = "{self.path}"\n'
        return f'[database]\ndsn = "{self.dsn}"\n'

    def open(self) -> Database:
        return open_database(self.path, self.dsn)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    pg = request.getfixturevalue("postgres") if request.param == "postgres" else None
    return Backend(request.param, tmp_path, pg)


def collector_config(path: Path, broker: Broker, backend: Backend, ident: str = "central-1",
                     extra: str = "") -> Path:
    path.write_text(f'id = "{ident}"\n\n[broker]\nhost = "127.0.0.1"\nport = {broker.port}\n'
                    f"reconnect_min_s = 0.1\nreconnect_max_s = 1\n\n{backend.toml()}\n"
                    f'[reports]\ntz = "Europe/Berlin"\n{extra}')
    return path


@pytest.fixture
def collectors(tmp_path: Path, broker: Broker, backend: Backend,
               procs: Callable[[list[str], Path], Proc]) -> Callable[[str], Proc]:
    """start(ident): a `feedback-collector run` process sharing this test's database."""
    def start(ident: str = "central-1") -> Proc:
        cfg = collector_config(tmp_path / f"{ident}.toml", broker, backend, ident)
        return procs(["collector.cli", "run", "--config", str(cfg)], tmp_path / f"{ident}.log")

    return start


def press_event(seq: int, *, desk: str = "desk-1", label: str = "good", score: int = 1,
                operator: str | None = "op-1", flags: tuple[str, ...] = (),
                wall_ns: int = 1_795_000_000_000_000_000, synced: bool = True,
                boot_id: str = "boot-a", mono_ns: int | None = None, hold: bool = False,
                button: int = 0, event_id: str | None = None, site: str = "clinic-3",
                edge: str = "reception-1") -> tuple[str, bytes]:
    """(topic, payload) of a press as the daemon publishes it."""
    ev = Event(event_id or new_event_id(), desk, DeviceRef("fc3-a", "console", "00A1B2C3D4E5"),
               Press(button, label, score, hold),
               OperatorTag(operator, "config" if operator else "none"),
               EventTime(wall_ns, synced, boot_id, seq * 10**9 if mono_ns is None else mono_ns),
               flags)
    return (f"feedback/v1/{site}/{edge}/event/fc3-a", encode_event(ev, seq, site, edge))


def device_lost_event(seq: int, *, device: str = "fc3-a", device_kind: str = "console",
                      lost: int = 1, total: int = 1, reason: str = "ring_overflow",
                      wall_ns: int = 1_795_000_000_000_000_000, event_id: str | None = None,
                      site: str = "clinic-3", edge: str = "reception-1") -> tuple[str, bytes]:
    """(topic, payload) of a `device_lost` event as the daemon publishes it."""
    ev = Event(event_id or new_event_id(), "desk-1", DeviceRef(device, device_kind, None),
               DeviceLost(lost, total, reason), OperatorTag.nobody(),
               EventTime(wall_ns, True, "boot-a", seq * 10**9))
    return (f"feedback/v1/{site}/{edge}/event/{device}", encode_event(ev, seq, site, edge))


def count_events(backend: Backend) -> int:
    db = backend.open()
    try:
        return int(db.query("SELECT count(*) FROM events")[0][0])
    finally:
        db.close()


def wait_events(backend: Backend, n: int, timeout: float = 60, what: str = "") -> None:
    from tests.conftest import wait_for

    wait_for(lambda: count_events(backend) >= n, timeout, what or f"{n} events stored")

