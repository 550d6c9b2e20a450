"""USB gadgets through configfs (libcomposite): create, plug, unplug, remove.

Source: Documentation/usb/gadget_configfs.rst and the function docs beside
it (gadget-testing.rst) in the Linux tree.  Needs root, configfs mounted at
/sys/kernel/config (mounted here when it is not) and the modules
libcomposite, usb_f_hid / usb_f_acm / usb_f_fs and a UDC driver.

A gadget's tree::

    /sys/kernel/config/usb_gadget/<name>/
        idVendor idProduct bcdDevice       0x1209 0xfb02 ...
        strings/0x409/{manufacturer,product,serialnumber}
        functions/hid.<f>/{protocol,subclass,report_length,report_desc,dev}
        functions/acm.<f>/port_num          -> /dev/ttyGS<port_num>
        functions/ffs.<f>/                  mount -t functionfs <f> DIR
        configs/c.1/<function> -> functions/<function>
        UDC                                 write a UDC name = plug, "" = unplug

On a machine without USB device hardware the UDCs come from dummy_hcd
(`modprobe dummy_hcd num=N` gives dummy_udc.0 .. dummy_udc.N-1, one per
emulated host controller, so N gadgets can be plugged at once; 6.1 accepts
N up to 32).  dummy_udc.K is wired to dummy_hcd.K, whose root hub is bus B
(`usbB` under /sys/devices/platform/dummy_hcd.K), and the gadget appears
there as USB device `B-1`.

Removal order matters: unbind, then close every device file of a function
(/dev/hidgN, /dev/ttyGSN, FunctionFS endpoint files), unmount FunctionFS,
and only then remove the function: removing a function whose device file
is still open can leave the process stuck in the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "CONFIGFS",
    "AcmFunction",
    "FfsFunction",
    "Gadget",
    "GadgetError",
    "HidFunction",
    "Identity",
    "host_port",
    "udcs",
]

CONFIGFS: Final = Path("/sys/kernel/config")
_GADGETS: Final = CONFIGFS / "usb_gadget"
_UDC_CLASS: Final = Path("/sys/class/udc")
_LANG: Final = "0x409"  # US English, the language every host asks for first

_libc = ctypes.CDLL(None, use_errno=True)


class GadgetError(OSError):
    """A configfs or mount operation failed; the message says which and where."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The device descriptor fields a gadget is known by (USB 2.0 table 9-8):
    vid/pid 16-bit ids, serial None for a device without iSerialNumber."""

    vid: int
    pid: int
    manufacturer: str
    product: str
    serial: str | None = None
    bcd_device: int = 0x0100


def _write(path: Path, value: str | bytes) -> None:
    data = value.encode() if isinstance(value, str) else value
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        raise GadgetError(e.errno, f"cannot open {path}: {e.strerror}") from e
    try:
        os.write(fd, data)
    except OSError as e:
        raise GadgetError(e.errno, f"cannot write {value!r} to {path}: {e.strerror}") from e
    finally:
        os.close(fd)


def _mount(source: str, target: Path, fstype: str) -> None:
    if _libc.mount(source.encode(), str(target).encode(), fstype.encode(), 0, None) != 0:
        err = ctypes.get_errno()
        raise GadgetError(err, f"mount -t {fstype} {source} {target}: {os.strerror(err)}")


def _umount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), 0) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not mounted (any more)
            raise GadgetError(err, f"umount {target}: {os.strerror(err)}")


def _mounts(fstype: str) -> list[tuple[str, Path]]:
    """(source, mount point) of every mount of `fstype`."""
    out: list[tuple[str, Path]] = []
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            src, target, kind = line.split()[:3]
            if kind == fstype:
                out.append((src, Path(target.replace("\\040", " "))))
    return out


def ensure_configfs() -> None:
    """Mount configfs if it is not mounted yet (its module must be loaded)."""
    if _GADGETS.is_dir():
        return
    if not any(target == CONFIGFS for _, target in _mounts("configfs")):
        _mount("none", CONFIGFS, "configfs")
    if not _GADGETS.is_dir():
        raise GadgetError(errno.ENODEV, f"no {_GADGETS}: load libcomposite (modprobe "
                          "libcomposite) and a UDC driver (modprobe dummy_hcd num=N)")


def udcs() -> list[str]:
    """Every UDC name (dummy_udc.0 ...), in numeric order."""
    def key(name: str) -> tuple[str, int]:
        stem, _, num = name.rpartition(".")
        return (stem, int(num)) if num.isdigit() else (name, -1)
    return sorted((p.name for p in _UDC_CLASS.iterdir()), key=key) if _UDC_CLASS.is_dir() else []


def _busy_udcs() -> set[str]:
    busy: set[str] = set()
    if _GADGETS.is_dir():
        for g in _GADGETS.iterdir():
            with contextlib.suppress(OSError):
                if name := (g / "UDC").read_text().strip():
                    busy.add(name)
    return busy


def host_port(udc: str) -> str | None:
    """The USB port path (as in /sys/bus/usb/devices) a gadget on `udc` gets
    on its host: `B-1` for dummy_udc.K, whose host controller dummy_hcd.K has
    root hub usbB.  None for any other UDC (real hardware: the host is
    another machine)."""
    stem, _, num = udc.rpartition(".")
    if stem != "dummy_udc":
        return None
    hcd = Path(f"/sys/devices/platform/dummy_hcd.{num}")
    buses = [p.name[3:] for p in hcd.glob("usb*") if p.name[3:].isdigit()] if hcd.is_dir() else []
    # A SuperSpeed dummy_hcd has two root hubs; the gadget sits on the first.
    return f"{min(buses, key=int)}-1" if buses else None


class _Function:
    kind = ""

    def __init__(self, gadget: Gadget, name: str) -> None:
        self.gadget = gadget
        self.name = name
        self.dir = gadget.dir / "functions" / f"{self.kind}.{name}"

    def _create(self) -> None:
        self.dir.mkdir()

    def _link(self) -> None:
        (self.gadget.dir / "configs" / "c.1" / self.dir.name).symlink_to(self.dir)


class HidFunction(_Function):
    """The kernel's HID function (f_hid): reports written to /dev/hidgN go out
    on its interrupt IN endpoint, the host's output reports can be read from
    it.  It cannot serve feature reports (6.1 answers GET_REPORT with
    report_length zero bytes): `firmware_sim.usb.ffs_console` does that."""

    kind = "hid"

    def configure(self, *, protocol: int, subclass: int, report_length: int,
                  report_desc: bytes) -> None:
        """protocol/subclass as in the interface descriptor (1/1: boot
        keyboard), report_length in bytes (the longest input report)."""
        _write(self.dir / "protocol", str(protocol))
        _write(self.dir / "subclass", str(subclass))
        _write(self.dir / "report_length", str(report_length))
        _write(self.dir / "report_desc", report_desc)

    def device(self) -> Path:
        """The gadget-side node, /dev/hidgN (it exists while the gadget is bound)."""
        majmin = (self.dir / "dev").read_text().strip()
        with contextlib.suppress(OSError):
            for line in Path(f"/sys/dev/char/{majmin}/uevent").read_text().splitlines():
                if line.startswith("DEVNAME="):
                    return Path("/dev") / line.partition("=")[2]
        return Path(f"/dev/hidg{majmin.partition(':')[2]}")


class AcmFunction(_Function):
    """CDC-ACM serial (f_acm): the gadget side is /dev/ttyGS<port_num>, the
    host side /dev/ttyACM*.  The host's DTR stays inside f_acm (6.1 keeps it
    in port_handshake_bits and tells nobody), so the gadget side cannot see
    the host open the port."""

    kind = "acm"

    def device(self) -> Path:
        return Path(f"/dev/ttyGS{(self.dir / 'port_num').read_text().strip()}")


class FfsFunction(_Function):
    """A FunctionFS function: its descriptors are written in userspace to
    ep0 of the filesystem mounted at `mount_point`; the gadget can be bound
    only after that.  The instance name is global to the kernel, so it is
    made from the gadget's and the function's names."""

    kind = "ffs"

    def __init__(self, gadget: Gadget, name: str, mount_point: Path) -> None:
        super().__init__(gadget, f"{gadget.name}-{name}")
        self.mount_point = mount_point

    def _create(self) -> None:
        super()._create()
        self.mount_point.mkdir(parents=True, exist_ok=True)
        _mount(self.name, self.mount_point, "functionfs")

    def unmount(self) -> None:
        """Unmount (every file in it must be closed first)."""
        _umount(self.mount_point)


class Gadget:
    """One USB device on a UDC.  `create()` builds it in configfs, the add_*
    methods add functions to its one configuration, `bind()` plugs it in,
    `unbind()` pulls it out, `remove()` takes it apart (close the functions'
    device files first)."""

    def __init__(self, name: str, identity: Identity, *, max_power_ma: int = 100) -> None:
        self.name = name
        self.identity = identity
        self.max_power_ma = max_power_ma
        self.dir = _GADGETS / name
        self.functions: list[_Function] = []
        self.udc: str | None = None

    def create(self) -> None:
        """Build the gadget; a stale one of the same name (a killed simulator's)
        is taken apart first."""
        ensure_configfs()
        if self.dir.exists():
            _teardown(self.dir)
        ident = self.identity
        self.dir.mkdir()
        _write(self.dir / "idVendor", f"0x{ident.vid:04x}")
        _write(self.dir / "idProduct", f"0x{ident.pid:04x}")
        _write(self.dir / "bcdDevice", f"0x{ident.bcd_device:04x}")
        _write(self.dir / "bcdUSB", "0x0200")
        strings = self.dir / "strings" / _LANG
        strings.mkdir()
        _write(strings / "manufacturer", ident.manufacturer)
        _write(strings / "product", ident.product)
        if ident.serial is not None:
            _write(strings / "serialnumber", ident.serial)
        config = self.dir / "configs" / "c.1"
        config.mkdir()
        _write(config / "MaxPower", str(self.max_power_ma))

    def _add(self, fn: _Function) -> None:
        fn._create()
        self.functions.append(fn)

    def add_hid(self, name: str, *, protocol: int, subclass: int, report_length: int,
                report_desc: bytes) -> HidFunction:
        fn = HidFunction(self, name)
        self._add(fn)
        fn.configure(protocol=protocol, subclass=subclass, report_length=report_length,
                     report_desc=report_desc)
        fn._link()
        return fn

    def add_acm(self, name: str) -> AcmFunction:
        fn = AcmFunction(self, name)
        self._add(fn)
        fn._link()
        return fn

    def add_ffs(self, name: str, mount_point: Path) -> FfsFunction:
        """Create and mount a FunctionFS function; it is linked into the
        configuration now, but the gadget binds only once its descriptors
        are written to `mount_point`/ep0."""
        fn = FfsFunction(self, name, mount_point)
        self._add(fn)
        fn._link()
        return fn

    @property
    def bound(self) -> bool:
        try:
            return bool((self.dir / "UDC").read_text().strip())
        except OSError:
            return False

    def bind(self, udc: str | None = None) -> str:
        """Plug in: on `udc`, else on the one used before, else on the first
        free one.  Returns the UDC's name."""
        wanted = udc or self.udc
        candidates = [wanted] if wanted else [u for u in udcs() if u not in _busy_udcs()]
        if not candidates:
            raise GadgetError(errno.EBUSY, f"no free UDC for gadget {self.name} (have: "
                              f"{', '.join(udcs()) or 'none'}; load dummy_hcd with num=N "
                              "for N gadgets)")
        last: GadgetError | None = None
        for name in candidates:
            try:
                _write(self.dir / "UDC", name)
            except GadgetError as e:
                # Another simulator took it between the scan and the write.
                last = e
                continue
            self.udc = name
            return name
        assert last is not None  # noqa: S101 - candidates was not empty
        raise last

    def unbind(self) -> None:
        """Pull the plug: the host sees a disconnect."""
        if self.bound:
            _write(self.dir / "UDC", "\n")

    def host_port(self) -> str | None:
        """The gadget's USB port path on its (dummy_hcd) host, e.g. `1-1`."""
        return host_port(self.udc) if self.udc else None

    def remove(self) -> None:
        """Unbind and take the gadget apart; FunctionFS is unmounted here, so
        its ep files must be closed before."""
        _teardown(self.dir)
        self.functions = []


def _teardown(gadget_dir: Path) -> None:
    with contextlib.suppress(OSError):
        if (gadget_dir / "UDC").read_text().strip():
            _write(gadget_dir / "UDC", "\n")
    for config in (gadget_dir / "configs").glob("*"):
        for link in config.iterdir():
            if link.is_symlink():
                link.unlink()
        for sub in (config / "strings").glob("*"):
            sub.rmdir()
        config.rmdir()
    ffs_names = {f.name[4:] for f in (gadget_dir / "functions").glob("ffs.*")}
    for source, target in _mounts("functionfs"):
        if source in ffs_names:
            _umount(target)
    for fn in (gadget_dir / "functions").glob("*"):
        fn.rmdir()
    for sub in (gadget_dir / "strings").glob("*"):
        sub.rmdir()
    gadget_dir.rmdir()
