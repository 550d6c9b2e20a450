"""The Pi tier's image: a whole Debian (bookworm, systemd as PID 1), cached
outside the checkout and rebuilt when missing.

Raspberry Pi OS Bookworm is Debian bookworm with the Pi's firmware and
kernel; this image is the same Debian from Debian's own packages for the
machine QEMU emulates, with the generic kernel (its USB gadget modules run the
project's simulated devices, as in the USB tier).  What makes it a Pi for the
project's purpose is the boot partition: a second small FAT disk, written by
`feedback-edge provision` as an installer writes a card, mounted at
/boot/firmware as Raspberry Pi OS mounts it, and its `cmdline.txt` passed to
the kernel as the Pi's firmware passes it (`PiGuest` reads it before each
boot).  That is how a Bookworm card's first boot is triggered
(`systemd.run=/boot/firmware/feedback/firstrun.sh`): systemd's own
run-generator and kernel-command-line.target, which this tier exists to
exercise under a real PID 1.  Trixie's cloud-init seed is not used here:
cloud-init and its dozens of Python modules would be test-only weight in a
guest that runs under TCG, and the installer it runs is the same install.sh.

Built with mmdebstrap (about a minute with Debian's mirror; ~700 MB), then
made into an ext4 image (`base.img`), with its kernel (`vmlinux`, unpacked
as in the USB tier) and initramfs beside it.  Every boot writes to a qcow2
overlay of its own, so the image stays as built.

Besides Debian's packages the image holds only the test's side door: a unit
(`vm-agent.service`) that mounts the test's 9p shares when QEMU offers them
and runs guest/pi-agent.sh from the checkout, the same command channel as
the USB tier.  It has no effect on a boot without those shares.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.vm.assets import (
    SYSTEM_PATH,
    UnavailableError,
    _locked,
    _run,
    _which,
    cache_dir,
    ensure_packages,
    extract_vmlinux,
)

__all__ = ["BROKER_NAME", "Image", "prepare_image"]

SUITE = "bookworm"
# What a Raspberry Pi OS Lite Bookworm has that the project touches, and no more:
# systemd and udev (the unit, sysusers, rules), python3 (the venv's
# interpreter), kmod, dbus (systemctl and systemd-analyze talk over it),
# openssh-server and sudo (firstrun.sh's admin login), dosfstools (fsck of
# the boot partition), iproute2.  The simulators the tests run in the guest
# use the installed venv's interpreter and packages.
PACKAGES = ("systemd", "systemd-sysv", "udev", "dbus", "python3", "kmod",
            "linux-image-amd64", "initramfs-tools", "openssh-server", "sudo", "dosfstools",
            "iproute2")
# The host tools the build needs -> their Debian package.
TOOLS = {"mmdebstrap": "mmdebstrap", "mkfs.fat": "dosfstools", "mcopy": "mtools",
         "qemu-img": "qemu-utils", "mkfs.ext4": "e2fsprogs"}
# The broker's name in the tests' site config; the image's /etc/hosts resolves it
# to the host (QEMU's user network), as a clinic's DNS would.
BROKER_NAME = "mqtt.clinic.test"
IMAGE_MB = 3072
# Bump when what the customisation below writes changes.
FORMAT = "4"

NETWORK = """\
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
"""
AGENT_UNIT = """\
# The VM tier's command channel (tests/vm/debian.py); not part of the product.
[Unit]
Description=VM tier test agent
DefaultDependencies=no
After=local-fs.target systemd-udevd.service systemd-modules-load.service
Before=sysinit.target
ConditionPathExists=/sys/bus/virtio

[Service]
ExecStart=/usr/local/lib/vm-tier/start
KillMode=mixed

[Install]
WantedBy=sysinit.target
"""
AGENT_START = """\
#!/bin/sh
# Mounts the test's shares when QEMU offers them (else: not a test boot, exit),
# then runs the agent from the checkout under test.
modprobe -a 9pnet_virtio 9p 2>/dev/null
mkdir -p /share /vm /checkout
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share /share 2>/dev/null || exit 0
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro vmtools /vm || exit 1
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro checkout /checkout || exit 1
exec /bin/sh /vm/pi-agent.sh
"""
# Timers that would wake up under TCG in the middle of a test and compete for
# the one vCPU; a Pi at a clinic has them, and they do not touch the service.
MASKED = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
          "man-db.timer", "dpkg-db-backup.timer", "systemd-tmpfiles-clean.timer")


@dataclass(frozen=True)
class Image:
    dir: Path
    base: Path  # ext4, raw: the root file system as built
    vmlinux: Path
    initrd: Path
    kernel_version: str
    built: dict[str, float] = field(default_factory=dict)

    def overlay(self, dest: Path, backing: Path | None = None) -> Path:
        """A qcow2 file over `backing` (default: the base image); boots write there."""
        back = backing or self.base
        fmt = "raw" if back == self.base else "qcow2"
        _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(back),
              str(dest)], env={**os.environ, "PATH": SYSTEM_PATH})
        return dest


def missing_packages() -> list[str]:
    return sorted({pkg for tool, pkg in TOOLS.items() if _which(tool) is None})


def _key() -> str:
    text = "\n".join([FORMAT, SUITE, *PACKAGES, *MASKED, NETWORK, AGENT_UNIT, AGENT_START,
                      BROKER_NAME, str(IMAGE_MB)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _customise(root: Path) -> None:
    env = {**os.environ, "PATH": SYSTEM_PATH}
    shadow = root / "etc" / "shadow"
    # Root without a password on the serial console: a failed run can be looked into.
    shadow.write_text("".join(("root::" + line.split(":", 2)[2] + "\n")
                              if line.startswith("root:") else line + "\n"
                              for line in shadow.read_text().splitlines()))
    (root / "etc" / "fstab").write_text(
        "/dev/vda  /               ext4  rw,errors=remount-ro  0  1\n"
        # As Raspberry Pi OS mounts its boot partition: without nofail, so
        # local-fs.target (and a first boot's systemd.run= script) waits for it.
        "/dev/vdb  /boot/firmware  vfat  defaults              0  2\n")
    (root / "boot" / "firmware").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "hostname").write_text("raspberrypi\n")
    (root / "etc" / "hosts").write_text(
        "127.0.0.1\tlocalhost\n127.0.1.1\traspberrypi\n"
        f"10.0.2.2\t{BROKER_NAME}\n")
    resolv = root / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("nameserver 10.0.2.3\n")  # QEMU's user-network DNS
    (root / "etc" / "systemd" / "network").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "systemd" / "network" / "20-wired.network").write_text(NETWORK)
    start = root / "usr" / "local" / "lib" / "vm-tier" / "start"
    start.parent.mkdir(parents=True, exist_ok=True)
    start.write_text(AGENT_START)
    start.chmod(0o755)
    (root / "etc" / "systemd" / "system" / "vm-agent.service").write_text(AGENT_UNIT)
    _run(["systemctl", f"--root={root}", "enable", "systemd-networkd.service",
          "vm-agent.service"], env=env)
    _run(["systemctl", f"--root={root}", "mask", *MASKED], env=env)


def _build(dest: Path, built: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        root = Path(tmp) / "root"
        t0 = time.monotonic()
        _run(["mmdebstrap", "--variant=minbase", "--format=directory",
              f"--include={','.join(PACKAGES)}",
              "--dpkgopt=path-exclude=/usr/share/doc/*",
              "--dpkgopt=path-include=/usr/share/doc/*/copyright",
              "--dpkgopt=path-exclude=/usr/share/man/*",
              "--dpkgopt=path-exclude=/usr/share/locale/*",
              SUITE, str(root)], env={**os.environ, "PATH": SYSTEM_PATH}, timeout=1800)
        built["mmdebstrap_s"] = time.monotonic() - t0
        _customise(root)
        t1 = time.monotonic()
        dest.mkdir()
        vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))[-1]
        version = vmlinuz.name.removeprefix("vmlinuz-")
        (dest / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        shutil.copyfile(root / "boot" / f"initrd.img-{version}", dest / "initrd.img")
        (dest / "kernel-version").write_text(version + "\n")
        packages = _run(["chroot", str(root), "dpkg-query", "-W"],
                        env={**os.environ, "PATH": SYSTEM_PATH})
        (dest / "packages.txt").write_text(packages)
        base = dest / "base.img"
        with base.open("wb") as f:
            f.truncate(IMAGE_MB << 20)
        _run(["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(root), "-E",
              "lazy_itable_init=0,lazy_journal_init=0", str(base)],
             env={**os.environ, "PATH": SYSTEM_PATH})
        base.chmod(0o444)  # boots write to overlays
        built["image_s"] = time.monotonic() - t1


def prepare_image() -> Image:
    """The image, built if missing.  UnavailableError: skip the tier."""
    ensure_packages(missing_packages)
    if os.geteuid() != 0:
        raise UnavailableError("building the Debian image (mmdebstrap, device nodes) needs root")
    cache = cache_dir()
    built: dict[str, float] = {}
    with _locked(cache):
        top = cache / "debian"
        top.mkdir(parents=True, exist_ok=True)
        idir = top / _key()
        if not (idir / "base.img").exists():
            shutil.rmtree(idir, ignore_errors=True)
            _build(idir, built)
        for other in top.iterdir():
            if other != idir:
                shutil.rmtree(other, ignore_errors=True)  # an older build: keep one image
    version = (idir / "kernel-version").read_text().strip()
    return Image(idir, idir / "base.img", idir / "vmlinux", idir / "initrd.img", version, built)


if __name__ == "__main__":
    t = time.monotonic()
    img = prepare_image()
    print(f"{img.dir}: kernel {img.kernel_version}; built {img.built or 'nothing'} "
          f"in {time.monotonic() - t:.1f} s")
