"""The HTTP port's connections, held to the gRPC port's connection settings.

aiohttp closes a keep-alive connection left idle (`keepalive_timeout`) but bounds neither the
time a request's headers take to arrive nor how many connections are open: 1,000 idle,
200 slow-header and 200 slow-body connections were all still open after 125 s. Here each
setting is the gRPC port's, read the HTTP way:

- `handshake_timeout`: the TLS handshake, and each request's headers from its first byte (and
  the first request's from the connection's start);
- `max_connection_idle`: aiohttp's keep-alive idle timeout;
- `max_connection_age`: the first answer after it closes the connection (`Connection: close`);
- `keepalive_time` / `keepalive_timeout`: TCP keep-alive probes, so a vanished peer is found;
- `max_connections`: past it a new connection gets a 503 and is closed, counted in
  `http_server_connections_refused_total`;
- `body_read_timeout`: applied by the listener around reading the body (408).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any, cast

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from moderation.serving.settings import ServeSettings

log = structlog.get_logger("moderation.serving.http")

_REFUSED_BODY = (
    b'{"error": {"code": 503, "status": "UNAVAILABLE", "message": "too many connections"}}'
)
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_REFUSED_BODY), _REFUSED_BODY)
)
"""What a connection past MODERATION_MAX_CONNECTIONS gets before it is closed."""


class Connections:
    """The open connections of one HTTP port: their count, the cap, their timers."""

    def __init__(self, settings: ServeSettings, registry: CollectorRegistry):
        self.settings = settings
        self.open: dict[asyncio.BaseTransport, _Guard] = {}
        self.refused = Counter(
            "http_server_connections_refused_total",
            "HTTP connections closed at once: the port held MODERATION_MAX_CONNECTIONS",
            registry=registry,
        )
        self.timed_out = Counter(
            "http_server_connections_timed_out_total",
            "HTTP connections closed because a request's headers did not arrive in time",
            registry=registry,
        )
        self.gauge = Gauge(
            "http_server_open_connections", "HTTP connections open", registry=registry
        )

    def protocol(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """The event loop's protocol factory: aiohttp's protocol behind a guard."""
        return lambda: _Guard(self, inner)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        guard = self.open.get(cast(asyncio.BaseTransport, transport))
        if guard is not None:
            guard.in_request = True
            guard.disarm()

    def request_ended(self, transport: asyncio.BaseTransport | None) -> bool:
        """Marks the connection idle; True when it is past its age and must close."""
        guard = self.open.get(cast(asyncio.BaseTransport, transport))
        if guard is None:
            return False
        guard.in_request = False
        age = asyncio.get_running_loop().time() - guard.opened
        return age > self.settings.max_connection_age


class _Guard(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the count and the header timer."""

    def __init__(self, connections: Connections, inner: Callable[[], asyncio.Protocol]):
        self.connections = connections
        self.inner: asyncio.Protocol | None = None
        self._make_inner = inner
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.in_request = False
        self.opened = 0.0

    # -- timers

    def arm(self) -> None:
        if self.timer is None and self.transport is not None:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.connections.settings.handshake_timeout, self._expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        if self.transport is not None and not self.in_request:
            self.connections.timed_out.inc()
            self.transport.abort()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        settings = self.connections.settings
        if len(self.connections.open) >= settings.max_connections:
            self.connections.refused.inc()
            log.warning("http connection refused", max_connections=settings.max_connections)
            with contextlib.suppress(Exception):
                self.transport.write(REFUSED)
            self.transport.close()
            self.transport = None
            return
        self.opened = asyncio.get_running_loop().time()
        self.connections.open[transport] = self
        self.connections.gauge.set(len(self.connections.open))
        _tcp_keepalive(transport, settings)
        self.arm()  # the first request's headers, from the start
        self.inner = self._make_inner()
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.transport is not None:
            self.connections.open.pop(self.transport, None)
            self.connections.gauge.set(len(self.connections.open))
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if not self.in_request:
            self.arm()  # a new request's headers are on their way
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


def _tcp_keepalive(transport: asyncio.BaseTransport, settings: ServeSettings) -> None:
    """TCP keep-alive probes after `keepalive_time` idle, the peer dead when one goes
    unanswered for `keepalive_timeout`: gRPC's keepalive pings, at the TCP level."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_KEEPIDLE"):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(settings.keepalive_time))
        )
        sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, round(settings.keepalive_timeout))
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 1)


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite with the connection guard and the TLS handshake timeout."""

    def __init__(
        self,
        runner: web.BaseRunner,
        connections: Connections,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
    ):
        super().__init__(runner, ssl_context=ssl_context)
        self.connections = connections
        self.host, self.port = host, port
        self.bound_port: int | None = None

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {}
        if self._ssl_context is not None:
            extra["ssl_handshake_timeout"] = self.connections.settings.handshake_timeout
        self._server = await loop.create_server(
            self.connections.protocol(cast(Callable[[], asyncio.Protocol], server)),
            self.host,
            self.port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            **extra,
        )
        self.bound_port = int(self._server.sockets[0].getsockname()[1])
