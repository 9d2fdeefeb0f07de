"""Limits on raw HTTP connections, before any handler, API key or websocket runs.

- Header limits: `max_line_size` and `max_field_size` go to aiohttp's request parser (400 from
  aiohttp). aiohttp < 3.12's C parser ignores its `max_headers`, so the guard counts the header
  lines of a connection's first request itself and answers 400 past `max_headers`, before the
  parser has built anything.
- `header_timeout`: a connection whose first request line and headers are not complete within this
  many seconds (idle TCP, slowloris) is aborted. Later idle time on a keep-alive connection is
  aiohttp's `keepalive_timeout`.
- `max_pending`: connections that are not a running conversation (HTTP requests, websocket
  handshakes, refused clients, idle keep-alive sockets) are capped; a connection over the cap is aborted on
  accept. `max_pending_per_ip` caps them per address group (`admission.address_group`: an IPv6 /64 is one)
  the same way, so that one address cannot hold every pending place (slowloris, idle sockets); a trusted
  proxy's connections count only against `max_pending`. Running conversations are capped separately by the
  conversation slots.
- Pipelining: aiohttp < 3.12 parses every pipelined request a connection sends without
  backpressure (what that costs: docs/serving.md, Limits). There, a plain HTTP request stops the
  parser (`RequestHandler.close()`: later bytes are dropped unparsed) and its connection closes
  after the one response. Websocket upgrades are not affected.

`ConnectionGuard` owns the accounting; `GuardedSite` listens like aiohttp's TCPSite but wraps each
connection's protocol; `guard_middleware` marks a connection's first request as dispatched.
"""

from __future__ import annotations

import asyncio
import logging
import typing as tp
from dataclasses import dataclass

import aiohttp
import aiohttp.http_exceptions
from aiohttp import web

from .admission import address_group

log = logging.getLogger("moshi_ttt.server.http")

AIOHTTP_VERSION = tuple(int(x) for x in aiohttp.__version__.split(".")[:2])
PIPELINING_BACKPRESSURE = AIOHTTP_VERSION >= (3, 12)


@dataclass(frozen=True)
class HttpLimits:
    max_line_size: int = 8190  # request line and each header line, bytes
    max_field_size: int = 8190  # one header value, bytes
    max_headers: int = 100
    header_timeout: float = 10.0  # seconds from accept to the first request's complete headers
    keepalive_timeout: float = 15.0  # idle seconds between requests (aiohttp >= 3.12 only keeps alive)
    max_pending: int = 64  # concurrent connections that are not a running conversation
    max_pending_per_ip: int = 8  # of those, per address group

    def __post_init__(self) -> None:
        for name in ("max_line_size", "max_field_size", "max_headers", "max_pending", "max_pending_per_ip"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("header_timeout", "keepalive_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    def handler_kwargs(self) -> dict:
        """Keyword arguments for aiohttp's RequestHandler (through `web.AppRunner(**kwargs)`)."""
        return {"max_line_size": self.max_line_size, "max_field_size": self.max_field_size,
                "max_headers": self.max_headers, "keepalive_timeout": self.keepalive_timeout}


class _Conn:
    __slots__ = ("timer", "pending", "dispatched", "protocol", "group")

    def __init__(self, protocol: _GuardedProtocol, group: str | None) -> None:
        self.protocol = protocol
        self.group = group  # the peer's address group; None: not counted per address (a trusted proxy)
        self.timer: asyncio.TimerHandle | None = None
        self.pending = True
        self.dispatched = False


class ConnectionGuard:
    """Per-connection state keyed by transport. `on_refused(reason)` is called for each connection
    the guard aborts ("over_cap", "over_cap_per_ip", "header_timeout", "banned")."""

    def __init__(self, limits: HttpLimits, on_refused: tp.Callable[[str], None] | None = None,
                 banned: tp.Callable[[str], bool] | None = None, trusted: tp.Callable[[str], bool] | None = None):
        self.limits = limits
        self.on_refused = on_refused or (lambda reason: None)
        self.banned = banned or (lambda peer: False)  # peer address → abort on accept, unparsed
        self.trusted = trusted or (lambda peer: False)  # peer address → a proxy: not counted per address
        self.conns: dict[asyncio.BaseTransport, _Conn] = {}
        self.pending = 0
        self.pending_by_group: dict[str, int] = {}

    def opened(self, transport: asyncio.BaseTransport, protocol: _GuardedProtocol) -> bool:
        """A new connection; False if it must be refused (too many pending connections, in all or from its
        address group; a banned peer)."""
        if self.pending >= self.limits.max_pending:
            self.on_refused("over_cap")
            return False
        peer = transport.get_extra_info("peername")
        if peer and self.banned(peer[0]):
            self.on_refused("banned")
            return False
        group = address_group(str(peer[0])) if peer and not self.trusted(peer[0]) else None
        if group is not None and self.pending_by_group.get(group, 0) >= self.limits.max_pending_per_ip:
            self.on_refused("over_cap_per_ip")
            return False
        conn = _Conn(protocol, group)
        self.conns[transport] = conn
        self._count(conn, +1)
        conn.timer = asyncio.get_running_loop().call_later(self.limits.header_timeout, self._expire, transport)
        return True

    def closed(self, transport: asyncio.BaseTransport) -> None:
        conn = self.conns.pop(transport, None)
        if conn is None:
            return
        if conn.timer is not None:
            conn.timer.cancel()
        if conn.pending:
            self._count(conn, -1)

    def _count(self, conn: _Conn, step: int) -> None:
        self.pending += step
        if conn.group is not None:
            n = self.pending_by_group.get(conn.group, 0) + step
            if n > 0:
                self.pending_by_group[conn.group] = n
            else:
                self.pending_by_group.pop(conn.group, None)

    def dispatched(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection's request headers are complete (a handler runs): no header deadline."""
        conn = self.conns.get(transport) if transport is not None else None
        if conn is not None and not conn.dispatched:
            conn.dispatched = True
            if conn.timer is not None:
                conn.timer.cancel()
                conn.timer = None

    def conversation(self, transport: asyncio.BaseTransport | None) -> None:
        """The connection now holds a conversation slot: it no longer counts against `max_pending`."""
        conn = self.conns.get(transport) if transport is not None else None
        if conn is not None and conn.pending:
            conn.pending = False
            self._count(conn, -1)

    def drop_input(self, transport: asyncio.BaseTransport | None) -> None:
        """From now on the connection's incoming bytes are discarded unparsed (a client being cut off for
        flooding: what it already sent must not cost more parsing while its close goes out)."""
        conn = self.conns.get(transport) if transport is not None else None
        if conn is not None:
            conn.protocol.feeding = False

    def _expire(self, transport: asyncio.BaseTransport) -> None:
        conn = self.conns.get(transport)
        if conn is None or conn.dispatched:
            return
        log.debug("closing a connection: no complete request within %g s", self.limits.header_timeout)
        self.on_refused("header_timeout")
        transport.abort()


FEED_SLICE = 4096  # bytes handed to aiohttp's parser per event-loop iteration

_TOO_MANY_HEADERS = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s")


class _GuardedProtocol(asyncio.Protocol):
    """Wraps aiohttp's RequestHandler for one connection; see `ConnectionGuard`."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard):
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.BaseTransport | None = None  # None: refused on accept (inner never started)
        self.feeding = True  # False once the guard answered the request itself: later bytes are dropped
        self.head_lines = 0  # newlines seen in the first request's head (request line + headers)
        self.head_done = False
        self.last = b""  # the previous chunk's last 3 bytes (a blank line split across chunks)
        self.backlog = bytearray()  # bytes read but not yet handed to aiohttp (see `_feed`)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard.opened(transport, self):
            transport.abort()
            return
        self.transport = transport
        self.inner.connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.transport is None:
            return
        self.guard.closed(self.transport)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or not self.feeding:
            return
        if not self.head_done:
            joined = self.last + data
            end = joined.find(b"\r\n\r\n")
            self.head_done = end >= 0
            self.head_lines += data.count(b"\n") if end < 0 else joined.count(b"\n", len(self.last), end + 2)
            self.last = joined[-3:]
            if self.head_lines > self.guard.limits.max_headers + 1:
                body = f"400: more than {self.guard.limits.max_headers} request headers\n".encode()
                self.guard.on_refused("too_many_headers")
                self.transport.write(_TOO_MANY_HEADERS % (len(body), body))
                self.transport.close()
                self.feeding = False
                return
        if self.backlog or len(data) > FEED_SLICE:
            # aiohttp parses a whole read before the session sees its first message (docs/serving.md,
            # Limits). Hand it over in slices, one per loop iteration, so a session's budget check runs in
            # between and can stop the rest unparsed.
            self.backlog += data
            self.transport.pause_reading()
            if len(self.backlog) == len(data):
                asyncio.get_running_loop().call_soon(self._feed)
            return
        self.inner.data_received(data)

    def _feed(self) -> None:
        if self.transport is None or self.transport.is_closing() or not self.feeding:
            self.backlog.clear()
            return
        chunk = bytes(self.backlog[:FEED_SLICE])
        del self.backlog[:FEED_SLICE]
        self.inner.data_received(chunk)
        if self.backlog:
            asyncio.get_running_loop().call_soon(self._feed)
        elif not getattr(self.inner, "_reading_paused", False):  # aiohttp's own flow control may hold it
            self.transport.resume_reading()

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.transport is not None else None

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite with every connection's protocol wrapped by `guard`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, *,
                 ssl_context=None, backlog: int = 128):
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host, self._port, self._guard = host, port, guard

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        quiet_malformed_requests()
        factory = self._runner.server
        assert factory is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _GuardedProtocol(factory(), self._guard), self._host,
                                                self._port, ssl=self._ssl_context, backlog=self._backlog,
                                                reuse_address=True)

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets
        return self._server.sockets[0].getsockname()[1]


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a full traceback at ERROR for every malformed request it answers 400 (a header line
    too long, a bad request line): one hostile client could fill the disk. Those become one debug line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, aiohttp.http_exceptions.HttpProcessingError):
            log.debug("400 for a malformed request: %s", " ".join(str(exc).split()))
            return False
        return True


def quiet_malformed_requests() -> None:
    """Installs `_MalformedRequestFilter` on aiohttp's server logger (once per process)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequestFilter) for f in logger.filters):
        logger.addFilter(_MalformedRequestFilter())


GUARD = web.AppKey("connection_guard", ConnectionGuard)


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


@web.middleware
async def guard_middleware(request: web.Request, handler):
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.dispatched(request.transport)
    if not PIPELINING_BACKPRESSURE and not is_websocket_upgrade(request):
        # Stop parsing what the client pipelined after this request; close after the response.
        request.protocol.close()
        resp = await handler(request)
        if not resp.prepared:
            resp.force_close()  # says "Connection: close"
        return resp
    return await handler(request)
