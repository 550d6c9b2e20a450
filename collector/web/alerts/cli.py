"""`feedback-collector web alert-rule add|list|disable|enable`.

    feedback-collector web alert-rule add --name "Desk 1 unhappy" --kind negative \
        --site clinic-3 --desk desk-1 --threshold 5 --window-min 30 \
        --email quality@clinic.example --webhook-url https://hooks.example/feedback \
        --webhook-secret-file /etc/feedback-collector/hook.secret --quiet 22:00-07:00
    feedback-collector web alert-rule add --name "Console dead?" --kind silence \
        --open 08:00-18:00 --days 12345 --duration-min 30 --email quality@clinic.example
    feedback-collector web alert-rule list
    feedback-collector web alert-rule disable 3

The webhook's secret is read from a file (or standard input with `-`), never
from the command line, where every user of the host could read it.
"""

from __future__ import annotations

import argparse
import sys
from datetime import time
from pathlib import Path

# The kinds and groupings as in models.Kind and models.Per (this module is
# imported to build the parser, before Django is set up; the model's
# full_clean checks them again).
KINDS = ("negative", "offline", "health", "silence", "callback", "loyalty", "doctor")
PERS = ("desk", "site")


def _time(text: str) -> time:
    return time.fromisoformat(text)


def _span(text: str) -> tuple[time, time]:
    start, _, end = text.partition("-")
    return _time(start), _time(end)


def add_parser(wsub: argparse._SubParsersAction[argparse.ArgumentParser],
               again: argparse.ArgumentParser) -> None:
    ar = wsub.add_parser("alert-rule", parents=[again], help="alert rules: add, list, disable")
    asub = ar.add_subparsers(dest="alert_command", required=True)
    add = asub.add_parser("add", parents=[again], help="add a rule")
    add.add_argument("--name", required=True)
    add.add_argument("--kind", required=True, choices=KINDS)
    add.add_argument("--site", default="")
    add.add_argument("--desk", default="")
    add.add_argument("--edge", default="")
    add.add_argument("--per", choices=PERS, default="desk")
    add.add_argument("--threshold", type=int, default=5)
    add.add_argument("--window-min", type=int, default=60)
    add.add_argument("--share-pct", type=int)
    add.add_argument("--min-count", type=int, default=10)
    add.add_argument("--duration-min", type=int, default=15)
    add.add_argument("--code", default="")
    add.add_argument("--open", type=_span, help="opening hours, HH:MM-HH:MM (silence)")
    add.add_argument("--days", default="1234567",
                     help="days open, ISO weekdays: 12345 is Monday to Friday (silence)")
    add.add_argument("--quiet", type=_span, help="quiet hours, HH:MM-HH:MM (local)")
    add.add_argument("--email", action="append", default=[])
    add.add_argument("--language", choices=["en", "ru"], default="en")
    add.add_argument("--webhook-url", default="")
    add.add_argument("--webhook-secret-file", help="a file holding the secret, or - (stdin)")
    add.add_argument("--disabled", action="store_true")
    asub.add_parser("list", parents=[again], help="every rule")
    for name in ("disable", "enable"):
        p = asub.add_parser(name, parents=[again], help=f"{name} a rule")
        p.add_argument("id", type=int)


def cmd(args: argparse.Namespace) -> int:
    from django.core.exceptions import ValidationError  # noqa: PLC0415 - after django.setup

    from collector.web.alerts.models import Rule  # noqa: PLC0415

    if args.alert_command == "list":
        for r in Rule.objects.all():
            where = f"{r.site or '*'}/{r.edge or '*'}/{r.desk or '*'}"
            chans = [f"{len(r.recipients())} e-mail"] + (["webhook"] if r.webhook_url else [])
            print(f"{r.pk}\t{r.kind}\t{'enabled' if r.enabled else 'disabled'}\t{where}\t"
                  f"{', '.join(chans)}\t{r.name}")
        return 0
    if args.alert_command in ("disable", "enable"):
        if not Rule.objects.filter(pk=args.id).update(enabled=args.alert_command == "enable"):
            print(f"feedback-collector web alert-rule: no rule {args.id}", file=sys.stderr)
            return 2
        print(f"{args.id}: {args.alert_command}d")
        return 0
    secret = ""
    if args.webhook_secret_file:
        secret = (sys.stdin.readline() if args.webhook_secret_file == "-" else  # noqa: S105 - "-" is stdin
                  Path(args.webhook_secret_file).read_text(encoding="utf-8")).strip()
    rule = Rule(name=args.name, kind=args.kind, enabled=not args.disabled, site=args.site,
                desk=args.desk, edge=args.edge, per=args.per, threshold=args.threshold,
                window_min=args.window_min, share_pct=args.share_pct,
                min_count=args.min_count, duration_min=args.duration_min, code=args.code,
                open_from=args.open[0] if args.open else None,
                open_to=args.open[1] if args.open else None, open_days=args.days,
                quiet_start=args.quiet[0] if args.quiet else None,
                quiet_end=args.quiet[1] if args.quiet else None,
                emails="\n".join(args.email), language=args.language,
                webhook_url=args.webhook_url, webhook_secret=secret)
    try:
        rule.full_clean()
    except ValidationError as e:
        for field, errs in e.message_dict.items():
            print(f"feedback-collector web alert-rule: {field}: {'; '.join(errs)}",
                  file=sys.stderr)
        return 2
    rule.save()
    print(rule.pk)
    return 0
