"""What the daemon says about itself: `health` (MQTT, every health_interval_s),
`status` (control socket, status page, `feedback-edge status`), the retained
`devices` inventory and systemd's STATUS= line.

Shapes: schemas/health.schema.json, status.schema.json and
devices.schema.json in `edge/contract/schemas/`.  None of them carries
personal data: no phone numbers, comments or badge numbers.
"""

from __future__ import annotations

import collections
import json
import os
from typing import TYPE_CHECKING, Any

from edge import __version__
from edge.contract.ids import USB_PORT_RE, USB_SERIAL_RE
from edge.contract.timefmt import format_wall
from edge.events import Event
from edge.logsafe import printable

if TYPE_CHECKING:
    from edge.daemon import Daemon

__all__ = ["Recent", "device_list", "health", "oldest_pending_s", "presence", "status",
           "status_line"]


def presence(d: Daemon, state: str) -> bytes:
    """The retained `status` topic's payload (online, or offline as the will)."""
    return json.dumps({"state": state, "since": format_wall(d.started_wall_ns),
                       "version": __version__, "boot_id": d.clock.boot_id},
                      separators=(",", ":")).encode()


class Recent:
    """The last `size` stored events, described for the status page."""

    def __init__(self, size: int = 20) -> None:
        self._items: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)

    def add(self, event: Event) -> None:
        self._items.appendleft({"time": format_wall(event.time.wall_ns), "desk": event.desk,
                                "device": event.device.id, "what": event.body.summary(),
                                "doctor": getattr(event.body, "doctor", None),
                                "operator": event.operator.id, "flags": list(event.flags)})

    def list(self) -> list[dict[str, Any]]:
        return list(self._items)


def status_line(d: Daemon) -> str:
    """systemd's STATUS=: queue, broker, devices connected."""
    connected = sum(dev.state == "connected" for dev in d.devices.values())
    alarms = sorted({a.code for a in d.alarms.active(d.clock.wall_ns())})
    return (f"{d.store.depth - len(d.publisher.delivered)} queued, broker {d.broker_state}, "
            f"{connected}/{len(d.devices)} devices"
            + (f"; ALARMS: {', '.join(alarms)}" if alarms else ""))


def device_list(d: Daemon) -> list[dict[str, Any]]:
    """Every configured device, then hardware plugged in but not configured."""
    # The serial a device reported (a terminal's HELLO) wins over the config's.
    out = [{"id": dev.cfg.id, "kind": dev.cfg.kind, "serial": dev.serial(),
            "desk": dev.cfg.desk, "state": dev.state,
            "last_seen": format_wall(dev.last_seen_ns) if dev.last_seen_ns else None,
            "error": _cap(dev.error)} for dev in d.devices.values()]
    serials = {s for dev in d.devices.values() for s in (dev.cfg.serial, dev.serial()) if s}
    for usb, kind in d.attached.devices:
        if kind is not None and usb.serial not in serials and USB_PORT_RE.match(usb.port_path):
            # Plugged in but not configured: its identity, for the installer.  What
            # the hardware says of itself is fitted to the contract's grammar (a
            # serial that broke it would get the whole inventory quarantined).
            serial = usb.serial if usb.serial is None or USB_SERIAL_RE.match(usb.serial) \
                else printable(usb.serial, 60).encode("ascii", "backslashreplace").decode()[:64]
            out.append({"id": f"usb-{usb.port_path}", "kind": kind, "serial": serial or None,
                        "desk": None, "state": "unconfigured", "last_seen": None,
                        "error": None, "usb_id": usb.ident, "port_path": usb.port_path})
    return out


def _cap(text: str | None, limit: int = 1024) -> str | None:
    """A free text within the contract's length (health and devices schemas)."""
    return text if text is None or len(text) <= limit else text[:limit - 3] + "..."


def _drops(d: Daemon) -> dict[str, int]:
    drops = dict(d.store.stats().drops)
    for counts in (d.ctx.discarded, d.intake.write_errors):
        for k, v in counts.items():
            drops[k] = drops.get(k, 0) + v
    return drops


def _age_s(d: Daemon, created_ms: int | None) -> float | None:
    return None if created_ms is None else \
        max(0.0, (d.clock.wall_ns() // 1_000_000 - created_ms) / 1000)


def oldest_pending_s(d: Daemon) -> float | None:
    """How long the oldest event still on the Pi has waited (s), or None: one small
    query, for the once-a-second condition checks (health builds far more)."""
    return _age_s(d, d.store.stats(d.publisher.delivered).oldest_created_ms)


def health(d: Daemon) -> dict[str, Any]:
    st = d.store.stats(delivered=d.publisher.delivered)
    oldest = _age_s(d, st.oldest_created_ms)
    return {
        "queue_depth": st.depth,
        "oldest_pending_age_s": oldest,
        "store_bytes": st.file_bytes,
        "disk_free_bytes": d.store.disk_free(),
        "drops": _drops(d),
        "decode_errors": {dev.cfg.id: dict(dev.decode_errors) for dev in d.devices.values()
                          if dev.decode_errors},
        "clock_synced": d.clock.synced(),
        "uptime_s": round(d.clock.mono_ns() / 1e9 - d.started_s, 1),
        "alarms": [_cap(t) for t in d.alarms.texts(d.clock.wall_ns())][:256],
        "delivery": d.publisher.delivery_status(),
    }


def status(d: Daemon) -> dict[str, Any]:
    h = health(d)
    devices = device_list(d)
    for entry in devices:
        dev = d.devices.get(entry["id"])
        if dev is not None:
            entry.update(presses=dev.stored, duplicates=dev.duplicates, resets=dev.resets,
                         decode_errors=dict(dev.decode_errors), **dev.details())
    cfg = d.config
    pub = d.publisher
    return {
        "running": True,
        "version": __version__,
        "pid": os.getpid(),
        "site": cfg.site,
        "edge": cfg.edge,
        "since": format_wall(d.started_wall_ns),
        "uptime_s": h["uptime_s"],
        "broker": {"host": cfg.broker.host, "port": cfg.broker.port,
                   "state": d.broker_state, "since": format_wall(d.broker_since_ns),
                   "error": d.broker_error, "window": pub.window},
        "queue": {"depth": h["queue_depth"], "oldest_pending_age_s": h["oldest_pending_age_s"],
                  "in_flight": len(pub.inflight), "store_bytes": h["store_bytes"],
                  "disk_free_bytes": h["disk_free_bytes"], "last_seq": d.store.last_seq},
        "published": pub.published,
        "delivered": pub.acked,
        "delivery": h["delivery"],
        "rejected": dict(pub.rejected),
        "commands_refused": dict(d.commands.refused),
        "drops": h["drops"],
        "devices": devices,
        "desks": _desks(d),
        "recent": d.recent.list(),
        "clock": d.timesync.status(),
        "alarms": h["alarms"],
        "alarm_details": [{"code": a.code, "subject": a.subject, "text": a.text,
                           "since": format_wall(a.since_ns)}
                          for a in d.alarms.active(d.clock.wall_ns())],
        "tz": cfg.tz,
        # Doctor ids to names, so the page says who an answer was about.
        "doctors": {str(x["id"]): str(x["name"]) for x in
                    (d.commands.doctors_now or (0, []))[1]},
    }


def _desks(d: Daemon) -> list[dict[str, Any]]:
    now = d.clock.wall_ns()
    out = []
    for desk in d.desks:
        tag = d.operators.who(desk, now)
        since = d.operators.since(desk, now)
        out.append({"desk": desk, "operator": tag.id, "source": tag.source,
                    "since": format_wall(since) if since is not None else None})
    return out
