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
    try:
        return _time(start), _time(end)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a span of local times like 08:00-18:00") from None


# Options read by some kinds only (models.KIND_FIELDS): None when not given, so
# that one given to a kind that does not read it is said, not silently kept.
_KIND_OPTIONS = {"per": "per", "threshold": "threshold", "window_min": "window-min",
                 "share_pct": "share-pct", "min_count": "min-count",
                 "duration_min": "duration-min", "code": "code", "open": "open",
                 "open_days": "days", "desk": "desk"}


# The model's fields as `add`'s options, for its error messages.
_OPTION_OF = {"name": "--name", "kind": "--kind", "site": "--site", "edge": "--edge",
              "desk": "--desk", "per": "--per", "threshold": "--threshold",
              "window_min": "--window-min", "share_pct": "--share-pct",
              "min_count": "--min-count", "duration_min": "--duration-min", "code": "--code",
              "open_from": "--open", "open_to": "--open", "open_days": "--days",
              "emails": "--email", "language": "--language", "webhook_url": "--webhook-url",
              "webhook_secret": "--webhook-secret-file", "quiet_start": "--quiet",
              "quiet_end": "--quiet"}


def add_parser(wsub: argparse._SubParsersAction[argparse.ArgumentParser],
               again: argparse.ArgumentParser) -> None:
    ar = wsub.add_parser("alert-rule", parents=[again],
                         help="alert rules: add, list, disable, enable")
    asub = ar.add_subparsers(dest="alert_command", required=True)
    add = asub.add_parser("add", parents=[again], help="add a rule; prints its id",
                          description="Which options each kind reads: negative: per, "
                          "threshold, window-min, share-pct; loyalty: per, threshold, "
                          "window-min, min-count, duration-min; doctor: threshold, "
                          "window-min, min-count, duration-min; silence: open, days, "
                          "duration-min; offline: duration-min; health: code, "
                          "duration-min; callback: none ([web.limits]).  Scope: site "
                          "and edge for every kind, desk for negative, loyalty, silence "
                          "and doctor.")
    add.add_argument("--name", required=True)
    add.add_argument("--kind", required=True, choices=KINDS)
    add.add_argument("--site", default="", help="only this site (default: every site)")
    add.add_argument("--edge", default="", help="only this edge")
    add.add_argument("--desk", help="only this desk")
    add.add_argument("--per", choices=PERS, help="count per desk or per site (default desk)")
    add.add_argument("--threshold", type=int,
                     help="negative: bad presses (with --share-pct: the fewest presses "
                     "counted), default 5; loyalty, doctor: the index it must stay at or "
                     "above, -99 to 100")
    add.add_argument("--window-min", type=int,
                     help="minutes of presses or answers counted, default 60")
    add.add_argument("--share-pct", type=int, help="negative: this share of bad, 1-100")
    add.add_argument("--min-count", type=int,
                     help="loyalty, doctor: the fewest presses or answers for an index, "
                     "default 10")
    add.add_argument("--duration-min", type=int,
                     help="minutes the condition must hold before it is an alert, "
                     "default 15")
    add.add_argument("--code", help="health: an alarm code of README's Alarms table "
                     "(device_missing, disk_full, broker_unreachable ...); default any")
    add.add_argument("--open", type=_span, metavar="HH:MM-HH:MM",
                     help="silence: opening hours, local time")
    add.add_argument("--days", help="silence: days open, ISO weekdays (12345 is Monday to "
                     "Friday), default every day")
    add.add_argument("--quiet", type=_span, metavar="HH:MM-HH:MM",
                     help="quiet hours, local time: messages wait until they end")
    add.add_argument("--email", action="append", default=[], help="a recipient (repeat)")
    add.add_argument("--language", choices=["en", "ru"], default="en",
                     help="of e-mails to addresses without an account")
    add.add_argument("--webhook-url", default="",
                     help="POST each alert here, signed (README: public addresses, or "
                     "[web] webhook_allow)")
    add.add_argument("--webhook-secret-file", help="a file holding the secret, or - (stdin)")
    add.add_argument("--disabled", action="store_true")
    asub.add_parser("list", parents=[again], help="every rule, with what it watches")
    for name in ("disable", "enable"):
        p = asub.add_parser(name, parents=[again], help=f"{name} a rule")
        p.add_argument("id", type=int)


def cmd(args: argparse.Namespace) -> int:
    from django.conf import settings  # noqa: PLC0415 - after django.setup
    from django.core.exceptions import ValidationError  # noqa: PLC0415
    from django.utils import timezone  # noqa: PLC0415

    from collector.web.alerts.models import KIND_FIELDS, Rule  # noqa: PLC0415
    from collector.web.cases import audit  # noqa: PLC0415

    if args.alert_command == "list":
        print("id\tkind\tstate\tsite/edge/desk\tchannels\tname\twatches")
        for r in Rule.objects.order_by("pk"):
            where = f"{r.site or '*'}/{r.edge or '*'}/{r.desk or '*'}"
            n = len(r.recipients())
            chans = ([f"{n} e-mail{'s' if n > 1 else ''}"] if n else []) + \
                (["webhook"] if r.webhook_url else [])
            print(f"{r.pk}\t{r.kind}\t{'enabled' if r.enabled else 'disabled'}\t{where}\t"
                  f"{', '.join(chans)}\t{r.name}\t{r.describe()}")
        return 0
    if args.alert_command in ("disable", "enable"):
        if not Rule.objects.filter(pk=args.id).update(enabled=args.alert_command == "enable"):
            print(f"feedback-collector web alert-rule: no rule {args.id}", file=sys.stderr)
            return 2
        audit(None, f"alert_rule_{args.alert_command}d", None, f"rule {args.id}",
              now=timezone.now())
        print(f"{args.id}: {args.alert_command}d")
        return 0
    secret = ""
    if args.webhook_secret_file:
        secret = (sys.stdin.readline() if args.webhook_secret_file == "-" else  # noqa: S105 - "-" is stdin
                  Path(args.webhook_secret_file).read_text(encoding="utf-8")).strip()
    given = {"per": args.per, "threshold": args.threshold, "window_min": args.window_min,
             "share_pct": args.share_pct, "min_count": args.min_count,
             "duration_min": args.duration_min, "code": args.code,
             "open_days": args.days, "desk": args.desk}
    # A desk is left to the model, which refuses it: a scope the rule cannot keep to.
    reads = {*KIND_FIELDS[args.kind], "desk", *(("open",) if args.kind == "silence" else ())}
    for field, value in [*given.items(), ("open", args.open)]:
        if value is not None and field not in reads:
            article = "an" if args.kind[0] in "aeiou" else "a"
            print(f"feedback-collector web alert-rule: --{_KIND_OPTIONS[field]} is not "
                  f"read by {article} {args.kind} rule (ignored)", file=sys.stderr)
            given[field] = None  # ignored means not checked either
    opening = args.open if "open" in reads else None
    rule = Rule(name=args.name, kind=args.kind, enabled=not args.disabled, site=args.site,
                edge=args.edge, emails="\n".join(args.email), language=args.language,
                webhook_url=args.webhook_url, webhook_secret=secret,
                open_from=opening[0] if opening else None,
                open_to=opening[1] if opening else None,
                quiet_start=args.quiet[0] if args.quiet else None,
                quiet_end=args.quiet[1] if args.quiet else None,
                **{k: v for k, v in given.items() if v is not None})
    try:
        rule.full_clean()
    except ValidationError as e:
        for field, errs in e.message_dict.items():
            print(f"feedback-collector web alert-rule: {_OPTION_OF.get(field, field)}: "
                  f"{'; '.join(errs)}", file=sys.stderr)
        return 2
    rule.save()
    audit(None, "alert_rule_saved", None, f"rule {rule.pk} added ({rule.kind})",
          now=timezone.now())
    if rule.recipients() and settings.CONFIG.web.smtp is None:
        print("feedback-collector web alert-rule: no [web.smtp] in the config: its e-mails "
              "are given up at once until one is added", file=sys.stderr)
    print(rule.pk)
    print(f"rule {rule.pk}: {rule.kind}, {rule.describe()}", file=sys.stderr)
    return 0
