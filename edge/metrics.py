"""Prometheus metrics of the daemon, served as /metrics by the status page's
server when `[web] metrics = true` (edge/web.py).

One custom collector reads the daemon's status snapshot (the one the page and
`feedback-edge status` show) at each scrape: the main loop counts nothing for
Prometheus, so metrics add nothing to the press path, and a daemon without the
option never imports prometheus_client.  The registry is private: nothing
else in the process (a library's global metrics) ends up on the page.

Labels are bounded sets from the code, never what a device or a person sent:
alarm codes, drop reasons, device states, decode error names, and the device
ids the config names (already on the status page).  No phone numbers,
comments, badge numbers, operators or alarm subjects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["DEVICE_STATES", "StatusCollector", "registry"]

# Every state a device row can have (edge/kinds/worker.py, reporting.device_list):
# all four are always exported, so a count that falls to 0 does not vanish.
DEVICE_STATES = ("connected", "missing", "error", "unconfigured")


def _n(value: Any) -> float:
    """A figure of the snapshot as a sample value; None (unknown) as 0."""
    return 0.0 if value is None else float(value)


class StatusCollector(Collector):
    """The daemon's figures from `snapshot()` (a status dict, edge.reporting.status)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot
        # Alarm codes seen raised since start: a cleared one stays, at 0, so an
        # alert on `== 1` resolves instead of losing its series.  Codes are the
        # code's own identifiers, a fixed set.
        self._codes: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        st = self._snapshot()
        up = GaugeMetricFamily("feedback_edge_up", "1 if the daemon's main loop answered "
                               "this scrape; 0 and no other figure if it did not")
        answered = "error" not in st
        up.add_metric([], 1.0 if answered else 0.0)
        yield up
        if answered:
            yield from self._figures(st)

    def _figures(self, st: dict[str, Any]) -> Iterable[Metric]:
        q = st["queue"]
        yield _gauge("feedback_edge_queue_depth", "events stored on the Pi, not yet delivered",
                     q["depth"])
        yield _gauge("feedback_edge_oldest_pending_seconds", "how long the oldest event still "
                     "on the Pi has waited (0 when none)", q["oldest_pending_age_s"])
        yield _gauge("feedback_edge_store_bytes", "size of the store's files", q["store_bytes"])
        yield _gauge("feedback_edge_disk_free_bytes", "free space on the store's file system "
                     "(0 if unknown)", q["disk_free_bytes"])
        drops = CounterMetricFamily("feedback_edge_drops", "events dropped or never stored, "
                                    "by reason", labels=["reason"])
        for reason, n in sorted(st["drops"].items()):
            drops.add_metric([reason], float(n))
        yield drops
        decode = CounterMetricFamily("feedback_edge_decode_errors", "malformed reports or "
                                     "frames from a device, by the decoder's name for them",
                                     labels=["device", "error"])
        states = dict.fromkeys(DEVICE_STATES, 0)
        for dev in st["devices"]:
            states[dev["state"]] = states.get(dev["state"], 0) + 1
            for name, n in sorted((dev.get("decode_errors") or {}).items()):
                decode.add_metric([dev["id"], name], float(n))
        yield decode
        devices = GaugeMetricFamily("feedback_edge_devices", "devices by state (configured "
                                    "ones, and hardware plugged in but not configured)",
                                    labels=["state"])
        for state, n in sorted(states.items()):
            devices.add_metric([state], float(n))
        yield devices
        raised = {a["code"] for a in st["alarm_details"]}
        self._codes |= raised
        alarm = GaugeMetricFamily("feedback_edge_alarm", "1 while an alarm with this code is "
                                  "raised (about anything), 0 once cleared", labels=["code"])
        for code in sorted(self._codes):
            alarm.add_metric([code], 1.0 if code in raised else 0.0)
        yield alarm
        yield _gauge("feedback_edge_alarms", "alarms raised now (one per code and subject)",
                     len(st["alarm_details"]))
        yield _gauge("feedback_edge_broker_connected", "1 while connected to the broker",
                     st["broker"]["state"] == "connected")
        delivery = st["delivery"]
        if delivery["mode"] == "collector":
            # Only in collector delivery: in broker delivery nothing waits for it.
            yield _gauge("feedback_edge_collector_online", "1 while the collector says it "
                         "is online (collector delivery)", delivery["collector_online"])
        yield _gauge("feedback_edge_clock_synced", "1 if the clock is synchronised",
                     st["clock"]["synced"])
        yield _gauge("feedback_edge_uptime_seconds", "seconds since the daemon started",
                     st["uptime_s"])
        yield _counter("feedback_edge_published", "events published (PUBACK or not)",
                       st["published"])
        yield _counter("feedback_edge_delivered", "events acknowledged by the broker",
                       st["delivered"])


def _gauge(name: str, doc: str, value: Any) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=_n(value))


def _counter(name: str, doc: str, value: Any) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=_n(value))


def registry(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A private registry holding only the daemon's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatusCollector(snapshot))
    return reg
