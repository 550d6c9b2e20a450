"""`feedback-edge operator ...` against a running daemon process."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Broker, Proc, wait_for
from tests.test_pipeline import Site


@pytest.fixture
def one_desk(tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc]) -> Site:
    return Site(tmp_path, broker, procs)


def cli(site: Site, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-m", "edge.cli", "operator", *args, "--config",
                          str(site.config)], capture_output=True, text=True, check=False)
    assert (out.returncode == 0) == ok, out.stderr
    assert "Traceback" not in out.stderr
    return out


def desk1(site: Site) -> dict[str, object]:
    desk: dict[str, object] = next(d for d in site.status()["desks"] if d["desk"] == "desk-1")
    return desk


def test_roster_login_logout_and_who(one_desk: Site) -> None:
    site = one_desk
    site.start()
    site.wait_connected()
    now = dt.datetime.now(dt.UTC)
    day = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[now.weekday()]
    # A shift covering now, whatever the time of day the tests run.
    cli(site, "add", "--desk", "desk-1", "--operator", "op-anna", "--days", day,
        "--from", "00:00", "--to", "24:00", "--tz", "UTC")
    shifts = json.loads(cli(site, "list", "--json").stdout)
    assert [(s["desk"], s["operator"], s["days"], s["tz"]) for s in shifts] == \
        [("desk-1", "op-anna", day, "UTC")]
    wait_for(lambda: desk1(site)["operator"] == "op-anna", 10, "daemon reloads the roster")
    assert desk1(site)["source"] == "schedule"
    cli(site, "login", "--desk", "desk-1", "--operator", "op-boris")
    assert (desk1(site)["operator"], desk1(site)["source"]) == ("op-boris", "command")
    site.press(0)
    wait_for(lambda: site.status()["devices"][0]["presses"] == 1, 10, "a press")
    cli(site, "logout", "--desk", "desk-1")
    assert (desk1(site)["operator"], desk1(site)["source"]) == ("op-anna", "schedule")
    assert "op-anna" in cli(site, "who").stdout
    cli(site, "remove", str(shifts[0]["id"]))
    wait_for(lambda: desk1(site)["operator"] is None, 10, "roster change seen")
    # Mistakes: a clear message, exit 2.
    bad = cli(site, "add", "--desk", "desk-1", "--operator", "x", "--days", "someday",
              "--from", "8", "--to", "16:00", "--tz", "Mars/Base", ok=False)
    assert bad.returncode == 2
    assert "weekdays" in bad.stderr
    assert cli(site, "login", "--desk", "desk-9", "--operator", "x", ok=False).returncode == 2
    assert cli(site, "remove", "99", ok=False).returncode == 2
