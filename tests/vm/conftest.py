"""Fixtures of the VM tier: `vm_assets` (built once per run, cached across runs)
and `vm`, which boots guests for a test and leaves nothing running after it.

A test's files (console log, QEMU's output, the share, disks) are under the
cache's runs/ directory, not /tmp: kept when the test failed, removed when it
passed."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker
from tests.vm.assets import Assets, UnavailableError, prepare
from tests.vm.debian import Image, prepare_image
from tests.vm.machine import Machines, run_dir
from tests.vm.pi import Installed, PiMachines, first_boot

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
        item: pytest.Item, call: pytest.CallInfo[None],
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture(scope="session")
def vm_assets() -> Assets:
    t = time.monotonic()
    try:
        assets = prepare()
    except UnavailableError as e:
        pytest.skip(f"VM tier: {e}")
    if assets.built:
        print(f"\nVM assets built in {time.monotonic() - t:.1f} s: {assets.built}")
    _prune(assets.runs)
    return assets


def _prune(runs: Path) -> None:
    # Kept failures of earlier runs: the newest few stay for a look, and none
    # young enough to belong to a run still going on this machine.
    old = sorted((p for p in runs.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for p in old[:-10]:
        if time.time() - p.stat().st_mtime > 6 * 3600:
            shutil.rmtree(p, ignore_errors=True)


@pytest.fixture
def vm(vm_assets: Assets, request: pytest.FixtureRequest) -> Iterator[Machines]:
    rundir = run_dir(vm_assets.runs, request.node.name)
    machines = Machines(vm_assets, rundir)
    yield machines
    machines.close()
    reports = request.node.stash.get(_REPORTS, {})
    if any(r.failed for r in reports.values()):
        print(f"\nVM run kept: {rundir} (console.log, qemu.log, share/ per boot)")
    else:
        shutil.rmtree(rundir, ignore_errors=True)


# -- the Pi tier: a whole Debian under systemd, installed from a provisioned card --------

@pytest.fixture(scope="session")
def pi_image() -> Image:
    t = time.monotonic()
    try:
        image = prepare_image()
    except UnavailableError as e:
        pytest.skip(f"Pi tier: {e}")
    if image.built:
        print(f"\nPi image built in {time.monotonic() - t:.1f} s: {image.built}")
    return image


@pytest.fixture(scope="session")
def site_broker(vm_assets: Assets) -> Iterator[Broker]:
    """The site's broker on the host for the whole Pi tier: the card's config
    names it (BROKER_NAME, port) before the first boot, as a clinic's does."""
    workdir = Path(tempfile.mkdtemp(prefix="site-broker-", dir=vm_assets.runs))
    b = Broker(workdir)
    b.start()
    yield b
    b.stop()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def installed_pi(pi_image: Image, site_broker: Broker, vm_assets: Assets) -> Iterator[Installed]:
    """A Pi after its first boot: the card provisioned for SITE_CONFIG, booted
    once (firstrun.sh, install.sh, reboot).  Tests boot copies of it
    (`Installed.clone`); the first boot's own record is for test_pi_install."""
    rundir = run_dir(vm_assets.runs, "pi-first-boot")
    installed = first_boot(pi_image, rundir, site_broker.port)
    yield installed
    if installed.ok:
        shutil.rmtree(rundir, ignore_errors=True)
    else:
        print(f"\nPi first boot kept: {rundir}")


@pytest.fixture
def pi(installed_pi: Installed, request: pytest.FixtureRequest) -> Iterator[PiMachines]:
    """Boots Pis from the installed state for one test and leaves none running."""
    rundir = run_dir(installed_pi.rundir.parent, request.node.name)
    machines = PiMachines(installed_pi, rundir)
    yield machines
    machines.close()
    reports = request.node.stash.get(_REPORTS, {})
    if any(r.failed for r in reports.values()):
        print(f"\nPi run kept: {rundir} (console.log per boot)")
    else:
        shutil.rmtree(rundir, ignore_errors=True)
