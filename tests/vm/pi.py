"""The Pi tier: a whole Debian under systemd as PID 1 (tests/vm/debian.py),
booted from a card that `feedback-edge provision` wrote.

- `Card`: the boot partition as an installer's laptop sees it.  `Card.write`
  makes a Raspberry Pi OS Bookworm boot partition (config.txt, cmdline.txt,
  a device tree), runs `provision` on it and packs the folder into a FAT
  image; `read` takes a file back out of the image (mtools: no mount, no
  root), as the installer reads `feedback/install.log` on the laptop.
- `PiGuest`: QEMU with the root disk (a qcow2 overlay of the image) as vda and
  the card as vdb, the kernel command line read from the card's cmdline.txt
  before each boot, as the Pi's firmware does.  A reboot ends QEMU
  (-no-reboot); the test boots the same disks again.  The test's command
  channel is the USB tier's (guest/agent.sh, via vm-agent.service).

Power cuts are SIGKILL to QEMU, as in the USB tier.  The root overlay is
opened with QEMU's default cache (writeback): a flush from the guest (fsync)
reaches the file, qcow2's own metadata included, before it completes, and
what the guest had not flushed is lost.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.vm.assets import CHECKOUT, GUEST, SYSTEM_PATH
from tests.vm.debian import BROKER_NAME, Image
from tests.vm.machine import Guest, GuestError, _drive, _q

__all__ = ["CARD_MB", "Card", "Installed", "PiGuest", "PiMachines", "first_boot", "site_config"]

CARD_MB = 128
UNIT = "feedback-edge.service"
# The card of a Pi as Raspberry Pi Imager leaves it, but for the root device:
# the firmware's cmdline.txt names the SD card's partition, this one the disk.
CMDLINE = "console=ttyS0 root=/dev/vda rootfstype=ext4 fsck.repair=yes rootwait\n"


def _tool(args: Sequence[str], *, input: bytes | None = None) -> bytes:
    proc = subprocess.run(list(args), input=input, capture_output=True, check=False,
                          env={**os.environ, "PATH": SYSTEM_PATH, "MTOOLS_SKIP_CHECK": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.decode(errors='replace')[-1000:]}")
    return proc.stdout


@dataclass(frozen=True)
class Card:
    """A FAT image holding a provisioned boot partition."""

    image: Path

    @classmethod
    def write(cls, dest: Path, site: Path, *, wheelhouse: Path | None = None,
              ssh_key: Path | None = None, hostname: str | None = None) -> tuple[Card, str]:
        """Provision a fresh Bookworm boot partition for the site folder `site`
        (its edge.toml and the files it names) into the FAT image `dest`.
        Returns the card and what provision printed."""
        from edge.provision import Options, host_target, provision

        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            boot = Path(tmp) / "bootfs"
            boot.mkdir()
            (boot / "config.txt").write_text("dtparam=audio=on\nauto_initramfs=1\n")
            (boot / "cmdline.txt").write_text(CMDLINE)
            (boot / "bcm2712-rpi-5-b.dtb").write_bytes(b"\xd0\x0d\xfe\xed")
            (boot / "issue.txt").write_text("Raspberry Pi reference 2025-05-13\n")
            # The wheels the guest's Debian python3 can install: this
            # machine's (x86_64, CPython 3.11, as bookworm's).
            done = provision(Options(boot, site / "edge.toml", targets=(host_target(),),
                                     wheelhouse=wheelhouse, ssh_key=ssh_key,
                                     hostname=hostname))
            with dest.open("wb") as f:
                f.truncate(CARD_MB << 20)
            _tool(["mkfs.fat", "-F", "32", "-n", "BOOTFS", str(dest)])
            _tool(["mcopy", "-s", "-i", str(dest), *[str(p) for p in sorted(boot.iterdir())],
                   "::/"])
        return cls(dest), "\n".join(done)

    def read(self, path: str) -> bytes | None:
        """A file of the card (path from its root, e.g. 'feedback/install.log'), or None."""
        listing = subprocess.run(["mdir", "-b", "-i", str(self.image), f"::/{path}"],
                                 capture_output=True, check=False,
                                 env={**os.environ, "PATH": SYSTEM_PATH,
                                      "MTOOLS_SKIP_CHECK": "1"})
        if listing.returncode != 0:
            return None
        return _tool(["mtype", "-i", str(self.image), f"::/{path}"])

    def text(self, path: str) -> str | None:
        data = self.read(path)
        return None if data is None else data.decode(errors="replace")

    def copy(self, dest: Path) -> Card:
        shutil.copyfile(self.image, dest)
        return Card(dest)


class PiGuest(Guest):
    """A Pi booted from `root` (qcow2 over the image) and `card`; see the module."""

    def __init__(self, image: Image, rundir: Path, root: Path, card: Card, *,
                 udcs: int = 1, memory_mb: int = 1024,
                 qemu_args: Sequence[str] = ()) -> None:
        super().__init__(None, rundir, memory_mb=memory_mb, udcs=udcs, qemu_args=qemu_args)
        self.image = image
        self.root = root
        self.card = card
        self.cmdline = ""

    def _env(self) -> dict[str, str]:
        # The simulators (checkout-python -m firmware_sim.usb) run on the installed
        # venv's interpreter, which has their dependencies (pyserial, tinydb).
        return {"FEEDBACK_CHECKOUT": "/checkout",
                "FEEDBACK_PYTHON": "/opt/feedback-edge/venv/bin/python",
                "FEEDBACK_INSTALL_ROOT": "/", "VM_UDCS": str(self._udcs)}

    def _boot_args(self) -> list[str]:
        text = self.card.text("cmdline.txt") or ""
        self.cmdline = text.splitlines()[0].strip() if text.strip() else ""
        return ["-kernel", _q(self.image.vmlinux), "-initrd", _q(self.image.initrd),
                "-append", self.cmdline,
                *_drive("pi-root", self.root, "cache=writeback", fmt="qcow2"),
                *_drive("pi-bootfs", self.card.image, "cache=writeback"),
                "-virtfs", f"local,path={_q(GUEST)},mount_tag=vmtools,readonly=on,"
                           "security_model=none",
                "-virtfs", f"local,path={_q(CHECKOUT)},mount_tag=checkout,readonly=on,"
                           "security_model=none,multidevs=remap"]

    def poweroff(self, timeout: float = 120) -> int:
        """`systemctl poweroff`: services stopped, file systems unmounted."""
        self._send(next(self._ids), "root", "systemctl poweroff\n")
        return self.wait_stopped(timeout)

    # -- the service -----------------------------------------------------------------

    def show(self, *props: str, unit: str = UNIT) -> dict[str, str]:
        """`systemctl show` properties of the unit."""
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_unit(self, timeout: float, what: str, **want: str) -> dict[str, str]:
        """Until the unit's properties equal `want` (e.g. ActiveState='active')."""
        last: dict[str, str] = {}

        def check() -> dict[str, str] | None:
            nonlocal last
            last = self.show(*want)
            return last if all(last.get(k) == v for k, v in want.items()) else None

        try:
            return self.wait_for(check, timeout, what, interval=0.5)
        except GuestError as e:
            raise GuestError(f"{what}: {UNIT} has {last}, wanted {want}\n{e}") from None

    def journal(self, *args: str) -> str:
        return self.run(["journalctl", "--no-pager", "-o", "cat", *args], timeout=120).stdout


# -- the installed Pi ---------------------------------------------------------------------

SITE, EDGE = "vm-site", "vm-edge"
ADMIN = "admin"  # provision's default --admin-user
CONSOLE_SERIAL = "00A1B2C3D4E5"


def site_config(port: int, devices: str | None = None, extra: str = "") -> str:
    """The site's edge.toml: the broker by name (the image's /etc/hosts has it)."""
    if devices is None:
        devices = f'[[devices]]\nkind = "console"\nserial = "{CONSOLE_SERIAL}"\ndesk = "desk-1"\n'
    return (f'site = "{SITE}"\nedge = "{EDGE}"\n{extra}\n[broker]\nhost = "{BROKER_NAME}"\n'
            f"port = {port}\nallow_plaintext = true\n\n{devices}")


@dataclass
class Installed:
    """What the first boot left and showed; `root` and `card` are the state
    later tests boot copies of (`clone`), never booted again themselves."""

    image: Image
    rundir: Path
    root: Path
    card: Card
    provision_output: str = ""
    error: str = ""  # why the first or second boot failed; "" when both went right
    first_boot_s: float = 0.0  # QEMU start to the reboot after the install
    first_boot_log: str | None = None  # the card's feedback/install.log after it
    installed: str | None = None  # the card's feedback/installed after it
    cmdline_after: str | None = None
    second_boot_ready_s: float = 0.0  # QEMU start to the test agent's answer
    second_boot_active_s: float = 0.0  # QEMU start to the unit seen active (READY=1)
    second_boot_log: str | None = None  # install.log after the second boot
    second_boot_installed: str | None = None
    unit: dict[str, str] = field(default_factory=dict)  # systemctl show, second boot
    second_boot_cmdline: str = ""
    admin_status: tuple[int, str] = (-1, "")  # `sudo feedback-edge status` as the admin
    admin_keys: str = ""
    second_boot_generated: str = ""  # the units systemd's generators made in the second boot
    console_first: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.error

    def clone(self, dest: Path) -> tuple[Path, Card]:
        dest.mkdir(parents=True, exist_ok=True)
        return self.image.overlay(dest / "root.qcow2", self.root), self.card.copy(dest / "card.img")


def first_boot(image: Image, rundir: Path, port: int) -> Installed:
    site = rundir / "site"
    site.mkdir()
    (site / "edge.toml").write_text(site_config(port))
    # The admin's login, as an installer provisions it (the key's blob is
    # random: nobody logs in with it, firstrun.sh only installs it).
    blob = b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20" + os.urandom(32)
    key = rundir / "admin.pub"
    key.write_text(f"ssh-ed25519 {base64.b64encode(blob).decode()} installer@laptop\n")
    card, done = Card.write(rundir / "card.img", site, ssh_key=key)
    root = image.overlay(rundir / "root.qcow2")
    inst = Installed(image, rundir, root, card, provision_output=done)
    try:
        g = PiGuest(image, rundir / "boot-1", root, card)
        (rundir / "boot-1").mkdir()
        inst.console_first = g.console
        t = time.monotonic()
        g.start()
        status = g.wait_stopped(900)
        inst.first_boot_s = time.monotonic() - t
        inst.first_boot_log = card.text("feedback/install.log")
        inst.installed = card.text("feedback/installed")
        inst.cmdline_after = card.text("cmdline.txt")
        g.close()
        if status != 0:
            inst.error = f"QEMU exited with {status} in the first boot"
            return inst
        (rundir / "boot-2").mkdir()
        g = PiGuest(image, rundir / "boot-2", root, card)
        t = time.monotonic()
        g.start()
        g.wait_ready(300)
        inst.second_boot_ready_s = time.monotonic() - t
        g.wait_unit(300, "the second boot", ActiveState="active")
        inst.second_boot_active_s = time.monotonic() - t
        inst.unit = g.show("ActiveState", "SubState", "StatusText", "NRestarts", "MainPID",
                           "User", "UnitFileState", "Result", "ExecMainStatus")
        inst.second_boot_cmdline = g.cmdline
        # README's step 6, as the admin firstrun.sh made: `sudo feedback-edge status`.
        # runuser, not the agent's as-user: that one sets no_new_privs, as the
        # unit does, which would stop sudo.
        admin = g.run(f"runuser -u {ADMIN} -- sudo -n feedback-edge status", check=False,
                      timeout=120)
        inst.admin_status = (admin.status, admin.stdout + admin.stderr)
        inst.admin_keys = g.run(f"cat ~{ADMIN}/.ssh/authorized_keys", check=False).stdout
        # What systemd.run= would have generated: no first-boot unit this time.
        inst.second_boot_generated = g.run(
            "ls /run/systemd/generator/ /run/systemd/generator.late/ 2>/dev/null",
            check=False).stdout
        g.poweroff()
        g.close()
        inst.second_boot_log = card.text("feedback/install.log")
        inst.second_boot_installed = card.text("feedback/installed")
    except (AssertionError, RuntimeError, OSError) as e:
        inst.error = f"{type(e).__name__}: {e}"
    return inst


class PiMachines:
    """The `pi` fixture: boots a copy of the installed Pi (one root disk and
    card per test, kept across that test's boots) and kills what is left."""

    def __init__(self, installed: Installed, rundir: Path) -> None:
        self.installed = installed
        self.rundir = rundir
        self.guests: list[PiGuest] = []
        self._disks: tuple[Path, Card] | None = None

    @property
    def card(self) -> Card:
        return self.disks[1]

    @property
    def disks(self) -> tuple[Path, Card]:
        if not self.installed.ok:
            raise AssertionError(f"the Pi's first boot failed: {self.installed.error}")
        if self._disks is None:
            self._disks = self.installed.clone(self.rundir)
        return self._disks

    def boot(self, *, ready: bool = True, active: bool = True, udcs: int = 1,
             timeout: float = 300, **kw: Any) -> PiGuest:
        """A Pi booted from this test's disks; by default waited for until its
        agent answers and the service is active (READY=1)."""
        root, card = self.disks
        rundir = self.rundir / f"boot-{len(self.guests) + 1}"
        rundir.mkdir()
        g = PiGuest(self.installed.image, rundir, root, card, udcs=udcs, **kw)
        self.guests.append(g)
        t = time.monotonic()
        g.start()
        if ready or active:
            g.wait_ready(timeout)
        if active:
            g.wait_unit(timeout, "boot", ActiveState="active")
            g.timings["active_s"] = time.monotonic() - t
        return g

    def close(self) -> None:
        for g in self.guests:
            g.close()
