"""The installer's status page: devices, desks, live presses, queue, broker, clock.

A small HTTP server (stdlib) on 127.0.0.1 by default.  Bound to another
address it requires a token (from a file; `?token=` on the page URL, which
the page passes on to its API calls), since the page shows who is on duty.
It never shows personal data: no phone numbers, comments or badge numbers;
answers show only the doctor and the Q1 answer.

The page polls /api/status once a second; the handler asks the daemon's main
loop for the snapshot, like the control socket does.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
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
 body { font: 15px/1.4 system-ui, sans-serif; margin: 1.2em; color: #222; }
 h1 { font-size: 1.3em; margin: 0 0 .3em; } h2 { font-size: 1.05em; margin: 1.2em 0 .4em; }
 table { border-collapse: collapse; width: 100%; }
 td, th { text-align: left; padding: .25em .6em; border-bottom: 1px solid #ddd; }
 .ok { color: #0a7d32; font-weight: 600; } .bad { color: #b3261e; font-weight: 600; }
 .muted { color: #777; } #presses tr:first-child { background: #fff7c2; }
 .cards { display: flex; flex-wrap: wrap; gap: .6em; }
 .card { border: 1px solid #ddd; border-radius: 6px; padding: .5em .8em; min-width: 11em; }
</style></head>
<body>
<h1>Feedback edge <span id="ident" class="muted"></span></h1>
<div class="cards">
 <div class="card">Broker<br><span id="broker">...</span></div>
 <div class="card">Queue<br><span id="queue">...</span></div>
 <div class="card">Clock<br><span id="clock">...</span></div>
 <div class="card">Alarms<br><span id="alarms">...</span></div>
</div>
<h2>Devices</h2>
<table><thead><tr><th>Device</th><th>Kind</th><th>Desk</th><th>State</th><th>Events</th>
<th>Errors</th></tr></thead><tbody id="devices"></tbody></table>
<h2>Desks</h2>
<table><thead><tr><th>Desk</th><th>On duty</th><th>Since</th></tr></thead>
<tbody id="desks"></tbody></table>
<h2>Last presses (press a button: it appears here)</h2>
<table><thead><tr><th>Time</th><th>Desk</th><th>Device</th><th>What</th><th>Operator</th>
</tr></thead><tbody id="presses"></tbody></table>
<script>
const token = new URLSearchParams(location.search).get("token");
const api = "api/status" + (token ? "?token=" + encodeURIComponent(token) : "");
function cell(text, cls) {
  const td = document.createElement("td"); td.textContent = text;
  if (cls) td.className = cls; return td;
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
async function refresh() {
  try {
    const st = await (await fetch(api, {cache: "no-store"})).json();
    set("ident", st.site + " / " + st.edge);
    set("broker", st.broker.state, st.broker.state === "connected");
    set("queue", st.queue.depth + " pending", st.queue.depth < 100);
    set("clock", st.clock.synced ? "synchronised" : "not synchronised", st.clock.synced);
    set("alarms", st.alarms.length ? st.alarms.join("; ") : "none", !st.alarms.length);
    rows("devices", st.devices, d => [cell(d.id), cell(d.kind), cell(d.desk || "-"),
      cell(d.state, d.state === "connected" ? "ok" : "bad"), cell(d.presses ?? "-"),
      cell(Object.entries(d.decode_errors || {}).map(e => e.join(" ")).join(", ") || "-")]);
    rows("desks", st.desks, d => [cell(d.desk), cell(d.operator || "nobody"),
      cell(d.since || "-", "muted")]);
    rows("presses", st.recent, p => [cell(new Date(p.time).toLocaleTimeString()), cell(p.desk),
      cell(p.device), cell(p.what), cell(p.operator || "-")]);
  } catch (e) { set("broker", "daemon not answering", false); }
}
refresh(); setInterval(refresh, 1000);
</script></body></html>
"""


class StatusPage:
    def __init__(self, host: str, port: int, ask: Ask, token: str | None = None) -> None:
        if not is_loopback(host) and not token:
            raise ValueError("a status page on the LAN needs a token (web.token_file)")
        self._ask = ask
        self._token = token
        page = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("web: %s", fmt % args)

            def do_GET(self) -> None:
                url = urlparse(self.path)
                given = parse_qs(url.query).get("token", [""])[0]
                if page._token and not hmac.compare_digest(given, page._token):
                    self._send(403, "text/plain", b"a token is needed: ?token=...")
                elif url.path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", PAGE.encode())
                elif url.path == "/api/status":
                    self._send(200, "application/json", json.dumps(page.snapshot()).encode())
                else:
                    self._send(404, "text/plain", b"not found")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Cache-Control", "no-store")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer((host, port), Handler)
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
