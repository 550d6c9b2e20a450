"""The callback workflow's rules, separate from the views: the clock is a
parameter everywhere (`now`), so tests move time instead of waiting.

- `sync_cases`: every stored answer with Q1 "no" and a phone number becomes a
  case (collector/reports.py `callback_list` is the same rule).
- `change_status`, `assign`, `add_note`: the workflow (models.NEXT), each
  step audited.  Resolving sends the patient an e-mail saying what was done,
  in the patient's language, when an e-mail was noted.
- `check_limits`: a case longer in a status than its limit (`[web.limits]`)
  warns its assignee and the quality managers by e-mail, once per stay.
- `erase_personal_data`: phone, comment and e-mail of cases closed more than
  `erase_after_days` ago are erased from the case and the stored event.
"""

from __future__ import annotations

import email.errors
import json
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.mail import EmailMessage
from django.db import IntegrityError, connection, transaction
from django.template.loader import render_to_string
from django.utils import translation
from django.utils.translation import gettext as _

from collector.web.models import (
    NEXT,
    AuditEntry,
    Case,
    Event,
    LimitWarning,
    Note,
    Role,
    Status,
    User,
)

log = logging.getLogger(__name__)

# Answers whose patient said no and left a phone number.
_CALLBACK_Q = {"kind": "answer", "q1": "no", "phone__isnull": False}


def audit(user: User | None, action: str, case: Case | None, detail: str = "", *,
          now: datetime) -> None:
    AuditEntry.objects.create(at=now, username=user.get_username() if user else "(system)",
                              action=action, case=case, detail=detail[:300])


def _lang(payload: str) -> str:
    try:
        answer = json.loads(payload).get("answer") or {}
    except (ValueError, AttributeError):
        return "en"
    lang = str(answer.get("lang") or "en").lower()
    return "ru" if lang.startswith("ru") else "en"


def sync_cases(now: datetime) -> int:
    """Open a case for every callback request that has none; returns how many."""
    known = set(Case.objects.values_list("site", "edge", "event_id"))
    new = []
    # Runs at every queue refresh: the payload (for the patient's language) is
    # read for new cases only, not for every callback request each time.
    for e in Event.objects.filter(**_CALLBACK_Q).exclude(phone="").only(
            "site", "edge", "event_id", "wall_ms", "corrected_ms", "doctor"):
        if (e.site, e.edge, e.event_id) in known:
            continue
        ms = e.corrected_ms if e.corrected_ms is not None else e.wall_ms
        new.append(Case(site=e.site, edge=e.edge, event_id=e.event_id,
                        answered_at=datetime.fromtimestamp(ms / 1000, UTC),
                        doctor=e.doctor or "", patient_lang=_lang(e.payload),
                        status=Status.NEW, status_since=now))
    # Two app instances may open the same case at once: the constraint keeps one.
    Case.objects.bulk_create(new, ignore_conflicts=True)
    return len(new)


def event_of(case: Case) -> Event | None:
    return Event.objects.filter(site=case.site, edge=case.edge,
                                event_id=case.event_id).first()


def visible_cases(user: User) -> Iterable[Case]:
    """The cases this user's role may work on."""
    qs = Case.objects.select_related("assignee")
    if user.role == Role.QUALITY_MANAGER:
        return qs
    if user.role == Role.CALLBACK_OFFICER:
        return qs.filter(assignee=user)
    return qs.none()


def can_work_on(user: User, case: Case) -> bool:
    return user.role == Role.QUALITY_MANAGER or (
        user.role == Role.CALLBACK_OFFICER and case.assignee_id == user.pk)


class WorkflowError(ValueError):
    """A step the workflow does not allow (the message says which)."""


# What sending an e-mail can raise: the connection (OSError, smtplib's errors
# among them) and a message Python's e-mail package refuses to build.
MAIL_ERRORS = (OSError, email.errors.MessageError, ValueError, UnicodeError)


def mail_configured() -> bool:
    """Whether [web.smtp] is set: without it nothing is e-mailed (and nothing
    holding a patient's address is written anywhere)."""
    return settings.CONFIG.web.smtp is not None


def _send(subject: str, body: str, to: str, what: str, case: Case) -> bool:
    try:
        EmailMessage(subject, body, to=[to]).send()
    except MAIL_ERRORS as e:
        # The type only: the message of a refused address may contain it.
        log.warning("case #%s: %s was not sent: %s", case.pk, what, type(e).__name__)
        return False
    return True


def change_status(case: Case, status: str, user: User, *, now: datetime,
                  outcome: str = "") -> None:
    with transaction.atomic():
        # The row as it is now, locked: two submissions at once change it once.
        fresh = Case.objects.select_for_update().get(pk=case.pk)
        if status not in NEXT.get(fresh.status, ()):
            raise WorkflowError(_("a case that is %(old)s cannot become %(new)s") % {
                "old": Status(fresh.status).label, "new": Status(status).label})
        if status == Status.RESOLVED and not outcome.strip() and not fresh.outcome:
            raise WorkflowError(_("say what was done before resolving"))
        before = fresh.status
        case.status, case.status_since, case.warned_status = status, now, ""
        if outcome.strip():
            case.outcome = outcome.strip()
        if status == Status.CLOSED:
            case.closed_at = now
        case.save(update_fields=["status", "status_since", "warned_status", "outcome",
                                 "closed_at"])
        audit(user, "status", case, f"{before} -> {status}", now=now)
    if status == Status.RESOLVED and case.patient_email:
        send_outcome(case, user, now=now)


def send_outcome(case: Case, user: User, *, now: datetime) -> None:
    """E-mail the patient what was done, in the patient's language (audited);
    WorkflowError when it could not go out (the case stays resolved: send again)."""
    if not mail_configured():
        audit(user, "mail_not_sent", case, "no [web.smtp] configured", now=now)
        raise WorkflowError(_("resolved; this server has no e-mail configured, so the "
                              "patient was not e-mailed"))
    with translation.override(case.patient_lang):
        subject = render_to_string("web/mail/resolved_subject.txt", {"case": case}).strip()
        body = render_to_string("web/mail/resolved_body.txt", {"case": case})
    if not _send(subject, body, case.patient_email, "the e-mail to the patient", case):
        audit(user, "mail_failed", case, "to the patient", now=now)
        raise WorkflowError(_("resolved, but the e-mail to the patient could not be sent; "
                              "try again later"))
    audit(user, "mail_sent", case, f"to the patient ({case.patient_lang})", now=now)


def assign(case: Case, assignee: User | None, user: User, *, now: datetime) -> None:
    if assignee is not None and assignee.role not in (Role.CALLBACK_OFFICER,
                                                      Role.QUALITY_MANAGER):
        raise WorkflowError(_("cases go to callback officers or quality managers"))
    case.assignee = assignee
    case.save(update_fields=["assignee"])
    audit(user, "assign", case, assignee.get_username() if assignee else "(nobody)", now=now)


def add_note(case: Case, user: User, text: str, minutes: int, *, now: datetime) -> None:
    if not text.strip() and minutes <= 0:
        raise WorkflowError(_("write a comment or the time spent"))
    with transaction.atomic():
        Note.objects.create(case=case, author=user, at=now, text=text.strip(), minutes=minutes)
        case.minutes_spent += max(0, minutes)
        case.save(update_fields=["minutes_spent"])
        audit(user, "note", case, f"{minutes} min" if minutes else "", now=now)


def note_email(case: Case, email: str, lang: str, user: User, *, now: datetime) -> None:
    case.patient_email, case.patient_lang = email.strip(), lang
    case.save(update_fields=["patient_email", "patient_lang"])
    audit(user, "email_noted", case, f"language {lang}", now=now)


# A claim older than this without `sent_at` was left by a tick that died.
_STALE_CLAIM = timedelta(minutes=10)


def check_limits(now: datetime) -> int:
    """Warn about cases over their status's time limit, each colleague once per
    stay in that status (LimitWarning); returns how many e-mails went out."""
    if not mail_configured():
        return 0
    LimitWarning.objects.filter(sent_at__isnull=True,
                                claimed_at__lt=now - _STALE_CLAIM).delete()
    limits = settings.CONFIG.web.limits_s
    managers = list(User.objects.filter(role=Role.QUALITY_MANAGER, is_active=True)
                    .exclude(email=""))
    sent = 0
    for status, seconds in limits.items():
        late = Case.objects.filter(status=status, status_since__lte=now - timedelta(
            seconds=seconds)).exclude(warned_status=status).select_related("assignee")
        for case in late:
            people = {u.email: u for u in managers}
            if case.assignee is not None and case.assignee.is_active and case.assignee.email:
                people[case.assignee.email] = case.assignee
            done = 0
            for address, person in people.items():
                got = _warn(case, status, seconds, address, person, now=now)
                done += got is not None
                sent += bool(got)
            if done < len(people):
                continue  # someone is still owed the warning: the next tick
            # Exactly one tick marks it and writes the audit line.
            if Case.objects.filter(pk=case.pk, status=status,
                                   status_since=case.status_since).exclude(
                    warned_status=status).update(warned_status=status):
                audit(None, "late_warning", case, f"{status} over "
                      f"{round(seconds / 3600, 1)} h", now=now)
    return sent


def _warn(case: Case, status: str, seconds: float, address: str, person: User, *,
          now: datetime) -> bool | None:
    """True: sent now; False: sent before (or by another tick); None: not sent."""
    try:
        with transaction.atomic():
            claim = LimitWarning.objects.create(case=case, status=status,
                                                status_since=case.status_since,
                                                email=address, claimed_at=now)
    except IntegrityError:
        return False if LimitWarning.objects.filter(
            case=case, status=status, status_since=case.status_since, email=address,
            sent_at__isnull=False).exists() else None
    with translation.override(person.language or settings.LANGUAGE_CODE):
        subject = render_to_string("web/mail/late_subject.txt", {"case": case}).strip()
        body = render_to_string("web/mail/late_body.txt", {
            "case": case, "hours": round(seconds / 3600, 1),
            "url": f"{settings.CONFIG.web.base_url}/cases/{case.pk}/"})
    if not _send(subject, body, address, "a time-limit warning", case):
        claim.delete()  # the next tick tries this colleague again
        return None
    LimitWarning.objects.filter(pk=claim.pk).update(sent_at=now)
    return True


def erase_personal_data(now: datetime) -> int:
    """Erase phone, comment and e-mail of cases closed, or left at "could not
    reach", `erase_after_days` ago; then what else keeps personal data that
    long: quarantined payloads and failed-login records.  Returns the cases."""
    before = now - timedelta(days=settings.CONFIG.web.erase_after_days)
    done = 0
    ended = (Case.objects.filter(status=Status.CLOSED, closed_at__lte=before)
             | Case.objects.filter(status=Status.UNREACHABLE, status_since__lte=before))
    for case in ended.filter(erased_at__isnull=True):
        with transaction.atomic():
            ev = event_of(case)
            if ev is not None:
                payload = json.loads(ev.payload)
                answer = payload.get("answer") or {}
                for key in ("phone", "comment"):
                    if key in answer:
                        answer[key] = None
                Event.objects.filter(site=ev.site, edge=ev.edge, event_id=ev.event_id).update(
                    phone=None, comment=None, payload=json.dumps(payload))
            case.patient_email, case.erased_at = "", now
            case.save(update_fields=["patient_email", "erased_at"])
            audit(None, "erased", case, "phone, comment and e-mail", now=now)
        done += 1
    _erase_quarantine(before)
    _erase_login_records(before)
    return done


def _erase_quarantine(before: datetime) -> None:
    """A quarantined message may be an answer with a phone and a comment: its
    payload goes after the same time (reason and digest stay for the record)."""
    with connection.cursor() as cur:
        cur.execute("UPDATE quarantine SET payload = %s WHERE received_ms < %s "
                    "AND length(payload) > 0", [b"", int(before.timestamp() * 1000)])


def _erase_login_records(before: datetime) -> None:
    """What was typed as a user name at failed logins may be an e-mail address."""
    from axes.models import AccessAttempt, AccessFailureLog, AccessLog  # noqa: PLC0415

    for model in (AccessAttempt, AccessFailureLog, AccessLog):
        model.objects.filter(attempt_time__lt=before).delete()


def run_tick(now: datetime, *steps: tuple[str, Callable[[datetime], int]]) -> dict[str, int]:
    """Each step on its own: one that fails (logged by type) never stops the
    others, so a bad address in a warning cannot hold up erasure."""
    out: dict[str, int] = {}
    for name, step in steps:
        t0 = time.monotonic()
        try:
            out[name] = step(now)
        except Exception as e:  # noqa: BLE001 - a step's fault must not stop the rest
            log.error("tick: %s failed: %s", name, type(e).__name__)
            out[name] = -1
        log.debug("tick: %s took %.3f s", name, time.monotonic() - t0)
    return out
