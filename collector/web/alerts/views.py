"""The quality manager's alert pages: rules (list, create, edit, enable or
disable) and alerts with every delivery attempt.  A webhook's secret is
write-only: the form never shows it back, and an empty field keeps it."""

from __future__ import annotations

from typing import Any, ClassVar

from django import forms
from django.contrib import messages
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.dates import WEEKDAYS as DAY_NAMES
from django.utils.text import capfirst
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_POST

from collector.web.alerts.models import KIND_FIELDS, WEEKDAYS, Episode, Kind, Rule
from collector.web.cases import audit, mail_configured
from collector.web.roles import MANAGE, role_required


class RuleForm(forms.ModelForm):  # type: ignore[type-arg]  # no runtime generics (no django-stubs-ext)
    webhook_secret = forms.CharField(
        label=capfirst(gettext_lazy("webhook secret")), required=False, max_length=200,
        widget=forms.PasswordInput(render_value=False),
        help_text=gettext_lazy("kept as it is when left empty"))

    open_days = forms.MultipleChoiceField(
        label=capfirst(gettext_lazy("open on")), required=False,
        widget=forms.CheckboxSelectMultiple,
        # Django's own translated day names (django.utils.dates: 0 is Monday).
        choices=[(d, DAY_NAMES[int(d) - 1]) for d in WEEKDAYS])

    class Meta:
        model = Rule
        fields: ClassVar[list[str]] = [
            "name", "kind", "enabled", "site", "desk", "edge", "per", "threshold",
            "window_min", "share_pct", "min_count", "duration_min", "code", "open_from",
            "open_to", "open_days", "emails", "language", "webhook_url", "webhook_secret",
            "quiet_start", "quiet_end"]
        widgets: ClassVar[dict[str, Any]] = {
            "open_from": forms.TimeInput(attrs={"type": "time"}),
            "open_to": forms.TimeInput(attrs={"type": "time"}),
            "quiet_start": forms.TimeInput(attrs={"type": "time"}),
            "quiet_end": forms.TimeInput(attrs={"type": "time"}),
            "emails": forms.Textarea(attrs={"rows": 3})}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.initial["open_days"] = list(self.instance.open_days if self.instance.pk
                                         else WEEKDAYS)
        # Each kind reads some fields only: say which, beside each field.
        labels = dict(Kind.choices)
        for name, field in self.fields.items():
            kinds = [labels[k] for k, fields in KIND_FIELDS.items() if name in fields]
            if kinds:
                read_by = _("read by: %(kinds)s") % {"kinds": "; ".join(str(k) for k in kinds)}
                field.help_text = f"{field.help_text} ({read_by})" if field.help_text \
                    else read_by

    def clean_open_days(self) -> str:
        return "".join(sorted(self.cleaned_data.get("open_days") or []))

    def clean_webhook_secret(self) -> str:
        secret = str(self.cleaned_data.get("webhook_secret") or "")
        return secret or (self.instance.webhook_secret if self.instance.pk else "")


def _changed(form: RuleForm) -> list[str]:
    """The fields a save changed; the secret only when one was typed (an empty
    field keeps it, though the form counts it as changed)."""
    return [f for f in form.changed_data
            if f != "webhook_secret" or form.data.get("webhook_secret")]


@role_required(*MANAGE)
def rules(request: HttpRequest) -> HttpResponse:
    return render(request, "alerts/rules.html", {"rules": Rule.objects.all()})


@role_required(*MANAGE)
def rule_edit(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    rule = get_object_or_404(Rule, pk=pk) if pk is not None else None
    form = RuleForm(request.POST or None, instance=rule)
    if request.method == "POST" and form.is_valid():
        saved = form.save()
        # Which fields changed, never their values (addresses, a webhook's URL).
        audit(request.user, "alert_rule_saved", None,  # type: ignore[arg-type]  # role_required: a User
              f"rule {saved.pk} {'changed' if rule else 'added'}: "
              f"{', '.join(_changed(form)) or 'nothing'}", now=timezone.now())
        messages.success(request, _("The rule is saved."))
        if saved.recipients() and not mail_configured():
            messages.warning(request, _("No [web.smtp] is configured: this rule's e-mails "
                                        "are given up at once until one is."))
        return redirect("alerts:rules")
    return render(request, "alerts/rule_edit.html", {"form": form, "rule": rule})


@role_required(*MANAGE)
@require_POST
def rule_toggle(request: HttpRequest, pk: int) -> HttpResponse:
    rule = get_object_or_404(Rule, pk=pk)
    Rule.objects.filter(pk=pk).update(enabled=not rule.enabled)
    audit(request.user, f"alert_rule_{'disabled' if rule.enabled else 'enabled'}",  # type: ignore[arg-type]  # role_required: a User
          None, f"rule {pk}", now=timezone.now())
    return redirect("alerts:rules")


@role_required(*MANAGE)
def alerts(request: HttpRequest) -> HttpResponse:
    episodes = (Episode.objects.filter(opened_at__isnull=False).select_related("rule")
                .prefetch_related("deliveries")[:300])
    return render(request, "alerts/alerts.html", {"episodes": episodes})


@role_required(*MANAGE)
def alert_detail(request: HttpRequest, pk: int) -> HttpResponse:
    ep = get_object_or_404(Episode.objects.select_related("rule"), pk=pk)
    deliveries = ep.deliveries.prefetch_related("tries")
    return render(request, "alerts/alert.html", {"e": ep, "deliveries": deliveries})
