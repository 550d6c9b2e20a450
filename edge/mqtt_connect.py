"""Reaching the broker without the network thread waiting on the network:
the helpers edge.mqtt.MqttLink connects with.

`Lookup` resolves the broker's host name with getaddrinfo on a short-lived
thread of its own (it cannot be interrupted, only left behind), and
`LinkClient`, paho's client, does the TCP connect and TLS handshake to those
resolved addresses instead of resolving the name itself, keeping the
configured host name for TLS server-name checks and SNI; `abort_connect()`
lets the network thread end a connect or handshake that takes too long.
`publish_packet_size` is how many bytes paho writes for a message, checked
against the broker's Maximum Packet Size before publishing.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt

__all__ = ["LinkClient", "Lookup", "publish_packet_size"]


# -- packet sizes -----------------------------------------------------------------


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


# -- paho, connecting where we resolved ---------------------------------------------


class LinkClient(mqtt.Client):
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


class Lookup:
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

