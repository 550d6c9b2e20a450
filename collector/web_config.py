"""The `[web]` table of `collector.toml`: the quality manager's web app.

Example::

    [web]
    secret_key_file = "web-secret"        # one line; Django's SECRET_KEY (sessions, CSRF)
    allowed_hosts = ["quality.clinic.example"]
    base_url = "https://quality.clinic.example"   # links in e-mails
    erase_after_days = 30       # phones, comments, e-mails erased this long after a case
                                # closed (or was left at "could not reach"); also what
                                # the quarantine and the failed-login records keep
    behind_proxy = true         # trust X-Forwarded-Proto from the reverse proxy
    webhook_allow = ["10.20.0.0/16", "tickets.clinic.lan"]
                                # alert webhooks may reach public addresses only, and
                                # these networks and host names (the clinic's own
                                # systems): never loopback, link-local or other
                                # private addresses unless listed here

    [web.limits]                # hours a case may stay in a status before a warning
    new = 4
    in_progress = 24
    investigating = 72
    resolved = 48
    unreachable = 72            # "could not reach": try again or close

    [web.smtp]                  # e-mail to patients and staff
    host = "smtp.clinic.example"
    port = 587
    security = "starttls"       # "starttls", "tls" (SMTPS) or "none"
    username = "quality"
    password_file = "smtp-password"
    from = "Quality <quality@clinic.example>"

Without `secret_key_file` a key is made once and kept in `state_dir`
(default: beside the SQLite database, or /var/lib/feedback-collector).
Mistakes are `edge.contract.toml.ConfigError`s naming key, value and what is allowed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from edge.contract.toml import MISSING, Table

__all__ = ["STATUSES_WITH_LIMITS", "SmtpConfig", "WebConfig", "parse_web"]

# Statuses a case can wait in for someone to act; closed and could-not-reach end it.
# "Could not reach" has one too: a case left there is neither called again nor closed.
STATUSES_WITH_LIMITS: Final = ("new", "in_progress", "investigating", "resolved",
                               "unreachable")
_DEFAULT_LIMITS_H: Final = {"new": 4.0, "in_progress": 24.0, "investigating": 72.0,
                            "resolved": 48.0, "unreachable": 72.0}
_HOST: Final = re.compile(r"^[A-Za-z0-9.\-*:\[\]]{1,253}$")
_NAME: Final = re.compile(r"^[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*\.?$")


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    security: str  # "starttls", "tls" or "none"
    username: str | None
    password: str | None
    sender: str


@dataclass(frozen=True, slots=True)
class WebConfig:
    secret_key_file: Path | None = None
    state_dir: Path | None = None
    allowed_hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
    base_url: str = "http://localhost:8000"
    erase_after_days: int = 30
    behind_proxy: bool = False
    limits_s: dict[str, float] = field(
        default_factory=lambda: {k: v * 3600 for k, v in _DEFAULT_LIMITS_H.items()})
    smtp: SmtpConfig | None = None
    # Where alert webhooks may go besides public addresses (alerts/channels.py).
    webhook_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    webhook_hosts: tuple[str, ...] = ()


def _webhook_allow(t: Table) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
                                      tuple[str, ...]]:
    value = t.get("webhook_allow")
    if value is MISSING:
        return (), ()
    networks, hosts = [], []
    allowed = 'a list of networks and host names, like ["10.20.0.0/16", "tickets.clinic.lan"]'
    if not isinstance(value, list):
        raise t.error("webhook_allow", value, allowed)
    for item in value:
        if not isinstance(item, str):
            raise t.error("webhook_allow", value, allowed)
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            if not _NAME.match(item):
                raise t.error("webhook_allow", item, allowed) from None
            hosts.append(item.lower().rstrip("."))
    return tuple(networks), tuple(hosts)


def parse_web(t: Table | None, default_state_dir: Path) -> WebConfig:
    """The `[web]` table (absent: every default)."""
    if t is None:
        return WebConfig(state_dir=default_state_dir)
    secret = t.path_value("secret_key_file")
    state_dir = t.path_value("state_dir") or default_state_dir
    hosts = t.get("allowed_hosts")
    if hosts is MISSING:
        allowed: tuple[str, ...] = ("localhost", "127.0.0.1")
    elif isinstance(hosts, list) and hosts and all(
            isinstance(h, str) and _HOST.match(h) for h in hosts):
        allowed = tuple(hosts)
    else:
        raise t.error("allowed_hosts", hosts, "a list of host names, like [\"quality.example\"]")
    base_url = t.string("base_url", default="http://localhost:8000",
                        pattern=re.compile(r"^https?://[^\s/]+(/[^\s]*)?$"),
                        allowed="an http:// or https:// URL") or "http://localhost:8000"
    erase = t.integer("erase_after_days", 30, 1, 3650)
    proxy = t.get("behind_proxy")
    if proxy is MISSING:
        proxy = False
    if not isinstance(proxy, bool):
        raise t.error("behind_proxy", proxy, "true or false")
    limits = {k: v * 3600 for k, v in _DEFAULT_LIMITS_H.items()}
    lt = t.table("limits")
    if lt is not None:
        for status in STATUSES_WITH_LIMITS:
            limits[status] = lt.number(status, _DEFAULT_LIMITS_H[status], 0.05, 24 * 365) * 3600
        lt.finish()
    networks, webhook_hosts = _webhook_allow(t)
    smtp = None
    st = t.table("smtp")
    if st is not None:
        security = st.string("security", default="starttls",
                             pattern=re.compile(r"^(starttls|tls|none)$"),
                             allowed="\"starttls\", \"tls\" or \"none\"") or "starttls"
        smtp = SmtpConfig(
            host=st.required_string("host", pattern=_HOST, allowed="a host name"),
            port=st.integer("port", 587 if security == "starttls" else
                            465 if security == "tls" else 25, 1, 65535),
            security=security,
            username=st.string("username", default=None, allowed="a user name"),
            password=st.secret_file("password_file"),
            sender=st.required_string("from", allowed="an address, like "
                                      "\"Quality <quality@clinic.example>\""))
        st.finish()
    t.finish()
    return WebConfig(secret, state_dir, allowed, base_url.rstrip("/"), erase, proxy,
                     limits, smtp, networks, webhook_hosts)
