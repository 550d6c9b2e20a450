"""Evaluating the rules and delivering the alerts, on an injected clock.

`evaluate(now)`: for each rule, the subjects (a desk, a site, an edge, an
edge's alarm code, a case) where its condition holds now.  A subject that
starts to hold gets an `Episode` (`since`); once it has held for the rule's
duration (at once for negative presses and late callbacks) it is raised
(`opened_at`) and an "opened" message is queued for each channel; when it no
longer holds it is resolved and a "resolved" message queued.  One episode per
rule and subject is open at a time (a partial unique index), and raising and
resolving are conditional UPDATEs: two ticks at once queue each message once.
A disabled rule holds nowhere, so its open alerts resolve.

`deliver(now)`: every queued message that is due, oldest first; a
"resolved" waits for its "opened" on the same channel.  Each try is claimed
(an `Attempt` row, unique per delivery and try) before it is sent; a failure
is retried after 1, 2, 4 ... minutes (at most an hour apart) up to
`MAX_ATTEMPTS`.  Quiet hours hold messages, not evaluation.

The conditions of each kind are conditions.py's.  A condition with a start
of its own (the last press of a silent desk, an offline edge's last message)
that starts later than its open episode cleared and held again between two
ticks: the episode is resolved and a new one opened.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import translation

from collector.web.alerts import channels
from collector.web.alerts.conditions import CONDITIONS, Finding
from collector.web.alerts.models import (
    Attempt,
    Delivery,
    DeliveryKind,
    Episode,
    Kind,
    Rule,
    State,
    describe,
)
from collector.web.cases import mail_configured
from collector.web.models import User

log = logging.getLogger(__name__)

MAX_ATTEMPTS: Final = 12  # 1 + 2 + 4 ... + 60 x 6: about seven hours of tries
MAX_BACKOFF: Final = timedelta(hours=1)
# A claimed attempt with no result after this was left by a tick that died.
STALE_CLAIM: Final = timedelta(minutes=10)


def _duration(rule: Rule) -> timedelta:
    if rule.kind in (Kind.NEGATIVE, Kind.CALLBACK):
        return timedelta(0)
    return timedelta(minutes=rule.duration_min)


# -- episodes --------------------------------------------------------------------------------

def evaluate(now: datetime) -> int:
    """Open, raise and resolve episodes as of `now`; returns how many were raised
    or resolved by this call."""
    changed = 0
    for rule in Rule.objects.all():
        try:
            found = CONDITIONS[rule.kind](rule, now) if rule.enabled else {}
            changed += _apply(rule, found, now)
        except Exception as e:  # noqa: BLE001 - one rule's fault must not stop the others
            log.error("alerts: rule %s could not be evaluated: %s", rule.pk, type(e).__name__)
    return changed


def _apply(rule: Rule, found: dict[str, Finding], now: datetime) -> int:
    changed = 0
    basis = rule.basis()
    if Rule.objects.get(pk=rule.pk).basis() != basis:
        return 0  # edited since this tick read it: the next tick evaluates it as it is
    current = {}
    for e in Episode.objects.filter(rule=rule, resolved_at__isnull=True):
        if e.basis and e.basis != basis:
            # The rule was edited (kind, grouping, scope): what was raised was
            # about something else; it ends, and the rule starts afresh.
            changed += _end(e, max(now, e.opened_at or e.since))
        else:
            current[e.subject] = e
    for subject, f in found.items():
        value = _english(rule.kind, f.facts)
        ep = current.get(subject)
        if ep is not None and f.since is not None and f.since > ep.since:
            # It cleared and held again between two ticks (a press at a silent
            # desk, an edge back for a while): that episode is over, this is new.
            changed += _end(ep, now)
            ep = None
        if ep is None:
            if Episode.objects.filter(rule=rule, subject=subject, resolved_at__gt=now).exists():
                continue  # a tick ahead of this one has seen it end: not raised again
            try:
                with transaction.atomic():
                    ep = Episode.objects.create(rule=rule, subject=subject, since=f.since or now,
                                                value=value, basis=basis, facts=f.facts)
            except IntegrityError:
                continue  # another tick opened it just now; it goes on from there
        elif ep.facts != f.facts:
            Episode.objects.filter(pk=ep.pk).update(value=value, facts=f.facts)
            ep.value, ep.facts = value, f.facts
        if ep.opened_at is None and now - ep.since >= _duration(rule):
            changed += _mark(ep, "opened_at", DeliveryKind.OPENED, now)
    for subject, ep in current.items():
        if subject not in found:
            changed += _end(ep, now)
    return changed


def _english(kind: str, facts: dict[str, Any]) -> str:
    with translation.override("en"):
        return describe(kind, facts)[:200]


def _end(ep: Episode, now: datetime) -> int:
    """The condition no longer holds: resolve the alert, or forget an episode
    that cleared before it had held long enough (never an alert).  Not by a
    tick behind the episode (another host's clock, a clock stepped back): what
    it does not see yet was seen by a later tick."""
    if now < (ep.opened_at or ep.since):
        return 0
    if ep.opened_at is None:
        Episode.objects.filter(pk=ep.pk, opened_at__isnull=True).delete()
        return 0
    return _mark(ep, "resolved_at", DeliveryKind.RESOLVED, now)


def _mark(ep: Episode, field: str, kind: str, now: datetime) -> int:
    """Set the episode's `field` (opened_at or resolved_at) to `now` and queue its
    `kind` of message, unless another tick did it first (a conditional UPDATE:
    exactly one tick queues it); returns 1 when this tick did."""
    with transaction.atomic():
        if not Episode.objects.filter(pk=ep.pk, **{f"{field}__isnull": True}).update(
                **{field: now}):
            return 0
        setattr(ep, field, now)
        _queue(ep, kind, now)
    return 1


def _queue(ep: Episode, kind: str, now: datetime) -> None:
    rule = ep.rule
    due = quiet_until(rule, now) or now
    langs = {u.email.lower(): u.language for u in User.objects.filter(is_active=True)
             .exclude(email="")}
    rows = [Delivery(episode=ep, kind=kind, channel=f"mail:{address}",
                     language=langs.get(address.lower()) or rule.language,
                     created_at=now, next_attempt_at=due) for address in rule.recipients()]
    if rule.webhook_url:
        rows.append(Delivery(episode=ep, kind=kind, channel="webhook", created_at=now,
                             next_attempt_at=due))
    if kind == DeliveryKind.RESOLVED:
        # Only where the opening went (or is going): a recipient added meanwhile
        # would get a resolution of an alert they never heard of.
        opened = set(Delivery.objects.filter(episode=ep, kind=DeliveryKind.OPENED)
                     .exclude(state=State.FAILED).values_list("channel", flat=True))
        rows = [r for r in rows if r.channel in opened]
    Delivery.objects.bulk_create(rows, ignore_conflicts=True)


# -- quiet hours -----------------------------------------------------------------------------

def quiet_until(rule: Rule, now: datetime) -> datetime | None:
    """The end of the quiet period `now` is in (local time), or None."""
    start, end = rule.quiet_start, rule.quiet_end
    if start is None or end is None or start == end:
        return None
    zone = ZoneInfo(settings.CONFIG.tz)
    local = now.astimezone(zone)
    t = local.time().replace(tzinfo=None)
    inside = start <= t < end if start < end else (t >= start or t < end)
    if not inside:
        return None
    day = local.date() if t < end else local.date() + timedelta(days=1)
    return datetime.combine(day, end, zone).astimezone(UTC)


def _backoff(n: int) -> timedelta:
    return min(timedelta(minutes=2 ** min(n - 1, 10)), MAX_BACKOFF)


# -- delivery --------------------------------------------------------------------------------

def deliver(now: datetime) -> int:
    """Send what is due; returns how many messages went out."""
    _release_stale_claims(now)
    sent = 0
    due = (Delivery.objects.filter(state=State.PENDING, next_attempt_at__lte=now)
           .select_related("episode__rule").order_by("created_at", "id"))
    for d in due:
        rule = d.episode.rule
        quiet = quiet_until(rule, now)
        if quiet is not None:
            Delivery.objects.filter(pk=d.pk, state=State.PENDING).update(next_attempt_at=quiet)
            continue
        if d.kind == DeliveryKind.RESOLVED:
            opened = Delivery.objects.filter(episode=d.episode, kind=DeliveryKind.OPENED,
                                             channel=d.channel).values_list("state", flat=True)
            if State.PENDING in opened:
                continue  # "resolved" never arrives before its "opened"
            if State.FAILED in opened:
                # The receiver never heard of this alert: a resolution alone would
                # tell it of an alert id it cannot know.
                with transaction.atomic():
                    if Delivery.objects.filter(pk=d.pk, state=State.PENDING).update(
                            state=State.FAILED):
                        Attempt.objects.create(delivery=d, n=d.attempts + 1, at=now,
                                               result="not sent: its opening was given up",
                                               ok=False)
                continue
        sent += _try(d, now)
    return sent


def _try(d: Delivery, now: datetime) -> int:
    n = d.attempts + 1
    try:
        with transaction.atomic():
            claim = Attempt.objects.create(delivery=d, n=n, at=now, claimed_at=_wall())
    except IntegrityError:
        return 0  # another tick has this try
    ep = d.episode
    rule = ep.rule
    gone = (not rule.webhook_url if d.channel == "webhook" else
            d.channel.removeprefix("mail:").lower() not in
            {a.lower() for a in rule.recipients()})
    if gone:
        # The rule no longer has this channel: stop, rather than send to an
        # address someone removed (or crash on an empty URL).
        Attempt.objects.filter(pk=claim.pk).update(result="channel removed from the rule",
                                                   ok=False)
        Delivery.objects.filter(pk=d.pk).update(attempts=n, state=State.FAILED)
        return 0
    if d.channel == "webhook":
        if not d.body:
            d.body = channels.body_bytes(ep, d.kind).decode()
            Delivery.objects.filter(pk=d.pk).update(body=d.body)
        ok, result = channels.send_webhook(rule.webhook_url, rule.webhook_secret,
                                           d.body.encode(), str(ep.alert_id), d.kind)
    elif not mail_configured():
        ok, result = False, "no [web.smtp] configured"
    else:
        ok, result = channels.send_mail(ep, d.kind, d.channel.removeprefix("mail:"), d.language)
    Attempt.objects.filter(pk=claim.pk).update(result=result[:200], ok=ok)
    if ok:
        Delivery.objects.filter(pk=d.pk).update(state=State.SENT, attempts=n, sent_at=now)
        return 1
    # No SMTP, or a webhook address refused: trying again changes nothing.
    give_up = n >= MAX_ATTEMPTS or result.startswith(("no [web.smtp]", "refused:"))
    Delivery.objects.filter(pk=d.pk).update(
        attempts=n, state=State.FAILED if give_up else State.PENDING,
        next_attempt_at=now + _backoff(n))
    # The channel's kind and the result only: never an address or a secret.
    log.warning("alerts: %s of alert %s (%s) not delivered, try %d: %s", d.kind,
                ep.alert_id, "webhook" if d.channel == "webhook" else "e-mail", n, result)
    return 0


def _wall() -> datetime:
    """The host's clock, for claims: whether a tick is still sending is a matter
    of real time, whatever time a tick was told it is (`--now`)."""
    return datetime.now(UTC)


def _release_stale_claims(now: datetime) -> None:
    """A tick that died between claiming and recording leaves a claim with no
    result: its try counts as failed and the next one is due now (the message
    may have gone out: the receiver knows it by its alert id and kind).  A claim
    is stale by the host clocks (`claimed_at`), not by ticks' `now`: a tick that
    has been sending for ten minutes made its latest claims just now."""
    cut = _wall() - STALE_CLAIM
    for a in Attempt.objects.filter(
            Q(claimed_at__lt=cut) | Q(claimed_at__isnull=True, at__lt=now - STALE_CLAIM),
            result="").select_related("delivery"):
        with transaction.atomic():
            if Attempt.objects.filter(pk=a.pk, result="").update(
                    result="no result recorded (the tick stopped)", ok=False):
                Delivery.objects.filter(pk=a.delivery_id, state=State.PENDING,
                                        attempts__lt=a.n).update(
                    attempts=a.n, next_attempt_at=now,
                    state=State.FAILED if a.n >= MAX_ATTEMPTS else State.PENDING)


def run(now: datetime) -> int:
    """The tick's step: evaluate, then deliver; returns the messages sent."""
    evaluate(now)
    return deliver(now)

