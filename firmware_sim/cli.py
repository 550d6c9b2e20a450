"""`feedback-sim`: simulated devices for demos and black-box tests.

    feedback-sim console run --socket /tmp/fc3.sock [--serial 00A1B2C3D4E5]
    feedback-sim console press good --socket /tmp/fc3.sock [--count 5 --interval-ms 500]
    feedback-sim console power-cycle --socket /tmp/fc3.sock
    feedback-sim console unplug --socket /tmp/fc3.sock   # the host's link closes; plug ends it
    feedback-sim console state --socket /tmp/fc3.sock
    feedback-sim terminal run --link /tmp/st3.tty --flash /tmp/st3.flash [--day] [--control S]
    feedback-sim terminal answer --control S --doctor dr-petrov --q1 no --q2 yes --phone ...
    feedback-sim usb console --control S ...    # as a real USB device (firmware_sim.usb.cli)
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from drivers.console import Layout, button_labels

__all__ = ["main"]

_LAYOUTS = {"three-level": Layout.THREE_LEVEL, "yes-no": Layout.YES_NO,
            "five-point": Layout.FIVE_POINT}


def _button_index(name: str, layout: int = Layout.THREE_LEVEL, buttons: int = 5) -> int:
    if name.isdigit():
        return int(name)
    for lay in (layout, Layout.THREE_LEVEL, Layout.YES_NO, Layout.FIVE_POINT):
        for i, (label, _) in enumerate(button_labels(lay, buttons)):
            if label == name:
                return i
    print(f"feedback-sim: unknown button {name!r}: use an index or good, neutral, bad, yes, "
          "no", file=sys.stderr)
    raise SystemExit(2)


def _run(args: argparse.Namespace) -> int:
    from firmware_sim.server import ConsoleServer  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="sim: %(message)s")
    server = ConsoleServer(args.socket, args.serial, buttons=args.buttons,
                           layout=_LAYOUTS[args.layout])
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    print(f"console {args.serial} ({args.layout}, {args.buttons} buttons) on {args.socket}",
          flush=True)
    server.serve_forever()
    return 0


def _press(args: argparse.Namespace) -> int:
    from firmware_sim.server import control  # noqa: PLC0415

    button = _button_index(args.button)
    for i in range(args.count):
        reply = control(args.socket, b"P", json.dumps({"button": button,
                                                       "hold_ms": args.hold_ms}).encode())
        if not reply.get("ok"):
            # The console refused (a button it does not have): a usage error.
            print(f"feedback-sim: console on {args.socket} refused the press: "
                  f"{reply.get('error')}", file=sys.stderr)
            return 2
        if i + 1 < args.count:
            time.sleep(args.interval_ms / 1000)
    return 0


def _control(args: argparse.Namespace) -> int:
    from firmware_sim.server import control  # noqa: PLC0415

    reply = control(args.socket, b"X", args.action.encode())
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


def _terminal_run(args: argparse.Namespace) -> int:
    from firmware_sim.terminal_server import TerminalServer, scripted_day  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="sim terminal: %(message)s")
    script = None
    if args.script is not None:
        script = json.loads(args.script.read_text())
    elif args.day:
        script = scripted_day(args.spacing_ms)
    server = TerminalServer(args.link, args.flash, args.serial, args.control, script,
                            rs232=args.rs232)
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    signal.signal(signal.SIGINT, lambda *_: server.stop())
    print(f"terminal {args.serial} on {server.slave_name} (link {args.link})", flush=True)
    server.serve_forever()
    return 0


def _terminal_control(args: argparse.Namespace) -> int:
    from firmware_sim.server import control  # noqa: PLC0415

    if args.action == "answer":
        record = {"kind": "answer", "doctor": args.doctor, "q1": args.q1, "q2": args.q2,
                  "phone": args.phone, "comment": args.comment, "lang": args.lang}
        reply = control(args.control, b"A", json.dumps(record).encode())
    else:
        reply = control(args.control, b"X", b"state")
    print(json.dumps(reply, indent=2))
    return 0 if reply.get("ok") else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="feedback-sim", description="simulated feedback devices")
    sub = p.add_subparsers(dest="device", required=True)
    console = sub.add_parser("console", help="an FC-3 desk console").add_subparsers(
        dest="action", required=True)
    run = console.add_parser("run", help="run a console until stopped")
    run.add_argument("--socket", type=Path, required=True)
    run.add_argument("--serial", default="00A1B2C3D4E5")
    run.add_argument("--buttons", type=int, default=3)
    run.add_argument("--layout", choices=sorted(_LAYOUTS), default="three-level")
    run.set_defaults(func=_run)
    press = console.add_parser("press", help="press a button of a running console")
    press.add_argument("button", help="good, neutral, bad, yes, no, or a button index")
    press.add_argument("--socket", type=Path, required=True)
    press.add_argument("--hold-ms", type=int, default=120)
    press.add_argument("--count", type=int, default=1)
    press.add_argument("--interval-ms", type=int, default=300)
    press.set_defaults(func=_press)
    for action in ("power-cycle", "unplug", "plug", "state"):
        c = console.add_parser(action, help=f"{action} a running console")
        c.add_argument("--socket", type=Path, required=True)
        c.set_defaults(func=_control)
    terminal = sub.add_parser("terminal", help="an ST-3000 survey terminal on a pty")\
        .add_subparsers(dest="action", required=True)
    trun = terminal.add_parser("run", help="run a terminal; prints its pty path")
    trun.add_argument("--link", type=Path, required=True,
                      help="a stable symlink to the pty, to put in the daemon's config")
    trun.add_argument("--flash", type=Path, required=True, help="the terminal's flash file")
    trun.add_argument("--serial", default="00C0FFEE0001")
    trun.add_argument("--control", type=Path)
    trun.add_argument("--script", type=Path, help="JSON list of records with after_ms")
    trun.add_argument("--day", action="store_true", help="play a built-in scripted day")
    trun.add_argument("--spacing-ms", type=int, default=2000)
    trun.add_argument("--rs232", action="store_true",
                      help="an older RS-232 unit: it cannot see the host open the port, "
                           "so it sends HELLO only at power-up and when asked (WHO)")
    trun.set_defaults(func=_terminal_run)
    answer = terminal.add_parser("answer", help="a patient answers on a running terminal")
    answer.add_argument("--control", type=Path, required=True)
    answer.add_argument("--doctor", required=True)
    answer.add_argument("--q1", choices=["yes", "no", "unsure"], required=True)
    answer.add_argument("--q2", choices=["yes", "no"])
    answer.add_argument("--phone")
    answer.add_argument("--comment")
    answer.add_argument("--lang", default="en")
    answer.set_defaults(func=_terminal_control)
    tstate = terminal.add_parser("state", help="what a running terminal holds")
    tstate.add_argument("--control", type=Path, required=True)
    tstate.set_defaults(func=_terminal_control)
    sub.add_parser("usb", add_help=False, help="a device as a real USB gadget (root; see "
                   "python3 -m firmware_sim.usb --help)")
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["usb"]:
        from firmware_sim.usb.cli import main as usb_main  # noqa: PLC0415

        return usb_main(argv[1:])
    args = p.parse_args(argv)
    try:
        result: int = args.func(args)
    except OSError as e:
        where = getattr(args, "socket", None) or getattr(args, "control", None)
        print(f"feedback-sim: no device answering on {where}: {e}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
