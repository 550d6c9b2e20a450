"""The FC-3 console as a real USB HID device: `ConsoleFirmware` (unchanged)
behind a FunctionFS function written in userspace.

Why FunctionFS and not the kernel's f_hid: f_hid (6.1) answers every
GET_REPORT with report_length zero bytes, so it cannot serve the info
feature report.  With FunctionFS the descriptors below are written to ep0
and every request to the interface arrives on ep0 as a SETUP event, HID
class requests and GET_DESCRIPTOR for the report descriptor included (the
composite core does not know HID; f_fs passes interface requests on).

Identity (shared/devices/console-hid.md, "USB identity"): 1209:fb02,
"Seed Feedback" / "Feedback Console FC-3", the unit's serial; one interface,
class 3, no boot protocol, interrupt IN (ep1) and OUT (ep2)::

    interface  09 04 00 00 02 03 00 00 01
    HID        09 21 11 01 00 01 22 27 00      report descriptor: 39 bytes
    ep1 IN     07 05 81 03 40 00 <interval>    64-byte interrupt, 1 ms
    ep2 OUT    07 05 02 03 40 00 <interval>

Requests answered on ep0 (HID 1.11, section 7):

    GET_DESCRIPTOR  0x22 report descriptor (the sheet's), 0x21 HID descriptor
    GET_REPORT      feature 3 -> ConsoleFirmware.feature_report() (17 bytes,
                    ID first); with `feature="stall"` a STALL, with "zeros"
                    13 zero bytes as f_hid answers (report_length of its
                    input report); anything else STALLs
    SET_REPORT      output 2 -> ConsoleFirmware.output_report()
    GET/SET_IDLE, GET/SET_PROTOCOL   remembered and answered
    CLEAR_FEATURE   to an endpoint: acknowledged

Interrupt OUT reports (ID first, what hidraw's write sends) go to
`output_report` too.  Input reports from the firmware queue up in front of
ep1 and are written one at a time: a write completes only when the host
polls the endpoint, which usbhid does only while someone has the hidraw
node open.  So a report made while nobody reads WAITS, with the now_uptime
of when it was made, and arrives when a reader opens the node: what real
hardware does, and what the daemon must time by the device clock.  The
queue holds the report in the endpoint plus `tx_queue` more (the
firmware's transmit FIFO); beyond that new reports are dropped and counted
(the ring resends anything unacknowledged).  Reports still queued when the
host deconfigures the device (unplug, reset) are lost.

What a hidraw reader sees of them: usbhid discards whatever arrives in the
first 50 ms after the node is opened by its first reader (usbhid_open:
HID_RESUME_RUNNING, "events generated while nobody was listening"), and a
firmware that refills its endpoint at once drains a queue of 33 in less
than that (measured under QEMU TCG).  With `pace_ms` the firmware loads
the next report only `pace_ms` after the host took the previous one (a
main loop that services USB that often): above 50 ms, the reports that
waited survive the flush and arrive late, with their old now_uptime.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

from drivers.console import PID, REPORT_COMMAND, REPORT_INFO, VID, Layout
from firmware_sim.console import AckedEvent, ConsoleFirmware
from firmware_sim.server import run_ticker, uptime_ms
from firmware_sim.usb import functionfs as ffs
from firmware_sim.usb.control import ControlServer, quiet_thread
from firmware_sim.usb.gadget import Gadget, Identity

__all__ = [
    "REPORT_DESCRIPTOR",
    "FeatureMode",
    "FfsConsole",
    "UsbConsole",
]

log = logging.getLogger(__name__)

# shared/devices/console-hid.md, "Report descriptor".
REPORT_DESCRIPTOR: Final = bytes.fromhex(
    "0600ff 0901 a101 8501 0902 1500 26ff00 7508 950c 8102"
    " 8502 0903 9508 9102 8503 0904 9510 b102 c0")
MANUFACTURER: Final = "Seed Feedback"
PRODUCT: Final = "Feedback Console FC-3"
F_HID_REPORT_LENGTH: Final = 13  # what f_hid's zero answer is as long as

FeatureMode = Literal["ok", "stall", "zeros"]

# HID 1.11 section 7.2: class requests and report types (wValue high byte).
_GET_REPORT: Final = 0x01
_GET_IDLE: Final = 0x02
_GET_PROTOCOL: Final = 0x03
_SET_REPORT: Final = 0x09
_SET_IDLE: Final = 0x0A
_SET_PROTOCOL: Final = 0x0B
_TYPE_OUTPUT: Final = 2
_TYPE_FEATURE: Final = 3

_MAX_PACKET: Final = 64
_EP_GONE: Final = frozenset({errno.ESHUTDOWN, errno.ECONNRESET, errno.ENODEV, errno.EPIPE})
_STALLED: Final = frozenset({errno.EL2HLT, errno.EBADMSG})
_CANCELLED: Final = frozenset({errno.EIDRM})


def _hs_interval(ms: int) -> int:
    """The high-speed bInterval exponent for a poll period of `ms` (a power of two)."""
    return (ms * 8).bit_length()


def _descriptors(interval_ms: int) -> bytes:
    def speed(interval: int) -> list[bytes]:
        return [ffs.interface(0, 2, cls=0x03, subclass=0, protocol=0, string=1),
                ffs.hid_descriptor(len(REPORT_DESCRIPTOR)),
                ffs.endpoint(0x81, ffs.XFER_INTERRUPT, _MAX_PACKET, interval),
                ffs.endpoint(0x02, ffs.XFER_INTERRUPT, _MAX_PACKET, interval)]
    return ffs.descriptors(speed(interval_ms), speed(_hs_interval(interval_ms)))


class FfsConsole:
    """The USB side of one console: ep0 requests, the IN queue and the OUT
    endpoint of the FunctionFS filesystem mounted at `mount`.

    `open()` writes the descriptors (the gadget may be bound after it),
    `close()` after the gadget is unbound.  The firmware's sender is set
    while the host has the device configured."""

    def __init__(self, fw: ConsoleFirmware, mount: Path, *, feature: FeatureMode = "ok",
                 tx_queue: int = 32, interval_ms: int = 1, pace_ms: int = 0,
                 on_output: Callable[[], None] | None = None) -> None:
        if interval_ms not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"interval_ms must be a power of two up to 32, not {interval_ms}")
        self.fw = fw
        self.mount = mount
        self.feature: FeatureMode = feature
        self.tx_queue = tx_queue
        self.interval_ms = interval_ms
        self.pace_ms = pace_ms
        self._on_output = on_output
        self._ep0 = -1
        self._ep_in = -1
        self._ep_out = -1
        self._stop = threading.Event()
        self._enabled = threading.Event()
        self._cond = threading.Condition()
        self._queue: deque[bytes] = deque()
        self._generation = 0
        self._idle = 0
        self._protocol = 1  # report protocol
        self.counters: dict[str, int] = {}
        # The last input reports the host took from ep1, hex: for byte-exact checks.
        self.in_log: deque[str] = deque(maxlen=32)
        self._threads: list[threading.Thread] = []

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # -- lifecycle -----------------------------------------------------------------

    def open(self) -> None:
        self._ep0 = os.open(self.mount / "ep0", os.O_RDWR)
        try:
            os.write(self._ep0, _descriptors(self.interval_ms))
            os.write(self._ep0, ffs.strings({0x0409: [PRODUCT]}))
            # Non-blocking only while the endpoint is disabled (EAGAIN instead
            # of sleeping in the kernel until it is enabled); a transfer still
            # waits for the host.
            self._ep_in = os.open(self.mount / "ep1", os.O_WRONLY | os.O_NONBLOCK)
            self._ep_out = os.open(self.mount / "ep2", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            self._close_fds()
            raise
        self._threads = [quiet_thread(self._ep0_loop, "ep0"),
                         quiet_thread(self._writer, "ep1-in"),
                         quiet_thread(self._reader, "ep2-out")]

    def close(self) -> None:
        """Stop and close; call after unbinding, which ends any transfer in flight."""
        self._stop.set()
        self._enabled.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5)
            if t.is_alive():
                log.warning("thread %s still in the kernel: not closing its files", t.name)
                return
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._ep_in, self._ep_out, self._ep0):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._ep0 = self._ep_in = self._ep_out = -1

    @property
    def configured(self) -> bool:
        return self._enabled.is_set() and not self._stop.is_set()

    def flush(self) -> int:
        """Drop every queued input report (power is gone); how many there were."""
        with self._cond:
            n = len(self._queue)
            self._queue.clear()
            self._generation += 1
            return n

    @property
    def queued(self) -> int:
        """Input reports not yet taken by the host, the one in the endpoint included."""
        with self._cond:
            return len(self._queue)

    # -- ep0 ---------------------------------------------------------------------

    def _ep0_loop(self) -> None:
        poller = select.poll()
        poller.register(self._ep0, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            try:
                data = os.read(self._ep0, ffs.EVENT_SIZE * 8)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EINTR):
                    log.warning("ep0 read: %s", e)
                    self._stop.wait(0.1)
                continue
            for event in ffs.parse_events(data):
                self._event(event)

    def _event(self, event: ffs.Event) -> None:
        if event.type == ffs.EventType.ENABLE:
            self._enabled.set()
            self.fw.set_sender(self._queue_report)
            with self._cond:
                self._cond.notify_all()
            log.info("configured by the host")
        elif event.type in (ffs.EventType.DISABLE, ffs.EventType.UNBIND):
            if self._enabled.is_set():
                log.info("deconfigured (%s)", ffs.EventType(event.type).name)
            self._enabled.clear()
            self.fw.set_sender(None)
            lost = self.flush()
            if lost:
                self._count("in_lost_on_disconnect", lost)
        elif event.type == ffs.EventType.SETUP and event.setup is not None:
            try:
                self._setup(event.setup)
            except OSError as e:
                if e.errno in _CANCELLED:
                    self._count("setup_cancelled")
                else:
                    log.warning("control request %s: %s", event.setup, e)

    def _answer(self, s: ffs.Setup, data: bytes) -> None:
        os.write(self._ep0, data[:s.length])

    def _ack(self) -> None:
        os.read(self._ep0, 0)

    def _stall(self, s: ffs.Setup) -> None:
        # Doing the data stage in the wrong direction is how FunctionFS stalls.
        self._count("stalled")
        try:
            if s.device_to_host:
                os.read(self._ep0, 0)
            else:
                os.write(self._ep0, b"")
        except OSError as e:
            if e.errno not in _STALLED:
                raise

    def _setup(self, s: ffs.Setup) -> None:
        kind = s.request_type & ffs.TYPE_MASK
        recipient = s.request_type & ffs.RECIP_MASK
        if kind == ffs.TYPE_STANDARD and recipient == ffs.RECIP_INTERFACE \
                and s.request == ffs.REQ_GET_DESCRIPTOR and s.device_to_host:
            dtype = s.value >> 8
            if dtype == ffs.DT_REPORT:
                self._count("get_report_descriptor")
                self._answer(s, REPORT_DESCRIPTOR)
            elif dtype == ffs.DT_HID:
                self._answer(s, ffs.hid_descriptor(len(REPORT_DESCRIPTOR)))
            else:
                self._stall(s)
        elif kind == ffs.TYPE_CLASS and recipient == ffs.RECIP_INTERFACE:
            self._class_request(s)
        elif kind == ffs.TYPE_STANDARD and recipient == ffs.RECIP_ENDPOINT \
                and s.request == ffs.REQ_CLEAR_FEATURE:
            self._ack()
        else:
            self._stall(s)

    def _class_request(self, s: ffs.Setup) -> None:
        rtype, rid = s.value >> 8, s.value & 0xFF
        if s.request == _GET_REPORT and rtype == _TYPE_FEATURE and rid == REPORT_INFO:
            self._count("get_feature")
            if self.feature == "ok":
                self._answer(s, self.fw.feature_report())
            elif self.feature == "zeros":
                self._answer(s, bytes(F_HID_REPORT_LENGTH))
            else:
                self._stall(s)
        elif s.request == _SET_REPORT and rtype == _TYPE_OUTPUT and rid == REPORT_COMMAND \
                and s.length > 0:
            data = os.read(self._ep0, s.length)
            self._count("set_report")
            self._deliver(data)
        elif s.request == _GET_IDLE:
            self._answer(s, bytes([self._idle]))
        elif s.request == _SET_IDLE:
            self._idle = s.value >> 8
            self._ack()
        elif s.request == _GET_PROTOCOL:
            self._answer(s, bytes([self._protocol]))
        elif s.request == _SET_PROTOCOL:
            self._protocol = s.value & 0xFF
            self._ack()
        else:
            self._stall(s)

    def _deliver(self, report: bytes) -> None:
        self.fw.output_report(report)
        if self._on_output is not None:
            self._on_output()

    # -- interrupt endpoints ---------------------------------------------------------

    def _queue_report(self, report: bytes) -> None:
        # Called by the firmware under its lock: queue and return, never block.
        with self._cond:
            if len(self._queue) > self.tx_queue:
                self._count("in_dropped")
                return
            self._queue.append(report)
            self._cond.notify_all()

    def _writer(self) -> None:
        taken_at = 0.0
        while True:
            if self.pace_ms > 0:
                self._stop.wait(max(0.0, taken_at + self.pace_ms / 1000 - time.monotonic()))
            with self._cond:
                while not self._stop.is_set() and not (self._queue and self._enabled.is_set()):
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                report, generation = self._queue[0], self._generation
            try:
                os.write(self._ep_in, report)  # returns when the host has polled it
                sent = True
            except OSError as e:
                if e.errno == errno.EAGAIN:  # deconfigured meanwhile: keep it
                    self._stop.wait(0.02)
                    continue
                if e.errno not in _EP_GONE and e.errno != errno.EINTR:
                    log.warning("ep1 write: %s", e)
                sent = False
            with self._cond:
                if self._generation == generation and self._queue:
                    self._queue.popleft()
            if sent:
                taken_at = time.monotonic()
                self.in_log.append(report.hex())
            self._count("in_reports" if sent else "in_lost_on_disconnect")

    def _reader(self) -> None:
        while not self._stop.is_set():
            if not self._enabled.wait(0.5):
                continue
            try:
                data = os.read(self._ep_out, _MAX_PACKET)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    self._stop.wait(0.02)
                elif e.errno not in _EP_GONE and e.errno != errno.EINTR:
                    log.warning("ep2 read: %s", e)
                    self._stop.wait(0.1)
                continue
            if data and not self._stop.is_set():
                self._count("out_reports")
                self._deliver(data)

    def state(self) -> dict[str, Any]:
        return {"configured": self.configured, "in_queue": self.queued,
                "pace_ms": self.pace_ms, "feature": self.feature, "idle": self._idle,
                "protocol": self._protocol,
                "in_log": list(self.in_log), **self.counters}


ACKED_REPLY: Final = 1500  # as firmware_sim.server: a control frame holds 64 KiB


class UsbConsole:
    """One console process: the firmware, its gadget (plugged into `udc` or
    the first free UDC) and the control socket.

    Control requests (`firmware_sim.server`'s, so `feedback-sim console
    press|state|unplug|plug|power-cycle --socket CONTROL` drive it):
    'P' {"button", "hold_ms", "delay_ms"}; 'X' "state" | "unplug" (power and
    USB gone: UDC unbound, ring lost) | "plug" (UDC bound, power-up, HELLO)
    | "power-cycle" (a firmware restart, which on USB is a disconnect and a
    new enumeration) | "feature ok|stall|zeros" (how GET_REPORT is answered
    from now on) | "pace MS" (see the module docstring).  The state reply
    has the socket server's keys (`host_attached`: the host has the device
    configured; USB does not tell whether a program has hidraw open) plus
    `usb`: udc, port, configured, in_queue, in_log (the last reports the
    host took, hex) and counters.

    With `acked_log`, every event an ACK removes from the ring is appended to
    that file as one JSON line as the ACK arrives (no fsync: on the VM tier's
    9p share a write() has reached the host's file system when it returns, so
    the record survives a power cut of the guest): `boot_id` (the kernel's),
    `power_up_ms` (the process's monotonic clock at the firmware's power-up,
    ms: with `boot_id` the power-up session), `dev_seq`, `type`, `button`,
    `event_uptime` (the event's CLOCK_MONOTONIC ms is their sum)."""

    def __init__(self, serial: str, control: Path, *, buttons: int = 3,
                 layout: int = Layout.THREE_LEVEL, feature: FeatureMode = "ok",
                 tx_queue: int = 32, udc: str | None = None, name: str | None = None,
                 vid: int = VID, pid: int = PID, mount_root: Path = Path("/dev"),
                 interval_ms: int = 1, pace_ms: int = 0,
                 acked_log: Path | None = None) -> None:
        self.fw = ConsoleFirmware(serial, buttons=buttons, layout=layout, uptime_ms=uptime_ms)
        self._acked_fd = -1
        self._boot_id = ""
        if acked_log is not None:
            self._acked_fd = os.open(acked_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            with contextlib.suppress(OSError):
                self._boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            self.fw.on_acked = self._log_acked
        self.name = name or f"fc3-{serial.lower()}"
        self.gadget = Gadget(self.name, Identity(vid, pid, MANUFACTURER, PRODUCT, serial))
        self._udc = udc
        self._mount = mount_root / f"ffs-{self.name}"
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # plug state
        self.plugged = False
        self.usb = FfsConsole(self.fw, self._mount, feature=feature, tx_queue=tx_queue,
                              interval_ms=interval_ms, pace_ms=pace_ms,
                              on_output=self._wake.set)
        self.control = ControlServer(control, self.handle)

    def start(self) -> None:
        """Create and plug the gadget, then open the control socket."""
        self.gadget.create()
        try:
            self.gadget.add_ffs("hid", self._mount)
            self.usb.open()
            self.gadget.bind(self._udc)
        except BaseException:
            self.usb.close()
            self.gadget.remove()
            raise
        self.plugged = True
        quiet_thread(self._ticker, "firmware")
        self.control.start()

    def stop(self) -> None:
        """Unplug and take everything apart, device files before functions."""
        self._stop.set()
        self._wake.set()
        self.control.stop()
        self.gadget.unbind()
        self.usb.close()
        self.gadget.remove()
        if self._acked_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._acked_fd)
            self._acked_fd = -1

    def _log_acked(self, events: list[AckedEvent]) -> None:
        # Under the firmware's lock (ConsoleFirmware.on_acked): one append per ACK.
        if self._acked_fd < 0:
            return
        up = self.fw.powered_up_at_ms
        data = "".join(json.dumps({"boot_id": self._boot_id, "power_up_ms": up,
                                   "dev_seq": e.dev_seq, "type": e.type.name,
                                   "button": e.button, "event_uptime": e.event_uptime}) + "\n"
                       for e in events).encode()
        try:
            while data:
                data = data[os.write(self._acked_fd, data):]
        except OSError as e:
            log.warning("acked log: %s", e)

    def _ticker(self) -> None:
        run_ticker(self.fw, self._wake, self._stop)

    def unplug(self) -> None:
        with self._lock:
            if not self.plugged:
                return
            self.fw.power_cut()
            self.gadget.unbind()
            self.usb.flush()
            self.plugged = False
        log.info("unplugged")

    def plug(self) -> None:
        with self._lock:
            if self.plugged:
                return
            self.fw.power_up()
            self.gadget.bind(self.gadget.udc)
            self.plugged = True
        self._wake.set()
        log.info("plugged in")

    def handle(self, kind: bytes, payload: bytes) -> dict[str, Any]:
        """One control frame -> its reply (see the class docstring)."""
        if kind == b"P":
            req = json.loads(payload)
            if not isinstance(req, dict) or "button" not in req:
                raise ValueError('a press is {"button": N, "hold_ms": N, "delay_ms": N}')
            self.fw.press(int(req["button"]), hold_ms=int(req.get("hold_ms", 120)),
                          delay_ms=int(req.get("delay_ms", 0)))
            self._wake.set()
            return {"ok": True}
        if kind != b"X":
            return {"ok": False, "error": f"unknown request {kind!r} (a USB console has no "
                                          "socket host: open its hidraw node)"}
        what = payload.decode(errors="replace")
        if what == "unplug":
            self.unplug()
        elif what == "plug":
            self.plug()
        elif what == "power-cycle":
            if self.plugged:
                self.unplug()
                self.plug()
            else:
                self.fw.power_cut()
                self.fw.power_up()
        elif what.startswith("feature "):
            mode = what.partition(" ")[2]
            if mode not in ("ok", "stall", "zeros"):
                raise ValueError(f"feature mode {mode!r}: ok, stall or zeros")
            self.usb.feature = mode  # type: ignore[assignment]  # checked just above
        elif what.startswith("pace "):
            pace = int(what.partition(" ")[2])
            if pace < 0:
                raise ValueError(f"pace {pace}: milliseconds >= 0")
            self.usb.pace_ms = pace
        elif what != "state":
            return {"ok": False, "error": f"unknown control {what!r}"}
        self._wake.set()
        return self.state()

    def state(self) -> dict[str, Any]:
        fw = self.fw
        with fw.lock:
            acked = list(fw.acked)[-ACKED_REPLY:]
            reply: dict[str, Any] = {
                "ok": True, "serial": fw.serial, "powered": fw.powered,
                "plugged": self.plugged, "host_attached": fw.host_attached,
                "unacked": fw.unacked, "lost": fw.lost, "sent": fw.counters.sent,
                "resent": fw.counters.resent, "acks": fw.counters.acks,
                "beeps": list(fw.counters.beeps[-10:]),
                "leds": [[led.button, led.mode, led.ms] for led in fw.leds[-10:]],
                "acked": [[a.dev_seq, a.type.name, a.button, a.event_uptime] for a in acked],
                "acked_total": fw.acked_total}
        reply["usb"] = {"udc": self.gadget.udc, "port": self.gadget.host_port(),
                        **self.usb.state()}
        return reply
