"""`feedback-sim`: simulated devices for demos and black-box tests.

    feedback-sim console run --socket /tmp/fc3.sock [--serial 00A1B2C3D4E5]
    feedback-sim console press good --socket /tmp/fc3.sock [--count 5 --interval-ms 500]
    feedback-sim console power-cycle --socket /tmp/fc3.sock
    feedback-sim console state --socket /tmp/fc3.sock
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
    raise SystemExit(f"feedback-sim: unknown button {name!r}: use an index or good, neutral, "
                     "bad, yes, no")


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
        control(args.socket, b"P", json.dumps({"button": button,
                                               "hold_ms": args.hold_ms}).encode())
        if i + 1 < args.count:
            time.sleep(args.interval_ms / 1000)
    return 0


def _control(args: argparse.Namespace) -> int:
    from firmware_sim.server import control  # noqa: PLC0415

    reply = control(args.socket, b"X", args.action.encode())
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
    args = p.parse_args(argv)
    try:
        result: int = args.func(args)
    except OSError as e:
        print(f"feedback-sim: no console answering on {args.socket}: {e}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
