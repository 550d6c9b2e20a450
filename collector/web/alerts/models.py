"""Alert rules, their episodes and every delivery attempt.

An `Episode` is one alert: its condition held from `since`; it was raised
(`opened_at`) once it had held long enough (a rule's `duration_min`, 0 for
rules without one) and `resolved_at` when it no longer held.  Each raised
episode has one `Delivery` per channel and kind (opened, resolved), and each
try of a delivery is an `Attempt`, written (claimed) before the message goes
out: two ticks at once never send the same attempt twice.

Nothing here holds a patient's personal data: subjects are site, desk, edge
and doctor identifiers and case numbers, values and facts are counts,
indexes, states, times and alarm codes.
"""

from __future__ import annotations

import re
import urllib.parse
import uuid
from datetime import datetime
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import models
from django.utils.translation import gettext
from django.utils.translation import gettext_lazy as _

# Site, edge and desk identifiers as the contract allows them (edge/contract/ids.py).
_SITE_RE = re.compile(r"^[a-z0-9-]{1,32}$")
_DESK_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# An alarm code: the part of a health alarm before ": " (the rest may name devices).
CODE_RE = re.compile(r"^[a-z_]{1,32}$")


class Kind(models.TextChoices):
    NEGATIVE = "negative", _("Negative presses")
    OFFLINE = "offline", _("Edge offline")
    HEALTH = "health", _("Edge health alarm")
    SILENCE = "silence", _("No presses during opening hours")
    CALLBACK = "callback", _("Callback past its time limit")
    LOYALTY = "loyalty", _("Loyalty index below a threshold")
    DOCTOR = "doctor", _("Doctor index below a threshold")


class Per(models.TextChoices):
    DESK = "desk", _("per desk")
    SITE = "site", _("per site")


# Which fields each kind reads (the others are ignored), for the form and `clean`.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    Kind.NEGATIVE: ("per", "threshold", "window_min", "share_pct"),
    Kind.OFFLINE: ("duration_min",),
    Kind.HEALTH: ("code", "duration_min"),
    Kind.SILENCE: ("duration_min", "open_from", "open_to", "open_days"),
    Kind.CALLBACK: (),
    Kind.LOYALTY: ("per", "threshold", "window_min", "duration_min", "min_count"),
    Kind.DOCTOR: ("threshold", "window_min", "duration_min", "min_count"),
}

# The longest e-mail address SMTP carries (RFC 5321, 4.5.3.1.3).
MAX_ADDRESS = 254
# The longest window or duration a rule may have: a year (and time arithmetic
# on it stays within datetime's range).
MAX_MINUTES = 366 * 24 * 60

# Kinds that watch desks; the others watch edges (offline, health) or cases
# (callback), whose scope is a site and an edge.
DESK_KINDS = (Kind.NEGATIVE, Kind.LOYALTY, Kind.SILENCE, Kind.DOCTOR)

# ISO weekdays (Monday 1) as `open_days` holds them.
WEEKDAYS = "1234567"


def _refused_address(url: str) -> str | None:
    """The address a webhook URL may not reach (channels.py), or None; a name
    that does not resolve now is not refused here (each try checks again)."""
    from collector.web.alerts import channels  # noqa: PLC0415 - channels imports the models

    try:
        parts = urllib.parse.urlsplit(url)
        channels.webhook_addresses(parts.hostname or "", parts.port or 443)
    except channels.WebhookRefusedError as e:
        return str(e.address)
    except (OSError, ValueError, UnicodeError):
        return None
    return None


class Rule(models.Model):
    name = models.CharField(_("name"), max_length=100)
    kind = models.CharField(_("kind"), max_length=16, choices=Kind.choices)
    enabled = models.BooleanField(_("enabled"), default=True)
    # Scope: empty is every site / desk / edge.
    site = models.CharField(_("site"), max_length=32, blank=True, default="")
    desk = models.CharField(_("desk"), max_length=64, blank=True, default="")
    edge = models.CharField(_("edge"), max_length=32, blank=True, default="")
    per = models.CharField(_("counted"), max_length=8, choices=Per.choices, default=Per.DESK)
    # Negative presses: at least `threshold` bad in `window_min` minutes, or, with
    # `share_pct`, that share of bad among at least `threshold` presses.
    # Loyalty: the index (% good - % bad) of `window_min` minutes below `threshold`
    # (of at least `min_count` presses) for `duration_min` minutes.
    # Doctor: a doctor's index (% yes - % no of Q1 among the answers) the same way.
    threshold = models.IntegerField(_("threshold"), default=5)
    window_min = models.PositiveIntegerField(_("window (minutes)"), default=60)
    share_pct = models.PositiveSmallIntegerField(_("share of bad (%)"), null=True, blank=True)
    min_count = models.PositiveIntegerField(_("minimum presses"), default=10)
    # How long a condition must hold before it is an alert (offline, health,
    # silence, loyalty).
    duration_min = models.PositiveIntegerField(_("for at least (minutes)"), default=15)
    code = models.CharField(_("alarm code (empty: any)"), max_length=32, blank=True,
                            default="")
    open_from = models.TimeField(_("opens at"), null=True, blank=True)
    open_to = models.TimeField(_("closes at"), null=True, blank=True)
    open_days = models.CharField(_("open on"), max_length=7, default=WEEKDAYS, blank=True)
    # Channels.
    emails = models.TextField(_("e-mail recipients (one a line)"), blank=True, default="")
    language = models.CharField(_("language of e-mails to addresses without an account"),
                                max_length=8, default="en",
                                choices=[("en", "English"), ("ru", "Русский")])
    webhook_url = models.URLField(_("webhook URL"), max_length=500, blank=True, default="")
    webhook_secret = models.CharField(_("webhook secret"), max_length=200, blank=True,
                                      default="")
    # Quiet hours (local time, [reports] tz): messages wait until they end;
    # evaluation goes on.  start > end spans midnight.
    quiet_start = models.TimeField(_("quiet from"), null=True, blank=True)
    quiet_end = models.TimeField(_("quiet until"), null=True, blank=True)

    class Meta:
        ordering: ClassVar[list[str]] = ["name", "id"]

    def __str__(self) -> str:
        return self.name

    def basis(self) -> str:
        """What an alert of this rule is about: its kind, and the grouping, scope
        and alarm code its kind reads.  An alert raised on another basis (the
        rule edited since) is ended."""
        reads = KIND_FIELDS.get(self.kind, ())
        return "|".join((self.kind, self.per if "per" in reads else "", self.site, self.edge,
                         self.desk, self.code if "code" in reads else ""))

    def describe(self) -> str:
        """What the rule watches, in the words of the CLI's `list` (English)."""
        per = f"per {self.per}: "
        held = f" for {self.duration_min} min"
        texts: dict[str, str] = {
            Kind.NEGATIVE: per + (f"at least {self.threshold} bad" if self.share_pct is None
                                  else f"{self.share_pct}% bad of at least {self.threshold}")
            + f" in {self.window_min} min",
            Kind.LOYALTY: per + f"index below {self.threshold} over {self.window_min} min "
            f"(at least {self.min_count} presses)" + held,
            Kind.DOCTOR: f"a doctor's index below {self.threshold} over {self.window_min} "
            f"min (at least {self.min_count} answers)" + held,
            Kind.SILENCE: f"no press at a desk for {self.duration_min} min, open "
            f"{self.open_from:%H:%M}-{self.open_to:%H:%M} on days {self.open_days}"
            if self.open_from and self.open_to else "no opening hours",
            Kind.OFFLINE: "an edge offline or silent" + held,
            Kind.HEALTH: f"edge alarm {self.code or 'of any code'}" + held,
            Kind.CALLBACK: "a callback case past its [web.limits]",
        }
        text = texts.get(self.kind, self.kind)
        quiet = (f"; quiet {self.quiet_start:%H:%M}-{self.quiet_end:%H:%M}"
                 if self.quiet_start and self.quiet_end else "")
        return text + quiet

    def recipients(self) -> list[str]:
        return [a.strip() for a in re.split(r"[\s,;]+", self.emails) if a.strip()]

    def clean(self) -> None:
        errors: dict[str, Any] = {}
        if self.site and not _SITE_RE.match(self.site):
            errors["site"] = _("a site identifier: a-z, 0-9 and -")
        if self.edge and not _SITE_RE.match(self.edge):
            errors["edge"] = _("an edge identifier: a-z, 0-9 and -")
        if self.desk and not _DESK_RE.match(self.desk):
            errors["desk"] = _("a desk identifier: letters, digits, _ . -")
        elif self.desk and self.kind not in DESK_KINDS:
            errors["desk"] = _("this kind watches edges or cases, not desks: leave it empty")
        if self.code and not CODE_RE.match(self.code):
            errors["code"] = _("an alarm code: a-z and _")
        if not self.name.isprintable():
            errors["name"] = _("a name on one line, without control characters")
        for address in self.recipients():
            try:
                validate_email(address)
            except ValidationError:
                errors["emails"] = _("one plain address a line")
            # RFC 5321, 4.5.3.1.3: a path is at most 256 octets with its brackets.
            if len(address) > MAX_ADDRESS:
                errors["emails"] = _("an address of at most %(n)d characters") % {
                    "n": MAX_ADDRESS}
            # Control characters and quoting would reach the mail headers.
            if any(c in address for c in "\"'<>\\") or not address.isprintable():
                errors["emails"] = _("one plain address a line")
        if self.webhook_url and not self.webhook_url.startswith(("https://", "http://")):
            errors["webhook_url"] = _("an http:// or https:// URL")
        elif self.webhook_url:
            refused = _refused_address(self.webhook_url)
            if refused:
                errors["webhook_url"] = _(
                    "%(address)s is not a public address: ask the server's administrator "
                    "to add it to [web] webhook_allow") % {"address": refused}
        if self.webhook_url and not self.webhook_secret:
            errors["webhook_secret"] = _("a webhook needs a secret to sign with")
        if not self.recipients() and not self.webhook_url:
            errors["emails"] = _("give e-mail recipients, a webhook, or both")
        if self.kind in (Kind.LOYALTY, Kind.DOCTOR) and not -100 < self.threshold <= 100:
            errors["threshold"] = _("an index from -99 to 100")
        if self.kind in (Kind.NEGATIVE, Kind.LOYALTY, Kind.DOCTOR) and self.window_min < 1:
            errors["window_min"] = _("at least a minute")
        for name in ("window_min", "duration_min"):
            if getattr(self, name) > MAX_MINUTES:
                errors[name] = _("at most a year (%(n)d minutes)") % {"n": MAX_MINUTES}
        if self.kind == Kind.NEGATIVE and self.threshold < 1:
            errors["threshold"] = _("at least 1")
        if self.share_pct is not None and not 1 <= self.share_pct <= 100:
            errors["share_pct"] = _("from 1 to 100")
        if self.kind == Kind.SILENCE and (self.open_from is None or self.open_to is None):
            errors["open_from"] = _("give the opening hours")
        elif self.kind == Kind.SILENCE and self.open_from is not None and \
                self.open_to is not None and self.open_from >= self.open_to:
            errors["open_to"] = _("closing time after the opening time")
        if self.open_days and (set(self.open_days) - set(WEEKDAYS) or
                               len(set(self.open_days)) != len(self.open_days)):
            errors["open_days"] = _("weekdays from 1 (Monday) to 7 (Sunday)")
        if self.kind == Kind.SILENCE and not self.open_days:
            errors["open_days"] = _("give the days the clinic is open")
        if (self.quiet_start is None) != (self.quiet_end is None):
            errors["quiet_start"] = _("give both ends of the quiet hours, or neither")
        if errors:
            raise ValidationError(errors)


class Episode(models.Model):
    """One alert of a rule for one subject; at most one unresolved at a time."""

    rule = models.ForeignKey(Rule, on_delete=models.PROTECT, related_name="episodes")
    subject = models.CharField(max_length=200)
    alert_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    since = models.DateTimeField()
    opened_at = models.DateTimeField(null=True)  # null: holding, not long enough yet
    resolved_at = models.DateTimeField(null=True)
    value = models.CharField(max_length=200, blank=True, default="")
    basis = models.CharField(max_length=300, blank=True, default="")  # Rule.basis()
    # `value`'s figures (conditions.Finding.facts), for describe() in any language.
    facts = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints: ClassVar[list[Any]] = [models.UniqueConstraint(
            fields=["rule", "subject"], condition=models.Q(resolved_at__isnull=True),
            name="one_open_episode")]
        ordering: ClassVar[list[str]] = ["-since", "-id"]


    def describe(self) -> str:
        """What was found, in the active language (pages; e-mails in the
        recipient's); `value` (English) when the figures are not there."""
        # The kind it was raised as (the rule may have been edited since).
        kind = self.basis.split("|", 1)[0] if self.basis else self.rule.kind
        try:
            return describe(kind, self.facts or {})
        except (KeyError, TypeError, ValueError):
            return self.value


def _local(iso: str) -> str:
    from django.conf import settings  # noqa: PLC0415 - the zone of the reports

    when = datetime.fromisoformat(iso).astimezone(ZoneInfo(settings.CONFIG.tz))
    return f"{when:%Y-%m-%d %H:%M %Z}"


def describe(kind: str, f: dict[str, Any]) -> str:
    """An episode's figures (conditions.Finding.facts) for a reader, in the active
    language.  Raises KeyError, TypeError or ValueError for figures of another
    shape."""
    from collector.web.models import Status  # noqa: PLC0415 - the case statuses' labels

    if kind == Kind.NEGATIVE:
        return gettext("%(bad)d bad of %(total)d presses in %(window)d min") % f
    if kind == Kind.LOYALTY:
        return gettext("index %(index).1f of %(total)d presses in %(window)d min") % f
    if kind == Kind.DOCTOR:
        return gettext("index %(index).1f of %(total)d answers in %(window)d min") % f
    if kind == Kind.OFFLINE:
        text = gettext("offline since %(seen)s") if f["state"] == "offline" else \
            gettext("silent since %(seen)s")
        return text % {"seen": _local(f["seen"])}
    if kind == Kind.HEALTH:
        return str(f["code"])
    if kind == Kind.SILENCE:
        return gettext("no presses since %(since)s") % {"since": _local(f["since"])}
    if kind == Kind.CALLBACK:
        return gettext("%(status)s for over %(hours)s h") % {
            "status": dict(Status.choices)[f["status"]], "hours": f["hours"]}
    raise KeyError(kind)


class DeliveryKind(models.TextChoices):
    OPENED = "opened", _("opened")
    RESOLVED = "resolved", _("resolved")


class State(models.TextChoices):
    PENDING = "pending", _("pending")
    SENT = "sent", _("sent")
    FAILED = "failed", _("given up")


class Delivery(models.Model):
    """One message (opened or resolved) of an episode to one channel:
    `mail:<address>` or `webhook`."""

    episode = models.ForeignKey(Episode, on_delete=models.PROTECT, related_name="deliveries")
    kind = models.CharField(max_length=8, choices=DeliveryKind.choices)
    channel = models.CharField(max_length=300)
    language = models.CharField(max_length=8, default="en")
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField()
    next_attempt_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True)
    # A webhook's body as first sent: every retry sends these bytes (and this
    # signature), though the episode's value may have moved on meanwhile.
    body = models.TextField(blank=True, default="")

    class Meta:
        constraints: ClassVar[list[Any]] = [models.UniqueConstraint(
            fields=["episode", "kind", "channel"], name="one_delivery_each")]
        indexes: ClassVar[list[Any]] = [models.Index(fields=["state", "next_attempt_at"])]
        ordering: ClassVar[list[str]] = ["created_at", "id"]


class Attempt(models.Model):
    """One try of a delivery, claimed (`result` empty) before sending."""

    delivery = models.ForeignKey(Delivery, on_delete=models.CASCADE, related_name="tries")
    n = models.PositiveIntegerField()
    at = models.DateTimeField()  # the tick's time (`--now`)
    # The host's clock when claimed: a claim without a result this much older
    # than another host's clock was left by a tick that died (engine.STALE_CLAIM).
    claimed_at = models.DateTimeField(null=True)
    result = models.CharField(max_length=200, blank=True, default="")
    ok = models.BooleanField(null=True)

    class Meta:
        constraints: ClassVar[list[Any]] = [models.UniqueConstraint(
            fields=["delivery", "n"], name="one_attempt_each")]
        ordering: ClassVar[list[str]] = ["n"]
