"""The collector's configuration: one TOML file, `collector.toml`.

Example::

    id = "central-1"            # this instance; unique among the collectors
    group = "collectors"        # the shared-subscription group they share events in

    [broker]                    # as in edge.toml: host, port, username, password_file, [broker.tls]
    host = "mqtt.clinic.example"
    port = 8883
    username = "collector"
    password_file = "collector-password"
    [broker.tls]
    ca_file = "ca.pem"

    [database]
    path = "/var/lib/feedback-collector/feedback.sqlite"   # SQLite (default), or:
    # dsn = "postgresql://collector@db.clinic.example/feedback"  # several instances, one database

    [reports]
    tz = "Europe/Berlin"        # days, weeks and months are local to this zone

    [callbacks]
    stale_after_hours = 24      # a callback still `new` after this long is flagged

    [metrics]                   # optional: `run` serves Prometheus metrics at /metrics
    listen = "127.0.0.1:9108"   # host:port ([::1]:9108 for IPv6); no personal data there

Mistakes are `edge.contract.toml.ConfigError`s naming key, value and what is allowed.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from collector.web_config import WebConfig, parse_web
from edge.contract.broker import BrokerConfig, parse_broker
from edge.contract.ids import NAME_RE
from edge.contract.timefmt import check_zone
from edge.contract.toml import ConfigError, Table

# The variable naming collector.toml: the web app's settings read it, and every
# command takes it as its --config default (collector/cli.py).
CONFIG_ENV = "FEEDBACK_COLLECTOR_CONFIG"

__all__ = ["CollectorConfig", "MetricsConfig", "load_collector_config",
           "parse_collector_config"]

# host:port, the host a name, an IPv4 address or a bracketed IPv6 address.
_LISTEN = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):[0-9]{1,5}\Z")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Where `feedback-collector run` serves /metrics (collector/metrics.py)."""

    host: str
    port: int


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    id: str
    group: str
    broker: BrokerConfig
    db_path: Path | None
    dsn: str | None
    tz: str
    stale_after_s: float
    batch: int = 500
    web: WebConfig = field(default_factory=WebConfig)
    metrics: MetricsConfig | None = None  # None: no /metrics


def parse_collector_config(data: dict[str, object], source: str = "",
                           base_dir: Path | None = None) -> CollectorConfig:
    top = Table(data, "", source, base_dir)
    ident = top.required_string("id", pattern=NAME_RE, allowed="1 to 32 lower-case letters, "
                                "digits or '-'")
    group = top.string("group", default="collectors", pattern=NAME_RE,
                       allowed="1 to 32 lower-case letters, digits or '-'")
    broker_t = top.table("broker")
    if broker_t is None:
        raise ConfigError("broker", "(missing)", "required: a [broker] table with at least host",
                          source)
    broker = parse_broker(broker_t, f"feedback-collector-{ident}")
    db_t = top.table("database") or Table({}, "database", source, base_dir)
    dsn = db_t.string("dsn", default=None, allowed="a PostgreSQL connection string")
    path = db_t.path_value("path")
    if dsn is not None and path is not None:
        raise db_t.error("dsn", "(hidden)", "give either path (SQLite) or dsn (PostgreSQL)")
    if dsn is None and path is None:
        path = Path("/var/lib/feedback-collector/feedback.sqlite")
    db_t.finish()
    rep_t = top.table("reports") or Table({}, "reports", source, base_dir)
    tz = rep_t.string("tz", default="UTC", allowed="an IANA zone like Europe/Berlin")
    try:
        check_zone(str(tz))
    except ValueError as e:
        raise rep_t.error("tz", tz, str(e)) from None
    rep_t.finish()
    cb_t = top.table("callbacks") or Table({}, "callbacks", source, base_dir)
    stale_h = cb_t.number("stale_after_hours", 24.0, 0.1, 24 * 90)
    cb_t.finish()
    web = parse_web(top.table("web"), path.parent if path is not None else
                    Path("/var/lib/feedback-collector"))
    metrics_t = top.table("metrics")
    metrics = _parse_metrics(metrics_t) if metrics_t is not None else None
    top.finish()
    return CollectorConfig(str(ident), str(group), broker, path, dsn, str(tz), stale_h * 3600,
                           web=web, metrics=metrics)


def _parse_metrics(t: Table) -> MetricsConfig:
    allowed = "host:port, e.g. 127.0.0.1:9108, 0.0.0.0:9108 or [::1]:9108"
    listen = t.required_string("listen", pattern=_LISTEN, allowed=allowed)
    host, port_text = listen.rsplit(":", 1)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise t.error("listen", listen, "the port must be from 0 to 65535")
    t.finish()
    # The brackets only delimit an IPv6 address in the text; the socket takes it bare.
    return MetricsConfig(host.removeprefix("[").removesuffix("]"), port)


def load_collector_config(path: Path) -> CollectorConfig:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError("(file)", str(path), f"cannot be read: {e.strerror} (give --config, "
                          f"or name the file in {CONFIG_ENV})") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError("(syntax)", str(path), f"is not valid TOML: {e}") from None
    return parse_collector_config(data, str(path), path.parent)
