"""The daemon's configuration: one TOML file, `edge.toml`.

Every mistake is reported as a `ConfigError` naming the key, the value found
and what is allowed, so an installer can fix the file without reading code.
Unknown keys are errors too (with a "did you mean" hint): a misspelt key that
is silently ignored is how a site ends up on the wrong broker.

Example::

    site = "clinic-3"
    edge = "reception-1"
    tz = "Europe/Berlin"       # the site's zone, for people reading times (status page)

    [broker]
    host = "mqtt.example.org"
    port = 8883
    username = "reception-1"
    password_file = "/etc/feedback-edge/mqtt-password"
    [broker.tls]
    ca_file = "/etc/feedback-edge/ca.pem"

    [store]
    path = "/var/lib/feedback-edge/outbox.sqlite"
    max_events = 500000
    max_bytes = 200000000
    min_free_bytes = 50000000   # refuse new events below this much free disk

    [desks.desk-2]
    operator = "op-17"        # fixed operator, lowest precedence

    [[devices]]
    kind = "console"
    serial = "00A1B2C3D4E5"
    desk = "desk-2"

    [[devices]]
    kind = "terminal"          # a survey terminal on USB serial
    serial = "00C0FFEE0001"    # found under /dev/serial/by-id; or port = "/dev/ttyUSB0"
    desk = "office-12"

    [guards]
    burst_presses = 5          # more than 5 presses within 10 s at a desk: flagged "burst"
    burst_window_s = 10
    after_hours = "flag"       # or "drop" (counted, never stored)
    [guards.opening_hours]
    days = "mon-sat"
    from = "08:00"
    to = "20:00"
    tz = "Europe/Berlin"

    [survey]
    doctors_file = "/etc/feedback-edge/doctors.json"   # {"rev": 3, "doctors": [...]}
    send_personal_data = true  # phone and comment go to the collector (the callback list)

    [web]                      # the installer's status page
    listen = "127.0.0.1:8480"  # another address needs token_file = "..."
    metrics = true             # also serve /metrics (Prometheus) there; default false

    [delivery]
    mode = "collector"         # keep events until the collector's ack watermark covers them;
                               # "broker" (default): until the broker's PUBACK
    resend_after_s = 60        # sent but not acknowledged by the collector: send again
    max_unacked = 500          # at most this many sent and not yet acknowledged
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.contract.broker import BrokerConfig, is_loopback, parse_broker
from edge.contract.ids import DESK_RE, NAME_RE, OPERATOR_RE, OPERATOR_RULE, valid_operator
from edge.contract.timefmt import check_zone, parse_days, parse_hhmm
from edge.contract.toml import MISSING, ConfigError, Table
from edge.contract.topics import topic_root
from edge.kinds import parse_device
from edge.kinds.base import DeviceConfig

__all__ = [
    "Config",
    "DeliveryConfig",
    "DeskConfig",
    "DeviceConfig",
    "GuardsConfig",
    "StoreConfig",
    "SurveyConfig",
    "WebConfig",
    "load_config",
    "parse_config",
]

@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: Path
    max_events: int
    max_bytes: int
    min_free_bytes: int


@dataclass(frozen=True, slots=True)
class DeskConfig:
    name: str
    operator: str | None


@dataclass(frozen=True, slots=True)
class SurveyConfig:
    doctors_file: Path | None
    send_personal_data: bool


@dataclass(frozen=True, slots=True)
class GuardsConfig:
    burst_presses: int  # more than this many presses ...
    burst_window_s: float  # ... within this many seconds at one desk: `burst`
    hours_days: tuple[int, ...] | None  # opening hours; None: always open
    hours_from: str
    hours_to: str
    hours_tz: str
    after_hours: str  # "flag" or "drop"


@dataclass(frozen=True, slots=True)
class WebConfig:
    enabled: bool
    host: str
    port: int
    token: str | None = field(repr=False)
    metrics: bool = False  # /metrics (Prometheus) on the same server, behind the same token


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """When an event may leave the store (mqtt-contract.md, "Delivery to the collector")."""

    mode: str = "broker"  # "broker": on PUBACK; "collector": when the ack watermark covers it
    resend_after_s: float = 60.0  # sent, not covered by the watermark this long: send again
    max_unacked: int = 500  # sent but not yet acknowledged by the collector, at most


@dataclass(frozen=True, slots=True)
class Config:
    site: str
    edge: str
    broker: BrokerConfig
    store: StoreConfig
    desks: dict[str, DeskConfig]
    devices: tuple[DeviceConfig, ...]
    control_socket: Path
    health_interval_s: float
    led_ms: int
    survey: SurveyConfig = SurveyConfig(None, True)
    # badge number (upper-case) -> operator id; badge numbers are personal data
    badges: dict[str, str] = field(default_factory=dict, repr=False)
    max_login_s: float = 10 * 3600
    guards: GuardsConfig = GuardsConfig(5, 10.0, None, "00:00", "00:00", "UTC", "flag")
    web: WebConfig = WebConfig(True, "127.0.0.1", 8480, None)
    source: str = ""
    delivery: DeliveryConfig = DeliveryConfig()
    # The site's zone: how people there read times (status page); by default
    # the opening hours' zone, else UTC.  Events always carry UTC.
    tz: str = "UTC"

    @property
    def topic_root(self) -> str:
        return topic_root(self.site, self.edge)


def parse_config(data: dict[str, Any], source: str = "", base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError on the first mistake."""
    top = Table(data, "", source, base_dir)
    site = top.required_string("site", pattern=NAME_RE,
                               allowed="1 to 32 lower-case letters, digits or '-'")
    edge = top.required_string("edge", pattern=NAME_RE,
                               allowed="1 to 32 lower-case letters, digits or '-'")
    broker_t = top.table("broker")
    if broker_t is None:
        raise ConfigError("broker", MISSING, "required: a [broker] table with at least host",
                          source)
    broker = parse_broker(broker_t, f"feedback-edge-{site}-{edge}")

    store_t = top.table("store") or Table({}, "store", source, base_dir)
    store_path = store_t.path_value("path") or Path("/var/lib/feedback-edge/outbox.sqlite")
    store = StoreConfig(
        path=store_path,
        max_events=store_t.integer("max_events", 500_000, 100, 100_000_000),
        max_bytes=store_t.integer("max_bytes", 500_000_000, 1_000_000, 1 << 40),
        min_free_bytes=store_t.integer("min_free_bytes", 50_000_000, 0, 1 << 40),
    )
    store_t.finish()

    desks: dict[str, DeskConfig] = {}
    desks_t = top.table("desks")
    if desks_t is not None:
        for name in list(desks_t.data):
            if not DESK_RE.match(name):
                raise desks_t.error(name, name, "a desk name: 1 to 64 letters, digits, "
                                    "'_', '.', '-'")
            one = desks_t.table(name)
            assert one is not None  # noqa: S101 - name comes from the table itself
            desks[name] = DeskConfig(name, one.string("operator", default=None,
                                                      pattern=OPERATOR_RE,
                                                      allowed=OPERATOR_RULE))
            one.finish()

    raw_devices = top.get("devices")
    devices: list[DeviceConfig] = []
    if raw_devices is not MISSING:
        if not isinstance(raw_devices, list) or not all(isinstance(d, dict)
                                                        for d in raw_devices):
            raise ConfigError("devices", raw_devices, "must be a list of [[devices]] tables",
                              source)
        for i, raw in enumerate(raw_devices):
            devices.append(parse_device(Table(raw, f"devices[{i}]", source), i, dict(desks)))
    seen: dict[str, int] = {}
    serials: dict[tuple[str, str], int] = {}
    for i, d in enumerate(devices):
        if d.id in seen:
            raise ConfigError(f"devices[{i}].id", d.id,
                              f"must be unique; devices[{seen[d.id]}] has the same id", source)
        seen[d.id] = i
        if d.serial is not None:
            # Two tables naming one unit would both open it: every press stored twice.
            if (d.kind, d.serial) in serials:
                raise ConfigError(f"devices[{i}].serial", d.serial, "must be unique; devices["
                                  f"{serials[d.kind, d.serial]}] is the same {d.kind}", source)
            serials[d.kind, d.serial] = i

    daemon_t = top.table("daemon") or Table({}, "daemon", source, base_dir)
    control = daemon_t.path_value("control_socket") or store.path.parent / "control.sock"
    health_interval = daemon_t.number("health_interval_s", 60.0, 1.0, 3600.0)
    led_ms = daemon_t.integer("led_ms", 1500, 0, 60_000)
    daemon_t.finish()
    survey_t = top.table("survey") or Table({}, "survey", source, base_dir)
    doctors_file = survey_t.path_value("doctors_file")
    if doctors_file is not None and doctors_file.exists():
        # A missing one is the daemon's alarm (and provisioning's refusal).
        _check_doctors(survey_t, doctors_file)
    personal = survey_t.get("send_personal_data")
    if personal is not MISSING and not isinstance(personal, bool):
        raise survey_t.error("send_personal_data", personal, "must be true or false")
    survey_t.finish()
    badges: dict[str, str] = {}
    badges_t = top.table("badges")
    if badges_t is not None:
        for badge, op in badges_t.data.items():
            badges_t.used.add(badge)
            if not re.match(r"^[A-Za-z0-9]{4,32}$", badge):
                raise badges_t.error("(a badge)", "(hidden)", "badge numbers are 4 to 32 "
                                     "letters or digits")
            if not valid_operator(op):
                raise badges_t.error("(a badge)", "(hidden)", f"must map to {OPERATOR_RULE}")
            badges[badge.upper()] = op
    ops_t = top.table("operators") or Table({}, "operators", source, base_dir)
    max_login_h = ops_t.number("max_login_hours", 10.0, 0.25, 24.0)
    ops_t.finish()
    guards = _parse_guards(top.table("guards") or Table({}, "guards", source, base_dir))
    web = _parse_web(top.table("web") or Table({}, "web", source, base_dir))
    delivery = _parse_delivery(top.table("delivery") or Table({}, "delivery", source))
    tz = top.string("tz", default=guards.hours_tz, allowed="an IANA zone like Europe/Berlin")
    try:
        check_zone(str(tz))
    except ValueError as e:
        raise top.error("tz", tz, str(e)) from None
    top.finish()
    return Config(site, edge, broker, store, desks, tuple(devices), control, health_interval,
                  led_ms, SurveyConfig(doctors_file, personal is not False), badges,
                  max_login_h * 3600, guards, web, source, delivery, str(tz))


def _parse_delivery(t: Table) -> DeliveryConfig:
    mode = t.string("mode", default="broker", allowed='"broker" or "collector"')
    if mode not in ("broker", "collector"):
        raise t.error("mode", mode, '"broker" (an event leaves the store on the broker\'s '
                      'PUBACK) or "collector" (when the collector\'s ack watermark covers it)')
    resend = t.number("resend_after_s", 60.0, 5.0, 86400.0)
    unacked = t.integer("max_unacked", 500, 1, 100_000)
    t.finish()
    return DeliveryConfig(str(mode), resend, unacked)


def _parse_web(t: Table) -> WebConfig:
    enabled = t.get("enabled")
    if enabled is not MISSING and not isinstance(enabled, bool):
        raise t.error("enabled", enabled, "must be true or false")
    listen = t.string("listen", default="127.0.0.1:8480",
                      pattern=re.compile(r"^[^\s:]+:\d{1,5}\Z"),
                      allowed="host:port, e.g. 127.0.0.1:8480 or 0.0.0.0:8480")
    assert listen is not None  # noqa: S101 - has a default
    host, port_text = listen.rsplit(":", 1)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise t.error("listen", listen, "the port must be from 0 to 65535")
    token = t.secret_file("token_file")
    if not is_loopback(host) and not token:
        raise t.error("listen", listen, "a page reachable from the LAN needs token_file "
                      "(the page shows who is on duty)")
    metrics = t.get("metrics")
    if metrics is not MISSING and not isinstance(metrics, bool):
        raise t.error("metrics", metrics, "must be true or false")
    if metrics is True and enabled is False:
        raise t.error("metrics", metrics, "needs the status page's server: enabled = true "
                      "(/metrics is served there)")
    t.finish()
    return WebConfig(enabled is not False, host, port, token, metrics is True)


def _parse_guards(t: Table) -> GuardsConfig:
    burst = t.integer("burst_presses", 5, 1, 1000)
    window = t.number("burst_window_s", 10.0, 1.0, 3600.0)
    action = t.string("after_hours", default="flag", allowed='"flag" or "drop"')
    if action not in ("flag", "drop"):
        raise t.error("after_hours", action, '"flag" (keep and mark) or "drop" (count and '
                      "discard)")
    hours = t.table("opening_hours")
    if hours is None:
        t.finish()
        return GuardsConfig(burst, window, None, "00:00", "00:00", "UTC", str(action))
    values: dict[str, str] = {}
    for key in ("days", "from", "to", "tz"):
        v = hours.required_string(key, allowed={"days": "weekdays like mon-sat",
                                                "from": "a local time like 08:00",
                                                "to": "a local time like 20:00",
                                                "tz": "an IANA zone like Europe/Berlin"}[key])
        try:
            if key == "days":
                parse_days(v)
            elif key == "tz":
                check_zone(v)
            else:
                parse_hhmm(v)
        except ValueError as e:
            raise hours.error(key, v, str(e)) from None
        values[key] = v
    hours.finish()
    t.finish()
    return GuardsConfig(burst, window, parse_days(values["days"]), values["from"],
                        values["to"], values["tz"], str(action))


def _check_doctors(t: Table, path: Path) -> None:
    """The doctors file must be what the `doctors` command takes (edge.doctors)."""
    from edge.doctors import validate_doctors  # noqa: PLC0415 - a pure function

    try:
        validate_doctors(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise t.error("doctors_file", str(path), f"is not a usable doctor list: {e}") from None


def load_config(path: Path) -> Config:
    """Read and validate `path`.  Relative file names are relative to the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError("(file)", str(path), f"cannot be read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("(file)", str(path), "must be UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("(syntax)", str(path), f"is not valid TOML: {e}") from None
    return parse_config(data, str(path), path.parent)
