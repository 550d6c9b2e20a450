"""Prometheus metrics: the edge's /metrics on its status page server (`[web]
metrics = true`) and the collector's (`[metrics] listen`), read from real
processes and parsed with prometheus_client's own parser, values not text."""

from __future__ import annotations

import json
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from collector.config import parse_collector_config
from edge.config import parse_config
from edge.contract.toml import ConfigError
from tests.collector_fixtures import Backend, collector_config, press_event, wait_events
from tests.conftest import Broker, Proc, free_port, wait_for
from tests.test_collector import publish_all
from tests.test_config import GOOD
from tests.test_pipeline import Site

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - localhost
            return int(r.status), str(r.headers.get("Content-Type")), bytes(r.read())
    except urllib.error.HTTPError as e:
        return int(e.code), "", b""


def scrape(url: str) -> Samples:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    status, ctype, body = _get(url)
    assert status == 200, (status, body)
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# -- the edge ------------------------------------------------------------------------------

def test_edge_metrics_show_the_queue_the_broker_and_an_alarm(
        tmp_path: Path, broker: Broker, procs: Callable[[list[str], Path], Proc]) -> None:
    site = Site(tmp_path, broker, procs)
    port = free_port()
    site.config.write_text(site.config.read_text()
                           + f'[web]\nlisten = "127.0.0.1:{port}"\nmetrics = true\n')
    # A damaged state file: the `state_unreadable` alarm is raised from the start.
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "doctors.json").write_text("{ not json")
    site.start()
    site.wait_connected()
    url = f"http://127.0.0.1:{port}/metrics"
    m = scrape(url)
    assert value(m, "feedback_edge_up") == 1
    assert value(m, "feedback_edge_broker_connected") == 1
    assert value(m, "feedback_edge_alarm", code="state_unreadable") == 1
    assert value(m, "feedback_edge_alarms") == 1
    assert value(m, "feedback_edge_devices", state="connected") == 1
    assert value(m, "feedback_edge_devices", state="missing") == 0
    assert value(m, "feedback_edge_queue_depth") == 0
    # Broker delivery: nothing waits for the collector, so no such figure.
    assert value(m, "feedback_edge_collector_online") is None
    assert (value(m, "feedback_edge_uptime_seconds") or 0) >= 0
    assert (value(m, "feedback_edge_disk_free_bytes") or 0) > 0
    assert value(m, "feedback_edge_clock_synced") in (0, 1)

    broker.stop()
    wait_for(lambda: value(scrape(url), "feedback_edge_broker_connected") == 0, 15,
             "the broker disconnected in /metrics")
    for button in (0, 1, 2):
        site.press(button)
    m = wait_for(lambda: (s := scrape(url)) and value(s, "feedback_edge_queue_depth") == 3
                 and s, 15, "three presses queued in /metrics")
    assert value(m, "feedback_edge_broker_connected") == 0
    assert (value(m, "feedback_edge_oldest_pending_seconds") or 0) >= 0
    assert (value(m, "feedback_edge_store_bytes") or 0) > 0
    # Equal to what the status page says, figure for figure.
    st = json.loads(_get(f"http://127.0.0.1:{port}/api/status")[2])
    assert st["queue"]["depth"] == 3
    assert value(m, "feedback_edge_alarm", code="state_unreadable") == 1

    broker.start()
    m = wait_for(lambda: (s := scrape(url)) and value(s, "feedback_edge_queue_depth") == 0
                 and s, 20, "the queue delivered after the broker came back")
    assert value(m, "feedback_edge_broker_connected") == 1
    assert (value(m, "feedback_edge_published_total") or 0) >= 3
    assert (value(m, "feedback_edge_uptime_seconds") or 0) > 0
    # No personal data and no alarm subject (the state file's path) in any label.
    labels = {v for (_, ls) in m for _, v in ls}
    assert not any("doctors.json" in v or "/" in v for v in labels), labels


def _status(**over: Any) -> dict[str, Any]:
    """A status snapshot as edge.reporting.status makes it (the parts metrics read)."""
    st: dict[str, Any] = {
        "uptime_s": 12.5, "published": 7, "delivered": 6,
        "broker": {"state": "connected"},
        "queue": {"depth": 2, "oldest_pending_age_s": None, "store_bytes": 4096,
                  "disk_free_bytes": None},
        "drops": {"store_full": 4, "after_hours": 1},
        "devices": [{"id": "fc3-a", "state": "connected", "decode_errors": {"crc": 2}},
                    {"id": "usb-1-1.4", "state": "unconfigured"}],
        "alarm_details": [{"code": "device_lost", "subject": "fc3-a", "text": "...",
                           "since": "2026-01-01T00:00:00Z"}],
        "clock": {"synced": True},
        "delivery": {"mode": "collector", "collector_online": False},
    }
    st.update(over)
    return st


def test_edge_metrics_off_is_404_on_is_behind_the_token_and_reads_the_snapshot() -> None:
    from edge.web import StatusPage

    asked: list[dict[str, Any]] = []
    off = StatusPage("127.0.0.1", 0, lambda box, req: asked.append(req))
    off.start()
    try:
        assert _get(f"http://127.0.0.1:{off.port}/metrics")[0] == 404
        assert asked == []  # not even a snapshot taken
    finally:
        off.stop()

    answers = [_status(), _status(alarm_details=[]), {"error": "no answer"}]
    on = StatusPage("127.0.0.1", 0, lambda box, req: box.put(answers.pop(0)), token="s3cr3t",
                    metrics=True)
    on.start()
    try:
        url = f"http://127.0.0.1:{on.port}/metrics"
        assert _get(url)[0] == 403
        m = scrape(url + "?token=s3cr3t")
        assert value(m, "feedback_edge_drops_total", reason="store_full") == 4
        assert value(m, "feedback_edge_decode_errors_total", device="fc3-a", error="crc") == 2
        assert value(m, "feedback_edge_devices", state="unconfigured") == 1
        assert value(m, "feedback_edge_devices", state="error") == 0
        assert value(m, "feedback_edge_collector_online") == 0
        assert value(m, "feedback_edge_oldest_pending_seconds") == 0  # None: nothing waits
        assert value(m, "feedback_edge_alarm", code="device_lost") == 1
        # Cleared: the series stays, at 0, so an alert on it resolves.
        m = scrape(url + "?token=s3cr3t")
        assert value(m, "feedback_edge_alarm", code="device_lost") == 0
        assert value(m, "feedback_edge_alarms") == 0
        # The main loop did not answer: up 0 and no stale figures.
        m = scrape(url + "?token=s3cr3t")
        assert m == {("feedback_edge_up", ()): 0}
    finally:
        on.stop()


@pytest.mark.parametrize(("web", "key", "says"), [
    ('metrics = "yes"', "web.metrics", "true or false"),
    ("metrics = true\nenabled = false", "web.metrics", "enabled = true"),
])
def test_edge_metrics_config_errors_name_the_key(web: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(tomllib.loads(GOOD + f"\n[web]\n{web}\n"), "edge.toml")
    assert e.value.key == key
    assert says in e.value.allowed


def test_edge_metrics_are_off_by_default_and_on_when_asked() -> None:
    assert parse_config(tomllib.loads(GOOD)).web.metrics is False
    assert parse_config(tomllib.loads(GOOD + "\n[web]\nmetrics = true\n")).web.metrics is True


# -- the collector -------------------------------------------------------------------------

COLLECTOR = 'id = "central-1"\n[broker]\nhost = "127.0.0.1"\n'


@pytest.mark.parametrize(("metrics", "key", "says"), [
    ('listen = "9108"', "metrics.listen", "host:port"),
    ('listen = "localhost:"', "metrics.listen", "host:port"),
    ('listen = "127.0.0.1:99999"', "metrics.listen", "from 0 to 65535"),
    ('listen = "::1:9108"', "metrics.listen", "host:port"),  # IPv6 needs its brackets
    ("listen = 9108", "metrics.listen", "host:port"),
    ("", "metrics.listen", "required"),
    ('listen = "127.0.0.1:9108"\nport = 1', "metrics.port", ""),
])
def test_collector_metrics_config_errors_name_the_key(metrics: str, key: str,
                                                      says: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_collector_config(tomllib.loads(COLLECTOR + f"[metrics]\n{metrics}\n"))
    assert e.value.key == key
    assert says in e.value.allowed


@pytest.mark.parametrize("value", ['"10.0.0.0/8"', '[1]', '["10.0.0.0/33x"]',
                                   '["*.clinic.lan"]', '["bad host"]'])
def test_collector_webhook_allow_errors_name_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_collector_config(tomllib.loads(COLLECTOR + f"[web]\nwebhook_allow = {value}\n"))
    assert e.value.key == "web.webhook_allow"
    assert "networks and host names" in e.value.allowed


def test_collector_webhook_allow_is_parsed() -> None:
    import ipaddress

    web = parse_collector_config(tomllib.loads(
        COLLECTOR + '[web]\nwebhook_allow = ["10.20.0.0/16", "fd00::/8", "192.168.1.7", '
        '"Tickets.Clinic.LAN."]\n')).web
    assert web.webhook_networks == (ipaddress.ip_network("10.20.0.0/16"),
                                    ipaddress.ip_network("fd00::/8"),
                                    ipaddress.ip_network("192.168.1.7/32"))
    assert web.webhook_hosts == ("tickets.clinic.lan",)
    assert parse_collector_config(tomllib.loads(COLLECTOR)).web.webhook_networks == ()


def test_the_alert_kinds_written_out_agree() -> None:
    """Modules that must not load Django (the metrics, the CLI's parser) write the
    rule kinds out; the web form's are checked against the CLI's in
    test_web_alerts.py."""
    from collector import metrics
    from collector.web.alerts import cli as alerts_cli

    assert metrics._ALERT_KINDS == alerts_cli.KINDS


def test_collector_metrics_listen_is_parsed() -> None:
    assert parse_collector_config(tomllib.loads(COLLECTOR)).metrics is None
    cfg = parse_collector_config(tomllib.loads(COLLECTOR + '[metrics]\nlisten = "[::1]:9108"\n'))
    assert cfg.metrics is not None
    assert (cfg.metrics.host, cfg.metrics.port) == ("::1", 9108)


def test_collector_metrics_count_events_quarantine_and_watermarks(
        tmp_path: Path, broker: Broker, backend: Backend,
        procs: Callable[[list[str], Path], Proc]) -> None:
    port = free_port()
    cfg = collector_config(tmp_path / "central-1.toml", broker, backend,
                           extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    proc = procs(["collector.cli", "run", "--config", str(cfg)], tmp_path / "central-1.log")
    url = f"http://127.0.0.1:{port}/metrics"
    m = wait_for(lambda: _try_scrape(url, proc), 20, "the collector's /metrics")
    assert value(m, "feedback_collector_database_up") == 1
    assert value(m, "feedback_collector_events_stored_total", kind="press") is None
    # Every quarantine reason is there from the start, at 0.
    for reason in ("json", "schema", "size", "invalid", "topic", "store"):
        assert value(m, "feedback_collector_quarantined_total", reason=reason) == 0
    assert _get(f"http://127.0.0.1:{port}/")[0] == 404  # only /metrics

    n = 25
    events = [press_event(seq) for seq in range(1, n + 1)]
    other = [press_event(seq, edge="reception-2") for seq in (1, 2, 4)]  # seq 3 missing
    poison = ("feedback/v1/clinic-3/reception-1/event/fc3-a", b"{ not json")
    publish_all(broker, [*events, poison, *other])
    wait_events(backend, n + 3)
    m = wait_for(lambda: (s := scrape(url)) and value(
        s, "feedback_collector_messages_total", kind="quarantine") == 1 and s, 20,
        "the batch counted")
    assert value(m, "feedback_collector_events_stored_total", kind="press") == n + 3
    assert value(m, "feedback_collector_events_received_total", kind="press") == n + 3
    assert value(m, "feedback_collector_quarantined_total", reason="json") == 1
    assert sum(v for (name, _), v in m.items()
               if name == "feedback_collector_quarantined_total") == 1
    assert value(m, "feedback_collector_duplicates_total") == 0
    assert (value(m, "feedback_collector_batches_total") or 0) >= 1
    assert value(m, "feedback_collector_batch_commit_seconds_count") == \
        value(m, "feedback_collector_batches_total")
    edge1 = {"site": "clinic-3", "edge": "reception-1"}
    edge2 = {"site": "clinic-3", "edge": "reception-2"}
    db = backend.open()
    try:
        marks = {(str(s), str(e)): (int(w), int(x)) for s, e, w, x in db.query(
            "SELECT site, edge, watermark, max_seq FROM edges")}
    finally:
        db.close()
    assert marks == {("clinic-3", "reception-1"): (n, n), ("clinic-3", "reception-2"): (2, 4)}
    assert value(m, "feedback_collector_watermark", **edge1) == n
    assert value(m, "feedback_collector_watermark_lag", **edge1) == 0
    assert value(m, "feedback_collector_watermark", **edge2) == 2
    assert value(m, "feedback_collector_max_seq", **edge2) == 4
    assert value(m, "feedback_collector_watermark_lag", **edge2) == 2
    # No presence message yet from either edge.
    assert value(m, "feedback_collector_edges", state="unknown") == 2
    # The web app's alert tables are not in this database: no such figure.
    assert value(m, "feedback_collector_alerts_open") is None

    # The same events again: duplicates, counted once each; nothing stored.
    publish_all(broker, events[:5])
    m = wait_for(lambda: (s := scrape(url)) and value(
        s, "feedback_collector_duplicates_total") == 5 and s, 20, "five duplicates")
    assert value(m, "feedback_collector_events_stored_total", kind="press") == n + 3
    assert value(m, "feedback_collector_events_received_total", kind="press") == n + 3 + 5


def _try_scrape(url: str, proc: Proc) -> Samples | None:
    assert proc.proc is not None
    assert proc.proc.poll() is None, proc.log()
    try:
        return scrape(url)
    except (OSError, AssertionError):
        return None
