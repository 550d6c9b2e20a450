"""`feedback-collector web ...`: the web app's commands.

    feedback-collector web migrate  --config collector.toml   # create/upgrade its tables
    feedback-collector web adduser NAME --role quality_manager [--email E] [--language ru]
                                                           # password read from stdin
    feedback-collector web serve    [--bind 127.0.0.1:8000]   # app + a tick every minute
    feedback-collector web tick     [--now 2026-12-01T10:00:00+00:00]
                                    # time-limit warnings and erasure once (for a timer),
                                    # and the dashboards' press counts brought up to date
    feedback-collector web token create NAME [--personal-data] [--rate 10] [--burst 20]
                                    # a read-API token (printed once); token revoke NAME,
                                    # token list
    feedback-collector web names import FILE   # the clinic's names: CSV kind,key,name
                                    # (UTF-8), or a doctor list's JSON (.json)
    feedback-collector web names export        # the names as that CSV, on standard output

`serve` is a small threaded WSGI server for one clinic or a demo; behind a
reverse proxy with several instances, run `gunicorn collector.web.wsgi` (README,
"The quality manager's web app").
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
import threading
from datetime import datetime
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger("collector.web")

ROLES = ("quality_manager", "callback_officer", "clinic_manager", "administrator")


def _setup(config: Path) -> None:
    """Django configured from `config`; a config mistake or a missing `web` extra
    ends the command with one line saying what to do (exit 2), as the collector's
    other commands do."""
    from collector.config import CONFIG_ENV, load_collector_config  # noqa: PLC0415
    from edge.contract.toml import ConfigError  # noqa: PLC0415

    try:
        load_collector_config(config)
    except ConfigError as e:
        print(f"feedback-collector: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    os.environ[CONFIG_ENV] = str(config.resolve())
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "collector.web.settings")
    try:
        import django  # noqa: PLC0415 - the collector's other commands never load Django
    except ImportError:
        print("feedback-collector web: Django is not installed; install the web app's "
              "extra: pip install 'feedback-edge[web]' (or '.[web,postgres]' from a checkout)",
              file=sys.stderr)
        raise SystemExit(2) from None
    django.setup()


def _instant(text: str) -> datetime:
    """--now: an aware time (a naive one would be taken for UTC or local time at
    random, step by step)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time like 2026-12-01T10:00:00+01:00") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset: add Z or +01:00")
    return when


def tick(now: datetime) -> dict[str, int]:
    """Open new cases, send time-limit warnings, erase expired personal data,
    bring the dashboards' press counts up to date (days computed), so a page
    load rarely has more than a minute's presses to count.  Each step runs even
    when another failed (its figure is then -1; the failure is logged)."""
    from django.conf import settings  # noqa: PLC0415

    from collector import rollup  # noqa: PLC0415
    from collector.web import cases, dashboards  # noqa: PLC0415
    from collector.web.alerts import engine as alerts  # noqa: PLC0415

    def press_counts(_now: datetime) -> int:
        return dashboards.read(lambda db: rollup.refresh(db, settings.CONFIG.tz))

    return cases.run_tick(now, ("cases opened", cases.sync_cases),
                          ("warnings sent", cases.check_limits),
                          ("cases erased", cases.erase_personal_data),
                          ("days of press counts computed", press_counts),
                          ("alert messages sent", alerts.run))


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # A thread per request: its database connection goes with it, or each
        # request would leave one open (PostgreSQL runs out of connections).
        from django.db import connections  # noqa: PLC0415

        try:
            super().process_request_thread(request, client_address)
        finally:
            connections.close_all()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        # Request lines carry paths and status codes only (no query values, no bodies).
        log.info("%s %s", self.address_string(), self.requestline.split(" ")[1].split("?")[0])


def cmd_web(args: argparse.Namespace) -> int:
    _setup(args.config)
    from axes.utils import reset as axes_reset  # noqa: PLC0415
    from django.core.management import call_command  # noqa: PLC0415
    from django.utils import timezone  # noqa: PLC0415

    if args.web_command == "migrate":
        from collector.config import load_collector_config  # noqa: PLC0415
        from collector.db import open_database  # noqa: PLC0415

        # The intake's tables first: the app reads `events` from its first page on.
        cfg = load_collector_config(args.config)
        open_database(cfg.db_path, cfg.dsn).close()
        call_command("migrate", interactive=False, verbosity=1)
        return 0
    if args.web_command == "adduser":
        from collector.web.models import User  # noqa: PLC0415

        password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else \
            getpass.getpass("password: ")
        if not password:
            print("feedback-collector web adduser: no password on standard input (give it on "
                  "the first line)", file=sys.stderr)
            return 2
        if len(password) < 10:
            print("feedback-collector web adduser: the password needs 10 characters or more",
                  file=sys.stderr)
            return 2
        if args.email:
            from django.core.exceptions import ValidationError  # noqa: PLC0415

            from collector.web.views import plain_email  # noqa: PLC0415

            try:
                plain_email(args.email)
            except ValidationError:
                print("feedback-collector web adduser: --email must be a plain address like "
                      "name@example.org", file=sys.stderr)
                return 2
        user, made = User.objects.get_or_create(username=args.name)
        # An existing user keeps what this command was not given.
        user.role = args.role
        if args.email is not None:
            user.email = args.email
        if args.language is not None:
            user.language = args.language
        user.set_password(password)
        user.save()
        # A new password also lifts a lockout after wrong passwords.
        axes_reset(username=args.name)
        print(f"{args.name}: {args.role} ({'created' if made else 'updated'})")
        return 0
    if args.web_command == "unlock":
        # The library's function: its management command prints "No attempts found."
        axes_reset(username=args.name)
        print(f"{args.name}: failed logins forgotten; they may log in again")
        return 0
    if args.web_command == "token":
        return _token(args)
    if args.web_command == "names":
        return _names(args)
    if args.web_command == "alert-rule":
        from collector.web.alerts import cli as alerts_cli  # noqa: PLC0415

        return alerts_cli.cmd(args)
    if args.web_command == "tick":
        now = args.now or timezone.now()
        done = tick(now)
        print(", ".join(f"{name} {n if n >= 0 else 'FAILED (see the log)'}"
                        for name, n in done.items()))
        return 1 if any(n < 0 for n in done.values()) else 0
    return _serve(args)


def _token(args: argparse.Namespace) -> int:
    """The read API's tokens (collector/web/api/tokens.py), audited as "(command
    line)".  A new token is printed once, on standard output only."""
    from django.utils import timezone  # noqa: PLC0415

    from collector.web.api import tokens  # noqa: PLC0415
    from collector.web.api.models import ApiToken  # noqa: PLC0415

    if args.action == "create":
        try:
            _made, text = tokens.create(args.name, personal_data=args.personal_data, user=None,
                                        now=timezone.now(), rate_per_s=args.rate,
                                        burst=args.burst)
        except tokens.TokenError as e:
            print(f"feedback-collector web token: {e}", file=sys.stderr)
            return 2
        print(text)
        return 0
    if args.action == "revoke":
        live = ApiToken.objects.filter(name=args.name, revoked_at__isnull=True).first()
        if live is None or not tokens.revoke(live, user=None, now=timezone.now()):
            print(f"feedback-collector web token: no live token is named {args.name}",
                  file=sys.stderr)
            return 1
        print(f"{args.name}: revoked")
        return 0
    listed = ApiToken.objects.order_by("name", "-created_at")
    if not listed:
        print("no tokens: `feedback-collector web token create NAME` makes one")
    for t in listed:
        state = f"revoked {t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "live"
        used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never"
        print(f"{t.name}\t{t.prefix}\tpersonal data: {'yes' if t.personal_data else 'no'}\t"
              f"{t.rate_per_s:g}/s burst {t.burst}\tlast used: {used}\t{state}")
    return 0


def _names(args: argparse.Namespace) -> int:
    """The clinic's names for sites, desks, receptionists and doctors
    (collector/web/names.py); every change audited as "(system)"."""
    from collector.web import names  # noqa: PLC0415

    if args.action == "export":
        # UTF-8 whatever the locale: the names are the clinic's own spelling.
        sys.stdout.buffer.write(names.export_csv().encode())
        sys.stdout.flush()
        return 0
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark.
        text = Path(args.file).read_text(encoding="utf-8-sig")
        rows = names.parse_doctors(text) if args.file.suffix.lower() == ".json" else \
            names.parse_csv(text)
    except (OSError, UnicodeDecodeError, names.NameRefusedError) as e:
        print(f"feedback-collector web names: {args.file}: {e}", file=sys.stderr)
        return 2
    changed = names.import_names(rows, None)
    print(f"{len(rows)} names read, {changed} changed")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from django.contrib.staticfiles.handlers import StaticFilesHandler  # noqa: PLC0415
    from django.core.wsgi import get_wsgi_application  # noqa: PLC0415
    from django.utils import timezone  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    host, _, port = args.bind.rpartition(":")
    app = StaticFilesHandler(get_wsgi_application())
    server = make_server(host or "127.0.0.1", int(port), app, server_class=_Server,
                         handler_class=_Quiet)
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(args.tick_s):
            tick(timezone.now())  # each step logs its own failure (by type: no values)

    threading.Thread(target=ticker, name="tick", daemon=True).start()
    print(f"feedback-collector web: http://{host or '127.0.0.1'}:{server.server_port}/",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser],
               default_config: Path) -> None:
    web = sub.add_parser("web", help="the quality manager's web app")
    web.add_argument("--config", type=Path, default=default_config)
    web.set_defaults(func=cmd_web)
    wsub = web.add_subparsers(dest="web_command", required=True)
    # --config before or after the subcommand, as in the collector's other commands.
    again = argparse.ArgumentParser(add_help=False)
    again.add_argument("--config", type=Path, default=argparse.SUPPRESS)
    wsub.add_parser("migrate", parents=[again], help="create or upgrade the app's tables")
    add = wsub.add_parser("adduser", parents=[again],
                          help="create a user or set a user's role and password "
                          "(password from standard input)")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument("--email")
    add.add_argument("--language", choices=["", "en", "ru"],
                     help="empty: as the browser (kept when not given)")
    unlock = wsub.add_parser("unlock", parents=[again],
                             help="lift a lockout after wrong passwords")
    unlock.add_argument("name")
    serve = wsub.add_parser("serve", parents=[again], help="serve the app (one process, threads)")
    serve.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT (port 0: any free)")
    serve.add_argument("--tick-s", type=float, default=60.0,
                       help="seconds between ticks (cases, warnings, erasure, counts, "
                       "alerts), default 60")
    from collector.web.alerts import cli as alerts_cli  # noqa: PLC0415 - Django-free at import

    alerts_cli.add_parser(wsub, again)
    tk = wsub.add_parser("tick", parents=[again],
                         help="once: open callback cases, time-limit warnings, erasure, "
                         "the dashboards' press counts, alerts (evaluated and delivered); "
                         "prints how many each step did")
    tk.add_argument("--now", type=_instant, metavar="TIME",
                    help="act as of this time (ISO 8601 with its offset, e.g. "
                    "2026-12-01T10:00:00+01:00); for tests only, never against a "
                    "database a running `serve` or timer ticks on the real clock")
    tok = wsub.add_parser("token", parents=[again], help="read-API tokens: create, revoke, list")
    toks = tok.add_subparsers(dest="action", required=True)
    mk = toks.add_parser("create", parents=[again], help="a new token, printed once")
    mk.add_argument("name")
    mk.add_argument("--personal-data", action="store_true",
                    help="may read phone numbers and comments (each read audited)")
    mk.add_argument("--rate", type=float, help="requests per second (default 10)")
    mk.add_argument("--burst", type=int, help="requests at once (default 20)")
    toks.add_parser("revoke", parents=[again], help="revoke the live token NAME"
                    ).add_argument("name")
    toks.add_parser("list", parents=[again], help="every token (never a secret)")
    nm = wsub.add_parser("names", parents=[again],
                         help="the clinic's names for sites, desks, receptionists, doctors")
    nms = nm.add_subparsers(dest="action", required=True)
    nms.add_parser("import", parents=[again], help="set names from a CSV kind,key,name "
                   "(an empty name clears) or a doctor list (.json)"
                   ).add_argument("file", type=Path)
    nms.add_parser("export", parents=[again], help="every name as CSV kind,key,name")
