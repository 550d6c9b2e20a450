"""The web app's tables, and the collector's `events` table as the app reads it.

`Event` is the intake's table (collector/db.py creates it; Django never
migrates it).  A `Case` is one callback request: an answer with Q1 "no" and a
phone number (the same rule as `feedback-collector callbacks`,
collector/reports.py).  Personal data of a case (the phone and comment in the
event, the patient's e-mail) is erased `erase_after_days` after it closed; the
audit keeps that it happened.  `AuditEntry` rows are never updated or deleted.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.contrib.auth.models import AbstractUser
from django.db import models
from django.utils.translation import gettext_lazy as _


class Role(models.TextChoices):
    QUALITY_MANAGER = "quality_manager", _("Quality manager")
    CALLBACK_OFFICER = "callback_officer", _("Callback officer")
    CLINIC_MANAGER = "clinic_manager", _("Clinic manager")
    ADMINISTRATOR = "administrator", _("Administrator")


class User(AbstractUser):
    role = models.CharField(_("role"), max_length=32, choices=Role.choices,
                            default=Role.CLINIC_MANAGER)
    # Empty: the browser's Accept-Language decides.
    language = models.CharField(_("language"), max_length=8, blank=True, default="",
                                choices=[("", _("As the browser")), ("en", "English"),
                                         ("ru", "Русский")])


class Event(models.Model):
    """The collector's stored events (read here; written by intake only)."""

    pk = models.CompositePrimaryKey("site", "edge", "event_id")
    site = models.TextField()
    edge = models.TextField()
    event_id = models.TextField()
    seq = models.BigIntegerField()
    kind = models.TextField()
    desk = models.TextField()
    device_id = models.TextField()
    operator_id = models.TextField(null=True)
    wall_ms = models.BigIntegerField()
    corrected_ms = models.BigIntegerField(null=True)
    doctor = models.TextField(null=True)
    q1 = models.TextField(null=True)
    q2 = models.TextField(null=True)
    phone = models.TextField(null=True)
    comment = models.TextField(null=True)
    payload = models.TextField()
    received_ms = models.BigIntegerField()

    class Meta:
        managed = False
        db_table = "events"


class Status(models.TextChoices):
    NEW = "new", _("New")
    IN_PROGRESS = "in_progress", _("In progress")
    INVESTIGATING = "investigating", _("Investigating")
    RESOLVED = "resolved", _("Resolved")
    CLOSED = "closed", _("Closed")
    UNREACHABLE = "unreachable", _("Could not reach")


# The workflow: which status may follow which (quality manager and assignee).
NEXT: dict[str, tuple[str, ...]] = {
    Status.NEW: (Status.IN_PROGRESS, Status.UNREACHABLE),
    Status.IN_PROGRESS: (Status.INVESTIGATING, Status.RESOLVED, Status.UNREACHABLE),
    Status.INVESTIGATING: (Status.RESOLVED,),
    Status.RESOLVED: (Status.CLOSED, Status.INVESTIGATING),
    Status.UNREACHABLE: (Status.IN_PROGRESS, Status.CLOSED),
    Status.CLOSED: (),
}


class Case(models.Model):
    site = models.CharField(max_length=64)
    edge = models.CharField(max_length=64)
    event_id = models.CharField(max_length=64)
    answered_at = models.DateTimeField(_("answered"))
    doctor = models.CharField(_("doctor"), max_length=200, blank=True, default="")
    patient_lang = models.CharField(_("patient's language"), max_length=8, default="en",
                                    choices=[("en", "English"), ("ru", "Русский")])
    status = models.CharField(_("status"), max_length=16, choices=Status.choices,
                              default=Status.NEW)
    status_since = models.DateTimeField()
    assignee = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="cases", verbose_name=_("assignee"))
    patient_email = models.EmailField(_("patient's e-mail"), blank=True, default="")
    outcome = models.TextField(_("what was done (sent to the patient)"), blank=True,
                               default="")
    minutes_spent = models.PositiveIntegerField(_("time spent (minutes)"), default=0)
    closed_at = models.DateTimeField(null=True, blank=True)
    erased_at = models.DateTimeField(null=True, blank=True)
    # The status whose time limit has been warned about (once per stay in it).
    warned_status = models.CharField(max_length=16, blank=True, default="")

    class Meta:
        constraints: ClassVar[list[Any]] = [
            models.UniqueConstraint(fields=["site", "edge", "event_id"], name="one_case_per_event")]
        indexes: ClassVar[list[Any]] = [models.Index(fields=["status", "answered_at"])]
        ordering: ClassVar[list[str]] = ["-answered_at"]

    def __str__(self) -> str:
        return f"#{self.pk}"


class Note(models.Model):
    case = models.ForeignKey(Case, on_delete=models.CASCADE, related_name="notes")
    author = models.ForeignKey(User, null=True, on_delete=models.SET_NULL)
    at = models.DateTimeField()
    text = models.TextField(_("comment"))
    minutes = models.PositiveIntegerField(_("time spent (minutes)"), default=0)

    class Meta:
        ordering: ClassVar[list[str]] = ["at"]


class AppendOnly(models.QuerySet["AuditEntry"]):
    """Refuses bulk changes; the database's triggers refuse them too (migration 0002)."""

    def update(self, **kwargs: Any) -> int:
        raise ValueError("the audit is append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise ValueError("the audit is append-only")


class AuditEntry(models.Model):
    """Who did what, when: never the value of a phone, comment or e-mail.

    Append-only three times over: save() of a stored row, delete() and the
    queryset's update()/delete() raise, and triggers in the database refuse
    UPDATE and DELETE (migration 0002); a case with audit rows cannot be deleted.
    """

    at = models.DateTimeField(db_index=True)
    username = models.CharField(max_length=150)
    action = models.CharField(max_length=32)
    case = models.ForeignKey(Case, null=True, on_delete=models.PROTECT, related_name="audit")
    detail = models.CharField(max_length=300, blank=True, default="")

    objects = AppendOnly.as_manager()

    class Meta:
        ordering: ClassVar[list[str]] = ["at", "id"]

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None:
            raise ValueError("the audit is append-only")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> tuple[int, dict[str, int]]:
        raise ValueError("the audit is append-only")


class LimitWarning(models.Model):
    """One time-limit warning to one colleague for one stay of a case in a status.

    The row is written (claimed) before the e-mail goes out, so two ticks at
    once (two app instances) never both send it; a failed send deletes its
    claim and the next tick tries that colleague again, and only that one.
    """

    case = models.ForeignKey(Case, on_delete=models.PROTECT, related_name="warnings")
    status = models.CharField(max_length=16)
    status_since = models.DateTimeField()
    email = models.CharField(max_length=254)
    claimed_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True)

    class Meta:
        constraints: ClassVar[list[Any]] = [models.UniqueConstraint(
            fields=["case", "status", "status_since", "email"], name="one_warning_each")]


class NameKind(models.TextChoices):
    SITE = "site", _("Site")
    DESK = "desk", _("Desk")
    OPERATOR = "operator", _("Receptionist")
    DOCTOR = "doctor", _("Doctor")


class DisplayName(models.Model):
    """A name as the clinic writes it for an identifier the events carry.

    `key` is the identifier exactly as the reports group by it: a site id, a
    desk as "site/desk" (desks are named per site: two sites both have a
    "desk-1"), an operator id, a doctor id.  `name` is kept as typed (any
    Unicode); the pages escape it like any other text.
    """

    kind = models.CharField(_("kind"), max_length=16, choices=NameKind.choices)
    key = models.CharField(_("identifier"), max_length=255)
    name = models.CharField(_("name"), max_length=200)

    class Meta:
        constraints: ClassVar[list[Any]] = [
            models.UniqueConstraint(fields=["kind", "key"], name="one_name_per_identifier")]
        ordering: ClassVar[list[str]] = ["kind", "key"]

    def __str__(self) -> str:
        return f"{self.kind} {self.key}"
