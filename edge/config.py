"""The daemon's configuration: one TOML file, `edge.toml`.

Every mistake is reported as a `ConfigError` naming the key, the value found
and what is allowed, so an installer can fix the file without reading code.
Unknown keys are errors too (with a "did you mean" hint): a misspelt key that
is silently ignored is how a site ends up on the wrong broker.

Example::

    site = "clinic-3"
    edge = "reception-1"

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

    [delivery]
    mode = "collector"         # keep events until the collector's ack watermark covers them;
                               # "broker" (default): until the broker's PUBACK
    resend_after_s = 60        # sent but not acknowledged by the collector: send again
    max_unacked = 500          # at most this many sent and not yet acknowledged
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = [
    "BrokerConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DeskConfig",
    "DeviceConfig",
    "GuardsConfig",
    "StoreConfig",
    "SurveyConfig",
    "Table",
    "TlsConfig",
    "WebConfig",
    "is_loopback",
    "load_config",
    "parse_broker",
    "parse_config",
]

NAME_RE: Final = re.compile(r"^[a-z0-9-]{1,32}$")
SERIAL_RE: Final = re.compile(r"^[0-9A-F]{12}$")
DESK_RE: Final = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEVICE_KINDS: Final = ("console", "terminal", "keyboard", "badge")
_USB_PORT: Final = re.compile(r"^\d+-[\d.]+$")
_USAGE: Final = re.compile(r"^0x[0-9a-fA-F]{2}$")
CONSOLE_VID: Final = 0x1209
CONSOLE_PID: Final = 0xFB02


class ConfigError(ValueError):
    """A mistake in the configuration, phrased for the person who wrote it."""

    def __init__(self, key: str, value: object, allowed: str, source: str = "") -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        self.source = source
        shown = "(missing)" if value is _MISSING else repr(value)
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key} = {shown}: {allowed}")


class _Missing:
    def __repr__(self) -> str:
        return "(missing)"


_MISSING: Final = _Missing()


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
class DeviceConfig:
    id: str
    kind: str
    desk: str
    serial: str | None
    transport: str
    socket: Path | None
    vid: int
    pid: int
    labels: tuple[str, ...] | None
    scores: tuple[int | None, ...] | None
    port: Path | None = None
    usb_port: str | None = None
    # keyboard: HID usage -> (label, score)
    keys: tuple[tuple[int, str, int | None], ...] = ()


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

    @property
    def topic_root(self) -> str:
        return f"feedback/v1/{self.site}/{self.edge}"


class Table:
    """Reads one TOML table, remembering which keys were used."""

    def __init__(self, data: dict[str, Any], path: str, source: str,
                 base_dir: Path | None = None) -> None:
        self.data = data
        self.path = path
        self.source = source
        # Relative file names are relative to the config file, so one site
        # folder (edge.toml and the files it names) validates on the
        # installer's laptop and works unchanged in /etc/feedback-edge.
        self.base_dir = base_dir
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, value: object, allowed: str) -> ConfigError:
        return ConfigError(self.key(name), value, allowed, self.source)

    def get(self, name: str) -> object:
        self.used.add(name)
        return self.data.get(name, _MISSING)

    def string(self, name: str, *, default: str | _Missing | None = _MISSING,
               pattern: re.Pattern[str] | None = None, allowed: str = "") -> str | None:
        value = self.get(name)
        if value is _MISSING:
            if isinstance(default, _Missing):
                raise self.error(name, value, f"required; {allowed or 'a string'}")
            return default
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise self.error(name, value, allowed or "must be a string")
        return value

    def required_string(self, name: str, *, pattern: re.Pattern[str] | None = None,
                        allowed: str = "") -> str:
        value = self.string(name, pattern=pattern, allowed=allowed)
        assert value is not None  # noqa: S101 - string() raises when a required key is missing
        return value

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.get(name)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(name, value, f"must be an integer from {low} to {high}")
        return value

    def number(self, name: str, default: float, low: float, high: float) -> float:
        value = self.get(name)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not low <= value <= high:
            raise self.error(name, value, f"must be a number from {low} to {high}")
        return float(value)

    def path_value(self, name: str, *, must_exist: bool = False) -> Path | None:
        value = self.string(name, default=None, allowed="must be a file path (a string)")
        if value is None:
            return None
        if not value:
            raise self.error(name, value, "must be a non-empty file path")
        p = Path(value)
        if self.base_dir is not None and not p.is_absolute():
            p = self.base_dir / p
        if must_exist and not p.is_file():
            raise self.error(name, value, "must name an existing, readable file")
        return p

    def table(self, name: str) -> Table | None:
        value = self.get(name)
        if value is _MISSING:
            return None
        if not isinstance(value, dict):
            raise self.error(name, value, "must be a table ([" + self.key(name) + "])")
        return Table(value, self.key(name), self.source, self.base_dir)

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                hint = difflib.get_close_matches(name, sorted(self.used), n=1)
                allowed = f"unknown key; did you mean {hint[0]!r}?" if hint else \
                    f"unknown key; allowed here: {', '.join(sorted(self.used))}"
                raise self.error(name, self.data[name], allowed)


def is_loopback(host: str) -> bool:
    """localhost or a loopback IP address (plain TCP and an open status page are fine there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_broker(t: Table, default_client_id: str) -> BrokerConfig:
    """A [broker] table (shared with the collector's config)."""
    host = t.required_string("host", allowed="a host name or IP address")
    port = t.integer("port", 1883, 1, 65535)
    client_id = t.string("client_id", default=default_client_id,
                         pattern=re.compile(r"^[A-Za-z0-9_.-]{1,64}$"),
                         allowed="1 to 64 letters, digits, '_', '.', '-'")
    keepalive = t.integer("keepalive_s", 30, 5, 600)
    username = t.string("username", default=None)
    password = t.string("password", default=None)
    password_file = t.path_value("password_file", must_exist=True)
    if password is not None and password_file is not None:
        raise t.error("password", "***", "give either password or password_file, not both")
    if password_file is not None:
        password = password_file.read_text(encoding="utf-8").strip()
    if password is not None and username is None:
        raise t.error("username", _MISSING, "required when a password is given")
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
        tls_table.finish()
    plaintext_ok = t.get("allow_plaintext")
    if plaintext_ok is not _MISSING and not isinstance(plaintext_ok, bool):
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


def _parse_labels(t: Table) -> tuple[tuple[str, ...] | None, tuple[int | None, ...] | None]:
    labels = t.get("labels")
    scores = t.get("scores")
    if labels is _MISSING:
        if scores is not _MISSING:
            raise t.error("scores", scores, "needs labels (one score per label)")
        return None, None
    if not isinstance(labels, list) or not 1 <= len(labels) <= 16 or not all(
            isinstance(x, str) and re.match(r"^[a-z0-9_-]{1,32}$", x) for x in labels):
        raise t.error("labels", labels,
                      "must be a list of 1 to 16 labels like \"good\" ([a-z0-9_-], 1-32 chars)")
    if scores is _MISSING:
        return tuple(labels), None
    if not isinstance(scores, list) or len(scores) != len(labels) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in scores):
        raise t.error("scores", scores, f"must be a list of {len(labels)} integers, "
                      "one per label")
    return tuple(labels), tuple(scores)


def _parse_terminal(t: Table, index: int, desk: str) -> DeviceConfig:
    serial = t.string("serial", default=None, pattern=SERIAL_RE,
                      allowed="12 upper-case hex digits, as printed on the label")
    port = t.path_value("port")
    if serial is None and port is None:
        raise t.error("port", _MISSING, "give serial (found under /dev/serial/by-id) or port "
                      "(e.g. /dev/ttyUSB0 for an RS-232 unit), or both")
    default_id = f"st3-{serial.lower()}" if serial else f"terminal-{index + 1}"
    dev_id = t.string("id", default=default_id, pattern=NAME_RE,
                      allowed="1 to 32 lower-case letters, digits or '-'")
    t.finish()
    return DeviceConfig(str(dev_id), "terminal", desk, serial, "serial", None, 0x1209, 0xFB30,
                        None, None, port)


def _parse_keyboard(t: Table, index: int, desk: str, kind: str) -> DeviceConfig:
    vid = t.integer("vid", -1, 0, 0xFFFF)
    pid = t.integer("pid", -1, 0, 0xFFFF)
    if vid < 0 or pid < 0:
        raise t.error("vid" if vid < 0 else "pid", _MISSING,
                      "required for keyboard-class devices (`feedback-edge devices` shows it)")
    serial = t.string("serial", default=None, pattern=re.compile(r"^[ -~]{1,64}$"),
                      allowed="the USB serial number as `feedback-edge devices` shows it")
    usb_port = t.string("usb_port", default=None, pattern=_USB_PORT,
                        allowed="a USB port path like 1-1.4 (`feedback-edge devices`)")
    keys: list[tuple[int, str, int | None]] = []
    raw_keys = t.table("keys")
    if kind == "keyboard":
        if raw_keys is None or not raw_keys.data:
            raise t.error("keys", _MISSING, 'required for buttons: e.g. keys = { "0x1e" = '
                          '["good", 1], "0x1f" = ["neutral", 0], "0x20" = ["bad", -1] }')
        for usage, spec in raw_keys.data.items():
            raw_keys.used.add(usage)
            if not _USAGE.match(usage):
                raise raw_keys.error(usage, spec, "keys are HID usages like \"0x1e\"")
            if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str)
                    and re.match(r"^[a-z0-9_-]{1,32}$", spec[0])
                    and (spec[1] is None or (isinstance(spec[1], int)
                                             and not isinstance(spec[1], bool)))):
                raise raw_keys.error(usage, spec, 'must be ["label", score], e.g. ["good", 1]')
            keys.append((int(usage, 16), spec[0], spec[1]))
    elif raw_keys is not None:
        raise t.error("keys", raw_keys.data, "only for kind = \"keyboard\"")
    prefix = "kbd" if kind == "keyboard" else "badge"
    default_id = f"{prefix}-{(serial or usb_port or str(index + 1)).lower()}"
    default_id = re.sub(r"[^a-z0-9-]", "-", default_id)[:32]
    dev_id = t.string("id", default=default_id, pattern=NAME_RE,
                      allowed="1 to 32 lower-case letters, digits or '-'")
    t.finish()
    return DeviceConfig(str(dev_id), kind, desk, serial, "hidraw", None, vid, pid, None, None,
                        None, usb_port, tuple(keys))


def _parse_device(t: Table, index: int, desks: dict[str, DeskConfig]) -> DeviceConfig:
    kind = t.required_string("kind", allowed=f"one of {', '.join(DEVICE_KINDS)}")
    if kind not in DEVICE_KINDS:
        raise t.error("kind", kind, f"must be one of {', '.join(DEVICE_KINDS)}")
    desk = t.required_string("desk", pattern=DESK_RE,
                             allowed="a desk name: 1 to 64 letters, digits, '_', '.', '-'")
    if desks and desk not in desks:
        raise t.error("desk", desk, f"must be one of the [desks] tables: {', '.join(desks)}")
    if kind == "terminal":
        return _parse_terminal(t, index, desk)
    if kind in ("keyboard", "badge"):
        return _parse_keyboard(t, index, desk, kind)
    transport = t.string("transport", default="hid", allowed="\"hid\" or \"socket\"")
    if transport not in ("hid", "socket"):
        raise t.error("transport", transport, "must be \"hid\" or \"socket\" (a simulator)")
    serial = t.string("serial", default=None, pattern=SERIAL_RE,
                      allowed="12 upper-case hex digits, as printed on the label")
    if transport == "hid" and serial is None:
        raise t.error("serial", _MISSING, "required for a USB console: 12 upper-case hex "
                      "digits, as printed on the label (`feedback-edge devices` lists them)")
    sock = t.path_value("socket")
    if transport == "socket" and sock is None:
        raise t.error("socket", _MISSING, "required when transport = \"socket\"")
    if transport == "hid" and sock is not None:
        raise t.error("socket", str(sock), "only allowed with transport = \"socket\"")
    vid = t.integer("vid", CONSOLE_VID, 0, 0xFFFF)
    pid = t.integer("pid", CONSOLE_PID, 0, 0xFFFF)
    labels, scores = _parse_labels(t)
    default_id = f"fc3-{serial.lower()}" if serial else f"console-{index + 1}"
    dev_id = t.string("id", default=default_id, pattern=NAME_RE,
                      allowed="1 to 32 lower-case letters, digits or '-'")
    t.finish()
    return DeviceConfig(str(dev_id), kind, desk, serial, str(transport), sock, vid, pid,
                        labels, scores)


def parse_config(data: dict[str, Any], source: str = "", base_dir: Path | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError on the first mistake."""
    top = Table(data, "", source, base_dir)
    site = top.required_string("site", pattern=NAME_RE,
                               allowed="1 to 32 lower-case letters, digits or '-'")
    edge = top.required_string("edge", pattern=NAME_RE,
                               allowed="1 to 32 lower-case letters, digits or '-'")
    broker_t = top.table("broker")
    if broker_t is None:
        raise ConfigError("broker", _MISSING, "required: a [broker] table with at least host",
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
                                                      pattern=re.compile(r"^.{1,64}$")))
            one.finish()

    raw_devices = top.get("devices")
    devices: list[DeviceConfig] = []
    if raw_devices is not _MISSING:
        if not isinstance(raw_devices, list) or not all(isinstance(d, dict)
                                                        for d in raw_devices):
            raise ConfigError("devices", raw_devices, "must be a list of [[devices]] tables",
                              source)
        for i, raw in enumerate(raw_devices):
            devices.append(_parse_device(Table(raw, f"devices[{i}]", source), i, desks))
    seen: dict[str, int] = {}
    for i, d in enumerate(devices):
        if d.id in seen:
            raise ConfigError(f"devices[{i}].id", d.id,
                              f"must be unique; devices[{seen[d.id]}] has the same id", source)
        seen[d.id] = i

    daemon_t = top.table("daemon") or Table({}, "daemon", source, base_dir)
    control = daemon_t.path_value("control_socket") or store.path.parent / "control.sock"
    health_interval = daemon_t.number("health_interval_s", 60.0, 1.0, 3600.0)
    led_ms = daemon_t.integer("led_ms", 1500, 0, 60_000)
    daemon_t.finish()
    survey_t = top.table("survey") or Table({}, "survey", source, base_dir)
    doctors_file = survey_t.path_value("doctors_file")
    personal = survey_t.get("send_personal_data")
    if personal is not _MISSING and not isinstance(personal, bool):
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
            if not isinstance(op, str) or not 1 <= len(op) <= 64:
                raise badges_t.error("(a badge)", "(hidden)", "must map to an operator id "
                                     "string of 1 to 64 characters")
            badges[badge.upper()] = op
    ops_t = top.table("operators") or Table({}, "operators", source, base_dir)
    max_login_h = ops_t.number("max_login_hours", 10.0, 0.25, 24.0)
    ops_t.finish()
    guards = _parse_guards(top.table("guards") or Table({}, "guards", source, base_dir))
    web = _parse_web(top.table("web") or Table({}, "web", source, base_dir))
    delivery = _parse_delivery(top.table("delivery") or Table({}, "delivery", source))
    top.finish()
    return Config(site, edge, broker, store, desks, tuple(devices), control, health_interval,
                  led_ms, SurveyConfig(doctors_file, personal is not False), badges,
                  max_login_h * 3600, guards, web, source, delivery)


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
    if enabled is not _MISSING and not isinstance(enabled, bool):
        raise t.error("enabled", enabled, "must be true or false")
    listen = t.string("listen", default="127.0.0.1:8480",
                      pattern=re.compile(r"^[^\s:]+:\d{1,5}$"),
                      allowed="host:port, e.g. 127.0.0.1:8480 or 0.0.0.0:8480")
    assert listen is not None  # noqa: S101 - has a default
    host, port_text = listen.rsplit(":", 1)
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise t.error("listen", listen, "the port must be from 0 to 65535")
    token_file = t.path_value("token_file", must_exist=True)
    token = token_file.read_text(encoding="utf-8").strip() if token_file else None
    if not is_loopback(host) and not token:
        raise t.error("listen", listen, "a page reachable from the LAN needs token_file "
                      "(the page shows who is on duty)")
    t.finish()
    return WebConfig(enabled is not False, host, port, token)


def _parse_guards(t: Table) -> GuardsConfig:
    from edge.operators import check_zone, parse_days, parse_hhmm  # noqa: PLC0415

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
