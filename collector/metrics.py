"""Prometheus metrics of `feedback-collector run`, at /metrics when collector.toml
has `[metrics] listen = "host:port"`.

Two sources, so that intake's per-message path gains nothing:

- This instance's intake, told once per committed batch (`Intake.observer`):
  batches and their commit time, messages by kind, valid events by event kind
  (duplicates included), events stored (new rows), and its database errors.
  These are per process and start at 0, as Prometheus counters do.
- The database, read at each scrape: what intake already counts there
  (`counters`: quarantined by reason, duplicates, for the whole database and
  every instance since it was created, so with several instances take max(),
  not sum()), each edge's watermark, highest seq and their lag, edges by their
  last presence state, and, when the web app's alert tables exist (after
  `feedback-collector web migrate`), open alerts by rule kind and alert
  messages by delivery state.

Label values are bounded: kinds and reasons are the code's own words (a
quarantine reason's first word: `json`, `schema`, `size`, `invalid`,
`topic`, `store`), sites and edges those stored (bounded by the fleet, names
checked against the contract's grammar).  Nothing from a payload's free text.

It is served by prometheus_client's WSGI app on wsgiref, a thread per
connection (at most `MAX_CLIENTS`, `MAX_PER_ADDRESS` from one address, each
for at most `CONNECTION_S`): a client that sends a byte now and then holds its
own thread only.  Figures from the database are read one scrape at a time on
one thread with the scrape side's own connection (intake's belongs to
intake's thread); a scrape that waits `READ_S` for them says the database is
down.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import queue
import socket
import socketserver
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from collector import store
from collector.db import Database, DatabaseError, open_database
from collector.store import IngestResult, Item
from edge.contract.ids import NAME_RE

if TYPE_CHECKING:
    from collector.config import CollectorConfig
    from collector.intake import Intake

__all__ = ["BatchMetrics", "DatabaseCollector", "serve"]

log = logging.getLogger(__name__)

# Item kinds (collector.store.Item): every one is exported from the start.
_ITEM_KINDS = ("event", "status", "devices", "health", "timesync", "quarantine")
# Commit times of a batch: a few ms for SQLite's 500 events, up to seconds on a
# loaded PostgreSQL.
_COMMIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
# Quarantine reasons' first words (collector/intake.py, collector/store.py).
_QUARANTINE_REASONS = ("json", "schema", "size", "invalid", "topic", "store")
# Alert rule kinds and delivery states as the web app's models name them
# (collector/web/alerts/models.py: Kind, State); every one is exported, at 0
# when none, so that a rule on a series sees it resolve.
_ALERT_KINDS = ("negative", "offline", "health", "silence", "callback", "loyalty", "doctor")
_DELIVERY_STATES = ("pending", "sent", "failed")


class BatchMetrics:
    """`Intake.observer`: counts per committed batch, into `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter("feedback_collector_batches", "batches committed by this "
                               "instance", registry=registry)
        self.commit = Histogram("feedback_collector_batch_commit_seconds", "time to commit "
                                "one batch (its successful attempt)", buckets=_COMMIT_BUCKETS,
                                registry=registry)
        self.messages = Counter("feedback_collector_messages", "messages this instance "
                                "committed, by kind (quarantine: kept aside)", ["kind"],
                                registry=registry)
        self.received = Counter("feedback_collector_events_received", "schema-valid events "
                                "this instance committed, by event kind, duplicates "
                                "included", ["kind"], registry=registry)
        self.stored = Counter("feedback_collector_events_stored", "events this instance "
                              "stored (new rows; duplicates not), by event kind", ["kind"],
                              registry=registry)
        for kind in _ITEM_KINDS:
            self.messages.labels(kind)

    def batch(self, items: Sequence[Item], res: IngestResult, commit_s: float) -> None:
        self.batches.inc()
        self.commit.observe(commit_s)
        for kind, n in collections.Counter(it.kind for it in items).items():
            self.messages.labels(kind).inc(n)
        # classify let only schema-valid events through: their kind is the schema's enum.
        for kind, n in collections.Counter(it.body["kind"] for it in items
                                           if it.kind == "event").items():
            self.received.labels(kind).inc(n)
        for kind, n in res.stored_kinds.items():
            self.stored.labels(kind).inc(n)


class DatabaseCollector(Collector):
    """What the database says, at each scrape; intake's database errors too."""

    def __init__(self, open_db: Callable[[], Database], intake: Intake) -> None:
        self._open = open_db
        self._db: Database | None = None
        self._intake = intake
        # Scrapes come on threads of their own; the database connection (SQLite's
        # is bound to its thread) is used on this one daemon thread, a scrape at a
        # time; a scrape waits for it READ_S at most (a hung database: up 0).
        self._reads: queue.Queue[concurrent.futures.Future[list[Metric]]] = queue.Queue()
        threading.Thread(target=self._reader, name="metrics-db", daemon=True).start()

    def _reader(self) -> None:
        while True:
            job = self._reads.get()
            if not job.set_running_or_notify_cancel():
                continue  # its scrape gave up waiting
            try:
                if self._db is None:
                    self._db = self._open()
                job.set_result(list(self._figures(self._db)))
            except BaseException as e:  # noqa: BLE001 - handed to the scrape waiting for it
                job.set_exception(e)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("feedback_collector_database_errors", "database outages "
                                  "this instance's intake met (each holds a batch back)",
                                  value=self._intake.db_errors)
        up = GaugeMetricFamily("feedback_collector_database_up", "1 if this scrape could read "
                               "the database; 0 and no figure from it if not")
        job: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()
        self._reads.put(job)
        try:
            figures = job.result(timeout=READ_S)
        except (DatabaseError, concurrent.futures.TimeoutError) as e:
            job.cancel()
            log.warning("metrics: the database cannot be read: %s",
                        e if isinstance(e, DatabaseError) else f"no answer in {READ_S:.0f} s")
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield from figures

    def _figures(self, db: Database) -> Iterable[Metric]:
        counts = store.counters(db)
        quarantined = CounterMetricFamily(
            "feedback_collector_quarantined", "messages quarantined, by the reason's first word "
            "(whole database, every instance)", labels=["reason"])
        # Every reason from the start, at 0: increase() and rules on a series need
        # it before the first quarantine.
        reasons = dict.fromkeys(_QUARANTINE_REASONS, 0)
        for name, n in counts.items():
            if name.startswith("quarantined:"):
                reasons[name.partition(":")[2]] = int(n)
        for reason, n in sorted(reasons.items()):
            quarantined.add_metric([reason], float(n))
        yield quarantined
        yield CounterMetricFamily("feedback_collector_duplicates", "messages already stored "
                                  "that came again (whole database, every instance)",
                                  value=counts.get("duplicates", 0))
        labels = ["site", "edge"]
        mark = GaugeMetricFamily("feedback_collector_watermark", "each edge's watermark: every "
                                 "seq up to it is stored or declared dropped", labels=labels)
        top = GaugeMetricFamily("feedback_collector_max_seq", "the highest seq stored of each "
                                "edge", labels=labels)
        lag = GaugeMetricFamily("feedback_collector_watermark_lag", "max_seq - watermark: seqs "
                                "above the watermark not yet stored (a gap while > 0)",
                                labels=labels)
        online = GaugeMetricFamily("feedback_collector_edge_online", "1 if the edge's last "
                                   "presence message said online", labels=labels)
        states = dict.fromkeys(("online", "offline", "unknown"), 0)
        for site, edge, wm, mx, state in db.query(
                "SELECT site, edge, watermark, max_seq, state FROM edges ORDER BY site, edge"):
            if not (NAME_RE.match(str(site)) and NAME_RE.match(str(edge))):
                continue  # a row from before quarantines stopped creating edges
            key = [str(site), str(edge)]
            mark.add_metric(key, float(wm))
            top.add_metric(key, float(mx))
            lag.add_metric(key, float(max(0, int(mx) - int(wm))))
            online.add_metric(key, 1.0 if state == "online" else 0.0)
            states[state if state in ("online", "offline") else "unknown"] += 1
        yield from (mark, top, lag, online)
        edges = GaugeMetricFamily("feedback_collector_edges", "edges by their last presence "
                                  "state (unknown: none received yet)", labels=["state"])
        for state, n in states.items():
            edges.add_metric([state], float(n))
        yield edges
        if _has_table(db, "alerts_episode"):
            yield from _alert_figures(db)


def _has_table(db: Database, table: str) -> bool:
    if db.dialect == "sqlite":
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    else:
        sql = ("SELECT 1 FROM information_schema.tables WHERE table_schema = "
               "current_schema() AND table_name = ?")
    return bool(db.query(sql, (table,)))


def _alert_figures(db: Database) -> Iterable[Metric]:
    """The web app's alerts (collector/web/alerts/models.py): an episode is open
    while raised (`opened_at`) and not resolved."""
    open_ = GaugeMetricFamily("feedback_collector_alerts_open", "alerts raised and not yet "
                              "resolved, by rule kind", labels=["kind"])
    counts = dict.fromkeys(_ALERT_KINDS, 0)
    for kind, n in db.query(
            "SELECT r.kind, count(*) FROM alerts_episode e JOIN alerts_rule r ON "
            "r.id = e.rule_id WHERE e.opened_at IS NOT NULL AND e.resolved_at IS NULL "
            "GROUP BY r.kind"):
        if kind in counts:
            counts[kind] = int(n)
    for kind, n in counts.items():
        open_.add_metric([kind], float(n))
    yield open_
    messages = GaugeMetricFamily("feedback_collector_alert_messages", "alert messages (one "
                                 "per alert, kind and channel) by delivery state; failed: "
                                 "given up after every try", labels=["state"])
    states = dict.fromkeys(_DELIVERY_STATES, 0)
    for state, n in db.query("SELECT state, count(*) FROM alerts_delivery GROUP BY state"):
        if state in states:
            states[state] = int(n)
    for state, n in states.items():
        messages.add_metric([state], float(n))
    yield messages


# Clients served at once, and from one address (a few slow clients from one
# place cannot take every slot from Prometheus'), and the longest a connection
# may last, however slowly it sends (the socket timeout is per read).
MAX_CLIENTS = 8
MAX_PER_ADDRESS = 2
CONNECTION_S = 15.0
# The longest a scrape waits for the database's figures.
READ_S = 10.0


class _Quiet(WSGIRequestHandler):
    # A client that connects and never sends gives up its thread after this long.
    timeout = 10

    def setup(self) -> None:
        super().setup()
        # Shut down, not closed: the handler's thread then fails its read at once.
        self._deadline = threading.Timer(CONNECTION_S, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        log.debug("metrics: %s", format % args)


def _only_metrics(app: WSGIApplication) -> WSGIApplication:
    """prometheus_client's app answers on every path; /metrics is the one documented."""
    def wrapped(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: the metrics are at /metrics\n"]
        return app(environ, start_response)

    return wrapped


def serve(cfg: CollectorConfig, intake: Intake) -> WSGIServer | None:
    """Count `intake`'s batches and serve /metrics on a daemon thread; None (logged)
    if the address cannot be bound: intake matters more than its metrics."""
    assert cfg.metrics is not None  # noqa: S101 - the caller checks [metrics]
    registry = CollectorRegistry(auto_describe=False)
    batches = BatchMetrics(registry)
    registry.register(DatabaseCollector(lambda: open_database(cfg.db_path, cfg.dsn), intake))
    host, port = cfg.metrics.host, cfg.metrics.port

    class Server(socketserver.ThreadingMixIn, WSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True
        _lock = threading.Lock()
        _clients: ClassVar[collections.Counter[str]] = collections.Counter()  # this server's only

        def process_request(self, request: Any, client_address: Any) -> None:
            address = str(client_address[0])
            with self._lock:
                full = (sum(self._clients.values()) >= MAX_CLIENTS
                        or self._clients[address] >= MAX_PER_ADDRESS)
                if not full:
                    self._clients[address] += 1
            if full:
                self.shutdown_request(request)  # as many clients as it serves already
                return
            super().process_request(request, client_address)

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                with self._lock:
                    self._clients[str(client_address[0])] -= 1

    app = _only_metrics(cast(WSGIApplication, make_wsgi_app(registry)))
    try:
        server = make_server(host, port, app, server_class=Server, handler_class=_Quiet)
    except OSError as e:
        log.error("metrics: cannot listen on %s:%d (%s); running without /metrics", host, port,
                  e.strerror or e)
        return None
    intake.observer = batches
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info("metrics: http://%s:%d/metrics", f"[{host}]" if ":" in host else host,
             server.server_port)
    return server
