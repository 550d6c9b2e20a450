"""`feedback-collector`: intake, fleet view, reports and commands to edges.

Exit codes: 0 fine, 1 runtime failure (database, broker, a refused command),
2 a user's mistake (config, arguments), 3 an edge did not answer in time.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any

from collector import __version__, queries, reports, store
from collector.config import CONFIG_ENV, CollectorConfig, load_collector_config
from collector.db import Database, DatabaseError, open_database
from collector.queries import fleet_rows
from edge.contract import topics
from edge.contract.ids import DOCTOR_ID_RE, OPERATOR_RULE, valid_operator
from edge.contract.timefmt import WALL_MAX_MS, WALL_MIN_MS, WALL_RANGE, check_zone
from edge.contract.toml import ConfigError

__all__ = ["broker_acl", "main", "send_command"]

DEFAULT_CONFIG = Path("/etc/feedback-collector/collector.toml")


# Set, the variable the web app's settings read is every command's default too,
# so a shell or unit that exports it runs `feedback-collector web tick` without
# --config.
def default_config() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


EXIT_USAGE = 2
# Patients one doctor served in one imported period: a bound a real count never reaches,
# well inside the database's 64-bit integers (and a double's exact range) when summed.
MAX_VISITS = 10_000_000
EXIT_TIMEOUT = 3


def _zone(text: str) -> str:
    """argparse type for --tz: an IANA zone, else a usage error (exit 2), not a traceback."""
    try:
        return check_zone(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None

def _cfg(args: argparse.Namespace) -> CollectorConfig:
    try:
        return load_collector_config(args.config)
    except ConfigError as e:
        print(f"feedback-collector: config error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _db(cfg: CollectorConfig) -> Database:
    try:
        return open_database(cfg.db_path, cfg.dsn)
    except (DatabaseError, OSError) as e:
        print(f"feedback-collector: database: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _table(header: list[str], rows: list[list[Any]]) -> str:
    # Cells may hold what patients, devices and edges sent: one line each, no
    # control characters (reports.text_cell).
    cells = [header, *[[reports.text_cell(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _emit(args: argparse.Namespace, header: list[str], rows: list[list[Any]]) -> None:
    if args.csv is None:
        print(_table(header, rows) if rows else "(nothing in this period)")
        return
    out = sys.stdout if args.csv == "-" else open(args.csv, "w", newline="",  # noqa: SIM115
                                                   encoding="utf-8")
    try:
        reports.write_csv(out, header, rows)
    finally:
        if out is not sys.stdout:
            out.close()


# -- run ---------------------------------------------------------------------------

def _cmd_run(args: argparse.Namespace) -> int:
    try:
        from collector.intake import Intake  # noqa: PLC0415 - keep reports light
    except ImportError as e:
        print(f"feedback-collector run: {e.name} is not installed; install the collector's "
              "extra: pip install '.[collector]' (or '.[web]', '.[postgres]')", file=sys.stderr)
        return EXIT_USAGE

    cfg = _cfg(args)
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(levelname)s %(name)s: %(message)s")
    intake = Intake(cfg, _db(cfg))
    if cfg.metrics is not None:
        from collector.metrics import serve  # noqa: PLC0415 - only with [metrics]

        serve(cfg, intake)

    def stop(_sig: int, _frame: object) -> None:
        intake.stop_event.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logging.getLogger("collector").info("collector %s: broker %s:%d, %s", cfg.id,
                                        cfg.broker.host, cfg.broker.port,
                                        "PostgreSQL" if cfg.dsn else f"SQLite {cfg.db_path}")
    intake.run()
    return 0


# -- fleet, gaps, quarantine ---------------------------------------------------------------

def _utc(ms: int) -> str:
    if not WALL_MIN_MS <= ms <= WALL_MAX_MS:  # a row from before times had a range
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))


def _cmd_fleet(args: argparse.Namespace) -> int:
    rows = fleet_rows(_db(_cfg(args)), int(time.time() * 1000))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [[r["edge"], r["state"], r["last_seen"],
              "" if r["queue"] is None else r["queue"],
              "" if r["oldest_pending_s"] is None else f"{r['oldest_pending_s']:.0f} s",
              ", ".join(r["devices"]) or "ok",
              {True: "synced", False: "NOT SYNCED", None: ""}[r["clock_synced"]],
              f"{r['watermark']}/{r['max_seq']}",
              ", ".join(f"{d} {n}" for d, n in r["device_lost_24h"].items())] for r in rows]
    print(_table(["edge", "state", "last seen", "queue", "oldest", "devices", "clock",
                  "acked/seq", "lost on devices 24 h"], table) if table
          else "no edge has reported yet")
    return 0


def _cmd_gaps(args: argparse.Namespace) -> int:
    rows, losses = [], []
    for g in store.gaps(_db(_cfg(args))):
        where = f"{g['site']}/{g['edge']}"
        for a, b, reason in g["dropped"]:
            rows.append([where, f"{a}..{b}", b - a + 1, f"dropped at the edge ({reason})"])
        for a, b in g["missing"]:
            rows.append([where, f"{a}..{b}", b - a + 1, "missing (not received)"])
        losses += [[where, d["device"], d["kind"], d["reason"], d["lost"], _utc(d["last_ms"])]
                   for d in g["device_losses"]]
    if not rows and not losses:
        print("no gaps")
        return 0
    print(_table(["edge", "seq", "events", "what"], rows) if rows else "no seq gaps")
    if losses:
        print("\nlost on devices before the edge could store them:")
        print(_table(["edge", "device", "kind", "reason", "events lost", "last (UTC)"],
                     losses))
    return 0


def _cmd_quarantine(args: argparse.Namespace) -> int:
    db = _db(_cfg(args))
    rows = [[i, _utc(ms), t, r] for i, t, r, ms in store.quarantined(db, args.limit)]
    counts = {k: v for k, v in store.counters(db).items() if k.startswith("quarantined:")}
    print(_table(["id", "received (UTC)", "topic", "reason"], rows) if rows
          else "nothing quarantined")
    if counts:
        print("counts: " + ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(
            counts.items())))
    return 0


# -- reports -------------------------------------------------------------------------

def _dates(args: argparse.Namespace) -> tuple[date | None, date | None]:
    try:
        start = date.fromisoformat(args.start) if args.start else None
        end = date.fromisoformat(args.end) if args.end else None
    except ValueError:
        print("feedback-collector: --from/--to take dates like 2026-11-01", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    if (start is None) != (end is None) or (start and end and end < start):
        print("feedback-collector: give --from and --to together, --to not before --from",
              file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    lo, hi = WALL_RANGE
    if start is not None and end is not None and (start < lo or end > hi):
        print(f"feedback-collector: --from and --to must be within {lo}..{hi}, the range of "
              "times the collector stores", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    return start, end


def _events(db: Database, kinds: list[str], start: date | None,
            end: date | None) -> list[dict[str, Any]]:
    """The events a report of `start`..`end` (local days) may count: the database
    filters by UTC time with a day's margin either side (no zone is 24 h off UTC),
    the report by the local day.  The rows whose time is outside the contract's
    range, which every report leaves out, are counted on standard error."""
    rows = queries.report_events(db, kinds, start, end)
    skipped = reports.out_of_range(rows)
    if skipped:
        lo, hi = WALL_RANGE
        print(f"feedback-collector: {skipped} event(s) left out: their time is outside "
              f"{lo}..{hi} (stored before the collector checked the range)", file=sys.stderr)
    return rows


def _cmd_report(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    db = _db(cfg)
    start, end = _dates(args)
    tz = args.tz or cfg.tz
    if args.what == "loyalty":
        rows = reports.loyalty_index(_events(db, ["press"], start, end), by=args.by,
                                     period=args.period, tz=tz, start=start, end=end,
                                     include_burst=args.include_burst)
        _emit(args, [args.by, args.period, "good", "neutral", "bad", "presses", "index"],
              [r.as_list() for r in rows])
    elif args.what == "doctors":
        rows = reports.doctor_index(_events(db, ["answer"], start, end), period=args.period,
                                    tz=tz,
                                    start=start, end=end, visits=queries.visits(db))
        _emit(args, ["doctor", args.period, "yes", "unsure", "no", "base", "index"],
              [r.as_list() for r in rows])
    else:
        rates = reports.answer_rate(_events(db, ["answer", "presence"], start, end),
                                    period=args.period, tz=tz, start=start, end=end)
        _emit(args, ["terminal", args.period, "answers", "approaches", "rate %"],
              [r.as_list() for r in rates])
    return 0


def _cmd_callbacks(args: argparse.Namespace) -> int:
    cfg = _cfg(args)
    db = _db(cfg)
    rows = reports.callback_list(_events(db, ["answer"], None, None),
                                 queries.callbacks_state(db),
                                 now_ms=int(time.time() * 1000),
                                 stale_after_s=cfg.stale_after_s, tz=args.tz or cfg.tz)
    _emit(args, ["time", "doctor", "phone", "comment", "status", "handled by", "handled at",
                 "", "id"], [r.as_list() for r in rows])
    return 0


def _cmd_callback(args: argparse.Namespace) -> int:
    try:
        site, edge, event_id = args.id.split("/")
    except ValueError:
        print("feedback-collector: the id is SITE/EDGE/EVENT_ID as `callbacks` lists it",
              file=sys.stderr)
        return EXIT_USAGE
    if not valid_operator(args.by):
        # `by` lands in reports and CSV exports: the same grammar as an operator id.
        print(f"feedback-collector: --by must be {OPERATOR_RULE}", file=sys.stderr)
        return EXIT_USAGE
    if not queries.set_callback(_db(_cfg(args)), site, edge, event_id, status=args.status,
                                who=args.by, now_ms=int(time.time() * 1000)):
        print(f"feedback-collector: no callback request {args.id}", file=sys.stderr)
        return 1
    print(f"{args.id}: {args.status} by {args.by}")
    return 0


def _cmd_visits(args: argparse.Namespace) -> int:
    rows: list[tuple[str, str, str, int]] = []
    try:
        with open(args.file, newline="", encoding="utf-8") as f:
            for n, rec in enumerate(csv.DictReader(f), start=2):
                try:
                    start, end = date.fromisoformat(rec["from"]), date.fromisoformat(rec["to"])
                    patients = int(rec["patients"])
                    if (not DOCTOR_ID_RE.match(rec["doctor"] or "") or end < start
                            or not 0 <= patients <= MAX_VISITS):
                        raise ValueError
                except (KeyError, ValueError, TypeError):
                    print(f"feedback-collector: {args.file} line {n}: need doctor (a doctor id: "
                          "1 to 64 of A-Z a-z 0-9 _ . -), from, to (dates like 2026-11-01, to "
                          f"not before from) and patients (0 to {MAX_VISITS})", file=sys.stderr)
                    return EXIT_USAGE
                rows.append((rec["doctor"], start.isoformat(), end.isoformat(), patients))
    except OSError as e:
        print(f"feedback-collector: {args.file}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    n = queries.import_visits(_db(_cfg(args)), rows)
    print(f"{n} visit count(s) imported")
    return 0


# -- commands to edges -----------------------------------------------------------------

def send_command(cfg: CollectorConfig, edge: tuple[str, str], name: str,
                 body: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """Publish a contract command and wait for its result (None: no answer in time)."""
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: PLC0415

    from edge.contract.broker import set_credentials  # noqa: PLC0415

    request_id = str(uuid.uuid4())
    topic = topics.cmd_topic(topics.topic_root(*edge), name)
    got: dict[str, Any] = {}
    ready, done = threading.Event(), threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2,
                    client_id=f"{cfg.broker.client_id}-cmd-{request_id[:8]}",
                    protocol=MQTTProtocolVersion.MQTTv5)
    set_credentials(c, cfg.broker)

    def on_connect(cl: mqtt.Client, *_: Any) -> None:
        cl.subscribe(topics.result_topic(topic), qos=1)

    def on_subscribe(*_: Any) -> None:
        ready.set()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            result = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(result, dict) and result.get("request_id") == request_id:
            got.update(result)
            done.set()

    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(cfg.broker.host, cfg.broker.port, cfg.broker.keepalive_s)
    c.loop_start()
    try:
        if not ready.wait(timeout):
            return None
        c.publish(topic, json.dumps({"request_id": request_id, **body}).encode(), qos=1)
        return got if done.wait(timeout) else None
    finally:
        c.disconnect()
        c.loop_stop()


def _edge_arg(text: str) -> tuple[str, str]:
    parts = text.split("/")
    if len(parts) != 2 or not all(parts):
        raise argparse.ArgumentTypeError("an edge is SITE/EDGE, e.g. clinic-3/reception-1")
    return parts[0], parts[1]


def _report_result(what: str, result: dict[str, Any] | None, edge: tuple[str, str]) -> int:
    if result is None:
        print(f"feedback-collector: {edge[0]}/{edge[1]} did not answer (offline?); the "
              "command is not retained and was not applied", file=sys.stderr)
        return EXIT_TIMEOUT
    if not result.get("ok"):
        print(f"feedback-collector: {edge[0]}/{edge[1]} refused: "
              f"{reports.text_cell(result.get('error'))}", file=sys.stderr)
        return 1
    print(f"{edge[0]}/{edge[1]}: {what}")
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    op = None if args.operator in ("-", "none") else args.operator
    result = send_command(_cfg(args), args.edge, "operator",
                          {"desk": args.desk, "operator": op}, args.timeout)
    return _report_result(f"{op or 'nobody'} on duty at {args.desk}", result, args.edge)


def _cmd_doctors(args: argparse.Namespace) -> int:
    try:
        doc = json.loads(Path(args.file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"feedback-collector: {args.file}: not a readable JSON file ({e})", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(doc, dict) or "rev" not in doc or "doctors" not in doc:
        print(f"feedback-collector: {args.file}: expected {{\"rev\": N, \"doctors\": [...]}}",
              file=sys.stderr)
        return EXIT_USAGE
    result = send_command(_cfg(args), args.edge, "doctors",
                          {"rev": doc["rev"], "doctors": doc["doctors"]}, args.timeout)
    return _report_result(f"doctor list rev {doc['rev']} applied", result, args.edge)


def broker_acl(edges: list[tuple[str, str, str]], collector_user: str) -> str:
    """A Mosquitto acl_file: each edge below its own root only (mqtt-contract.md, Security)."""
    lines = ["# Written by `feedback-collector broker-acl`.",
             "# Collectors read everything; they write commands, acks and their state only.",
             f"user {collector_user}", f"topic read {topics.ALL_TOPICS}",
             f"topic write {topics.cmd_topic(topics.ANY_ROOT, '+')}",
             f"topic write {topics.ack_topic(topics.ANY_ROOT)}",
             f"topic readwrite {topics.COLLECTOR_STATE_TOPIC}"]
    for site, edge, user in edges:
        root = topics.topic_root(site, edge)
        lines += ["", f"# edge {site}/{edge}", f"user {user}"]
        lines += [f"topic write {w}" for w in
                  (topics.status_topic(root), topics.event_topic(root, "+"),
                   topics.devices_topic(root), topics.health_topic(root),
                   topics.timesync_topic(root), topics.result_topic(topics.cmd_topic(root, "+")))]
        lines += [f"topic read {topics.cmd_topic(root, '+')}",
                  f"topic read {topics.ack_topic(root)}",
                  f"topic read {topics.COLLECTOR_STATE_TOPIC}"]
    return "\n".join(lines) + "\n"


def _cmd_broker_acl(args: argparse.Namespace) -> int:
    edges = []
    for spec in args.edges:
        where, _, user = spec.partition("=")
        try:
            site, edge = _edge_arg(where)
        except argparse.ArgumentTypeError as e:
            print(f"feedback-collector: {spec}: {e}", file=sys.stderr)
            return EXIT_USAGE
        edges.append((site, edge, user or f"{site}-{edge}"))
    print(broker_acl(edges, args.collector_user), end="")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="feedback-collector", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"feedback-collector {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", type=Path, default=default_config())
        sp.set_defaults(func=func)
        return sp

    run = add("run", _cmd_run, "run the intake")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    add("fleet", _cmd_fleet, "every edge: online, last seen, queue, devices, clock"
        ).add_argument("--json", action="store_true")
    add("gaps", _cmd_gaps, "seq ranges dropped at edges or not received, events lost on "
        "devices")
    add("quarantine", _cmd_quarantine, "payloads kept aside, with the reason"
        ).add_argument("--limit", type=int, default=50)
    rep = add("report", _cmd_report, "indices and rates per period")
    rep.add_argument("what", choices=["loyalty", "doctors", "answer-rate"])
    rep.add_argument("--by", choices=["operator", "desk", "site"], default="operator",
                     help="loyalty only")
    rep.add_argument("--period", choices=reports.PERIODS, default="week")
    rep.add_argument("--from", dest="start", help="first day, e.g. 2026-11-01")
    rep.add_argument("--to", dest="end", help="last day, inclusive")
    rep.add_argument("--tz", type=_zone, help="an IANA zone; default: [reports] tz")
    rep.add_argument("--include-burst", action="store_true")
    rep.add_argument("--csv", metavar="FILE", help="write CSV (- for standard output)")
    cbs = add("callbacks", _cmd_callbacks, "patients to call back, newest first")
    cbs.add_argument("--tz", type=_zone)
    cbs.add_argument("--csv", metavar="FILE")
    cb = add("callback", _cmd_callback, "record how a callback was handled")
    cb.add_argument("id", help="SITE/EDGE/EVENT_ID from `callbacks`")
    cb.add_argument("--status", choices=["new", "called", "resolved"], required=True)
    cb.add_argument("--by", required=True, help="who handled it")
    vis = add("visits", _cmd_visits, "import patients served per doctor and period (CSV: "
              "doctor,from,to,patients)")
    vis.add_argument("file")
    op = add("operator", _cmd_operator, "set who is on duty at an edge's desk")
    op.add_argument("edge", type=_edge_arg, help="SITE/EDGE")
    op.add_argument("desk")
    op.add_argument("operator", help="operator id, or - for nobody")
    op.add_argument("--timeout", type=float, default=10.0)
    doc = add("doctors", _cmd_doctors, "send a doctor list to an edge's terminals")
    doc.add_argument("edge", type=_edge_arg, help="SITE/EDGE")
    doc.add_argument("file", help='JSON: {"rev": N, "doctors": [...]}')
    doc.add_argument("--timeout", type=float, default=10.0)
    acl = sub.add_parser("broker-acl", help="the central Mosquitto's ACL for these edges")
    acl.add_argument("edges", nargs="+", metavar="SITE/EDGE[=USERNAME]",
                     help="each edge; its broker username defaults to SITE-EDGE")
    acl.add_argument("--collector-user", default="collector")
    acl.set_defaults(func=_cmd_broker_acl)
    from collector.web.cli import add_parser as add_web  # noqa: PLC0415 - Django stays unloaded

    add_web(sub, default_config())
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
