"""The broker link's alarms: `LinkAlarms` turns the messages edge.mqtt.MqttLink
posts (edge.link_messages: Connected, Disconnected, Stable, PubAck) into
alarms, on the main loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from edge.alarms import Alarms
from edge.contract.broker import BrokerConfig
from edge.link_messages import Disconnected, PubAck, reason_hex

__all__ = ["AUTH_REFUSALS", "BRIEF_S", "SENT_REFUSALS", "UNREACHABLE_S", "LinkAlarms"]

# A connection that ends within this of its CONNACK was dropped "right after
# CONNACK"; two in a row raise `client_id_taken`.
BRIEF_S: Final = 5.0
# Not connected for this long (main loop's clock): `broker_unreachable`.
UNREACHABLE_S: Final = 60.0

# CONNACK reason codes that mean "these credentials are not accepted": v5
# Bad user name or password, Not authorized, Banned, Bad authentication
# method; MQTT 3.1.1's bad user name or password, not authorised.
AUTH_REFUSALS: Final = frozenset({0x86, 0x87, 0x8A, 0x8C, 0x04, 0x05})
# DISCONNECT reason codes from the broker that refuse something we sent: Not
# authorized, Topic Name invalid, Packet too large, Quota exceeded, Payload
# format invalid, Retain not supported, QoS not supported.
SENT_REFUSALS: Final = frozenset({0x87, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B})
SESSION_TAKEN_OVER: Final = 0x8E


class LinkAlarms:
    """The broker link's alarms, from the link's messages.  Owned by the main
    loop; `now` is its injected monotonic time in seconds.

    - `broker_dns`: the host name did not resolve (or not in time); cleared
      when a resolution works again (any later stage) or on connect.
    - `broker_auth`: CONNACK refused the credentials (AUTH_REFUSALS); cleared
      by a successful CONNACK.
    - `broker_unreachable`: no connection has held (Stable) for UNREACHABLE_S
      while disconnected (a broker that keeps dropping us counts); cleared when
      a connection holds.
    - `broker_refusing`: the broker refused an event (PUBACK reason code 0x80
      or above, or too large for its Maximum Packet Size) or disconnected us
      for something we sent (SENT_REFUSALS); cleared when an event is accepted.
    - `client_id_taken`: a DISCONNECT "Session taken over", or two connections
      in a row dropped within BRIEF_S of their CONNACK; cleared when a
      connection has held (Stable).
    """

    def __init__(self, alarms: Alarms, cfg: BrokerConfig, wall_ns: Callable[[], int],
                 now: float) -> None:
        self._alarms = alarms
        self._cfg = cfg
        self._wall_ns = wall_ns
        self._down_since: float | None = now  # no connection has held since
        self._connected = False
        self._last_error = "not connected yet"
        self._brief = 0  # connections in a row dropped right after their CONNACK

    def _raise(self, code: str, text: str) -> None:
        self._alarms.raise_(code, text, self._wall_ns())

    def on_connected(self) -> None:
        # Unreachable ends only when a connection holds (on_stable): a broker
        # that accepts and drops us again and again is not reachable either.
        self._connected = True
        for code in ("broker_dns", "broker_auth"):
            self._alarms.clear(code)

    def on_stable(self) -> None:
        self._brief = 0
        self._down_since = None
        for code in ("client_id_taken", "broker_unreachable"):
            self._alarms.clear(code)

    def on_disconnected(self, msg: Disconnected, now: float) -> None:
        self._connected = False
        if self._down_since is None:
            self._down_since = now
        self._last_error = msg.reason
        if msg.stage == "dns":
            self._raise("broker_dns", f"{msg.reason} (is DNS reachable?)")
            return
        self._alarms.clear("broker_dns")  # the name resolved, whatever came next
        code = msg.code
        if msg.stage == "refused" and code in AUTH_REFUSALS:
            self._raise("broker_auth", f"broker {self._cfg.host} refused our login: "
                        f"{msg.detail} (bad user name or password, or not authorized); check "
                        "username and password_file")
        if msg.stage != "lost":
            # A connect that failed in between: the broker restarts or the network
            # drops, which is not another client taking our id.
            self._brief = 0
            return
        if msg.from_broker and code in SENT_REFUSALS:
            self._raise("broker_refusing", f"broker {self._cfg.host} disconnected us for "
                        f"what we sent: {msg.detail}; the events stay in the store")
            self._brief = 0
        elif msg.from_broker and code == SESSION_TAKEN_OVER:
            self._raise("client_id_taken", f"client id in use elsewhere: another connection "
                        f"to {self._cfg.host} took over client id {self._cfg.client_id}")
        elif msg.held_s is not None and msg.held_s < BRIEF_S:
            self._brief += 1
            if self._brief >= 2:
                self._raise("client_id_taken", f"client id in use elsewhere? {self._cfg.host} "
                            f"closed our last {self._brief} connections within "
                            f"{BRIEF_S:.0f} s of accepting them; does another client connect "
                            f"as {self._cfg.client_id}?")
        else:
            self._brief = 0

    def on_puback(self, ack: PubAck, is_event: bool) -> None:
        if not is_event:
            return
        if ack.ok:
            self._alarms.clear("broker_refusing")
        else:
            self._raise("broker_refusing", f"broker {self._cfg.host} refuses events: "
                        f"{ack.reason} ({reason_hex(ack.reason_code)}); they stay in the store and "
                        "are retried")

    def tick(self, now: float) -> None:
        if not self._connected and self._down_since is not None \
                and now - self._down_since >= UNREACHABLE_S:
            self._raise("broker_unreachable", f"no connection to broker {self._cfg.host}:"
                        f"{self._cfg.port} has held for more than {UNREACHABLE_S:.0f} s; last "
                        f"error: {self._last_error}")
