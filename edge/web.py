"""The installer's status page: devices, desks, live presses, queue, broker, clock.

A small HTTP server (stdlib) on 127.0.0.1 by default.  Bound to another
address it requires a token (from a file; `?token=` on the page URL, which
the page passes on to its API calls), since the page shows who is on duty.
It never shows personal data: no phone numbers, comments or badge numbers;
answers show only the doctor and the Q1 answer.

The page polls /api/status once a second; the handler asks the daemon's main
loop for the snapshot, like the control socket does.  With `metrics=True`
/metrics serves the same snapshot in Prometheus' text format (edge/metrics.py),
behind the same token.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from edge.contract.broker import is_loopback

__all__ = ["StatusPage"]

log = logging.getLogger(__name__)

Ask = Callable[[queue.SimpleQueue[dict[str, Any]], dict[str, Any]], None]

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Feedback edge status</title>
<style>
 body { font: 15px/1.4 system-ui, sans-serif; margin: 1em; color: #222; }
 h1 { font-size: 1.3em; margin: 0 0 .3em; } h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
 .scroll { overflow-x: auto; }
 table { border-collapse: collapse; width: 100%; }
 td, th { text-align: left; padding: .25em .5em; border-bottom: 1px solid #ddd;
          vertical-align: top; }
 .ok { color: #0a7d32; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
 .muted { color: #777; } #presses tr:first-child { background: #fff7c2; }
 .cards { display: flex; flex-wrap: wrap; gap: .6em; }
 .card { border: 1px solid #ddd; border-radius: 6px; padding: .5em .8em; min-width: 10em;
         flex: 1 1 10em; }
 #verdict { padding: .6em .8em; border-radius: 6px; margin: .4em 0 .8em; font-weight: 600; }
 #verdict.ok { background: #e3f5e9; } #verdict.bad { background: #fde7e5; }
 #alarmlist { margin: .3em 0 0; padding-left: 1.2em; } #alarmlist li { margin: .2em 0; }
 .flag { display: inline-block; font-size: .8em; padding: 0 .35em; margin: 0 .2em .1em 0;
         border: 1px solid #bbb; border-radius: 4px; color: #555; }
 @media (max-width: 480px) {
   body { margin: .6em; font-size: 14px; } .card { min-width: 8em; }
   .wide { display: none; }
 }
</style></head>
<body>
<h1>Feedback edge <span id="ident" class="muted"></span></h1>
<div id="verdict">...</div>
<ul id="alarmlist"></ul>
<div class="cards">
 <div class="card">Broker<br><span id="broker">...</span></div>
 <div class="card">Queue<br><span id="queue">...</span></div>
 <div class="card">Clock<br><span id="clock">...</span></div>
</div>
<h2>Devices</h2>
<div class="scroll"><table><thead><tr><th>Device</th><th class="wide">Kind</th><th>Desk</th>
<th>State</th><th>Events</th><th class="wide">Errors</th></tr></thead>
<tbody id="devices"></tbody></table></div>
<h2>Desks</h2>
<div class="scroll"><table><thead><tr><th>Desk</th><th>On duty</th><th>Since</th></tr></thead>
<tbody id="desks"></tbody></table></div>
<h2>Last presses (press a button: it appears here)</h2>
<div class="scroll"><table><thead><tr><th>Time</th><th>Desk</th><th class="wide">Device</th>
<th>What</th><th>Operator</th></tr></thead><tbody id="presses"></tbody></table></div>
<p class="muted">Times in <span id="tz"></span>.</p>
<script>
const token = new URLSearchParams(location.search).get("token");
const api = "api/status" + (token ? "?token=" + encodeURIComponent(token) : "");
let fmt = null, fmtZone = null;
function when(iso) {  // one format for every time on the page, in the site's zone
  if (!iso) return "-";
  const p = Object.fromEntries(fmt.formatToParts(new Date(iso)).map(x => [x.type, x.value]));
  return `${p.year}-${p.month}-${p.day} ${p.hour}:${p.minute}:${p.second}`;
}
function cell(content, cls, wide) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  const classes = [cls || "", wide ? "wide" : ""].join(" ").trim();
  if (classes) td.className = classes;
  return td;
}
function rows(id, items, cells) {
  const body = document.getElementById(id); body.replaceChildren();
  for (const it of items) {
    const tr = document.createElement("tr");
    for (const c of cells(it)) tr.appendChild(c);
    body.appendChild(tr);
  }
}
function set(id, text, ok) {
  const el = document.getElementById(id); el.textContent = text;
  el.className = ok === undefined ? "" : (ok ? "ok" : "bad");
}
function what(p, doctors) {
  const span = document.createElement("span");
  let text = p.what;
  if (p.doctor && doctors[p.doctor]) text = text.replace(p.doctor, doctors[p.doctor]);
  span.append(text + " ");
  for (const f of p.flags || []) {
    const b = document.createElement("span"); b.className = "flag"; b.textContent = f;
    span.append(b);
  }
  return span;
}
async function refresh() {
  try {
    const st = await (await fetch(api, {cache: "no-store"})).json();
    if (fmtZone !== st.tz) {
      fmt = new Intl.DateTimeFormat("en-GB", {timeZone: st.tz, year: "numeric",
        month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
        second: "2-digit", hourCycle: "h23"});
      fmtZone = st.tz;
    }
    set("ident", st.site + " / " + st.edge);
    set("tz", st.tz);
    const down = st.devices.filter(d => d.state !== "connected" && d.state !== "unconfigured");
    const problems = st.alarm_details.length + (st.broker.state === "connected" ? 0 : 1)
      + down.length;
    set("verdict", problems ? `Needs attention (${problems})` : "All good", !problems);
    const list = document.getElementById("alarmlist"); list.replaceChildren();
    for (const a of st.alarm_details) {
      const li = document.createElement("li"); li.className = "bad";
      li.textContent = `${a.text} (${a.code}, since ${when(a.since)})`; list.appendChild(li);
    }
    set("broker", st.broker.state + (st.broker.error ? ": " + st.broker.error : ""),
        st.broker.state === "connected");
    set("queue", st.queue.depth + " pending", st.queue.depth < 100);
    set("clock", st.clock.synced ? "synchronised" : "not synchronised", st.clock.synced);
    rows("devices", st.devices, d => [cell(d.id), cell(d.kind, "", true), cell(d.desk || "-"),
      cell(d.state, d.state === "connected" ? "ok" : "bad"), cell(d.presses ?? "-"),
      cell(Object.entries(d.decode_errors || {}).map(e => e.join(" ")).join(", ") || "-",
           "", true)]);
    rows("desks", st.desks, d => [cell(d.desk), cell(d.operator || "nobody"),
      cell(when(d.since), "muted")]);
    rows("presses", st.recent, p => [cell(when(p.time)), cell(p.desk),
      cell(p.device, "", true), cell(what(p, st.doctors || {})), cell(p.operator || "-")]);
    // Whether the page is wider than the screen (phones): kept on the body.
    document.body.dataset.overflow = String(
      document.documentElement.scrollWidth > document.documentElement.clientWidth);
  } catch (e) {
    set("verdict", "The daemon is not answering", false);
    set("broker", "daemon not answering", false);
  }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client gone mid-answer (closed tab, timeout) is not the journal's business;
        # anything else is a fault of ours and is logged with its traceback.
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("web: client %s went away", client_address[0] if client_address else "?")
        else:
            super().handle_error(request, client_address)


def _metrics_page(snapshot: Callable[[], dict[str, Any]]
                  ) -> Callable[[], tuple[int, str, bytes]]:
    """/metrics: (HTTP status, content type, body).  prometheus_client is imported
    only here, so a daemon without the option never loads it."""
    try:
        from prometheus_client.exposition import generate_latest  # noqa: PLC0415

        from edge.metrics import registry  # noqa: PLC0415
    except ImportError as e:
        # The page and the presses matter more than metrics: say why, serve the rest.
        log.error("web: /metrics unavailable: %s", e)
        why = f"/metrics is unavailable: {e}".encode()
        return lambda: (503, "text/plain; charset=utf-8", why)
    reg = registry(snapshot)
    # The classic text format (0.0.4), which every Prometheus server reads;
    # generate_latest's default escaping writes exactly that.
    return lambda: (200, "text/plain; version=0.0.4; charset=utf-8", generate_latest(reg))


class StatusPage:
    def __init__(self, host: str, port: int, ask: Ask, token: str | None = None, *,
                 metrics: bool = False) -> None:
        if not is_loopback(host) and not token:
            raise ValueError("a status page on the LAN needs a token (web.token_file)")
        self._ask = ask
        self._token = token
        self._metrics: Callable[[], tuple[int, str, bytes]] | None = None
        if metrics:
            self._metrics = _metrics_page(self.snapshot)
        page = self

        class Handler(BaseHTTPRequestHandler):
            # A client that sends its request slowly (or never) gives up its
            # thread after this many seconds.
            timeout = 10

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("web: %s", fmt % args)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                given = parse_qs(url.query).get("token", [""])[0]
                # Bytes: compare_digest refuses a str with non-ASCII characters.
                if page._token and not hmac.compare_digest(
                        given.encode("utf-8", "surrogateescape"), page._token.encode()):
                    self._send(403, "text/plain", b"a token is needed: ?token=...")
                elif url.path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", PAGE.encode())
                elif url.path == "/api/status":
                    self._send(200, "application/json", json.dumps(page.snapshot()).encode())
                elif url.path == "/metrics" and page._metrics is not None:
                    self._send(*page._metrics())
                else:
                    self._send(404, "text/plain", b"not found")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = _Server((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="web",
                                        daemon=True)

    def snapshot(self) -> dict[str, Any]:
        box: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._ask(box, {"cmd": "status"})
        try:
            return box.get(timeout=5)
        except queue.Empty:
            return {"error": "the daemon's main loop did not answer"}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
