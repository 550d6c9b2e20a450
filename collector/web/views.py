"""The callback workflow's pages.  Every view checks the role on the server
(roles.role_required) and every case view checks that this user may work on
that case (cases.can_work_on): a URL alone reveals nothing."""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.tokens import default_token_generator
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import EmailMessage
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone, translation
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy
from django.views.decorators.http import require_POST

from collector.db import DatabaseError
from collector.web import cases, dashboards, names
from collector.web.models import NEXT, AuditEntry, Case, NameKind, Role, Status, User
from collector.web.roles import ADMIN, CASES, MANAGE, NAMES, REPORTS, role_required

log = logging.getLogger(__name__)


def _user(request: HttpRequest) -> User:
    assert isinstance(request.user, User)  # noqa: S101 - role_required ran first
    return request.user


def home(request: HttpRequest) -> HttpResponse:
    user = request.user
    if not user.is_authenticated:
        return redirect("login")
    role = getattr(user, "role", None)
    if role in CASES:
        return redirect("queue")
    if role in ADMIN:  # before REPORTS, which the administrator may also see
        return redirect("users")
    if role in REPORTS:
        return redirect("dashboard")
    raise PermissionDenied


@role_required(*CASES)
def queue(request: HttpRequest) -> HttpResponse:
    return render(request, "web/queue.html", _queue_context(request))


@role_required(*CASES)
def queue_rows(request: HttpRequest) -> HttpResponse:
    """The queue's table body, fetched by the page every few seconds."""
    return render(request, "web/queue_rows.html", _queue_context(request))


def _queue_context(request: HttpRequest) -> dict[str, object]:
    now = timezone.now()
    cases.sync_cases(now)
    user = _user(request)
    show = request.GET.get("show", "open")
    qs = cases.visible_cases(user)
    if show == "open":
        qs = qs.exclude(status=Status.CLOSED)  # type: ignore[attr-defined]
    limits = settings.CONFIG.web.limits_s
    # Late: over the limit now, or warned about by a tick (whose clock may differ).
    rows = [(c, c.warned_status == c.status or (now - c.status_since).total_seconds()
             > limits.get(c.status, float("inf")))
            for c in list(qs[:500])]  # type: ignore[index]
    # The clinic's names for sites and doctors: one query each for the whole table.
    clinic = names.Names()
    return {"rows": [(c, late, clinic.label("site", c.site),
                      clinic.label("doctor", c.doctor) if c.doctor else "")
                     for c, late in rows], "show": show}


class NoteForm(forms.Form):
    text = forms.CharField(label=gettext_lazy("Comment"), required=False,
                           widget=forms.Textarea(attrs={"rows": 3}), max_length=5000)
    minutes = forms.IntegerField(label=gettext_lazy("Time spent (minutes)"), min_value=0,
                                 max_value=24 * 60, initial=0)


# What an address may hold beyond Django's EmailValidator: no quoted local part,
# no whitespace or control character (Python's e-mail package refuses such a
# header, and the address would end up in an error's text), no separators.
_PLAIN_EMAIL = re.compile(r"[^\s\"\\<>(),;:@\[\]]+@[^\s\"\\<>(),;:@\[\]]+")


def plain_email(value: str) -> None:
    """Raises ValidationError for an address that could not go into a To: header as is."""
    if not _PLAIN_EMAIL.fullmatch(value) or any(
            unicodedata.category(c)[0] in "CZ" for c in value):
        raise ValidationError(_("write the address plainly, like name@example.org"),
                              code="invalid")


class PlainEmailField(forms.EmailField):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.validators.append(plain_email)


class EmailForm(forms.Form):
    email = PlainEmailField(label=gettext_lazy("Patient's e-mail"))
    lang = forms.ChoiceField(label=gettext_lazy("Patient's language"),
                             choices=[("en", "English"), ("ru", "Русский")])


class StatusForm(forms.Form):
    status = forms.ChoiceField(choices=Status.choices)
    outcome = forms.CharField(label=gettext_lazy("What was done (sent to the patient)"),
                              required=False, widget=forms.Textarea(attrs={"rows": 3}),
                              max_length=5000)


class AssignForm(forms.Form):
    assignee = forms.ModelChoiceField(
        label=gettext_lazy("Assignee"), required=False,
        queryset=User.objects.filter(role__in=CASES, is_active=True).order_by("username"))


def _case(request: HttpRequest, pk: int) -> Case:
    case = get_object_or_404(Case, pk=pk)
    if not cases.can_work_on(_user(request), case):
        raise PermissionDenied
    return case


@role_required(*CASES)
def case_detail(request: HttpRequest, pk: int) -> HttpResponse:
    case = _case(request, pk)
    user = _user(request)
    event = cases.event_of(case)
    if event is not None and event.phone:
        # Every view of a phone number is audited: who and when, never the number.
        cases.audit(user, "phone_viewed", case, now=timezone.now())
    return render(request, "web/case.html", {
        "case": case, "event": event, "next": NEXT.get(case.status, ()),
        "statuses": dict(Status.choices), "notes": case.notes.select_related("author"),
        "note_form": NoteForm(), "email_form": EmailForm(initial={
            "email": case.patient_email, "lang": case.patient_lang}),
        "status_form": StatusForm(initial={"outcome": case.outcome}),
        "assign_form": AssignForm(initial={"assignee": case.assignee}),
        "can_assign": user.role == Role.QUALITY_MANAGER,
        "mail_configured": cases.mail_configured(),
        "audit": case.audit.all() if user.role == Role.QUALITY_MANAGER else None,
        **_case_labels(case, event)})


def _case_labels(case: Case, event: Any) -> dict[str, str]:
    """The clinic's names for the case's site, desk and doctor ("" for none)."""
    clinic = names.Names()
    desk = getattr(event, "desk", None) or ""
    # A desk is named per site ("site/desk"); unnamed, it reads as before: its own id.
    desk_name = clinic.of("desk").get(f"{case.site}/{desk}") if desk else None
    return {"site_label": clinic.label("site", case.site),
            "desk_label": desk_name or desk,
            "desk_title": f"{case.site}/{desk}" if desk_name else "",
            "doctor_label": clinic.label("doctor", case.doctor) if case.doctor else ""}


@role_required(*CASES)  # first: other roles get 403 whatever the method
@require_POST
def case_action(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    case = _case(request, pk)
    user, now = _user(request), timezone.now()
    try:
        if action == "status":
            form = StatusForm(request.POST)
            if not form.is_valid():
                raise cases.WorkflowError(_("choose a status"))
            cases.change_status(case, form.cleaned_data["status"], user, now=now,
                                outcome=form.cleaned_data["outcome"])
        elif action == "note":
            nf = NoteForm(request.POST)
            if not nf.is_valid():
                raise cases.WorkflowError(_("the comment or the minutes are not valid"))
            cases.add_note(case, user, nf.cleaned_data["text"], nf.cleaned_data["minutes"],
                           now=now)
        elif action == "email":
            if case.status == Status.CLOSED:
                # Erasure comes after closing: an address noted now would never be erased.
                raise PermissionDenied
            ef = EmailForm(request.POST)
            if not ef.is_valid():
                raise cases.WorkflowError(_("that is not an e-mail address"))
            cases.note_email(case, ef.cleaned_data["email"], ef.cleaned_data["lang"], user,
                             now=now)
        elif action == "send_outcome":
            if case.status != Status.RESOLVED or not case.patient_email:
                raise PermissionDenied
            cases.send_outcome(case, user, now=now)
        elif action == "assign":
            if user.role != Role.QUALITY_MANAGER:
                raise PermissionDenied
            af = AssignForm(request.POST)
            if not af.is_valid():
                raise cases.WorkflowError(_("choose a colleague"))
            cases.assign(case, af.cleaned_data["assignee"], user, now=now)
        else:
            raise PermissionDenied
    except cases.WorkflowError as e:
        messages.error(request, str(e))
    else:
        messages.success(request, _("Saved."))
    return redirect("case", pk=case.pk)


@role_required(*MANAGE)
def audit_log(request: HttpRequest) -> HttpResponse:
    entries = AuditEntry.objects.select_related("case").order_by("-at", "-id")[:1000]
    return render(request, "web/audit.html", {"entries": entries})


class NewUserForm(forms.ModelForm):  # type: ignore[type-arg]
    """A new colleague: no password here; they set their own from an e-mailed
    link, so an administrator never knows a password that reads phone numbers."""

    email = PlainEmailField(label=gettext_lazy("E-mail"))

    class Meta:
        model = User
        fields = ("username", "email", "role", "language")


@role_required(*ADMIN)
def users(request: HttpRequest) -> HttpResponse:
    form = NewUserForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        made = form.save(commit=False)
        made.set_unusable_password()
        made.save()
        cases.audit(_user(request), "user_created", None, f"{made.username} ({made.role})",
                    now=timezone.now())
        if _send_welcome(request, made):
            messages.success(request, _("User created; they were e-mailed a link to set "
                                        "their password."))
        else:
            messages.error(request, _("User created, but no e-mail could be sent: give them "
                                      "a password on the server with `feedback-collector "
                                      "web adduser`."))
        return redirect("users")
    return render(request, "web/users.html", {
        "form": form, "users": User.objects.order_by("username")})


def _send_welcome(request: HttpRequest, user: User) -> bool:
    if not cases.mail_configured():
        return False
    link = request.build_absolute_uri(reverse("password_set", kwargs={
        "uidb64": urlsafe_base64_encode(force_bytes(user.pk)),
        "token": default_token_generator.make_token(user)}))
    with translation.override(user.language or settings.LANGUAGE_CODE):
        subject = render_to_string("web/mail/welcome_subject.txt", {"user": user}).strip()
        body = render_to_string("web/mail/welcome_body.txt", {"user": user, "link": link})
    try:
        EmailMessage(subject, body, to=[user.email]).send()
    except cases.MAIL_ERRORS as e:
        log.warning("the set-password e-mail was not sent: %s", type(e).__name__)
        return False
    return True


class ProfileForm(forms.ModelForm):  # type: ignore[type-arg]
    email = PlainEmailField(label=gettext_lazy("E-mail"), required=False)

    class Meta:
        model = User
        fields = ("language", "email")


@role_required(*[r.value for r in Role])
def profile(request: HttpRequest) -> HttpResponse:
    form = ProfileForm(request.POST or None, instance=_user(request))
    if request.method == "POST" and form.is_valid():
        form.save()
        messages.success(request, _("Saved."))
        return redirect("profile")
    return render(request, "web/profile.html", {"form": form})


class NameForm(forms.Form):
    """One name to set; an empty name clears it.  Neither field is stripped: the
    identifier must equal the events', the name is stored as typed."""

    kind = forms.ChoiceField(label=gettext_lazy("Kind"), choices=NameKind.choices)
    key = forms.CharField(label=gettext_lazy("Identifier"), max_length=names.MAX_KEY,
                          strip=False)
    name = forms.CharField(label=gettext_lazy("Name"), max_length=names.MAX_NAME,
                           required=False, strip=False)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if not self.errors:
            try:
                names.check(data["kind"], data["key"], data.get("name") or "")
            except names.NameRefusedError:
                raise ValidationError(_("That cannot be stored: an identifier without spaces "
                                        "around it, a name without line breaks.")) from None
        return data


@role_required(*NAMES)
def display_names(request: HttpRequest) -> HttpResponse:
    """The identifiers the data holds and the clinic's names for them; a form per row."""
    form = NameForm(request.POST or None)
    if request.method == "POST":
        if form.is_valid():
            d = form.cleaned_data
            if names.set_name(d["kind"], d["key"], d["name"] or "", _user(request)):
                messages.success(request, _("Saved."))
            return redirect("names")
        messages.error(request, " ".join(str(e) for e in form.errors.get("__all__", [])) or
                       _("Choose a kind, and give an identifier and a name of at most "
                         "200 characters."))
    try:
        seen = dashboards.read(names.seen)
    except DatabaseError:
        seen = []
        messages.error(request, _("The collector's database cannot be reached: only the "
                                  "names already set are listed."))
    listing = names.listing(seen)
    return render(request, "web/names.html", {
        "form": form, "kinds": [(k, label, listing[k]) for k, label in NameKind.choices]})
