"""The VM tier's heavy inputs, built once and cached outside the checkout.

- Debian's generic kernel (the version `apt-cache depends linux-image-amd64`
  names today, so Debian's kernel updates are followed), its `vmlinux`
  unpacked from vmlinuz: QEMU boots the ELF without the kernel decompressing
  itself under TCG, 2-3 s sooner per boot (../shared/usb-vm/README.md).
- An initramfs: static busybox, the modules the tier needs in dependency order
  (`modprobe --show-depends`, soft dependencies included) and guest/*.
- The project installed as a Pi installs it: `feedback-edge provision` writes
  the card folder (install.sh, site config, wheelhouse) and install.sh runs
  with FEEDBACK_ROOT into a directory the guest sees through 9p.

The cache is `$FEEDBACK_VM_CACHE`, else /var/cache/feedback-edge-vm when it
can be written, else ~/.cache/feedback-edge-vm.  Each item is keyed by what it
is made from (kernel version; init scripts, module list and busybox; the
project's sources), rebuilt when missing, and built under a lock so parallel
test runs on one machine share it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MODULES", "Assets", "UnavailableError", "cache_dir", "extract_vmlinux", "prepare"]

CHECKOUT = Path(__file__).resolve().parents[2]
GUEST = Path(__file__).with_name("guest")
MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "9pnet_virtio", "9p",
           "overlay", "ext4", "configfs", "dummy_hcd", "libcomposite", "usb_f_fs", "usb_f_hid",
           "usb_f_acm", "hid_generic", "usbhid", "uhid", "cdc_acm", "evdev", "uinput")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host tools -> the Debian package that has them.  The guest runs the host's
# userland, so udev, setpriv and systemd-sysusers are needed here too.
TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "modprobe": "kmod",
    "depmod": "kmod",
    "cpio": "cpio",
    "udevadm": "udev",
    "mkfs.ext4": "e2fsprogs",
    "setpriv": "util-linux",
    "systemd-sysusers": "systemd",
    "systemctl": "systemd",
    "dpkg-deb": "dpkg",
}
UDEVD = (Path("/lib/systemd/systemd-udevd"), Path("/usr/lib/systemd/systemd-udevd"))
BUSYBOX = Path("/bin/busybox")
STDLIB = Path("/usr/lib/python3.11")  # Debian's, which the installed venv runs on
# The config the image is provisioned with; tests give the daemon their own.
SITE_TOML = """\
site = "vm-site"
edge = "vm-edge"

[broker]
host = "10.0.2.2"
port = 1883
allow_plaintext = true

[[devices]]
kind = "console"
serial = "00A1B2C3D4E5"
desk = "desk-1"
"""
# Bump when the layout of what is cached changes.
FORMAT = "1"


class UnavailableError(Exception):
    """The tier cannot run on this machine; the message says why (a skip reason)."""


@dataclass(frozen=True)
class Assets:
    cache: Path
    kernel_version: str
    vmlinux: Path
    initrd: Path
    install_root: Path  # FEEDBACK_ROOT of install.sh: opt/feedback-edge/venv, etc/...
    opt_image: Path  # install_root/opt/feedback-edge as a read-only ext4 image
    stdlib_image: Path  # STDLIB as one
    built: dict[str, float] = field(default_factory=dict)  # what was built now, seconds

    @property
    def runs(self) -> Path:
        return self.cache / "runs"


def cache_dir() -> Path:
    env = os.environ.get("FEEDBACK_VM_CACHE")
    if env:
        return Path(env)
    system = Path("/var/cache/feedback-edge-vm")
    if system.is_dir() and os.access(system, os.W_OK):
        return system
    if not system.exists() and os.access(system.parent, os.W_OK):
        return system
    return Path.home() / ".cache" / "feedback-edge-vm"


def _which(name: str) -> str | None:
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:{SYSTEM_PATH}")


def _is_static(binary: Path) -> bool:
    """No PT_INTERP program header: the initramfs has no dynamic loader."""
    data = binary.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3
               for i in range(phnum))


def missing_packages() -> list[str]:
    missing = {pkg for tool, pkg in TOOLS.items() if _which(tool) is None}
    if not any(p.exists() for p in UDEVD):
        missing.add("udev")
    if not BUSYBOX.exists() or not _is_static(BUSYBOX):
        missing.add("busybox-static")
    return sorted(missing)


def _run(args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise RuntimeError(f"{' '.join(args)} exited with {proc.returncode}: {tail}")
    return proc.stdout


def _apt(args: list[str]) -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PATH": SYSTEM_PATH}
    return _run(["apt-get", *args], env=env, timeout=1200)


def ensure_packages(missing_packages: Callable[[], list[str]] = missing_packages) -> None:
    """Install from Debian what `missing_packages()` names (as root), or skip."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise UnavailableError(f"{', '.join(missing)} not installed and not root "
                               "(the tier installs them from Debian when run as root)")
    install = ["install", "-y", "-qq", "--no-install-recommends", *missing]
    try:
        _apt(install)
    except RuntimeError:
        _apt(["update", "-qq"])
        _apt(install)
    still = missing_packages()
    if still:
        raise UnavailableError(f"apt-get installed {', '.join(missing)} but "
                               f"{', '.join(still)} still missing")


# -- the kernel ----------------------------------------------------------------

def kernel_package() -> str:
    """Debian's current generic kernel, e.g. linux-image-6.1.0-57-amd64."""
    def resolve() -> str | None:
        out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"],
                             capture_output=True, text=True, check=False).stdout
        m = re.search(r"Depends: (linux-image-\S+-amd64)\b", out)
        return m.group(1) if m else None

    pkg = resolve()
    if pkg is None and os.geteuid() == 0:
        _apt(["update", "-qq"])
        pkg = resolve()
    if pkg is None:
        raise UnavailableError("apt-cache does not know linux-image-amd64 (apt-get update as root)")
    return pkg


def _download(pkg: str, dest: Path) -> Path:
    def attempt() -> Path | None:
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            try:
                _run(["apt-get", "download", "-qq", pkg], cwd=Path(tmp), timeout=1200)
            except RuntimeError:
                return None
            deb = next(Path(tmp).glob(f"{pkg}_*.deb"))
            return deb.rename(dest / deb.name)

    deb = attempt()
    if deb is None and os.geteuid() == 0:
        _apt(["update", "-qq"])  # the lists may name a version the mirror no longer has
        deb = attempt()
    if deb is None:
        raise RuntimeError(f"apt-get download {pkg} failed")
    return deb


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The ELF kernel inside a bzImage: its payload is one compressed stream
    somewhere after the setup code (what scripts/extract-vmlinux does)."""
    def xz(data: bytes) -> bytes:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data)

    def lzma_alone(data: bytes) -> bytes:
        return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data)

    def gz(data: bytes) -> bytes:
        return zlib.decompressobj(31).decompress(data)

    def zstd(data: bytes) -> bytes:
        if _which("zstd") is None:
            raise OSError("zstd not installed")
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                              check=False).stdout

    formats = ((b"\xfd7zXZ\x00", xz), (b"\x1f\x8b\x08", gz), (b"\x28\xb5\x2f\xfd", zstd),
               (b"\x5d\x00\x00", lzma_alone))
    for magic, decompress in formats:
        start = vmlinuz.find(magic)
        while start != -1:
            with contextlib.suppress(lzma.LZMAError, zlib.error, OSError, EOFError):
                out = decompress(vmlinuz[start:])
                if out[:4] == b"\x7fELF":
                    return out
            start = vmlinuz.find(magic, start + 1)
    raise ValueError("no compressed ELF kernel found in vmlinuz")


def _initrd_key() -> str:
    h = hashlib.sha256(f"{FORMAT}\n{' '.join(MODULES)}\n".encode())
    for path in sorted(p for p in GUEST.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(GUEST)}\n{path.stat().st_mode & 0o111}\n".encode())
        h.update(path.read_bytes())
    h.update(hashlib.sha256(BUSYBOX.read_bytes()).digest())
    return h.hexdigest()[:16]


def _module_order(tree: Path, version: str) -> list[Path]:
    _run(["depmod", "-b", str(tree), version])
    order: list[Path] = []
    for name in MODULES:
        out = _run(["modprobe", "-d", str(tree), "-S", version, "--show-depends", name])
        for line in out.splitlines():
            if line.startswith("insmod "):
                path = Path(line.split()[1])
                if path not in order:
                    order.append(path)
    return order


def _build_initrd(tree: Path, version: str, dest: Path) -> None:
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        ir = Path(tmp) / "ir"
        for d in ("bin", "mods", "proc", "sys", "dev", "tmp"):
            (ir / d).mkdir(parents=True)
        shutil.copy2(BUSYBOX, ir / "bin" / "busybox")
        names = []
        for ko in _module_order(tree, version):
            shutil.copy2(ko, ir / "mods" / ko.name)
            names.append(ko.name)
        (ir / "mods" / "order").write_text("\n".join(names) + "\n")
        shutil.copytree(GUEST, ir / "vm", ignore=shutil.ignore_patterns("init.sh"))
        shutil.copy2(GUEST / "init.sh", ir / "init")
        files = sorted(str(p.relative_to(ir)) for p in ir.rglob("*"))
        # Not compressed: the kernel would decompress it under TCG on every boot.
        proc = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
                              input=("\n".join([".", *files]) + "\n").encode(), cwd=ir,
                              capture_output=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"cpio failed: {proc.stderr.decode(errors='replace')}")
        part = dest.with_suffix(".part")
        part.write_bytes(proc.stdout)
        part.rename(dest)


def _kernel(cache: Path, built: dict[str, float]) -> tuple[str, Path, Path]:
    pkg = kernel_package()
    version = pkg.removeprefix("linux-image-")
    kdir = cache / "kernel" / version
    kdir.mkdir(parents=True, exist_ok=True)
    vmlinux = kdir / "vmlinux"
    initrd = kdir / f"initrd-{_initrd_key()}.cpio"
    if vmlinux.exists() and initrd.exists():
        return version, vmlinux, initrd
    debs = sorted(kdir.glob(f"{pkg}_*.deb"))
    if debs:
        deb = debs[-1]
    else:
        t0 = time.monotonic()
        deb = _download(pkg, kdir)
        built["kernel_download_s"] = time.monotonic() - t0
    with tempfile.TemporaryDirectory(dir=kdir) as tmp:
        tree = Path(tmp)
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
        if not vmlinux.exists():
            t1 = time.monotonic()
            elf = extract_vmlinux((tree / "boot" / f"vmlinuz-{version}").read_bytes())
            part = vmlinux.with_suffix(".part")
            part.write_bytes(elf)
            part.rename(vmlinux)
            built["vmlinux_s"] = time.monotonic() - t1
        if not initrd.exists():
            t1 = time.monotonic()
            _build_initrd(tree, version, initrd)
            built["initrd_s"] = time.monotonic() - t1
    for old in sorted(kdir.glob("initrd-*.cpio"), key=lambda p: p.stat().st_mtime)[:-4]:
        old.unlink()  # other checkouts' keys may still be in use: keep a few
    for other in (cache / "kernel").iterdir():
        if other.name != version:
            shutil.rmtree(other, ignore_errors=True)  # Debian moved on to a newer kernel
    return version, vmlinux, initrd


# -- the project, installed as on a Pi -------------------------------------------------

def _source_key() -> str:
    h = hashlib.sha256(f"{FORMAT}\n{SITE_TOML}\n".encode())
    files = [CHECKOUT / "pyproject.toml"]
    for top in ("edge", "drivers", "firmware_sim", "collector", "systemd"):
        files += [p for p in (CHECKOUT / top).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts]
    for path in sorted(files):
        h.update(f"{path.relative_to(CHECKOUT)}\n".encode())
        h.update(path.read_bytes())
    python = _run(["/usr/bin/python3", "-c", "import sys; print(sys.version)"])
    h.update(python.encode())
    return h.hexdigest()[:16]


def _fake_bootfs(root: Path) -> Path:
    """What `provision` checks for: a Raspberry Pi OS boot partition (Trixie)."""
    boot = root / "bootfs"
    boot.mkdir()
    (boot / "config.txt").write_text("dtparam=audio=on\n")
    (boot / "cmdline.txt").write_text("console=serial0,115200 root=PARTUUID=0-02 rootwait\n")
    (boot / "bcm2712-rpi-5-b.dtb").write_bytes(b"\xd0\x0d\xfe\xed")
    (boot / "meta-data").write_text("instance-id: rpios-image\n")
    (boot / "user-data").write_text("#cloud-config\n")
    return boot


def _install(cache: Path, built: dict[str, float]) -> Path:
    key = _source_key()
    idir = cache / "install" / key
    if (idir / "installed").exists():
        os.utime(idir)  # in use: see the pruning below
        return idir / "root"
    if os.geteuid() != 0:
        raise UnavailableError("the first-boot installer (install.sh) sets root ownership: "
                               "needs root (CI runs as root)")
    from edge.provision import Options, host_target, provision

    t0 = time.monotonic()
    # Built in place, not renamed into place: the venv's scripts name their
    # interpreter by the path they were installed at.  The lock keeps other
    # runs out until "installed" marks it whole.
    shutil.rmtree(idir, ignore_errors=True)
    idir.mkdir(parents=True)
    site = idir / "site"
    site.mkdir()
    (site / "edge.toml").write_text(SITE_TOML)
    boot = _fake_bootfs(idir)
    # Only this machine's wheels: the guest runs the host's Debian python3.
    provision(Options(boot, site / "edge.toml", targets=(host_target(),)))
    root = idir / "root"
    (root / "etc").mkdir(parents=True)
    # The guest's own /etc is the host's: starting from the same files,
    # systemd-sysusers gives the service user the same ids in both.
    for name in ("passwd", "group"):
        shutil.copy2(f"/etc/{name}", root / "etc" / name)
    # Debian's python3 first on PATH: a Pi's interpreter, not a venv's or pyenv's.
    env = {"PATH": SYSTEM_PATH, "FEEDBACK_ROOT": str(root), "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_CACHE_DIR": "1", "HOME": str(idir)}
    proc = subprocess.run(["sh", str(boot / "feedback" / "install.sh")], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    (idir / "install.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"install.sh failed ({proc.returncode}): "
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    shutil.rmtree(boot)  # the wheelhouse: installed now
    (idir / "installed").write_text(proc.stdout)
    built["install_s"] = time.monotonic() - t0
    # A run still using an older install must keep it: only two hours without
    # use retire one (a test run takes minutes; a day of edits makes dozens).
    # One without "installed" was left by a run that died building it (under the lock).
    installs = []
    for p in (cache / "install").iterdir():
        if (p / "installed").exists():
            installs.append(p)
        else:
            shutil.rmtree(p, ignore_errors=True)
    for old in sorted(installs, key=lambda p: p.stat().st_mtime)[:-3]:
        if time.time() - old.stat().st_mtime > 7200:
            shutil.rmtree(old, ignore_errors=True)
    return idir / "root"


# -- Python's files on a block device ---------------------------------------------------
#
# Python under TCG runs about 20 times slower than here (the daemon's imports:
# 0.1 s here), and reading its files through 9p adds to that.  Measured on 2
# shared cores, importing edge.daemon and edge.cli as the service user took
# 3.3-4.5 s the first time in a fresh guest (2.7-3.7 s the second) with the
# venv and the standard library read through 9p, and 2.5-2.8 s (1.8-2.1 s)
# read from ext4 images on virtio disks.  The .pyc files are used either way
# (pip compiles them at install; Debian ships the standard library's); 9p's
# cache=loose gained nothing; copying the venv into the guest's tmpfs costs
# 14 s per boot.  The guest mounts the images read-only over the same paths.

def _ext4_image(src: Path, dest: Path) -> None:
    size = sum(p.lstat().st_size for p in src.rglob("*"))
    part = dest.with_suffix(".part")
    with part.open("wb") as f:
        f.truncate(size * 2 + (32 << 20))
    _run(["mkfs.ext4", "-q", "-F", "-d", str(src), "-E",
          "lazy_itable_init=0,lazy_journal_init=0", str(part)],
         env={**os.environ, "PATH": SYSTEM_PATH})
    part.rename(dest)


def _images(cache: Path, root: Path, built: dict[str, float]) -> tuple[Path, Path]:
    t0 = time.monotonic()
    opt = root.parent / "opt.img"
    if not opt.exists():
        _ext4_image(root / "opt" / "feedback-edge", opt)
    listing = hashlib.sha256()
    for p in sorted(STDLIB.rglob("*")):
        st = p.lstat()
        listing.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    stdlib = cache / "python" / f"stdlib-{listing.hexdigest()[:16]}.img"
    if not stdlib.exists():
        stdlib.parent.mkdir(exist_ok=True)
        for old in stdlib.parent.glob("stdlib-*.img"):
            old.unlink()  # Debian updated python3.11
        _ext4_image(STDLIB, stdlib)
    if time.monotonic() - t0 > 0.5:
        built["images_s"] = time.monotonic() - t0
    return opt, stdlib


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepare() -> Assets:
    """Everything a boot needs, built if missing.  UnavailableError: skip the tier."""
    ensure_packages()
    cache = cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UnavailableError(f"cannot create the VM cache {cache}: {e}") from None
    if cache.resolve().is_relative_to(CHECKOUT):
        raise UnavailableError(f"FEEDBACK_VM_CACHE={cache} is inside the checkout: "
                               "put it elsewhere")
    built: dict[str, float] = {}
    with _locked(cache):
        version, vmlinux, initrd = _kernel(cache, built)
        root = _install(cache, built)
        opt, stdlib = _images(cache, root, built)
    (cache / "runs").mkdir(exist_ok=True)
    return Assets(cache, version, vmlinux, initrd, root, opt, stdlib, built)


if __name__ == "__main__":
    # `python -m tests.vm.assets` from the checkout: build (or find) everything once.
    t = time.monotonic()
    a = prepare()
    print(f"{a.cache}: kernel {a.kernel_version}, {a.initrd.name}, {a.install_root}; "
          f"built {a.built or 'nothing'} in {time.monotonic() - t:.1f} s")
