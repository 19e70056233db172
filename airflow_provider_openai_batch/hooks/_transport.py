"""A lean HTTP/1.1 keep-alive transport for the shared ``httpx.AsyncClient`` of the triggerer.

Why not httpx's default transport: in a triggerer every waiting cancellation polls through one client, so the
transport's CPU per request is the triggerer's CPU per poll. httpcore over anyio costs about 1 ms of CPU per
request on a small VM, and its connection pool walks every pooled connection (with a ``poll()`` syscall each)
for every request and every response (encode/httpcore#1035). This transport speaks the same HTTP/1.1, through
the same ``h11`` state machine httpcore uses, directly over asyncio streams; taking an idle connection is O(1).
See docs/performance.md for the measurements.

What it leaves out, on purpose, because polling never needs it: HTTP/2, streaming request bodies and
streaming responses (every answer is a small JSON document, read whole; file downloads, which stream, run in
workers through a plain ``httpx`` client instead: ``_async_clients.streaming_client``). Proxies still work: httpx
routes proxied URLs (``HTTPS_PROXY``...) to its own proxy transports before they reach this one.

Concurrency is bounded by the caller (the shared client's semaphore): this transport opens a connection
whenever none is idle, and keeps at most ``max_idle`` idle ones per origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import h11
import httpx

#: An idle connection older than this is closed rather than reused, as httpx does by default: servers and load
#: balancers drop idle connections after a while, and reusing one at that moment would fail the request.
KEEPALIVE_EXPIRY = 5.0
#: How long closing the pool waits for its connections to be closed.
CLOSE_TIMEOUT = 5.0
_READ_SIZE = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]
T = TypeVar("T")


@dataclass(eq=False)
class _Connection:
    """One open HTTP/1.1 connection and the protocol state of the exchange on it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def reusable(self, now: float) -> bool:
        return not self.reader.at_eof() and now - self.idle_since < KEEPALIVE_EXPIRY

    def close(self) -> None:
        self.writer.close()


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams with a LIFO pool of keep-alive connections per origin.

    :param ssl_context: TLS settings for ``https`` origins.
    :param max_idle: idle connections kept per origin; more are closed when their response is read.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext, max_idle: int) -> None:
        self._ssl_context = ssl_context
        self._max_idle = max_idle
        self._idle: dict[Origin, deque[_Connection]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = _origin(request.url)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        connection = self._take_idle(origin) or await self._connect(origin, timeouts.get("connect"))
        try:
            response = await _exchange(connection, request, timeouts)
        except BaseException:
            connection.close()  # the exchange may have stopped half-way: the connection cannot be reused
            raise
        self._give_back(origin, connection)
        return response

    async def aclose(self) -> None:
        connections = [connection for idle in self._idle.values() for connection in idle]
        self._idle.clear()
        for connection in connections:
            connection.close()
        # Bounded: a TLS peer that never answers the close would otherwise hold the last hook's exit for
        # asyncio's 30 s TLS shutdown timeout. An error means the peer went first: nothing left to release.
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.gather(*(connection.writer.wait_closed() for connection in connections))

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = asyncio.get_running_loop().time()
        while idle:
            connection = idle.pop()  # the most recently used: least likely to have been dropped
            if connection.reusable(now):
                return connection
            connection.close()
        return None

    def _give_back(self, origin: Origin, connection: _Connection) -> None:
        protocol = connection.protocol
        if protocol.our_state is not h11.DONE or protocol.their_state is not h11.DONE:
            connection.close()  # e.g. the server said "Connection: close"
            return
        protocol.start_next_cycle()
        idle = self._idle.setdefault(origin, deque())
        if len(idle) >= self._max_idle:
            connection.close()
            return
        connection.idle_since = asyncio.get_running_loop().time()
        idle.append(connection)

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        tls = scheme == "https"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=self._ssl_context if tls else None, server_hostname=host if tls else None
                )
        except TimeoutError as error:
            raise httpx.ConnectTimeout(f"Timed out connecting to {host}:{port}.") from error
        except OSError as error:  # ssl.SSLError included
            raise httpx.ConnectError(f"Cannot connect to {host}:{port}: {error}") from error
        return _Connection(reader, writer)


async def _exchange(
    connection: _Connection, request: httpx.Request, timeouts: dict[str, float | None]
) -> httpx.Response:
    """Send ``request`` on ``connection`` and read the whole response."""
    protocol = connection.protocol
    body = await request.aread()
    target = request.url.raw_path
    try:
        data = protocol.send(h11.Request(method=request.method, target=target, headers=request.headers.raw))
        if body:
            data += protocol.send(h11.Data(data=body))
        data += protocol.send(h11.EndOfMessage())
    except h11.LocalProtocolError as error:
        raise httpx.LocalProtocolError(str(error), request=request) from error
    connection.writer.write(data)
    await _io(connection.writer.drain(), timeouts.get("write"), httpx.WriteTimeout, httpx.WriteError, request)
    # The read timeout bounds the whole response: every response of this API is one small JSON document.
    return await _io(
        _read_response(connection, request), timeouts.get("read"), httpx.ReadTimeout, httpx.ReadError, request
    )


async def _read_response(connection: _Connection, request: httpx.Request) -> httpx.Response:
    protocol = connection.protocol
    head: h11.Response | None = None
    chunks: list[bytes] = []
    while True:
        try:
            event = protocol.next_event()
            if event is h11.NEED_DATA:
                data = await connection.reader.read(_READ_SIZE)
                if not data and head is None:
                    raise httpx.RemoteProtocolError(
                        "Server disconnected without sending a response.", request=request
                    )
                protocol.receive_data(data)
                continue
        except h11.RemoteProtocolError as error:
            raise httpx.RemoteProtocolError(str(error), request=request) from error
        if isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            chunks.append(event.data)
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            return httpx.Response(
                head.status_code,
                headers=head.headers.raw_items(),
                stream=httpx.ByteStream(b"".join(chunks)),
                request=request,
                extensions={"http_version": b"HTTP/1.1", "reason_phrase": head.reason},
            )
        # h11.InformationalResponse (1xx) is skipped; the final response follows it.


async def _io(
    operation: Awaitable[T],
    timeout: float | None,
    on_timeout: type[httpx.TimeoutException],
    on_error: type[httpx.NetworkError],
    request: httpx.Request,
) -> T:
    """Await ``operation`` within ``timeout``, turning timeouts and socket errors into httpx's exceptions."""
    try:
        async with asyncio.timeout(timeout):
            return await operation
    except TimeoutError as error:
        raise on_timeout(f"Timed out after {timeout} s.", request=request) from error
    except OSError as error:
        raise on_error(str(error) or type(error).__name__, request=request) from error


def _origin(url: httpx.URL) -> Origin:
    if url.scheme not in _DEFAULT_PORTS:
        raise httpx.UnsupportedProtocol(f"Unsupported URL scheme {url.scheme!r}: only http and https are.")
    return url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme]
