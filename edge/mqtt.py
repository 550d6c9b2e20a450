"""The daemon's connection to the broker (paho-mqtt 2.x, MQTT v5): `MqttLink`,
its network thread and reconnect back-off.

paho runs its callbacks on the network thread under its own locks, so every
callback here only records what happened as a message for the daemon's main
loop (edge.link_messages) and returns (style.md point 9).  Storage, publishing decisions, retries
and alarms all happen in the main loop (edge.link_alarms.LinkAlarms turns the
messages into alarms there).

The network thread is ours rather than paho's `loop_start()`, because paho's
reconnect delay has no jitter: after a broker restart every Pi at every site
would come back in the same second.  We wait a random time between half the
minimum and the current back-off ("full jitter"), doubling from
`reconnect_min_s` to `reconnect_max_s`.  The back-off is reset only once a
connection has held for `STABLE_S`: a broker that accepts and then drops us
at once (another client with our client id, a refusal of what we send) is
retried slowly, not in a loop.  The thread drives paho through its
external-loop interface (`on_socket_register_write`, `loop_read`,
`loop_write`, `loop_misc`), so `publish()` on the main loop only queues the
packet and wakes this thread; the socket writes happen here, off the main
loop.

**Liveness.**  `alive()` (the systemd watchdog's question) means "the network
thread is not hung", never "the network is slow".  Nothing that waits on the
network runs on the network thread itself: the broker's name is resolved by
getaddrinfo on a short-lived thread (waited for `RESOLVE_TIMEOUT_S`; a lookup
that is still running is waited for again on the next attempt rather than
started twice), and the TCP connect and TLS handshake run on another one
(`CONNECT_TIMEOUT_S` each), to the resolved address, with the configured host
name kept for TLS server-name checks (the helpers: edge.mqtt_connect).  The
network thread waits for both in short slices, beating its heartbeat; a
CONNACK that does not come within `CONNACK_TIMEOUT_S` ends the attempt.

**Packet sizes.**  CONNECT advertises MQTT v5 Maximum Packet Size
`MAX_PACKET_BYTES` (256 KiB): the broker does not send us anything larger
(it drops such a message for us), so a huge message on a command topic never
reaches this process's memory.  Commands themselves are at most 64 KiB
(edge/commands.py).  In the other direction, a message larger than the
broker's Maximum Packet Size (from CONNACK) is not sent at all, since the
broker would close the connection and paho would send it again after every
reconnect: `publish()` answers it at once with a refused PubAck (0x95), which
the publisher treats as any refusal (the event stays, slow retries) and
`LinkAlarms` raises `broker_refusing`.

paho keeps QoS 1 messages that were in flight when the link dropped and sends
them again (DUP set) after the reconnect; the daemon keeps its own map of
message ids to seqs across reconnects, and after a daemon restart everything
still in the store is published again.  Both are safe because the collector
drops duplicates by event_id.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.contract.broker import BrokerConfig, set_credentials
from edge.link_messages import Connected, Disconnected, Inbound, PubAck, Stable, reason_hex
from edge.mqtt_connect import LinkClient, Lookup, publish_packet_size

__all__ = ["CONNACK_TIMEOUT_S", "CONNECT_TIMEOUT_S", "MAX_PACKET_BYTES", "RESOLVE_TIMEOUT_S",
           "STABLE_S", "MqttLink", "backoff_delays"]

log = logging.getLogger(__name__)

# A connection that held this long resets the reconnect back-off and clears
# `client_id_taken`.
STABLE_S: Final = 60.0
# getaddrinfo is given this long (glibc's own timeouts add up to half a minute).
RESOLVE_TIMEOUT_S: Final = 5.0
# The TCP connect and the TLS handshake, each.
CONNECT_TIMEOUT_S: Final = 5.0
CONNACK_TIMEOUT_S: Final = 10.0
# Advertised in CONNECT: the broker sends us no larger packet.  Well above a
# command (edge.commands.MAX_COMMAND_BYTES, 64 KiB) and its topic.
MAX_PACKET_BYTES: Final = 256 * 1024
PACKET_TOO_LARGE: Final = 0x95


# -- reconnect back-off -----------------------------------------------------------


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
                 post: Callable[[object], None], rng: random.Random | None = None,
                 stable_s: float = STABLE_S, resolve_timeout_s: float = RESOLVE_TIMEOUT_S,
                 max_packet_bytes: int = MAX_PACKET_BYTES) -> None:
        self._cfg = cfg
        self._post = post
        self._stop = threading.Event()
        self._delay = backoff_delays(cfg.reconnect_min_s, cfg.reconnect_max_s,
                                     rng or random.Random())
        self._stable_s = stable_s
        self._resolve_timeout_s = resolve_timeout_s
        self._max_packet_bytes = max_packet_bytes
        self._lookup: Lookup | None = None
        # Per connection, written only by the network thread.
        self._connect_sent_at = 0.0
        self._connack_at = 0.0
        self._stable = False
        self._refused = False  # the CONNACK refused: paho's own "Protocol error" is noise
        self.connected = False
        # The broker's Maximum Packet Size from the last CONNACK (None: no limit).
        self.broker_max_packet: int | None = None
        self._local_mids = itertools.count(-1, -1)  # refusals that never reached paho
        self._too_large_warned: set[str] = set()
        # When the network thread last went round its loop (watchdog).
        self.heartbeat = time.monotonic()
        c = LinkClient(CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                    protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=False)
        c.addresses = []
        c.connect_timeout = CONNECT_TIMEOUT_S
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
            self._refused = True
            detail = f"{rc} ({reason_hex(rc.value)})"
            self._post(Disconnected(f"broker refused the connection: {detail}",
                                    stage="refused", code=int(rc.value), from_broker=True,
                                    detail=detail))
            return
        receive_max = getattr(props, "ReceiveMaximum", 65535) if props is not None else 65535
        max_packet = getattr(props, "MaximumPacketSize", None) if props is not None else None
        self.broker_max_packet = int(max_packet) if max_packet is not None else None
        self._connack_at = time.monotonic()
        self._stable = False
        self.connected = True
        self._post(Connected(int(receive_max), self.broker_max_packet))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                       rc: ReasonCode, props: Properties | None) -> None:
        del client, userdata, props
        if self._refused:
            return  # the CONNACK's reason was posted; paho adds a "Protocol error"
        held = time.monotonic() - self._connack_at if self.connected else None
        self.connected = False
        from_broker = flags.is_disconnect_packet_from_server
        detail = f"{rc} ({reason_hex(rc.value)})" if from_broker else str(rc)
        if from_broker:
            reason = f"the broker disconnected us: {detail}"
        elif str(rc) == "Unspecified error":
            # paho's word for a socket closed or reset under it.
            reason = "connection lost (closed by the broker or the network)"
        elif str(rc) == "Success":
            reason = "disconnected"
        else:
            reason = f"connection lost: {rc}"
        self._post(Disconnected(reason, stage="lost" if held is not None else "connect",
                                code=int(rc.value) if from_broker else None,
                                from_broker=from_broker, held_s=held, detail=detail))

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

    def _beat_until(self, done: threading.Event, timeout: float) -> bool:
        """Wait for `done` up to `timeout` s, beating the heartbeat: the thread
        waits on the network, it is not hung.  False on timeout or stop."""
        until = time.monotonic() + timeout
        while not done.is_set():
            self.heartbeat = now = time.monotonic()
            if now >= until or self._stop.is_set():
                return False
            done.wait(min(0.5, until - now))
        return True

    def _resolve(self) -> list[tuple[int, Any]] | None:
        """The broker's addresses, or None (posted as a "dns" Disconnected)."""
        host = self._cfg.host
        if self._lookup is None:
            self._lookup = Lookup(host, self._cfg.port)
        lookup = self._lookup
        if not self._beat_until(lookup.done, self._resolve_timeout_s):
            if not self._stop.is_set():
                # Left running: the next attempt waits for this same lookup.
                detail = f"no answer within {self._resolve_timeout_s:.0f} s"
                self._post(Disconnected(f"cannot resolve the broker's host name {host}: "
                                        f"{detail}", stage="dns", detail=detail))
            return None
        self._lookup = None
        if lookup.error is not None or not lookup.addresses:
            detail = lookup.error or "no address"
            self._post(Disconnected(f"cannot resolve the broker's host name {host}: {detail}",
                                    stage="dns", detail=detail))
            return None
        return lookup.addresses

    def _connect_once(self, addresses: list[tuple[int, Any]]) -> bool:
        """TCP, TLS and CONNECT on a helper thread; True when CONNECT went out."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 0
        props.MaximumPacketSize = self._max_packet_bytes
        c = self._client
        c.addresses = addresses
        self._refused = False
        self.broker_max_packet = None
        done = threading.Event()
        outcome: list[BaseException | MQTTErrorCode] = []

        def connect() -> None:
            try:
                outcome.append(c.connect(self._cfg.host, self._cfg.port,
                                         keepalive=self._cfg.keepalive_s, clean_start=True,
                                         properties=props))
            except (OSError, ssl.SSLError, ValueError) as e:
                outcome.append(e)
            finally:
                done.set()

        threading.Thread(target=connect, name="mqtt-connect", daemon=True).start()
        # Every address's connect, then the handshake, each with its timeout.
        budget = CONNECT_TIMEOUT_S * (len(addresses) + 1) + 1.0
        if not self._beat_until(done, budget):
            c.abort_connect()
            # A shut-down socket fails at once.  Should the helper still hang,
            # the heartbeat stops here and the watchdog restarts the daemon.
            done.wait()
        result = outcome[0] if outcome else MQTTErrorCode.MQTT_ERR_UNKNOWN
        if isinstance(result, BaseException):
            if not self._stop.is_set():
                self._post(Disconnected(f"cannot reach broker {self._cfg.host}:"
                                        f"{self._cfg.port}: {result}", stage="connect"))
            return False
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._post(Disconnected(f"cannot send CONNECT: {mqtt.error_string(result)}",
                                    stage="connect"))
            return False
        self._connect_sent_at = time.monotonic()
        return True

    def _serve(self) -> None:
        """One connection's life: select on the socket and the wake-up pipe."""
        c = self._client
        while not self._stop.is_set():
            self.heartbeat = now = time.monotonic()
            sock = c.socket()
            if sock is None:
                return
            if not self.connected and not self._refused \
                    and now - self._connect_sent_at > CONNACK_TIMEOUT_S:
                self._post(Disconnected(f"no CONNACK from the broker within "
                                        f"{CONNACK_TIMEOUT_S:.0f} s", stage="connect"))
                self._refused = True  # this attempt is over: paho's word on it is noise
                c.disconnect()
                return
            if self.connected and not self._stable and now - self._connack_at >= self._stable_s:
                self._stable = True
                self._delay(True)
                self._post(Stable())
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
            addresses = self._resolve()
            if addresses is not None and self._connect_once(addresses):
                self._serve()
                if self.connected:
                    self.connected = False
                    self._post(Disconnected("connection lost", held_s=time.monotonic()
                                            - self._connack_at))
            if self._stop.is_set():
                break
            # Reset only by a connection that held (STABLE_S), never by a CONNACK.
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
        once after a batch: one syscall per batch instead of per message.

        A message larger than the broker's Maximum Packet Size is not queued:
        its PubAck (refused, 0x95) is posted at once, with a message id paho
        never uses (negative)."""
        limit = self.broker_max_packet
        if limit is not None and (size := publish_packet_size(topic, payload, qos)) > limit:
            mid = next(self._local_mids)
            if topic not in self._too_large_warned:
                self._too_large_warned.add(topic)
                log.warning("not sent to %s: %d bytes, the broker's Maximum Packet Size is %d",
                            topic, size, limit)
            self._post(PubAck(mid, PACKET_TOO_LARGE, f"Packet too large for the broker's "
                                                     f"Maximum Packet Size ({limit} bytes)"))
            return mid
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
        """The network thread runs and went round its loop within `within_s`
        (waiting on a slow network counts as going round)."""
        return self._thread.is_alive() and time.monotonic() - self.heartbeat < within_s

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._client.disconnect()
        self._thread.join(timeout)
        self.connected = False
        self._wake_r.close()
        self._wake_w.close()
