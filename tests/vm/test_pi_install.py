"""A card from `feedback-edge provision` boots into a running service under a
real systemd (issue 16, "First boot for real").

The `installed_pi` fixture provisions a Bookworm card for the site, boots a
fresh Debian from it (cmdline.txt's systemd.run= runs firstrun.sh, which runs
install.sh offline from the card's wheelhouse, then reboots), and boots it a
second time.  These tests check what that left, as an installer would: the
card's install.log and `installed`, the unit running as its user, READY=1.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from tests.conftest import Broker
from tests.vm.assets import Assets
from tests.vm.debian import Image
from tests.vm.pi import Card, Installed, PiGuest, site_config

pytestmark = pytest.mark.vm

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


def test_first_boot_installs_offline_from_the_card_and_the_service_reaches_ready(
        installed_pi: Installed) -> None:
    i = installed_pi
    print(f"\nfirst boot (firstrun, install, reboot): {i.first_boot_s:.1f} s; second boot: "
          f"agent {i.second_boot_ready_s:.1f} s, service active {i.second_boot_active_s:.1f} s")
    assert i.first_boot_log is not None, f"no install.log on the card ({i.error})"
    log = i.first_boot_log
    assert not i.error, f"{i.error}\ninstall.log:\n{log}"
    lines = log.splitlines()
    # In order: what the installer reads on the laptop, one step per line.
    steps = [r"firstrun: started " + STAMP,
             r"firstrun: hostname vm-site-vm-edge",
             r"firstrun: ssh enabled for admin \(keys only\)",
             r"feedback-edge install: started " + STAMP + " from /boot/firmware/feedback",
             r"feedback-edge install: installed feedback-edge \S+",
             r"/etc/feedback-edge/edge.toml: ok \(site vm-site, edge vm-edge, broker "
             r"mqtt.clinic.test:\d+, 1 device\(s\)",
             r"Creating user 'feedback-edge'",
             r"feedback-edge install: the service is running: ",
             r"feedback-edge install: done; the service is enabled",
             r"firstrun: finished, rebooting"]
    at = 0
    for step in steps:
        found = next((n for n in range(at, len(lines)) if re.match(step, lines[n])), None)
        assert found is not None, f"install.log lacks {step!r} after line {at}:\n{log}"
        at = found + 1
    assert "FAILED" not in log, log
    assert "rror" not in log, log
    assert re.fullmatch(STAMP + r"\n", i.installed or ""), i.installed
    # firstrun.sh took itself off the kernel command line once it had run to its end.
    assert "systemd.run" not in (i.cmdline_after or "systemd.run")
    # README's step 6: the admin's key is in place and `sudo feedback-edge
    # status` works for the admin (0: fine, 3: running with alarms).
    assert "installer@laptop" in i.admin_keys
    assert i.admin_status[0] in (0, 3), i.admin_status
    assert "vm-site" in i.admin_status[1], i.admin_status
    want = {"ActiveState": "active", "SubState": "running", "User": "feedback-edge",
            "UnitFileState": "enabled", "NRestarts": "0"}
    assert {k: i.unit.get(k) for k in want} == want, i.unit


def test_the_second_boot_does_not_install_again(installed_pi: Installed) -> None:
    i = installed_pi
    assert not i.error, i.error
    assert "systemd.run" not in i.second_boot_cmdline, i.second_boot_cmdline
    assert "kernel-command-line.service" not in i.second_boot_generated
    assert i.second_boot_log == i.first_boot_log
    assert i.second_boot_installed == i.installed
    # The config's secrets left the FAT partition once installed.
    assert i.card.read("feedback/site/edge.toml") is None


def test_a_failed_install_says_why_on_the_card_and_boots_on(
        pi_image: Image, site_broker: Broker, vm_assets: Assets) -> None:
    """A card whose wheelhouse lost the daemon's wheel (a copy cut short): the
    first boot says so in install.log, leaves no `installed`, and takes the
    installer off the command line, so the Pi does not retry at every boot."""
    rundir = Path(tempfile.mkdtemp(prefix="pi-failed-install-", dir=vm_assets.runs))
    site = rundir / "site"
    site.mkdir()
    (site / "edge.toml").write_text(site_config(site_broker.port))
    card, _ = Card.write(rundir / "card.img", site)
    wheels = subprocess.run(["mdir", "-b", "-i", str(card.image), "::/feedback/wheels"],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}).stdout.split()
    [wheel] = [w for w in wheels if "feedback_edge-" in w]
    subprocess.run(["mdel", "-i", str(card.image), wheel], check=True,
                   env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    (rundir / "boot-1").mkdir()
    g = PiGuest(pi_image, rundir / "boot-1", pi_image.overlay(rundir / "root.qcow2"), card)
    try:
        g.start()
        assert g.wait_stopped(900) == 0
    finally:
        g.close()
    log = card.text("feedback/install.log") or ""
    print(f"\ninstall.log of a card without the daemon's wheel:\n{log}")
    assert re.search(r"feedback-edge install: FAILED: pip install feedback-edge from "
                     r"/boot/firmware/feedback/wheels", log), log
    assert "firstrun: the install FAILED; see above" in log, log
    assert card.read("feedback/installed") is None
    assert "systemd.run" not in (card.text("cmdline.txt") or "systemd.run")
    # The config's secrets left the card although the install failed.
    assert card.read("feedback/site/edge.toml") is None
    shutil.rmtree(rundir, ignore_errors=True)


def test_a_power_cut_during_the_first_boot_is_followed_by_a_whole_install(
        pi_image: Image, site_broker: Broker, vm_assets: Assets) -> None:
    """The Pi unplugged during its first boot, while the installer runs (a
    seeded moment 3-12 s after systemd starts it; it takes about 30 s): the next
    boot runs it again from the start and the one after is a working Pi.
    (firstrun.sh used to take itself off cmdline.txt before installing, so a
    cut there left a half-installed Pi that never tried again.)"""
    seed = int(os.environ.get("FEEDBACK_FIRSTBOOT_CUT_SEED")
               or random.SystemRandom().randrange(1000))
    delay = random.Random(seed).uniform(3, 12)
    rundir = Path(tempfile.mkdtemp(prefix="pi-cut-first-boot-", dir=vm_assets.runs))
    site = rundir / "site"
    site.mkdir()
    (site / "edge.toml").write_text(site_config(site_broker.port))
    card, _ = Card.write(rundir / "card.img", site)
    root = pi_image.overlay(rundir / "root.qcow2")
    guests: list[PiGuest] = []

    def boot() -> PiGuest:
        (rundir / f"boot-{len(guests) + 1}").mkdir()
        g = PiGuest(pi_image, rundir / f"boot-{len(guests) + 1}", root, card)
        guests.append(g)
        g.start()
        return g

    try:
        g = boot()
        # systemd's "Starting kernel-command-line.service" (not the kernel's
        # own echo of its command line, which names the target too).
        g.wait_for(lambda: re.search(r"Starting \S*kernel-command-li", g.console_text()), 300,
                   "systemd starting the first-boot script")
        threading.Event().wait(delay)  # the moment of the cut: the test's input
        g.power_cut()
        print(f"\npower cut {delay:.1f} s into the first boot's installer (seed {seed}; "
              f"FEEDBACK_FIRSTBOOT_CUT_SEED={seed} repeats it)")
        assert card.read("feedback/installed") is None, "cut after the install: no test"
        assert "systemd.run" in (card.text("cmdline.txt") or ""), card.text("cmdline.txt")
        g = boot()
        assert g.wait_stopped(900) == 0  # the retry installs, then reboots
        log = card.text("feedback/install.log") or ""
        assert "(attempt 2 of 3)" in log, log
        assert "feedback-edge install: done; the service is enabled" in log, log
        assert card.read("feedback/installed") is not None, log
        assert "systemd.run" not in (card.text("cmdline.txt") or "systemd.run")
        g = boot()
        g.wait_ready(300)
        g.wait_unit(300, "the boot after the retried install", ActiveState="active")
        g.poweroff()
    finally:
        for g in guests:
            g.close()
    shutil.rmtree(rundir, ignore_errors=True)
