"""The `[broker]` table both `edge.toml` and `collector.toml` have, and its use in paho.

Plain TCP is allowed only to localhost unless `allow_plaintext = true` says
so explicitly (mqtt-contract.md, Security); TLS verifies the server against
`ca_file` and may add a client certificate.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edge.contract.toml import MISSING, Table

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = ["BrokerConfig", "TlsConfig", "is_loopback", "parse_broker", "set_credentials"]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    host: str
    port: int
    client_id: str
    keepalive_s: int
    username: str | None
    password: str | None = field(repr=False)
    tls: TlsConfig | None
    window: int
    reconnect_min_s: float
    reconnect_max_s: float


def is_loopback(host: str) -> bool:
    """localhost or a loopback IP address (plain TCP and an open status page are fine there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_tls_files(t: Table, tls: TlsConfig) -> None:
    """Load the files as TLS will (ssl, RFC 5280 PEM): a file that is there but is
    not a certificate or key fails at check-config, not at the clinic."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(tls.ca_file))
        except (ssl.SSLError, ValueError) as e:
            raise t.error("ca_file", str(tls.ca_file),
                          f"must hold PEM CA certificate(s) ({e.__class__.__name__})") from None
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            # An empty password: an encrypted key fails here instead of prompting.
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file), password=b"")
        except (ssl.SSLError, ValueError, OSError) as e:
            raise t.error("cert_file", str(tls.cert_file),
                          "must be a PEM certificate matching key_file (an unencrypted PEM "
                          f"key) ({e.__class__.__name__})") from None


def parse_broker(t: Table, default_client_id: str) -> BrokerConfig:
    """A [broker] table (shared with the collector's config)."""
    host = t.required_string("host", allowed="a host name or IP address")
    port = t.integer("port", 1883, 1, 65535)
    client_id = t.string("client_id", default=default_client_id,
                         pattern=re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z"),
                         allowed="1 to 64 letters, digits, '_', '.', '-'")
    keepalive = t.integer("keepalive_s", 30, 5, 600)
    username = t.string("username", default=None)
    password = t.string("password", default=None)
    from_file = t.secret_file("password_file")
    if password is not None and from_file is not None:
        raise t.error("password", "***", "give either password or password_file, not both")
    if from_file is not None:
        password = from_file
    if password is not None and username is None:
        raise t.error("username", MISSING, "required when a password is given")
    tls_table = t.table("tls")
    tls: TlsConfig | None = None
    if tls_table is not None:
        tls = TlsConfig(
            ca_file=tls_table.path_value("ca_file", must_exist=True),
            cert_file=tls_table.path_value("cert_file", must_exist=True),
            key_file=tls_table.path_value("key_file", must_exist=True),
        )
        if (tls.cert_file is None) != (tls.key_file is None):
            raise tls_table.error("key_file", str(tls.key_file),
                                  "cert_file and key_file go together: give both or neither")
        _check_tls_files(tls_table, tls)
        tls_table.finish()
    plaintext_ok = t.get("allow_plaintext")
    if plaintext_ok is not MISSING and not isinstance(plaintext_ok, bool):
        raise t.error("allow_plaintext", plaintext_ok, "must be true or false")
    if tls is None and not is_loopback(host) and plaintext_ok is not True:
        raise t.error("host", host, "plain TCP is allowed only to localhost; add [broker.tls] "
                      "or set allow_plaintext = true to accept an unencrypted link")
    window = t.integer("window", 20, 1, 1000)
    rmin = t.number("reconnect_min_s", 0.5, 0.05, 60)
    rmax = t.number("reconnect_max_s", 60, 0.1, 3600)
    if rmax < rmin:
        raise t.error("reconnect_max_s", rmax, f"must be at least reconnect_min_s ({rmin})")
    t.finish()
    return BrokerConfig(host, port, str(client_id), keepalive, username, password, tls,
                        window, rmin, rmax)


def set_credentials(c: mqtt.Client, cfg: BrokerConfig) -> None:
    """Username/password and TLS (server verified against the CA) from the config."""
    if cfg.username is not None:
        c.username_pw_set(cfg.username, cfg.password)
    if cfg.tls is not None:
        c.tls_set(ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                  certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                  keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                  cert_reqs=ssl.CERT_REQUIRED)
