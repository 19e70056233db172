"""A lean HTTP/1.1 keep-alive transport for the shared ``httpx.AsyncClient`` of the triggerer.

Why not httpx's default transport: in a triggerer every waiting cancellation polls through one client, so the
transport's CPU per request is the triggerer's CPU per poll. httpcore over anyio costs about 1 ms of CPU per
request on a small VM, and its connection pool walks every pooled connection (with a ``poll()`` syscall each)
for every request and every response (encode/httpcore#1035). This transport speaks the same HTTP/1.1, through
the same ``h11`` state machine httpcore uses, directly over asyncio streams; taking an idle connection is
O(1). See docs/performance.md for the measurements.

What it leaves out, on purpose, because the Batch API never needs it: HTTP/2, streaming request bodies and
streaming responses (every answer is a small JSON document, read whole). Proxies still work: httpx routes
proxied URLs (``HTTPS_PROXY``...) to its own proxy transports before they reach this one.

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
#: Happy eyeballs (RFC 8305, whose recommended delay this is): when a host has several addresses (IPv6 and
#: IPv4), the next one is tried once the previous attempt fails or has been pending this long, whichever comes
#: first. A broken IPv6 route, where packets vanish rather than being refused, then costs this delay instead
#: of the whole connect timeout. asyncio interleaves the addresses by family once a delay is given.
HAPPY_EYEBALLS_DELAY = 0.25
_READ_SIZE = 64 * 1024
#: As httpx says for a closed client: using the transport after that is a bug, not a network failure.
_CLOSED = "Cannot send a request, as the transport has been closed."
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
    #: Set when reading a response failed: whether no byte of it had arrived
    #: (see :func:`_closed_before_answering`).
    unanswered: bool = False

    def reusable(self, now: float) -> bool:
        """Whether this idle connection can carry the next request.

        Not once the server closed it, nor once bytes arrived while it was idle: no request was waiting for
        them, so parsing them as the next answer would hand a request someone else's response (typically the
        "408 Request Timeout" a server sends before closing an idle connection). StreamReader has no public
        way to tell that it holds bytes (``at_eof()`` stays false while it does, even after the end of the
        stream), so this reads its ``_buffer``, a bytearray in CPython 3.11 to 3.13: one attribute load per
        request, where a ``read()`` would cost a coroutine. tests/test_transport.py fails if that changes.
        """
        reader = self.reader
        return not reader._buffer and not reader.at_eof() and now - self.idle_since < KEEPALIVE_EXPIRY  # type: ignore[attr-defined]


class KeepAliveTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams with a LIFO pool of keep-alive connections per origin.

    :param ssl_context: TLS settings for ``https`` origins.
    :param max_idle: idle connections kept per origin; more are closed when their response is read.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext, max_idle: int) -> None:
        self._ssl_context = ssl_context
        self._max_idle = max_idle
        self._idle: dict[Origin, deque[_Connection]] = {}
        #: Every open connection, idle or carrying a request: closing the transport closes them all. Kept up
        #: to date when a connection opens or closes, so that a request that reuses one pays nothing for it.
        self._open: set[_Connection] = set()
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        origin = _origin(request.url)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        connection = self._take_idle(origin)
        while True:
            reused = connection is not None
            if connection is None:
                connection = await self._connect(origin, timeouts.get("connect"))
            try:
                response = await _exchange(connection, request, timeouts)
            except BaseException as error:
                self._discard(connection)  # the exchange may have stopped half-way: it cannot be reused
                # A server may close a kept-alive connection just as it is reused (its idle timeout ran out
                # while the request was on its way): the request is sent again, once and at once, on a new
                # connection. Not after a fresh connection failed: that failure is the server's, for the
                # hook's retries. Every request of this API is safe to send twice (the cancel is idempotent).
                if self._closed or not (reused and _closed_before_answering(connection, error)):
                    raise
                connection = None
                continue
            self._give_back(origin, connection)
            return response

    async def aclose(self) -> None:
        """Close every connection, those carrying a request included: that request fails at once."""
        self._closed = True
        connections = list(self._open)
        self._open.clear()
        self._idle.clear()
        for connection in connections:
            # Ends a read in flight with this error: closing a plain connection would have it read as the
            # server's "disconnected without a response", and a TLS one only after its shutdown handshake.
            connection.reader.set_exception(
                ConnectionAbortedError("The transport was closed with the request in flight.")
            )
            connection.writer.close()
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
            self._discard(connection)
        return None

    def _give_back(self, origin: Origin, connection: _Connection) -> None:
        protocol = connection.protocol
        if protocol.our_state is not h11.DONE or protocol.their_state is not h11.DONE:
            self._discard(connection)  # e.g. the server said "Connection: close"
            return
        protocol.start_next_cycle()
        idle = self._idle.setdefault(origin, deque())
        now = asyncio.get_running_loop().time()
        # The pool is taken from its top, so a connection under a fresher one could stay idle, and open, for
        # as long as the fresher one keeps being reused. The deque is ordered by idle_since: expired
        # connections are at its bottom, and each give-back closes them there, in one comparison when there
        # are none.
        while idle and now - idle[0].idle_since >= KEEPALIVE_EXPIRY:
            self._discard(idle.popleft())
        if len(idle) >= self._max_idle:
            self._discard(connection)
            return
        connection.idle_since = now
        idle.append(connection)

    def _discard(self, connection: _Connection) -> None:
        self._open.discard(connection)
        connection.writer.close()

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        if self._closed:
            raise RuntimeError(_CLOSED)
        scheme, host, port = origin
        tls = scheme == "https"
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    ssl=self._ssl_context if tls else None,
                    server_hostname=host if tls else None,
                    happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                )
        except TimeoutError as error:
            raise httpx.ConnectTimeout(f"Timed out connecting to {host}:{port}.") from error
        except OSError as error:  # ssl.SSLError included
            raise httpx.ConnectError(f"Cannot connect to {host}:{port}: {error}") from error
        if self._closed:  # while connecting: nothing would close this connection
            writer.close()
            raise RuntimeError(_CLOSED)
        connection = _Connection(reader, writer)
        self._open.add(connection)
        return connection


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
    received = False
    try:
        while True:
            try:
                event = protocol.next_event()
                if event is h11.NEED_DATA:
                    data = await connection.reader.read(_READ_SIZE)
                    if not data and not received:
                        raise httpx.RemoteProtocolError(
                            "Server disconnected without sending a response.", request=request
                        )
                    received = True
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
    except BaseException:
        # Only on failure, to keep the success path free of bookkeeping. A reset connection raises before
        # handing over the bytes it had buffered (StreamReader has no public way to see them): those count.
        connection.unanswered = not received and not connection.reader._buffer  # type: ignore[attr-defined]
        raise


def in_memory(response: httpx.Response, raw: bytes) -> httpx.Response:
    """``response`` with ``raw``, its body as received, read whole: decoded (gunzipped...) here, synchronously.

    Decoding a body as httpx's async streams do raises between two of its async generators when the body does
    not decode (``Content-Encoding: gzip`` on a plain body, as a CDN may send), and leaves the inner one
    mid-iteration for the event loop to close in a task of its own. Read raw to its end, then decoded in memory,
    every generator has finished first, and ``httpx.DecodingError`` is raised here, once, for the hook to retry.
    """
    whole = httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        request=response.request,
        extensions=response.extensions,
    )
    whole.read()
    return whole


async def read_whole(response: httpx.Response) -> httpx.Response:
    """A streamed ``response`` read to its end and released: :func:`in_memory`."""
    try:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    finally:
        await response.aclose()
    return in_memory(response, raw)


def _closed_before_answering(connection: _Connection, error: BaseException) -> bool:
    """Whether ``error`` says the server closed (or reset) the connection before any byte of its response:
    the failure of a kept-alive connection that the server dropped as it was reused, worth one more try.

    A timeout is not (the server may be working on it); a connection that answered part of a response is not
    (the server took the request).
    """
    if isinstance(error, httpx.WriteError):
        return True  # nothing is read before the request is written
    return isinstance(error, httpx.ReadError | httpx.RemoteProtocolError) and connection.unanswered


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
