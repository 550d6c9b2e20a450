"""How an alert leaves: an e-mail (Django's mail, `[web.smtp]`) or a webhook.

A webhook is a JSON POST whose body is the same bytes on every retry (the
alert id and kind make it idempotent for the receiver), signed with the
rule's secret: `X-Feedback-Signature: sha256=<hex HMAC-SHA256 of the body>`,
and `X-Feedback-Alert-Id`.  Neither the secret nor a recipient's address is
ever logged; a failure is recorded by its type or HTTP status only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import urllib.error
import urllib.request
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage
from django.template.loader import render_to_string
from django.utils import translation

from collector.web.alerts.models import Episode
from collector.web.cases import MAIL_ERRORS

WEBHOOK_TIMEOUT_S = 10
USER_AGENT = "feedback-collector-alerts/1"


def payload(episode: Episode, kind: str) -> dict[str, Any]:
    """What an alert says: identifiers, counts, times; nothing a patient wrote."""
    rule = episode.rule

    def iso(t: Any) -> str | None:
        return t.isoformat() if t is not None else None

    return {"alert_id": str(episode.alert_id), "kind": kind,
            "rule": {"id": rule.pk, "name": rule.name, "kind": rule.kind},
            "subject": episode.subject, "value": episode.value,
            "since": iso(episode.since), "opened_at": iso(episode.opened_at),
            "resolved_at": iso(episode.resolved_at) if kind == "resolved" else None}


def body_bytes(episode: Episode, kind: str) -> bytes:
    return json.dumps(payload(episode, kind), sort_keys=True, separators=(",", ":")).encode()


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is not a delivery: urllib would follow it as a GET without the
    body, to wherever it points (an internal address), with the signature."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects())


def send_webhook(url: str, secret: str, body: bytes, alert_id: str,
                 kind: str) -> tuple[bool, str]:
    """POST `body` to `url` (delivered, what happened: an HTTP status or an error
    type).  At most WEBHOOK_TIMEOUT_S in all: urllib's timeout is per socket
    read, which a receiver sending a byte at a time stretches without end, so the
    request runs in a thread the tick stops waiting for."""
    if not url.startswith(("https://", "http://")):
        return False, "refused: not an http(s) URL"
    try:
        req = urllib.request.Request(url, data=body, method="POST", headers={  # noqa: S310 - http(s) only, checked above
            "Content-Type": "application/json", "User-Agent": USER_AGENT,
            "X-Feedback-Alert-Id": alert_id, "X-Feedback-Alert-Kind": kind,
            "X-Feedback-Signature": signature(secret, body)})
    except ValueError as e:
        return False, f"refused: {type(e).__name__}"
    result: list[tuple[bool, str]] = []

    def post() -> None:
        try:
            with _OPENER.open(req, timeout=WEBHOOK_TIMEOUT_S) as r:
                status = int(r.status)
        except urllib.error.HTTPError as e:
            result.append((False, f"HTTP {e.code}"))
        except (OSError, ValueError) as e:  # URLError, timeouts, refused connections
            result.append((False, type(e).__name__))
        else:
            result.append((200 <= status < 300, f"HTTP {status}"))

    worker = threading.Thread(target=post, name="webhook", daemon=True)
    worker.start()
    worker.join(WEBHOOK_TIMEOUT_S)
    if not result:
        # Abandoned, not killed: if it completes, the receiver gets the same alert
        # id and kind again at the next try, which it knows to ignore.
        return False, "timed out"
    return result[0]


def send_mail(episode: Episode, kind: str, address: str, language: str) -> tuple[bool, str]:
    ctx = {"e": episode, "rule": episode.rule, "kind": kind,
           "url": f"{settings.CONFIG.web.base_url}/alerts/{episode.pk}/"}
    with translation.override(language):
        subject = render_to_string("alerts/mail/subject.txt", ctx).strip()
        text = render_to_string("alerts/mail/body.txt", ctx)
    try:
        EmailMessage(subject, text, to=[address]).send()
    except MAIL_ERRORS as e:
        # The type only: a refused address may be in the error's text.
        return False, type(e).__name__
    return True, "sent"
