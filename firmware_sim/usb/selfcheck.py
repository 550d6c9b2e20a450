"""Guest-side checks of the USB backends through the host side of the USB
stack: `python3 -m firmware_sim.usb.selfcheck --dir /tmp/usbcheck` as root
in a machine with dummy_hcd (num >= 5), libcomposite, usb_f_fs, usb_f_hid,
usb_f_acm, usbhid, hid_generic, cdc_acm and evdev loaded.

Starts each simulator as its own process (as a test would), then checks
what a host program sees: sysfs identity, hidraw reports byte for byte,
output and feature reports, reports that waited in the endpoint, ep0
requests through usbfs, the terminal on /dev/ttyACM*, keys on hidraw and
evdev (with EVIOCGRAB).  Prints one PASS/FAIL line per check with its
figures; exits 1 if anything failed.

The ioctls (numbers from the kernel's uapi headers, x86-64 layouts)::

    HIDIOCGRDESCSIZE  _IOR('H', 1, int)                  linux/hidraw.h
    HIDIOCGRDESC      _IOR('H', 2, {u32 size; u8 value[4096]})
    HIDIOCGRAWINFO    _IOR('H', 3, {u32 bustype; s16 vendor; s16 product})
    HIDIOCGFEATURE(n) _IOC(RW, 'H', 7, n)
    USBDEVFS_CONTROL  _IOWR('U', 0, {u8 type, req; u16 value, index, length;
                                     u32 timeout_ms; void *data})   24 bytes
    USBDEVFS_BULK     _IOWR('U', 2, {u32 ep, len, timeout_ms; void *data})  24 bytes
    EVIOCGRAB         _IOW('E', 0x90, int)               linux/input.h
    input_event       {timeval (16 bytes); u16 type, code; s32 value}
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import select
import signal
import statistics
import struct
import subprocess
import sys
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from drivers.console import (
    ConsoleInfo,
    ConsoleReport,
    ReportType,
    decode_info,
    decode_report,
    encode_ack,
    encode_show,
)
from drivers.hidraw_transport import EVIOCGRAB, hidiocgfeature
from drivers.keyboard import BadgeDecoder, BadgeScan, BootDecoder
from drivers.terminal import Frame, FrameDecoder, FrameType, encode_frame
from drivers.usb_discovery import UsbDevice, scan
from firmware_sim.server import control
from firmware_sim.usb.ffs_console import REPORT_DESCRIPTOR

__all__ = ["main"]

HIDIOCGRDESCSIZE: Final = 0x80044801
HIDIOCGRDESC: Final = 0x90044802
HIDIOCGRAWINFO: Final = 0x80084803
USBDEVFS_CONTROL: Final = 0xC0185500
USBDEVFS_BULK: Final = 0xC0185502
_CTRL: Final = struct.Struct("<BBHHHI4xQ")
_BULK: Final = struct.Struct("<III4xQ")
_INPUT_EVENT: Final = struct.Struct("<qqHHi")
EV_KEY: Final = 1
KEY_1: Final = 2

_results: list[tuple[bool, str, str]] = []


def check(name: str, ok: bool, detail: str = "") -> bool:
    _results.append((ok, name, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


# -- processes and sysfs ----------------------------------------------------------------


class Sim:
    """A `python3 -m firmware_sim.usb` process, ready once its control socket exists."""

    def __init__(self, work: Path, name: str, args: list[str]) -> None:
        self.control = work / f"{name}.ctl"
        self.log = work / f"{name}.log"
        self.started = time.monotonic()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "firmware_sim.usb", *args,
                                          "--control", str(self.control)],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.control.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self.log.read_text()}")
            time.sleep(0.02)
        self.ready = time.monotonic()

    def x(self, what: str) -> dict[str, Any]:
        return control(self.control, b"X", what.encode())

    def request(self, kind: bytes, payload: dict[str, Any]) -> dict[str, Any]:
        return control(self.control, kind, json.dumps(payload).encode())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def wait_usb(match: Callable[[UsbDevice], bool], need: str, timeout: float = 15) -> UsbDevice:
    """The first USB device matching, once its `need` nodes ("hidraw", "tty",
    "event") exist in /dev."""
    deadline = time.monotonic() + timeout
    while True:
        for dev in scan():
            nodes: tuple[str, ...] = getattr(dev, need) if need else ("x",)
            if match(dev) and nodes and all(Path(n).exists() for n in nodes):
                return dev
        if time.monotonic() > deadline:
            raise TimeoutError(f"no matching USB device with {need} nodes")
        time.sleep(0.01)


def read_fd(fd: int, timeout: float, size: int = 64) -> bytes | None:
    if not select.select([fd], [], [], timeout)[0]:
        return None
    return os.read(fd, size)


def drain(fd: int, quiet: float = 0.3) -> list[tuple[float, bytes]]:
    """Everything readable until `quiet` seconds pass without data."""
    out: list[tuple[float, bytes]] = []
    while (data := read_fd(fd, quiet)) is not None:
        out.append((time.monotonic(), data))
    return out


@contextlib.contextmanager
def opened(path: str | Path, flags: int) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def feature(fd: int) -> bytes:
    buf = bytearray(17)
    buf[0] = 3
    n = fcntl.ioctl(fd, hidiocgfeature(17), buf, True)
    return bytes(buf[:n])


def usbfs_control(fd: int, rtype: int, req: int, *, value: int, index: int = 0,
                  data: bytes | int) -> bytes:
    """A control transfer through usbfs: `data` is what to send, or how many
    bytes to receive.  Returns the received bytes."""
    length = data if isinstance(data, int) else len(data)
    buf = ctypes.create_string_buffer(data if isinstance(data, bytes) else b"", max(length, 1))
    arg = bytearray(_CTRL.pack(rtype, req, value, index, length, 2000, ctypes.addressof(buf)))
    n = fcntl.ioctl(fd, USBDEVFS_CONTROL, arg, True)
    return buf.raw[:n] if isinstance(data, int) else b""


def usbfs_interrupt_in(fd: int, ep: int, size: int, timeout_ms: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    arg = bytearray(_BULK.pack(ep, size, timeout_ms, ctypes.addressof(buf)))
    n = fcntl.ioctl(fd, USBDEVFS_BULK, arg, True)
    return buf.raw[:n]


def usbfs_node(port: str) -> Path:
    d = Path("/sys/bus/usb/devices") / port
    bus, dev = int((d / "busnum").read_text()), int((d / "devnum").read_text())
    return Path(f"/dev/bus/usb/{bus:03d}/{dev:03d}")


# -- the console -------------------------------------------------------------------


def _report_age_ms(report: bytes, info_now: int) -> int:
    """How old the report's now_uptime is at device time `info_now`, in ms."""
    r = decode_report(report, 3)
    if not isinstance(r, ConsoleReport):
        raise TypeError(f"undecodable report {report.hex()}: {r}")
    return (info_now - r.now_uptime) % (1 << 32)


def _info_now(raw: bytes) -> int:
    info = decode_info(raw)
    if not isinstance(info, ConsoleInfo):
        raise TypeError(f"undecodable info report {raw.hex()}: {info}")
    return info.now_uptime


def console_checks(work: Path) -> None:
    serial = "00A1B2C3D4E5"
    t0 = time.monotonic()
    sim = Sim(work, "console", ["console", "--serial", serial, "--udc", "dummy_udc.0"])
    dev = wait_usb(lambda d: (d.vid, d.pid, d.serial) == (0x1209, 0xFB02, serial), "hidraw")
    t_enum = time.monotonic()
    check("console enumerates", dev.interfaces == ((3, 0, 0),) and
          dev.manufacturer == "Seed Feedback" and dev.product == "Feedback Console FC-3",
          f"{dev.port_path} {dev.ident} serial {dev.serial} {dev.manufacturer!r} "
          f"{dev.product!r} interfaces {dev.interfaces} {dev.hidraw[0]}; process start -> "
          f"hidraw {t_enum - t0:.2f} s, control socket (bound) -> hidraw "
          f"{max(0.0, t_enum - sim.ready):.2f} s")
    hidraw = dev.hidraw[0]
    try:
        _console_hidraw(sim, hidraw)
        _console_waiting(sim)
        _console_usbfs(sim, dev.port_path)
        _console_feature_modes(sim)
        _console_unplug(sim, serial)
        _two_consoles(work)
    finally:
        sim.stop()
    check("console gadget removed", not Path("/sys/kernel/config/usb_gadget/"
                                              f"fc3-{serial.lower()}").exists(),
          f"exit code {sim.proc.returncode}")


def _console_hidraw(sim: Sim, hidraw: str) -> None:
    with opened(hidraw, os.O_RDWR) as fd:
        size = bytearray(4)
        fcntl.ioctl(fd, HIDIOCGRDESCSIZE, size, True)
        desc = bytearray(4100)
        struct.pack_into("<I", desc, 0, int.from_bytes(size, "little"))
        fcntl.ioctl(fd, HIDIOCGRDESC, desc, True)
        rdesc = bytes(desc[4:4 + int.from_bytes(size, "little")])
        rawinfo = bytearray(8)
        fcntl.ioctl(fd, HIDIOCGRAWINFO, rawinfo, True)
        bus, vid, pid = struct.unpack("<Ihh", rawinfo)
        check("report descriptor via hidraw", rdesc == REPORT_DESCRIPTOR and bus == 3 and
              (vid & 0xFFFF, pid & 0xFFFF) == (0x1209, 0xFB02),
              f"{len(rdesc)} bytes, bus {bus}, {vid & 0xFFFF:04x}:{pid & 0xFFFF:04x}")
        drain(fd, 1.2)  # the HELLO's replays
        fd_ack(fd, sim)
        rtts: list[float] = []
        exact = True
        last = b""
        for i in range(5):
            drain(fd, 0.05)
            t = time.monotonic()
            sim.request(b"P", {"button": i % 3, "hold_ms": 60})
            data = read_fd(fd, 2.0)
            if data is None:
                check("press -> hidraw", False, f"press {i}: no report in 2 s")
                return
            rtts.append((time.monotonic() - t) * 1000)
            r = decode_report(data, 3)
            state = sim.x("state")
            exact &= state["usb"]["in_log"][-1] == data.hex() and len(data) == 13 and \
                getattr(r, "type", None) == ReportType.PRESS and \
                getattr(r, "button", None) == i % 3 and not getattr(r, "replay", True)
            last = data
            os.write(fd, encode_ack(data[1]))
        check("press -> hidraw, byte-exact", exact,
              f"last {last.hex()}; round trip (control request -> report read, incl. 30 ms "
              f"debounce) ms: min {min(rtts):.0f} median {statistics.median(rtts):.0f} "
              f"max {max(rtts):.0f}")
        time.sleep(0.2)
        os.write(fd, encode_show(1, 2, 1500))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            state = sim.x("state")
            if state["leds"] and state["leds"][-1] == [1, 2, 1500] and state["unacked"] == 0:
                break
            time.sleep(0.05)
        check("output reports (interrupt OUT) reach the model",
              state["leds"][-1] == [1, 2, 1500] and state["unacked"] == 0 and
              state["acks"] >= 5,
              f"acks {state['acks']}, leds {state['leds'][-1:]}, unacked {state['unacked']}, "
              f"acked {state['acked'][-1:]}, out_reports {state['usb'].get('out_reports')}")
        t = time.monotonic()
        raw = feature(fd)
        ms = (time.monotonic() - t) * 1000
        info = decode_info(raw)
        check("feature report 3 via HIDIOCGFEATURE", len(raw) == 17 and raw[0] == 3 and
              getattr(info, "buttons", None) == 3 and getattr(info, "ring", None) == 32,
              f"{raw.hex()} ({len(raw)} bytes, {ms:.1f} ms): {info}")


def fd_ack(fd: int, sim: Sim) -> None:
    """ACK everything the console holds (the host's cumulative ACK of its newest)."""
    state = sim.x("state")
    if state["usb"]["in_log"]:
        newest = bytes.fromhex(state["usb"]["in_log"][-1])
        os.write(fd, encode_ack(newest[1]))
    time.sleep(0.1)


def _console_waiting(sim: Sim) -> None:
    """Reports made while nobody has hidraw open wait in the endpoint; at the
    next open usbhid drops what arrives in its first 50 ms, so they reach a
    hidraw reader only from a firmware that refills its endpoint slower."""
    for pace in (0, 100):
        sim.x(f"pace {pace}")
        sim.x("power-cycle")  # a clean ring
        dev = wait_usb(lambda d: d.serial == "00A1B2C3D4E5", "hidraw")
        with opened(dev.hidraw[0], os.O_RDWR) as fd:
            drain(fd, 1.2)
            fd_ack(fd, sim)
            drain(fd, 0.3)
        # Nobody reads now: presses queue up in front of the host.
        before = sim.x("state")["usb"].get("in_reports", 0)
        for i in range(20):
            sim.request(b"P", {"button": i % 3, "hold_ms": 40, "delay_ms": i * 100})
        time.sleep(4.0)
        queued = sim.x("state")["usb"]["in_queue"]
        with opened(dev.hidraw[0], os.O_RDWR) as fd:
            t_open = time.monotonic()
            got = drain(fd, 0.4)
            info_now = _info_now(feature(fd))
            t_info = time.monotonic()
        taken = sim.x("state")["usb"].get("in_reports", 0) - before
        detail = (f"pace {pace} ms: {queued} reports queued while closed; in the "
                  f"{(t_info - t_open):.1f} s after open the host took {taken}, hidraw "
                  f"delivered {len(got)}")
        if pace == 0:
            check("usbhid drops the queued reports at open (pace 0)", queued > 0 and
                  len(got) < taken, detail)
            continue
        if not got:
            check("reports wait in the endpoint (hidraw, pace 100)", False, detail)
            return
        t_first, first = got[0]
        # The info report's now_uptime is "now" on the device clock.
        age = _report_age_ms(first, info_now) - (t_info - t_first) * 1000
        check("reports wait in the endpoint (hidraw, pace 100)", age > 1000,
              f"{detail}; the first read {(t_first - t_open) * 1000:.0f} ms after open: "
              f"{first.hex()}, its now_uptime {age:.0f} ms old when read")
    sim.x("pace 0")


def _console_usbfs(sim: Sim, port: str) -> None:
    """ep0 requests the kernel's HID driver does not make, through usbfs
    (usbhid unbound first): GET_DESCRIPTOR(report), SET_REPORT(output), and a
    report waiting in the endpoint read as libusb reads it."""
    intf = f"{port}:1.0"
    Path("/sys/bus/usb/drivers/usbhid/unbind").write_text(intf)
    try:
        with opened(usbfs_node(port), os.O_RDWR) as fd:
            rdesc = usbfs_control(fd, 0x81, 0x06, value=0x2200, data=256)
            check("GET_DESCRIPTOR(0x22) on ep0", rdesc == REPORT_DESCRIPTOR,
                  f"{len(rdesc)} bytes")
            beeps = len(sim.x("state")["beeps"])
            usbfs_control(fd, 0x21, 0x09, value=0x0202, data=bytes([2, 4, 0xC8] + [0] * 6))
            state = sim.x("state")
            check("SET_REPORT(output 2) on ep0 reaches the model",
                  len(state["beeps"]) == beeps + 1 and state["beeps"][-1] == 200,
                  f"beeps {state['beeps']}, set_report {state['usb'].get('set_report')}")
            idle = usbfs_control(fd, 0xA1, 0x02, value=0, data=1)
            usbfs_control(fd, 0x21, 0x0A, value=0x0400, data=b"")
            idle2 = usbfs_control(fd, 0xA1, 0x02, value=0, data=1)
            check("GET_IDLE / SET_IDLE", idle2 == b"\x04", f"{idle.hex()} -> {idle2.hex()}")
            for _ in range(40):  # take whatever is queued now
                try:
                    usbfs_interrupt_in(fd, 0x81, 64, 50)
                except OSError:
                    break
            sim.request(b"P", {"button": 2, "hold_ms": 40})
            time.sleep(2.5)
            data = usbfs_interrupt_in(fd, 0x81, 64, 1000)
            t_read = time.monotonic()
            raw = usbfs_control(fd, 0xA1, 0x01, value=0x0303, data=17)
            age = _report_age_ms(data, _info_now(raw)) - (time.monotonic() - t_read) * 1000
            r = decode_report(data, 3)
            check("a report waits in the endpoint (read as libusb does)",
                  getattr(r, "type", None) == ReportType.PRESS and 2300 < age < 3500,
                  f"{data.hex()}: PRESS made 2.5 s before the read, now_uptime {age:.0f} ms "
                  "old when read")
    finally:
        Path("/sys/bus/usb/drivers/usbhid/bind").write_text(intf)


def _console_feature_modes(sim: Sim) -> None:
    dev = wait_usb(lambda d: d.serial == "00A1B2C3D4E5", "hidraw")
    hidraw = dev.hidraw[0]
    with opened(hidraw, os.O_RDWR) as fd:
        sim.x("feature stall")
        try:
            feature(fd)
            stalled = "answered"
        except OSError as e:
            stalled = errno.errorcode.get(e.errno or 0, str(e.errno))
        sim.x("feature zeros")
        zeros = feature(fd)
        sim.x("feature ok")
        ok = feature(fd)
    check("feature fallback modes", stalled == "EPIPE" and zeros == bytes(13) and len(ok) == 17,
          f"stall -> {stalled}; zeros -> {zeros.hex()} ({len(zeros)} bytes); ok -> "
          f"{len(ok)} bytes")


def _console_unplug(sim: Sim, serial: str) -> None:
    dev = wait_usb(lambda d: d.serial == serial, "hidraw")
    with opened(dev.hidraw[0], os.O_RDWR) as fd:
        t = time.monotonic()
        sim.x("unplug")
        try:
            while read_fd(fd, 2.0) is not None:
                pass
            err = "no error in 2 s"
        except OSError as e:
            err = errno.errorcode.get(e.errno or 0, str(e.errno))
        t_err = time.monotonic() - t
    gone = not any(d.serial == serial for d in scan())
    t = time.monotonic()
    sim.x("plug")
    dev = wait_usb(lambda d: d.serial == serial, "hidraw")
    t_back = time.monotonic() - t
    with opened(dev.hidraw[0], os.O_RDWR) as fd:
        first = read_fd(fd, 3.0)
    r = decode_report(first, 3) if first else None
    check("unplug and plug", err == "EIO" and gone and
          getattr(r, "type", None) == ReportType.HELLO,
          f"reader got {err} {t_err * 1000:.0f} ms after unplug; device gone from sysfs: "
          f"{gone}; plug -> hidraw {t_back:.2f} s; first report {first.hex() if first else None}"
          f" (HELLO, replayed: {getattr(r, 'replay', None)})")


def _two_consoles(work: Path) -> None:
    serial = "00A1B2C3D4E6"
    sim = Sim(work, "console2", ["console", "--serial", serial])
    try:
        a = wait_usb(lambda d: d.serial == "00A1B2C3D4E5", "hidraw")
        b = wait_usb(lambda d: d.serial == serial, "hidraw")
        with opened(a.hidraw[0], os.O_RDWR) as fa, opened(b.hidraw[0], os.O_RDWR) as fb:
            drain(fa, 1.2)
            drain(fb, 0.1)
            sim.request(b"P", {"button": 1})
            rb = read_fd(fb, 2.0)
            ra = read_fd(fa, 0.3)
        check("two consoles told apart by serial", a.port_path != b.port_path and rb is not None
              and getattr(decode_report(rb, 3), "button", None) == 1 and
              (ra is None or getattr(decode_report(ra, 3), "type", None) != ReportType.PRESS),
              f"{a.serial} at {a.port_path} {a.hidraw[0]}, {b.serial} at {b.port_path} "
              f"{b.hidraw[0]} ({sim.x('state')['usb']['udc']}); a press on the second "
              f"reached only its node")
    finally:
        sim.stop()


# -- the terminal ------------------------------------------------------------------------


def _frames(fd: int, dec: FrameDecoder, timeout: float) -> list[Frame]:
    """Frames until 0.1 s pass without data after the first, or `timeout`;
    the time the first data came is appended to `_frame_times`."""
    out: list[Frame] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = read_fd(fd, 0.1, 4096)
        if data is None:
            if out:
                break
            continue
        if not data:
            raise OSError(errno.EIO, "EOF")
        if not out:
            _frame_times.append(time.monotonic())
        out += [f for f in dec.feed(data) if isinstance(f, Frame)]
    return out


_frame_times: list[float] = []


def _who_until_hello(fd: int, dec: FrameDecoder) -> tuple[list[Frame], dict[str, Any]]:
    """WHO (after a lone delimiter) once a second until a HELLO comes, as the
    daemon asks: what waited in the device reaches the port before it is raw
    and n_tty echoes it back, so a first WHO can arrive glued to that noise.
    The frames read on the way, and the HELLO's payload."""
    seen: list[Frame] = []
    for seq in range(1, 11):
        os.write(fd, b"\0" + encode_frame(FrameType.WHO, seq, {}))
        frames = _frames(fd, dec, 1.0)
        seen += frames
        hello = [f for f in frames if f.type == FrameType.HELLO]
        if hello:
            return seen, json.loads(hello[-1].payload)
    return seen, {}


def terminal_checks(work: Path) -> None:
    serial = "00C0FFEE0001"
    flash = work / "st3.flash"
    with contextlib.suppress(FileNotFoundError):
        flash.unlink()
    t0 = time.monotonic()
    sim = Sim(work, "terminal", ["terminal", "--serial", serial, "--flash", str(flash),
                                 "--udc", "dummy_udc.2"])
    try:
        dev = wait_usb(lambda d: (d.vid, d.pid, d.serial) == (0x1209, 0xFB30, serial), "tty")
        check("terminal enumerates", bool(dev.tty) and dev.tty[0].startswith("/dev/ttyACM"),
              f"{dev.port_path} {dev.ident} serial {dev.serial} {dev.tty} interfaces "
              f"{dev.interfaces}; process start -> tty {time.monotonic() - t0:.2f} s")
        fd = os.open(dev.tty[0], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)
            dec = FrameDecoder()
            seen, body = _who_until_hello(fd, dec)
            check("terminal answers WHO with HELLO on ttyACM", body.get("serial") == serial,
                  f"frames read: {[FrameType(f.type).name for f in seen]}; HELLO {body}")
            t = time.monotonic()
            rid = sim.request(b"A", {"kind": "answer", "doctor": "dr-petrov", "q1": "yes",
                                     "lang": "en"})["id"]
            got = [f for f in _frames(fd, dec, 3.0) if f.type == FrameType.ANSWER]
            rtt = (_frame_times[-1] - t) * 1000
            ans = json.loads(got[0].payload) if got else {}
            if got:
                os.write(fd, encode_frame(FrameType.ACK, 2, {"ack": got[0].seq}))
            deadline = time.monotonic() + 3
            while sim.x("state")["unacked"] and time.monotonic() < deadline:
                time.sleep(0.05)
            check("terminal record -> ttyACM -> ACK", ans.get("id") == rid and
                  sim.x("state")["unacked"] == 0,
                  f"{ans}; control request -> frame read {rtt:.0f} ms; ACKed")
            t = time.monotonic()
            sim.x("unplug")
            try:
                _frames(fd, dec, 2.0)
                err = "nothing"
            except OSError as e:
                err = errno.errorcode.get(e.errno or 0, str(e.errno))
        finally:
            os.close(fd)
        t_err = time.monotonic() - t
        sim.request(b"A", {"kind": "answer", "doctor": "dr-ivanova", "q1": "unsure"})
        sim.x("plug")
        dev = wait_usb(lambda d: d.serial == serial, "tty")
        with opened(dev.tty[0], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK) as fd:
            tty.setraw(fd)
            dec = FrameDecoder()
            frames, _ = _who_until_hello(fd, dec)
            frames += _frames(fd, dec, 3.0)  # the record is retransmitted every 2 s
        kinds = [FrameType(f.type).name for f in frames]
        check("terminal unplug and plug", err in ("EIO", "ENODEV") and "ANSWER" in kinds,
              f"reader got {err} {t_err * 1000:.0f} ms after unplug; after plug "
              f"{dev.tty[0]}: {kinds} (the answer made while unplugged replayed)")
    finally:
        sim.stop()


# -- keyboards ----------------------------------------------------------------------------


def keyboard_checks(work: Path) -> None:
    kbd = Sim(work, "keyboard", ["keyboard", "--udc", "dummy_udc.3"])
    badge = Sim(work, "badge", ["badge", "--udc", "dummy_udc.4"])
    try:
        k = wait_usb(lambda d: (d.vid, d.pid) == (0x1A86, 0xE026), "event")
        k = wait_usb(lambda d: (d.vid, d.pid) == (0x1A86, 0xE026), "hidraw")
        check("button box enumerates", k.interfaces == ((3, 1, 1),),
              f"{k.port_path} {k.ident} serial {k.serial} {k.interfaces} {k.hidraw} {k.event}")
        with opened(k.hidraw[0], os.O_RDONLY) as raw, \
                opened(k.event[0], os.O_RDONLY | os.O_NONBLOCK) as grab, \
                opened(k.event[0], os.O_RDONLY | os.O_NONBLOCK) as other:
            drain(raw, 0.2)
            drain(other, 0.1)
            kbd.request(b"T", {"keys": [0x1E, 0x20]})
            reports = [d for _, d in drain(raw, 0.5)]
            events = _key_events(other)
            check("keys reach hidraw and evdev",
                  [r.hex() for r in reports] == ["00001e0000000000", "0000000000000000",
                                                 "0000200000000000", "0000000000000000"] and
                  (EV_KEY, KEY_1, 1) in events,
                  f"hidraw {[r.hex() for r in reports]}; evdev key events {events}")
            fcntl.ioctl(grab, EVIOCGRAB, 1)
            try:
                fcntl.ioctl(other, EVIOCGRAB, 1)
                second = "granted"
            except OSError as e:
                second = errno.errorcode.get(e.errno or 0, str(e.errno))
            kbd.request(b"T", {"keys": [0x1F]})
            reports = [d for _, d in drain(raw, 0.5)]
            grabbed, others = _key_events(grab), _key_events(other)
            check("EVIOCGRAB: keys reach only the grabber", bool(reports) and bool(grabbed)
                  and not others and second == "EBUSY",
                  f"hidraw {len(reports)} reports, grabber {grabbed}, other reader {others}, "
                  f"second grab {second}")
        b = wait_usb(lambda d: (d.vid, d.pid) == (0xFFFF, 0x0035), "hidraw")
        with opened(b.hidraw[0], os.O_RDONLY) as raw:
            drain(raw, 0.2)
            t = time.monotonic()
            badge.request(b"T", {"text": "04A7F3", "enter": True})
            got = drain(raw, 0.5)
        boot, scans = BootDecoder(), BadgeDecoder()
        found: list[BadgeScan] = []
        for at, data in got:
            for key in boot.feed(data, int((at - t) * 1000)):
                if (s := scans.feed(key)) is not None:
                    found.append(s)
        check("badge scan typed and decoded", [s.badge for s in found] == ["04A7F3"],
              f"{b.port_path} {b.ident}: {len(got)} reports, decoded {len(found)} scan(s) "
              f"of {[len(s.badge) for s in found]} chars, errors {scans.errors}")
    finally:
        kbd.stop()
        badge.stop()


def _key_events(fd: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    with contextlib.suppress(BlockingIOError):
        while data := os.read(fd, _INPUT_EVENT.size * 64):
            for off in range(0, len(data), _INPUT_EVENT.size):
                _, _, etype, code, value = _INPUT_EVENT.unpack_from(data, off)
                if etype == EV_KEY:
                    out.append((etype, code, value))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m firmware_sim.usb.selfcheck")
    p.add_argument("--dir", type=Path, required=True, help="a writable work directory")
    p.add_argument("--only", default="console,terminal,keyboard")
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    for name, fn in (("console", console_checks), ("terminal", terminal_checks),
                     ("keyboard", keyboard_checks)):
        if name in args.only.split(","):
            try:
                fn(args.dir)
            except Exception as e:  # noqa: BLE001 - report and go on with the next group
                check(f"{name} checks ran", False, f"{type(e).__name__}: {e}")
    failed = [r for r in _results if not r[0]]
    print(f"{len(_results) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
