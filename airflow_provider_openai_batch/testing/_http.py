"""The emulator's HTTP/1.1 transport: a threaded keep-alive server that knows nothing about OpenAI.

Kept apart from the API semantics so each can be read alone. The server hands every request to one
``respond`` callable and writes back what it returns; the hard parts live here: keep-alive connections that
``stop()`` must be able to close, connections dropped on purpose, and silence on the happy path.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any, NamedTuple

#: Name of every thread the emulator starts, so tests can check that none outlives ``stop()``.
THREAD_NAME = "openai-batch-emulator"


class Response(NamedTuple):
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = MappingProxyType({})
    #: Send only this many bytes of ``body`` (its full length announced), then close: a download cut short.
    drop_after: int | None = None


#: ``respond(method, target, headers, body)``: headers lower-cased; returning None drops the connection.
Responder = Callable[[str, str, dict[str, str], bytes], Response | None]


class Server(ThreadingHTTPServer):
    """Tracks its connections so stopping can close idle keep-alive ones instead of waiting for clients.

    ``block_on_close`` is off because the stock implementation would join threads still blocked reading the
    next request of a keep-alive connection; :meth:`close_connections` wakes and joins them instead.
    Threads are tracked apart from sockets because a thread outlives the moment its socket is forgotten;
    finished ones are dropped only when the list has doubled, as scanning thousands per accept is slow.
    """

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # thousands of pollers may connect at once

    def __init__(self, address: tuple[str, int], respond: Responder) -> None:
        self.respond = respond
        self._connections: set[socket.socket] = set()
        self._handler_threads: list[threading.Thread] = []
        self._reap_at = 64
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), name=THREAD_NAME, daemon=True
        )
        with self._connections_lock:
            self._connections.add(request)
            self._handler_threads.append(thread)
            if len(self._handler_threads) >= self._reap_at:
                self._handler_threads = [alive for alive in self._handler_threads if alive.is_alive()]
                self._reap_at = 2 * len(self._handler_threads) + 64
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self, timeout: float) -> None:
        """Shut every open connection down, which wakes its thread, and wait up to ``timeout`` for them.

        Call after ``shutdown()``: no connection can be accepted any more, so none is missed.
        """
        with self._connections_lock:
            connections, threads = list(self._connections), list(self._handler_threads)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its own thread
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients going away (routine with drops and timeouts); report real bugs."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "openai-batch-emulator"
    disable_nagle_algorithm = True  # headers and body are two writes: avoid delayed-ACK stalls
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: one stderr line per request would drown test output and slow benchmarks down."""

    def _handle(self) -> None:
        body = self._read_body()
        headers = {name.lower(): value for name, value in self.headers.items()}
        response = self.server.respond(self.command, self.path, headers, body)
        if response is None:
            self._drop()
        else:
            self._send(response)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        """A chunked body (what a client sends when it streams an upload of unknown size), trailers skipped."""
        chunks = []
        while size := int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline(1024)  # the CRLF closing the chunk
        while self.rfile.readline(1024).strip():
            pass  # trailer fields, up to the blank line ending the body
        return b"".join(chunks)

    def _send(self, response: Response) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if response.drop_after is None:
            self.wfile.write(response.body)
            return
        self.close_connection = True
        try:
            self.wfile.write(response.body[: response.drop_after])
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client left first: the connection is lost either way

    def _drop(self) -> None:
        """Promise a longer body than is sent, then shut the socket down: a connection lost mid-response."""
        self.close_connection = True
        partial = b'{"id": "batch_'
        head = (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(partial) + 1024}\r\n\r\n"
        )
        try:
            self.wfile.write(head.encode() + partial)
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the client left first: the connection is lost either way
