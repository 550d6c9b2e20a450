"""Template filters of the web app."""

from django import template
from django.utils.translation import gettext_lazy as _

register = template.Library()

# The audit's action codes as people read them (the code stays in data-action).
ACTIONS = {
    "assign": _("assigned"), "phone_viewed": _("viewed the phone number"),
    "email_noted": _("noted the patient's e-mail"), "note": _("added a comment"),
    "status": _("changed the status"), "mail_sent": _("e-mailed the patient"),
    "mail_failed": _("the e-mail to the patient failed"),
    "mail_not_sent": _("no e-mail configured"), "late_warning": _("time-limit warning"),
    "erased": _("erased personal data"), "user_created": _("created a user"),
    "name_set": _("named an identifier"), "api_token_created": _("created an API token"),
    "api_token_revoked": _("revoked an API token"),
    "api_personal_data": _("an API token read personal data"),
    "alert_rule_saved": _("saved an alert rule"),
    "alert_rule_enabled": _("enabled an alert rule"),
    "alert_rule_disabled": _("disabled an alert rule"),
}


@register.filter
def action_label(code: str) -> str:
    return str(ACTIONS.get(code, code))
