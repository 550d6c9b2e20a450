"""`python3 -m firmware_sim.usb` (also `feedback-sim usb`): run a simulated
device as a real USB gadget, or drive a running one.

    console  --control CTL [--serial 00A1B2C3D4E5] [--feature ok|stall|zeros] [--udc U]
             [--acked-log FILE]
    terminal --control CTL --flash FILE [--serial 00C0FFEE0001] [--day] [--udc U]
    keyboard --control CTL [--vid 0x1a86 --pid 0xe026] [--serial S] [--udc U]
    badge    --control CTL [--vid 0xffff --pid 0x0035] [--serial S] [--udc U]
    type     --control CTL (--text 04A7F3 [--no-enter] | --key 0x1e ... | --report HEX ...)
    ctl      --control CTL state | unplug | plug | power-cycle | "feature stall" | "pace 100"

The run commands need root (configfs, FunctionFS mounts) and a UDC
(`modprobe dummy_hcd num=N`); each prints one line when its device is
plugged in and its control socket exists, and takes the gadget apart on
SIGTERM or SIGINT.  A console is also driven by `feedback-sim console press
good --socket CTL` (and state, unplug, plug, power-cycle), a terminal by
`feedback-sim terminal answer|state --control CTL`.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from drivers.console import Layout

__all__ = ["main"]

_LAYOUTS = {"three-level": Layout.THREE_LEVEL, "yes-no": Layout.YES_NO,
            "five-point": Layout.FIVE_POINT}


def _int(text: str) -> int:
    return int(text, 0)


def _serve_until_signal(dev: Any) -> int:
    """Keep a started device plugged in until SIGTERM or SIGINT, then take it apart."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        dev.stop()
    return 0


def _console(args: argparse.Namespace) -> int:
    from firmware_sim.usb.ffs_console import UsbConsole  # noqa: PLC0415

    dev = UsbConsole(args.serial, args.control, buttons=args.buttons,
                     layout=_LAYOUTS[args.layout], feature=args.feature,
                     tx_queue=args.tx_queue, udc=args.udc, name=args.name,
                     vid=args.vid, pid=args.pid, interval_ms=args.interval_ms,
                     pace_ms=args.pace_ms, acked_log=args.acked_log)
    dev.start()
    print(f"console {args.serial} on {dev.gadget.udc} (usb {dev.gadget.host_port()}), "
          f"control {args.control}", flush=True)
    return _serve_until_signal(dev)


def _terminal(args: argparse.Namespace) -> int:
    from firmware_sim.terminal_server import scripted_day  # noqa: PLC0415
    from firmware_sim.usb.acm_terminal import UsbTerminal  # noqa: PLC0415

    script = None
    if args.script is not None:
        script = json.loads(args.script.read_text())
    elif args.day:
        script = scripted_day(args.spacing_ms)
    dev = UsbTerminal(args.serial, args.flash, args.control, udc=args.udc, name=args.name,
                      script=script)
    dev.start()
    print(f"terminal {args.serial} on {dev.gadget.udc} (usb {dev.gadget.host_port()}), "
          f"control {args.control}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: dev.stop())
    signal.signal(signal.SIGINT, lambda *_: dev.stop())
    dev.serve_forever()
    return 0


def _keyboard(args: argparse.Namespace) -> int:
    from firmware_sim.usb.keyboard import UsbKeyboard  # noqa: PLC0415

    dev = UsbKeyboard(args.kind, args.control, serial=args.serial, udc=args.udc,
                      name=args.name, vid=args.vid, pid=args.pid)
    dev.start()
    ident = dev.gadget.identity
    print(f"{args.kind} {ident.vid:04x}:{ident.pid:04x} on {dev.gadget.udc} "
          f"(usb {dev.gadget.host_port()}), control {args.control}", flush=True)
    return _serve_until_signal(dev)


def _reply(reply: dict[str, Any]) -> int:
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


def _type(args: argparse.Namespace) -> int:
    from firmware_sim.usb.keyboard import type_request  # noqa: PLC0415

    req: dict[str, Any] = {"gap_ms": args.gap_ms, "hold_ms": args.hold_ms}
    if args.text is not None:
        req.update(text=args.text, enter=not args.no_enter)
    elif args.report:
        req["reports"] = args.report
    else:
        req["keys"] = args.key
    return _reply(type_request(args.control, req))


def _ctl(args: argparse.Namespace) -> int:
    from firmware_sim.server import control  # noqa: PLC0415

    return _reply(control(args.control, b"X", args.action.encode()))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m firmware_sim.usb",
                                description="simulated devices as real USB gadgets")
    sub = p.add_subparsers(dest="command", required=True)

    def device(name: str, help_: str) -> argparse.ArgumentParser:
        d = sub.add_parser(name, help=help_)
        d.add_argument("--control", type=Path, required=True, help="control socket to create")
        d.add_argument("--udc", help="the UDC to plug into (default: the first free one)")
        d.add_argument("--name", help="configfs gadget name (default: kind and serial); a "
                                      "gadget of that name left by a killed simulator is "
                                      "replaced")
        return d

    c = device("console", "an FC-3 console (FunctionFS HID, 1209:fb02)")
    c.add_argument("--serial", default="00A1B2C3D4E5")
    c.add_argument("--buttons", type=int, default=3)
    c.add_argument("--layout", choices=sorted(_LAYOUTS), default="three-level")
    c.add_argument("--feature", choices=["ok", "stall", "zeros"], default="ok",
                   help="how GET_REPORT for the info feature report is answered: stall or "
                        "zeros is a firmware that cannot (for the daemon's fallback)")
    c.add_argument("--tx-queue", type=int, default=32,
                   help="input reports the firmware queues behind the one in the endpoint")
    c.add_argument("--interval-ms", type=int, default=1, help="interrupt poll interval")
    c.add_argument("--pace-ms", type=int, default=0,
                   help="refill the IN endpoint at most this often (> 50: reports that waited "
                        "while nobody read survive usbhid's flush at open)")
    c.add_argument("--vid", type=_int, default=0x1209)
    c.add_argument("--pid", type=_int, default=0xFB02)
    c.add_argument("--acked-log", type=Path,
                   help="append one JSON line per event the host ACKs (boot_id, power_up_ms, "
                        "dev_seq, type, button, event_uptime), written as the ACK arrives")
    c.set_defaults(func=_console)

    t = device("terminal", "an ST-3000 survey terminal (CDC-ACM, 1209:fb30)")
    t.add_argument("--flash", type=Path, required=True, help="the terminal's flash file")
    t.add_argument("--serial", default="00C0FFEE0001")
    t.add_argument("--script", type=Path, help="JSON list of records with after_ms")
    t.add_argument("--day", action="store_true", help="play a built-in scripted day")
    t.add_argument("--spacing-ms", type=int, default=2000)
    t.set_defaults(func=_terminal)

    for kind, help_ in (("keyboard", "a button box typing keys (boot keyboard)"),
                        ("badge", "a badge reader typing numbers and Enter (boot keyboard)")):
        k = device(kind, help_)
        k.add_argument("--serial")
        k.add_argument("--vid", type=_int)
        k.add_argument("--pid", type=_int)
        k.set_defaults(func=_keyboard, kind=kind)

    ty = sub.add_parser("type", help="type on a running keyboard or badge reader")
    ty.add_argument("--control", type=Path, required=True)
    what = ty.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a badge number (letters, digits); Enter follows")
    what.add_argument("--key", type=_int, action="append", help="a key usage, e.g. 0x1e")
    what.add_argument("--report", action="append", help="a raw 8-byte report in hex")
    ty.add_argument("--no-enter", action="store_true", help="a partial scan: no Enter")
    ty.add_argument("--gap-ms", type=int, default=20)
    ty.add_argument("--hold-ms", type=int, default=10)
    ty.set_defaults(func=_type)

    ctl = sub.add_parser("ctl", help="state, unplug, plug or power-cycle a running device")
    ctl.add_argument("--control", type=Path, required=True)
    ctl.add_argument("action", help='state | unplug | plug | power-cycle | "feature MODE"')
    ctl.set_defaults(func=_ctl)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"usb-sim {args.command}: %(message)s")
    try:
        result: int = args.func(args)
    except OSError as e:
        print(f"firmware_sim.usb {args.command}: {e}", file=sys.stderr)
        return 1
    return result
