"""How an alert leaves: an e-mail (Django's mail, `[web.smtp]`) or a webhook.

A webhook is a JSON POST whose body is the same bytes on every retry (the
alert id and kind make it idempotent for the receiver), signed with the
rule's secret: `X-Feedback-Signature: sha256=<hex HMAC-SHA256 of the body>`,
and `X-Feedback-Alert-Id`.  Neither the secret nor a recipient's address is
ever logged; a failure is recorded by its type or HTTP status, or, for a
refused address, the address.

A webhook reaches public addresses only, and the networks and host names of
`[web] webhook_allow`: the quality manager types the URL, and the server must
not become her way into its loopback, its cloud's metadata service or the
clinic's LAN.  Every address the name resolves to is checked, and the
connection goes to the address checked (a name that resolves again to
another address meanwhile gains nothing).  Redirects are not followed: a 3xx
is a failed try.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import urllib.parse
from typing import Any, Final

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


class WebhookRefusedError(Exception):
    """The URL's host is not a place a webhook may go (module docstring)."""

    def __init__(self, address: Address) -> None:
        super().__init__(f"refused: {address} is not a public address "
                         "(see [web] webhook_allow)")
        self.address = address


# IPv6 forms that carry an IPv4 address a gateway or relay may deliver to
# (the low 32 bits): NAT64's well-known prefix (RFC 6052), SIIT's
# IPv4-translated (RFC 2765) and the deprecated IPv4-compatible (RFC 4291).
_EMBEDDING: Final = tuple(ipaddress.IPv6Network(n) for n in (
    "64:ff9b::/96", "::ffff:0:0:0/96", "::/96"))
# Never public, though some Pythons' is_global says so (CVE-2024-4032, before
# 3.11.10 and 3.12.4): site-local (RFC 3879), NAT64's local-use prefix (RFC
# 8215: where it carries its IPv4 address depends on the network's prefix
# length), IETF protocol assignments (RFC 6890).
_NOT_PUBLIC: Final = (ipaddress.IPv6Network("fec0::/10"), ipaddress.IPv6Network("64:ff9b:1::/48"),
                      ipaddress.IPv6Network("2001::/23"), ipaddress.IPv4Network("192.0.0.0/24"))

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _public(address: Address) -> bool:
    """A global address, judged by the IPv4 address an IPv6 form carries (mapped,
    6to4, Teredo, NAT64, translated, compatible), when it carries one."""
    if any(address in net for net in _NOT_PUBLIC):
        return False
    if isinstance(address, ipaddress.IPv4Address):
        return address.is_global
    carried = [a for a in (address.ipv4_mapped, address.sixtofour,
                           *(address.teredo or ())) if a is not None]
    if any(address in net for net in _EMBEDDING):
        carried.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if carried:
        return all(a.is_global for a in carried)
    return address.is_global


def _allowed(host: str, address: Address) -> bool:
    web = settings.CONFIG.web
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (_public(address) or host.lower().rstrip(".") in web.webhook_hosts
            or any(address in net for net in web.webhook_networks))


def webhook_addresses(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, once every one is allowed.  Raises
    WebhookRefusedError (naming the first address refused) or OSError (the
    name does not resolve)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for address in addresses:
        if not _allowed(host, address):
            raise WebhookRefusedError(address)
    return list(dict.fromkeys(str(a) for a in addresses))


def _connect(addresses: list[str], port: int, timeout: float | None) -> socket.socket:
    """The first of the checked addresses that answers (as create_connection
    tries a name's addresses in turn)."""
    error: OSError | None = None
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as e:
            error = e
    raise error or OSError("no address")


class _Pinned(http.client.HTTPConnection):
    """HTTP to addresses resolved and checked before, with the URL's Host."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses

    def connect(self) -> None:
        self.sock = _connect(self.addresses, self.port, self.timeout)


class _PinnedTLS(http.client.HTTPSConnection):
    """HTTPS to checked addresses; the certificate is verified for the URL's host."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.addresses = addresses

    def connect(self) -> None:
        sock = _connect(self.addresses, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]  # http.client's own context


def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[bool, str]:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    addresses = webhook_addresses(host, port)
    conn = (_PinnedTLS if tls else _Pinned)(host, port, addresses, WEBHOOK_TIMEOUT_S)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(64 * 1024)  # what a receiver says is not ours to keep
        return 200 <= response.status < 300, f"HTTP {response.status}"
    finally:
        conn.close()


def send_webhook(url: str, secret: str, body: bytes, alert_id: str,
                 kind: str) -> tuple[bool, str]:
    """POST `body` to `url` (delivered, what happened: an HTTP status, an error
    type, or why the address is refused).  At most WEBHOOK_TIMEOUT_S in all: a
    socket timeout is per read, which a receiver sending a byte at a time
    stretches without end, so the request runs in a thread the tick stops
    waiting for."""
    if not url.startswith(("https://", "http://")):
        return False, "refused: not an http(s) URL"
    try:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            return False, "refused: no host in the URL"
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as e:
        return False, f"refused: {type(e).__name__}"
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               "X-Feedback-Alert-Id": alert_id, "X-Feedback-Alert-Kind": kind,
               "X-Feedback-Signature": signature(secret, body)}
    result: list[tuple[bool, str]] = []

    def post() -> None:
        try:
            result.append(_post(url, body, headers))
        except WebhookRefusedError as e:
            result.append((False, str(e)))
        except (OSError, ValueError, http.client.HTTPException) as e:
            result.append((False, type(e).__name__))

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
        # One line whatever a name holds: a header with a line break is refused.
        subject = " ".join(render_to_string("alerts/mail/subject.txt", ctx).split())
        text = render_to_string("alerts/mail/body.txt", ctx)
    try:
        EmailMessage(subject, text, to=[address]).send()
    except MAIL_ERRORS as e:
        # The type only: a refused address may be in the error's text.
        return False, type(e).__name__
    return True, "sent"
