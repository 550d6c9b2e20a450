"""The daemon's connection to the broker (paho-mqtt 2.x, MQTT v5).

paho runs its callbacks on the network thread under its own locks, so every
callback here only records what happened as a message for the daemon's main
loop and returns (style.md point 9).  Storage, publishing decisions and
retries all happen in the main loop.

The network thread is ours rather than paho's `loop_start()`, because paho's
reconnect delay has no jitter: after a broker restart every Pi at every site
would come back in the same second.  We wait a random time between half the
minimum and the current back-off ("full jitter"), doubling from
`reconnect_min_s` to `reconnect_max_s`, and reset it after a successful
CONNACK.  The thread drives paho through its external-loop interface
(`on_socket_register_write`, `loop_read`, `loop_write`, `loop_misc`), so
`publish()` on the main loop only queues the packet and wakes this thread;
the socket writes happen here, off the main loop.

paho keeps QoS 1 messages that were in flight when the link dropped and sends
them again (DUP set) after the reconnect; the daemon keeps its own map of
message ids to seqs across reconnects, and after a daemon restart everything
still in the store is published again.  Both are safe because the collector
drops duplicates by event_id.
"""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.contract.broker import BrokerConfig, set_credentials

__all__ = ["Connected", "Disconnected", "Inbound", "MqttLink", "PubAck", "backoff_delays"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Connected:
    receive_maximum: int


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str


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


def backoff_delays(low: float, high: float, rng: random.Random) -> Callable[[bool], float]:
    """Full-jitter exponential back-off.  Call with reset=True after a success."""
    state = {"cap": low}

    def next_delay(reset: bool = False) -> float:
        if reset:
            state["cap"] = low
            return 0.0
        cap = state["cap"]
        state["cap"] = min(cap * 2, high)
        return rng.uniform(low / 2, cap)

    return next_delay


class MqttLink:
    def __init__(self, cfg: BrokerConfig, *, will: tuple[str, bytes],
                 post: Callable[[object], None], rng: random.Random | None = None) -> None:
        self._cfg = cfg
        self._post = post
        self._stop = threading.Event()
        self._delay = backoff_delays(cfg.reconnect_min_s, cfg.reconnect_max_s,
                                     rng or random.Random())
        self._connack_ok = threading.Event()
        self.connected = False
        # When the network thread last went round its loop (watchdog).
        self.heartbeat = time.monotonic()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                        protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=False)
        # The daemon keeps its own window (within the broker's Receive
        # Maximum).  paho's cap must be off: paho calls on_publish before it
        # decrements its in-flight count, so a message published in reaction
        # would sit in paho's queue until the next PUBACK came in.
        c.max_inflight_messages_set(0)
        c.max_queued_messages_set(0)
        set_credentials(c, cfg)
        c.will_set(will[0], will[1], qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_connect_fail = self._on_connect_fail
        # publish() from the main loop wakes the network thread instead of
        # writing to the socket itself.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        c.on_socket_register_write = self._on_register_write
        c.on_socket_open = self._on_socket_open
        self._client = c
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)

    # -- paho callbacks: record and return ---------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    rc: ReasonCode, props: Properties | None) -> None:
        del client, userdata, flags
        if rc.is_failure:
            self._post(Disconnected(f"broker refused the connection: {rc}"))
            return
        self._connack_ok.set()
        receive_max = getattr(props, "ReceiveMaximum", 65535) if props is not None else 65535
        self.connected = True
        self._post(Connected(int(receive_max)))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       rc: ReasonCode, props: Properties | None) -> None:
        del client, userdata, flags, props
        self.connected = False
        self._post(Disconnected(str(rc)))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        del client, userdata
        self._post(Disconnected("connection failed"))

    @staticmethod
    def _on_socket_open(client: mqtt.Client, userdata: Any, sock: Any) -> None:
        del client, userdata
        # paho leaves Nagle on: a PUBLISH written while an earlier segment
        # awaits its (delayed) ACK would wait for the next one, adding one
        # inter-press gap to the press's latency.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        del client, userdata, sock
        # A full pipe means a wake-up is already pending.
        with contextlib.suppress(BlockingIOError):
            self._wake_w.send(b"w")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, rc: ReasonCode,
                    props: Properties | None) -> None:
        del client, userdata, props
        self._post(PubAck(mid, int(rc.value), str(rc)))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        del client, userdata
        self._post(Inbound(msg.topic, bytes(msg.payload), bool(msg.retain)))

    # -- network thread ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def _connect_once(self) -> bool:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        try:
            rc = self._client.connect(self._cfg.host, self._cfg.port,
                                      keepalive=self._cfg.keepalive_s, clean_start=True,
                                      properties=props)
        except (OSError, ssl.SSLError, ValueError) as e:
            self._post(Disconnected(f"cannot reach broker {self._cfg.host}:{self._cfg.port}: "
                                    f"{e}"))
            return False
        return rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def _serve(self) -> None:
        """One connection's life: select on the socket and the wake-up pipe."""
        c = self._client
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            sock = c.socket()
            if sock is None:
                return
            wlist = [sock] if c.want_write() else []
            readable, _writable, _ = select.select([sock, self._wake_r], wlist, [], 1.0)
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    self._wake_r.recv(4096)
            # TLS may hold decrypted bytes that select() cannot see.
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
            if (sock in readable or pending) and c.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if c.want_write() and c.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return
            if c.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    def _run(self) -> None:
        while not self._stop.is_set():
            self._connack_ok.clear()
            if self._connect_once():
                self._serve()
                if self.connected:
                    self.connected = False
                    self._post(Disconnected("connection lost"))
            if self._stop.is_set():
                break
            delay = self._delay(self._connack_ok.is_set())
            if self._connack_ok.is_set():
                delay = self._delay(False)
            log.debug("reconnecting to broker in %.1f s", delay)
            # Waiting in slices keeps the heartbeat fresh through long back-offs.
            until = time.monotonic() + delay
            while not self._stop.is_set() and time.monotonic() < until:
                self.heartbeat = time.monotonic()
                self._stop.wait(min(1.0, until - time.monotonic()))

    # -- used by the main loop ------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                wake: bool = True) -> int:
        """Queue a message in paho.  With wake=False the caller calls wake()
        once after a batch: one syscall per batch instead of per message."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if wake:
            self.wake()
        return int(info.mid)

    def wake(self) -> None:
        # paho only signals when its "registered for write" flag was clear,
        # and the network thread may be about to clear it: wake it ourselves.
        self._on_register_write(self._client, None, None)

    def subscribe(self, topic: str) -> None:
        self._client.subscribe(topic, qos=1)

    def alive(self, within_s: float) -> bool:
        """The network thread runs and went round its loop within `within_s`."""
        return self._thread.is_alive() and time.monotonic() - self.heartbeat < within_s

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._client.disconnect()
        self._thread.join(timeout)
        self.connected = False
        self._wake_r.close()
        self._wake_w.close()
