"""What the MQTT link (edge.mqtt.MqttLink) posts to the daemon's main loop
from its network thread: Connected, Disconnected, Stable, PubAck, Inbound.
The daemon routes them; edge.link_alarms turns them into alarms.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Connected", "Disconnected", "Inbound", "PubAck", "Stable", "reason_hex"]


@dataclass(frozen=True, slots=True)
class Connected:
    receive_maximum: int
    maximum_packet_size: int | None = None  # the broker's, from CONNACK


@dataclass(frozen=True, slots=True)
class Disconnected:
    """Not connected (any more), and why.

    stage: "dns" (the host name did not resolve), "connect" (TCP, TLS or no
    CONNACK), "refused" (CONNACK with a failure reason code), "lost" (a
    connection that had its CONNACK ended).  `code`: the MQTT reason code of
    the CONNACK or of the broker's DISCONNECT, when there was one.
    `held_s`: how long a lost connection had held after its CONNACK.
    `detail`: the broker's (or the resolver's) own words, which `reason` quotes."""

    reason: str
    stage: str = "lost"
    code: int | None = None
    from_broker: bool = False
    held_s: float | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Stable:
    """The connection has held for STABLE_S (the back-off was reset)."""


@dataclass(frozen=True, slots=True)
class PubAck:
    mid: int
    reason_code: int
    reason: str

    @property
    def ok(self) -> bool:
        # MQTT v5: reason codes below 0x80 are success (0x10 "no matching
        # subscribers" included: the broker has the message).
        return self.reason_code < 0x80


@dataclass(frozen=True, slots=True)
class Inbound:
    topic: str
    payload: bytes
    retain: bool


def reason_hex(code: int) -> str:
    """An MQTT reason code as the spec writes it, e.g. 0x87."""
    return f"0x{code:02X}"

