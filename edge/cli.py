"""`feedback-edge`: run the daemon, check a config, show status.

Exit codes: 0 fine, 1 runtime failure, 2 a user's mistake (bad config, bad
arguments) -- always with a one-line message, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge import __version__
from edge.config import Config, load_config
from edge.contract.toml import ConfigError

if TYPE_CHECKING:
    from drivers.usb_discovery import UsbDevice

__all__ = ["main"]

DEFAULT_CONFIG = Path("/etc/feedback-edge/edge.toml")
EXIT_USAGE = 2
EXIT_ALARMS = 3  # `status`: running, but something needs a person


def _load(path: Path) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"feedback-edge: config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config_file)
    print(f"{args.config_file}: ok (site {cfg.site}, edge {cfg.edge}, broker "
          f"{cfg.broker.host}:{cfg.broker.port}, {len(cfg.devices)} device(s), store "
          f"{cfg.store.path})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    from edge.logsafe import log_handler  # noqa: PLC0415
    logging.basicConfig(level=getattr(logging, args.log_level), handlers=[log_handler()])
    from edge.commands import ControlRequest  # noqa: PLC0415
    from edge.control import ControlServer  # noqa: PLC0415 - keep `check-config` light
    from edge.daemon import Daemon  # noqa: PLC0415
    from edge.instance import AlreadyRunningError, InstanceLock  # noqa: PLC0415

    lock = InstanceLock(cfg.store.path.parent)
    try:
        lock.acquire()
    except AlreadyRunningError as e:
        print(f"feedback-edge: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        lock_error: str | None = f"the instance lock {lock.path} cannot be taken ({e.strerror})"
    else:
        lock_error = None
    # Faults of the disk do not stop the daemon (it retries and raises alarms).
    daemon = Daemon(cfg)
    if lock_error is not None:
        logging.getLogger("edge.instance").error("%s", lock_error)
        daemon.alarms.raise_("instance_lock", lock_error, daemon.clock.wall_ns())
    control = None
    try:
        control = ControlServer(cfg.control_socket, lambda box, request: daemon.inbox.put(
            ControlRequest(box, request)))
        control.start()
    except OSError as e:
        # Presses matter more than `feedback-edge status`: run on without it, loudly.
        text = f"the control socket {cfg.control_socket} cannot be created ({e.strerror}); " \
            "`feedback-edge status` cannot reach the daemon"
        logging.getLogger("edge.control").error("%s", text)
        daemon.alarms.raise_("control_socket", text, daemon.clock.wall_ns())
    page = None
    if cfg.web.enabled:
        from edge.web import StatusPage  # noqa: PLC0415

        try:
            page = StatusPage(cfg.web.host, cfg.web.port, lambda box, request: daemon.inbox.put(
                ControlRequest(box, request)), cfg.web.token, metrics=cfg.web.metrics)
            page.start()
        except OSError as e:
            # The daemon matters more than its page: run without it, loudly.
            logging.getLogger("edge.web").error("status page on %s:%d unavailable: %s",
                                                cfg.web.host, cfg.web.port, e.strerror)

    def on_signal(signum: int, _frame: object) -> None:
        daemon.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.run()
    finally:
        if control is not None:
            control.stop()
        if page is not None:
            page.stop()
        lock.release()
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _pairs(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))


def _render(st: dict[str, Any]) -> str:
    lines: list[str] = []
    if not st.get("running"):
        lines.append(f"daemon:   NOT RUNNING ({st.get('why', 'no answer')})")
    else:
        lines.append(f"daemon:   running, version {st['version']}, pid {st['pid']}, "
                     f"up {_age(st['uptime_s'])}")
    lines.append(f"site:     {st['site']} / edge {st['edge']}")
    b = st.get("broker")
    if b:
        err = f" ({b['error']})" if b.get("error") else ""
        lines.append(f"broker:   {b['host']}:{b['port']} {b['state'].upper()} since "
                     f"{b['since']}{err}")
    q = st["queue"]
    lines.append(f"queue:    {q['depth']} pending, oldest {_age(q['oldest_pending_age_s'])}, "
                 f"store {q['store_bytes'] / 1e6:.1f} MB, last seq {q['last_seq']}")
    refused = st.get("commands_refused") or {}
    lines.append("drops:    " + (_pairs(st.get("drops") or {}) or "none")
                 + (f"; commands refused {_pairs(refused)}" if refused else ""))
    devices = st.get("devices") or []
    lines.append(f"devices:  {len(devices)}")
    for d in devices:
        extra = f", {d['presses']} presses" if "presses" in d else ""
        errs = d.get("decode_errors") or {}
        if errs:
            extra += f", decode errors {_pairs(errs)}"
        why = f" ({d['error']})" if d.get("error") else ""
        lines.append(f"  {d['id']:<20} {d['kind']:<8} desk {d['desk']:<10} "
                     f"{d['state'].upper()}{why}{extra}")
    clock = st.get("clock")
    if clock:
        lines.append(f"clock:    {'synchronised' if clock['synced'] else 'NOT synchronised'}")
    for alarm in st.get("alarms") or []:
        lines.append(f"ALARM:    {alarm}")
    return "\n".join(lines)


def _offline_status(cfg: Config, why: str) -> dict[str, Any]:
    import time  # noqa: PLC0415

    from edge.store import read_stats  # noqa: PLC0415

    stats = read_stats(cfg.store.path)
    now_ms = time.time_ns() // 1_000_000
    return {
        "running": False, "why": why, "site": cfg.site, "edge": cfg.edge,
        "queue": {
            "depth": stats.depth if stats else 0,
            "oldest_pending_age_s": (now_ms - stats.oldest_created_ms) / 1000
            if stats and stats.oldest_created_ms is not None else None,
            "store_bytes": stats.file_bytes if stats else 0,
            "last_seq": stats.last_seq if stats else 0,
        },
        "drops": stats.drops if stats else {},
        "devices": [{"id": d.id, "kind": d.kind, "desk": d.desk, "serial": d.serial,
                     "state": "unknown"} for d in cfg.devices],
        # Without the daemon nobody judges the store; say at least that it cannot be read.
        "alarms": [] if stats is not None or not cfg.store.path.exists() else
        [f"store_unreadable: {cfg.store.path} cannot be read as an event store"],
    }


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    from edge.control import query  # noqa: PLC0415

    try:
        st = query(cfg.control_socket)
    except (OSError, ValueError) as e:
        st = _offline_status(cfg, f"no answer on {cfg.control_socket}: "
                             f"{getattr(e, 'strerror', None) or e}")
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else _render(st))
    if not st.get("running"):
        return 1
    return EXIT_ALARMS if st.get("alarms") else 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from drivers.usb_discovery import classify, scan  # noqa: PLC0415
    from edge.kinds import MATCHERS  # noqa: PLC0415

    cfg = _load(args.config) if args.config.exists() or args.config != DEFAULT_CONFIG \
        else None
    configured = {d.serial: d for d in cfg.devices if d.serial} if cfg else {}
    found = scan(args.sysfs)
    rows: list[dict[str, Any]] = []
    for dev in found:
        kind = classify(dev, MATCHERS)
        match = configured.get(dev.serial or "")
        rows.append({
            "port_path": dev.port_path, "usb_id": dev.ident, "serial": dev.serial,
            "product": dev.product, "kind": kind,
            "state": "configured" if match else ("unconfigured" if kind else "not ours"),
            "device_id": match.id if match else None, "desk": match.desk if match else None,
            "nodes": [*dev.hidraw, *dev.tty, *dev.event],
        })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no USB devices found (is the hardware plugged in? is this a Pi?)")
        return 0
    for r in rows:
        what = r["kind"] or "-"
        where = f"desk {r['desk']} as {r['device_id']}" if r["device_id"] else r["state"]
        print(f"{r['port_path']:<10} {r['usb_id']}  {what:<9} serial {r['serial'] or '-':<14} "
              f"{where:<28} {' '.join(r['nodes'])}  {r['product'] or ''}")
    todo = [(r, dev) for r, dev in zip(rows, found, strict=True)
            if r["state"] == "unconfigured"]
    if todo:
        print("\nnot in the config yet; add to edge.toml (and set the desk):")
    for r, dev in todo:
        print(f"\n{_snippet(r, dev)}")
    return 0


def _snippet(row: dict[str, Any], usb: UsbDevice) -> str:
    """A [[devices]] block that check-config accepts once the desk is set."""
    from edge.kinds import KINDS  # noqa: PLC0415

    kind = KINDS.get(row["kind"])
    body = kind.snippet(usb) if kind is not None and kind.snippet is not None else \
        [f'kind = "{row["kind"]}"']
    return "\n".join(["[[devices]]", *body, 'desk = "CHANGE-ME"'])


def _cmd_operator(args: argparse.Namespace) -> int:
    import time  # noqa: PLC0415

    from edge.contract.timefmt import check_zone, parse_days, parse_hhmm  # noqa: PLC0415
    from edge.control import query  # noqa: PLC0415
    from edge.operators import Operators, Shift, shift_json  # noqa: PLC0415

    cfg = _load(args.config)
    desks = sorted({*cfg.desks, *(d.desk for d in cfg.devices)})
    if getattr(args, "desk", None) is not None and args.desk not in desks:
        print(f"feedback-edge: desk {args.desk!r} is not in the config; desks: "
              f"{', '.join(desks) or '(none)'}", file=sys.stderr)
        return EXIT_USAGE
    if args.op in ("login", "logout"):
        operator = args.operator if args.op == "login" else None
        request: dict[str, Any] = {"cmd": "operator", "desk": args.desk, "operator": operator}
        if args.op == "logout":
            request = {"cmd": "operator", "desk": args.desk, "logout": True}
        try:
            reply = query(cfg.control_socket, request=request)
        except OSError:
            print("feedback-edge: the daemon is not running; start it first so the login "
                  "counts from now", file=sys.stderr)
            return 1
        if not reply.get("ok"):
            print(f"feedback-edge: {reply.get('error')}", file=sys.stderr)
            return EXIT_USAGE
        print(f"desk {args.desk}: " + (f"{operator} on duty from now" if operator else
                                        "logged out (the roster or config decides again)"))
        if reply.get("warning"):
            print(f"feedback-edge: warning: {reply['warning']}", file=sys.stderr)
        return 0
    ops = Operators(cfg.store.path.parent, {n: d.operator for n, d in cfg.desks.items()},
                    cfg.max_login_s)
    try:
        if args.op == "add":
            try:
                shift = Shift(args.desk, args.operator, parse_days(args.days),
                              parse_hhmm(args.start).strftime("%H:%M"),
                              parse_hhmm(args.end).strftime("%H:%M"), check_zone(args.tz))
            except ValueError as e:
                print(f"feedback-edge: {e}", file=sys.stderr)
                return EXIT_USAGE
            try:
                print(f"shift {ops.add_shift(shift)} added")
            except OSError as e:
                print(f"feedback-edge: cannot write the roster: {e.strerror}", file=sys.stderr)
                return 1
        elif args.op == "remove":
            try:
                removed = ops.remove_shift(args.id)
            except OSError as e:
                print(f"feedback-edge: cannot write the roster: {e.strerror}", file=sys.stderr)
                return 1
            if not removed:
                print(f"feedback-edge: no shift {args.id} (see `operator list`)",
                      file=sys.stderr)
                return EXIT_USAGE
            print(f"shift {args.id} removed")
        elif args.op == "list":
            rows = [shift_json(i, s) for i, s in ops.shifts]
            if args.json:
                print(json.dumps(rows, indent=2))
            for r in [] if args.json else rows:
                print(f"{r['id']:>3}  {r['desk']:<12} {r['operator']:<16} {r['days']:<28} "
                      f"{r['from']}-{r['to']} {r['tz']}")
        elif args.op == "who":
            now = time.time_ns()
            for desk in desks:
                tag = ops.who(desk, now)
                print(f"{desk:<12} {tag.id or '-':<16} ({tag.source})")
    finally:
        ops.close()
    return 0


def _cmd_udev_rules(args: argparse.Namespace) -> int:
    from edge.deploy import udev_rules  # noqa: PLC0415

    print(udev_rules(_load(args.config)), end="")
    return 0


def _cmd_provision(args: argparse.Namespace) -> int:
    from edge.provision import Options, ProvisionError, provision  # noqa: PLC0415

    opts = Options(args.bootfs, args.config, args.wifi, args.wifi_psk_file, args.wifi_country,
                   args.ssh_key, args.admin_user, args.hostname, args.os, args.wheelhouse)
    try:
        for line in provision(opts):
            print(line)
    except ProvisionError as e:
        print(f"feedback-edge provision: {e}", file=sys.stderr)
        return EXIT_USAGE
    print("Done: unmount the card, put it in the Pi, plug in the devices and power it up.")
    return 0


def _cmd_wheelhouse(args: argparse.Namespace) -> int:
    from edge.provision import ProvisionError, build_wheelhouse  # noqa: PLC0415

    try:
        build_wheelhouse(args.dir)
    except ProvisionError as e:
        print(f"feedback-edge wheelhouse: {e}", file=sys.stderr)
        return 1
    print(f"{args.dir}: {len(list(args.dir.glob('*.whl')))} wheels, checked offline for "
          "aarch64 and armv7 with Python 3.11 and 3.13")
    return 0


def _refuse_secret_flags(argv: list[str]) -> None:
    from edge.provision import SECRET_FLAGS  # noqa: PLC0415

    for arg in argv:
        if arg.split("=", 1)[0] in SECRET_FLAGS:
            print(f"feedback-edge provision: {arg.split('=', 1)[0]}: secrets are not taken on "
                  "the command line (they stay in shell history and show in ps); put the "
                  "Wi-Fi passphrase in a file and give --wifi-psk-file FILE", file=sys.stderr)
            raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="feedback-edge", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"feedback-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    run.add_argument("--log-level", default="INFO",
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config_file", type=Path)
    check.set_defaults(func=_cmd_check)
    status = sub.add_parser("status", help="queue, broker, devices and drops of the daemon")
    status.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)
    operator = sub.add_parser("operator", help="who is on duty: shifts, logins")
    ops = operator.add_subparsers(dest="op", required=True)
    add = ops.add_parser("add", help="add a recurring shift to the roster")
    add.add_argument("--desk", required=True)
    add.add_argument("--operator", required=True)
    add.add_argument("--days", required=True, help="e.g. mon-fri, sat,sun")
    add.add_argument("--from", dest="start", required=True, help="local time, e.g. 08:00")
    add.add_argument("--to", dest="end", required=True, help="local time, e.g. 16:00")
    add.add_argument("--tz", required=True, help="IANA zone, e.g. Europe/Berlin")
    rm = ops.add_parser("remove", help="remove a shift by its id")
    rm.add_argument("id", type=int)
    ls = ops.add_parser("list", help="the roster")
    ls.add_argument("--json", action="store_true")
    login = ops.add_parser("login", help="someone is on duty at a desk from now")
    login.add_argument("--desk", required=True)
    login.add_argument("--operator", required=True)
    logout = ops.add_parser("logout", help="nobody is on duty at a desk from now")
    logout.add_argument("--desk", required=True)
    ops.add_parser("who", help="who is on duty at each desk now")
    for p_ in (add, rm, ls, login, logout, ops.choices["who"]):
        p_.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    operator.set_defaults(func=_cmd_operator)
    rules = sub.add_parser("udev-rules", help="udev rules for the config's keyboard-class "
                           "devices")
    rules.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    rules.set_defaults(func=_cmd_udev_rules)
    devices = sub.add_parser("devices", help="list the USB devices attached now")
    devices.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    devices.add_argument("--json", action="store_true")
    devices.add_argument("--sysfs", type=Path, default=Path("/sys"), help=argparse.SUPPRESS)
    devices.set_defaults(func=_cmd_devices)
    prov = sub.add_parser("provision", help="prepare a freshly flashed Raspberry Pi OS card")
    prov.add_argument("bootfs", type=Path, help="mount point of the card's boot partition")
    prov.add_argument("--config", type=Path, required=True,
                      help="the site's edge.toml; files it names sit next to it")
    prov.add_argument("--wifi", metavar="SSID")
    prov.add_argument("--wifi-psk-file", type=Path, metavar="FILE")
    prov.add_argument("--wifi-country", metavar="CC", help="two-letter country code, e.g. DE")
    prov.add_argument("--ssh-key", type=Path, metavar="FILE", help="an OpenSSH public key")
    prov.add_argument("--admin-user", default="admin", help="the SSH login (default admin)")
    prov.add_argument("--hostname", help="default: SITE-EDGE from the config")
    prov.add_argument("--os", choices=["auto", "bookworm", "trixie"], default="auto")
    prov.add_argument("--wheelhouse", type=Path, metavar="DIR",
                      help="a wheelhouse made by `feedback-edge wheelhouse` (default: build one)")
    prov.set_defaults(func=_cmd_provision)
    wheel = sub.add_parser("wheelhouse", help="build the offline wheelhouse for the Pis once")
    wheel.add_argument("dir", type=Path)
    wheel.set_defaults(func=_cmd_wheelhouse)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["provision"]:
        _refuse_secret_flags(argv)
    args = _parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
