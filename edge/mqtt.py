"""The daemon's connection to the broker (paho-mqtt 2.x, MQTT v5).

paho runs its callbacks on the network thread under its own locks, so every
callback here only records what happened as a message for the daemon's main
loop and returns (style.md point 9).  Storage, publishing decisions, retries
and alarms all happen in the main loop (`LinkAlarms` turns the messages into
alarms there).

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
name kept for TLS server-name checks.  The network thread waits for both in
short slices, beating its heartbeat; a CONNACK that does not come within
`CONNACK_TIMEOUT_S` ends the attempt.

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
from dataclasses import dataclass
from typing import Any, Final

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.alarms import Alarms
from edge.contract.broker import BrokerConfig, set_credentials

__all__ = ["AUTH_REFUSALS", "BRIEF_S", "CONNACK_TIMEOUT_S", "CONNECT_TIMEOUT_S",
           "MAX_PACKET_BYTES", "RESOLVE_TIMEOUT_S", "SENT_REFUSALS", "STABLE_S",
           "UNREACHABLE_S", "Connected", "Disconnected", "Inbound", "LinkAlarms", "MqttLink",
           "PubAck", "Stable", "backoff_delays", "publish_packet_size"]

log = logging.getLogger(__name__)

# A connection that held this long resets the reconnect back-off and clears
# `client_id_taken`.
STABLE_S: Final = 60.0
# A connection that ends within this of its CONNACK was dropped "right after
# CONNACK"; two in a row raise `client_id_taken`.
BRIEF_S: Final = 5.0
# getaddrinfo is given this long (glibc's own timeouts add up to half a minute).
RESOLVE_TIMEOUT_S: Final = 5.0
# The TCP connect and the TLS handshake, each.
CONNECT_TIMEOUT_S: Final = 5.0
CONNACK_TIMEOUT_S: Final = 10.0
# Advertised in CONNECT: the broker sends us no larger packet.  Well above a
# command (edge.commands.MAX_COMMAND_BYTES, 64 KiB) and its topic.
MAX_PACKET_BYTES: Final = 256 * 1024
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
PACKET_TOO_LARGE: Final = 0x95


# -- messages to the main loop ---------------------------------------------------


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


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_size(topic: str, payload: bytes, qos: int) -> int:
    """Bytes of the MQTT v5 PUBLISH paho writes for this message (no properties)."""
    remaining = 2 + len(topic.encode()) + (2 if qos > 0 else 0) + 1 + len(payload)
    return 1 + _varint_len(remaining) + remaining


def _hex(code: int) -> str:
    return f"0x{code:02X}"


# -- paho, connecting where we resolved ---------------------------------------------


class _Client(mqtt.Client):
    """paho's client, connecting to addresses resolved beforehand (paho would
    resolve the host name itself, on the thread that calls connect()).  The
    host name given to connect() stays paho's `host`: TLS checks the server's
    certificate against it and sends it as SNI."""

    addresses: list[tuple[int, Any]]
    _raw: socket.socket | None = None

    def _create_socket_connection(self) -> socket.socket:
        # paho's own hook (Client._create_socket calls it, then wraps TLS).
        error: OSError = OSError(f"no address for {self.host}")
        for family, sockaddr in self.addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            self._raw = sock
            try:
                sock.settimeout(self.connect_timeout)
                sock.connect(sockaddr)
            except OSError as e:
                sock.close()
                error = e
                continue
            return sock
        raise error

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        # paho's hook too.  As paho's, with the context checking the host name
        # (set_credentials: CERT_REQUIRED), but a failed handshake closes the
        # TLS socket (paho leaves it to the garbage collector) and an abort
        # from the network thread reaches it.
        ctx = self._ssl_context
        if ctx is None or not ctx.check_hostname:
            return super()._ssl_wrap_socket(tcp_sock)
        tls = ctx.wrap_socket(tcp_sock, server_hostname=self.host, do_handshake_on_connect=False)
        self._raw = tls
        try:
            tls.settimeout(self.connect_timeout)
            tls.do_handshake()
        except BaseException:
            tls.close()
            raise
        return tls

    def abort_connect(self) -> None:
        """From another thread: make a connect or TLS handshake in progress fail now."""
        raw = self._raw
        if raw is not None:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)


class _Lookup:
    """getaddrinfo on its own thread: it cannot be interrupted, only left behind."""

    def __init__(self, host: str, port: int) -> None:
        self.done = threading.Event()
        self.addresses: list[tuple[int, Any]] = []
        self.error: str | None = None
        self._host, self._port = host, port
        threading.Thread(target=self._run, name="mqtt-resolve", daemon=True).start()

    def _run(self) -> None:
        try:
            infos = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
            self.addresses = [(family, sockaddr) for family, _t, _p, _c, sockaddr in infos]
        except OSError as e:  # socket.gaierror included
            self.error = e.strerror or str(e)
        finally:
            self.done.set()


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
        self._lookup: _Lookup | None = None
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
        c = _Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
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
            detail = f"{rc} ({_hex(rc.value)})"
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
        detail = f"{rc} ({_hex(rc.value)})" if from_broker else str(rc)
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
            self._lookup = _Lookup(host, self._cfg.port)
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


# -- alarms, on the main loop -------------------------------------------------------


class LinkAlarms:
    """The broker link's alarms, from the link's messages.  Owned by the main
    loop; `now` is its injected monotonic time in seconds.

    - `broker_dns`: the host name did not resolve (or not in time); cleared
      when a resolution works again (any later stage) or on connect.
    - `broker_auth`: CONNACK refused the credentials (AUTH_REFUSALS); cleared
      by a successful CONNACK.
    - `broker_unreachable`: not connected for UNREACHABLE_S; cleared on connect.
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
        self._down_since: float | None = now  # not connected since
        self._last_error = "not connected yet"
        self._brief = 0  # connections in a row dropped right after their CONNACK

    def _raise(self, code: str, text: str) -> None:
        self._alarms.raise_(code, text, self._wall_ns())

    def on_connected(self) -> None:
        self._down_since = None
        for code in ("broker_dns", "broker_auth", "broker_unreachable"):
            self._alarms.clear(code)

    def on_stable(self) -> None:
        self._brief = 0
        self._alarms.clear("client_id_taken")

    def on_disconnected(self, msg: Disconnected, now: float) -> None:
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
                        f"{ack.reason} ({_hex(ack.reason_code)}); they stay in the store and "
                        "are retried")

    def tick(self, now: float) -> None:
        if self._down_since is not None and now - self._down_since >= UNREACHABLE_S:
            self._raise("broker_unreachable", f"no connection to broker {self._cfg.host}:"
                        f"{self._cfg.port} for more than {UNREACHABLE_S:.0f} s; last error: "
                        f"{self._last_error}")
