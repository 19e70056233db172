"""KeepAliveTransport over real sockets: a scripted HTTP/1.1 server on loopback, with and without TLS.

The emulator covers the transport in every async hook and trigger test; this server covers what the emulator
does not do on purpose: chunked and gzip bodies, ``Connection: close``, hanging, dropping, resetting or
garbling a response, bytes on an idle connection, and TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from airflow.providers.common.compat.sdk import Connection
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pytest_mock import MockerFixture

from airflow_provider_openai_batch.hooks import _async_clients, _connection, _transport
from airflow_provider_openai_batch.hooks._connection import ConnectionSettings, shared_ssl_context
from airflow_provider_openai_batch.hooks._transport import KeepAliveTransport

BODY = b'{"id": "batch_1", "status": "cancelled"}'


def ok(body: bytes = BODY, *headers: str) -> bytes:
    head = "".join(f"{header}\r\n" for header in headers)
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        + head.encode()
        + (f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    )


#: Script actions besides raw response bytes.
HANG, DROP, RESET = "hang", "drop", "reset"


def reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP reset rather than the orderly FIN, as a crashed or impatient peer
    does."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class ScriptedServer:
    """Answers the n-th request it receives (on any connection) with ``script[n]``: raw response bytes, then
    the connection stays open unless the response says ``Connection: close`` or n is in ``close_after``;
    ``HANG`` (never answer; close when the client does), ``DROP`` (close without answering) or ``RESET``
    (reset without answering). Past the end of the script, answers :func:`ok`. ``writers`` holds the server's
    end of each open connection, for a test to act on one the client keeps idle."""

    script: list[bytes | str] = field(default_factory=list)
    close_after: set[int] = field(default_factory=set)
    tls: ssl.SSLContext | None = None
    connections: int = 0
    closed: int = 0
    requests: list[bytes] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://{'localhost' if self.tls else '127.0.0.1'}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    ),
                    0,
                )
                self.requests.append(head + await reader.readexactly(length))
                action = (
                    self.script[len(self.requests) - 1] if len(self.requests) <= len(self.script) else ok()
                )
                if action == HANG:
                    with contextlib.suppress(ConnectionError):
                        await reader.read()  # returns once the client closes
                    return
                if action == DROP:
                    return
                if action == RESET:
                    reset(writer)
                    return
                assert isinstance(action, bytes)
                writer.write(action)
                await writer.drain()
                if b"connection: close" in action.lower() or len(self.requests) in self.close_after:
                    return
        finally:
            self.closed += 1
            self.writers.remove(writer)
            writer.close()

    async def aclose(self) -> None:
        assert self._server is not None
        self._server.close()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    await scripted.start()
    yield scripted
    await scripted.aclose()


@pytest.fixture
async def transport() -> AsyncIterator[KeepAliveTransport]:
    lean = KeepAliveTransport(ssl_context=shared_ssl_context(), max_idle=2)
    yield lean
    await lean.aclose()


async def send(
    transport: KeepAliveTransport,
    url: str,
    method: str = "GET",
    content: bytes | None = None,
    timeout: float = 5.0,
) -> httpx.Response:
    """Send one request the way the shared client does: straight to the transport, then read the body."""
    request = httpx.Request(
        method, url, content=content, extensions={"timeout": httpx.Timeout(timeout).as_dict()}
    )
    response = await transport.handle_async_request(request)
    await response.aread()
    return response


async def settle() -> None:
    """Let a close on one end reach the other end's event loop."""
    await asyncio.sleep(0.05)


# -- keep-alive ---------------------------------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    for _ in range(3):
        response = await send(transport, f"{server.url}/v1/batches/batch_1")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /v1/batches/batch_1 HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in server.requests[0]


async def test_query_and_body_are_sent(server: ScriptedServer, transport: KeepAliveTransport) -> None:
    await send(transport, f"{server.url}/v1/batches?limit=2&after=b_4", method="POST", content=b'{"a": 1}')
    assert server.requests[0].startswith(b"POST /v1/batches?limit=2&after=b_4 HTTP/1.1\r\n")
    assert server.requests[0].endswith(b'\r\n\r\n{"a": 1}')


async def test_connection_close_is_honoured(server: ScriptedServer, transport: KeepAliveTransport) -> None:
    server.script = [ok(BODY, "Connection: close"), ok()]
    assert (await send(transport, server.url)).status_code == 200
    assert (await send(transport, server.url)).status_code == 200
    assert server.connections == 2


async def test_an_idle_connection_the_server_closed_is_not_reused(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    """A load balancer closes idle keep-alive connections without notice; writing the next request on such a
    connection would fail it, so the transport notices the close and connects again."""
    server.close_after = {1}
    await send(transport, server.url)
    await settle()
    assert (await send(transport, server.url)).status_code == 200
    assert server.connections == 2


REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("then_close", [True, False], ids=["then-closed", "left-open"])
async def test_bytes_sent_on_an_idle_connection_are_not_taken_as_the_next_answer(
    server: ScriptedServer, transport: KeepAliveTransport, then_close: bool
) -> None:
    """Servers send "408 Request Timeout" on a keep-alive connection they are about to close: nobody asked
    for it, so the next request must not get it as its answer. The connection is discarded when taken from
    the pool, whether the close that follows the 408 already arrived or not."""
    await send(transport, server.url)
    (idle,) = server.writers
    idle.write(REQUEST_TIMEOUT)
    if then_close:
        idle.close()
    await settle()
    response = await send(transport, server.url)
    assert response.status_code == 200 and response.content == BODY
    assert server.connections == 2 and len(server.requests) == 2, "the answer came on a new connection"


async def test_expired_idle_connections_are_not_reused(
    server: ScriptedServer, transport: KeepAliveTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_transport, "KEEPALIVE_EXPIRY", 0.0)
    await send(transport, server.url)
    await send(transport, server.url)
    assert server.connections == 2
    await settle()
    assert server.closed == 1, "the expired connection was closed"


async def test_expired_connections_under_a_fresh_one_are_closed(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    """The pool hands out its most recently used connection first; one that expired under it must still be
    closed, not left open until the server or the triggerer's exit closes it."""
    await asyncio.gather(*(send(transport, server.url) for _ in range(2)))
    port = int(server.url.rsplit(":", 1)[1])
    oldest, freshest = transport._idle[("http", "127.0.0.1", port)]
    oldest.idle_since -= _transport.KEEPALIVE_EXPIRY  # expired, under a connection that is not
    await send(transport, server.url)
    await settle()
    assert server.connections == 2, "the fresh connection was reused"
    assert server.closed == 1, "the expired one under it was closed"
    assert list(transport._idle[("http", "127.0.0.1", port)]) == [freshest]


async def test_at_most_max_idle_connections_are_kept(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    responses = await asyncio.gather(*(send(transport, server.url) for _ in range(3)))
    assert [response.status_code for response in responses] == [200] * 3
    assert server.connections == 3
    await settle()
    assert server.closed == 1, "max_idle=2: the third connection is closed once its response is read"
    await asyncio.gather(*(send(transport, server.url) for _ in range(2)))
    assert server.connections == 3, "the two kept connections are reused"


async def test_aclose_closes_the_idle_connections(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    await send(transport, server.url)
    await transport.aclose()
    await settle()
    assert server.closed == 1


async def test_aclose_does_not_wait_forever_for_a_peer_that_never_closes(
    server: ScriptedServer, transport: KeepAliveTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS peer that never answers the close would hold the last trigger's exit for asyncio's 30 s TLS
    shutdown timeout; the transport waits at most ``CLOSE_TIMEOUT``."""
    await send(transport, server.url)
    (connection,) = transport._idle[("http", "127.0.0.1", int(server.url.rsplit(":", 1)[1]))]

    async def never_closed() -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(connection.writer, "wait_closed", never_closed)
    monkeypatch.setattr(_transport, "CLOSE_TIMEOUT", 0.1)
    await asyncio.wait_for(transport.aclose(), timeout=2)


async def test_aclose_ends_the_requests_in_flight_and_closes_their_connections(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    """The shared client closes when its last hook leaves. A request still in flight then, on a reused or a
    new connection, must neither keep its socket open nor wait for an answer: it fails at once."""
    await send(transport, server.url)
    server.script = [ok(), HANG, HANG]
    in_flight = [asyncio.create_task(send(transport, server.url, timeout=60)) for _ in range(2)]
    await settle()
    assert len(server.requests) == 3 and server.connections == 2, "one request reused the idle connection"
    async with asyncio.timeout(5):  # waiting for the requests' own timeout fails the test
        await transport.aclose()
        outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
    assert [type(outcome) for outcome in outcomes] == [httpx.ReadError, httpx.ReadError]
    assert all("transport was closed" in str(outcome) for outcome in outcomes)
    await settle()
    assert server.closed == 2, "no socket left open"
    with pytest.raises(RuntimeError, match="transport has been closed"):
        await send(transport, server.url)
    assert server.connections == 2, "a closed transport opens no connection"


async def test_a_connection_that_opens_after_aclose_is_closed(
    server: ScriptedServer, transport: KeepAliveTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request still connecting when the transport closes gets its connection afterwards: nothing else
    would ever close it."""
    connecting, go_on = asyncio.Event(), asyncio.Event()
    open_connection = asyncio.open_connection

    async def slow_open_connection(
        *args: Any, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        connecting.set()
        await go_on.wait()
        return await open_connection(*args, **kwargs)

    monkeypatch.setattr(asyncio, "open_connection", slow_open_connection)
    pending = asyncio.create_task(send(transport, server.url))
    await connecting.wait()
    await transport.aclose()
    go_on.set()
    with pytest.raises(RuntimeError, match="transport has been closed"):
        await pending
    await settle()
    assert server.connections == 1 and server.closed == 1
    assert server.requests == []


# -- bodies -------------------------------------------------------------------------------------------------


async def test_chunked_gzip_body_is_decoded(server: ScriptedServer, transport: KeepAliveTransport) -> None:
    packed = gzip.compress(BODY)
    half = len(packed) // 2
    chunks = b"".join(
        f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (packed[:half], packed[half:])
    )
    server.script = [
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    ]
    response = await send(transport, server.url)
    assert response.content == BODY
    assert (await send(transport, server.url)).status_code == 200
    assert server.connections == 1, "a chunked response leaves the connection reusable"


async def test_informational_responses_are_skipped(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    server.script = [b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok()]
    response = await send(transport, server.url)
    assert response.status_code == 200 and response.content == BODY


async def test_error_statuses_are_responses(server: ScriptedServer, transport: KeepAliveTransport) -> None:
    envelope = b'{"error": {"message": "Cannot cancel a batch with status \'completed\'."}}'
    server.script = [
        b"HTTP/1.1 409 Conflict\r\nContent-Length: " + str(len(envelope)).encode() + b"\r\n\r\n" + envelope
    ]
    response = await send(transport, server.url)
    assert response.status_code == 409 and response.reason_phrase == "Conflict"
    assert response.json()["error"]["message"].startswith("Cannot cancel")


# -- failures -----------------------------------------------------------------------------------------------


async def test_read_timeout_discards_the_connection(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    server.script = [HANG, ok()]
    with pytest.raises(httpx.ReadTimeout):
        await send(transport, server.url, timeout=0.1)
    assert (await send(transport, server.url)).status_code == 200
    assert server.connections == 2


async def test_server_closing_without_a_response(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    server.script = [DROP, ok()]
    with pytest.raises(httpx.RemoteProtocolError, match="Server disconnected without sending a response"):
        await send(transport, server.url)
    assert (await send(transport, server.url)).status_code == 200


async def test_garbage_instead_of_http(server: ScriptedServer, transport: KeepAliveTransport) -> None:
    server.script = [b"SSH-2.0-OpenSSH_9.6\r\n\r\n"]
    with pytest.raises(httpx.RemoteProtocolError):
        await send(transport, server.url)


async def test_truncated_body(server: ScriptedServer, transport: KeepAliveTransport) -> None:
    server.script = [b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{"id":']
    with pytest.raises(httpx.RemoteProtocolError):
        await send(transport, server.url)


@pytest.mark.parametrize("action", [DROP, RESET])
async def test_a_reused_connection_closed_before_the_answer_is_sent_again_at_once(
    server: ScriptedServer, transport: KeepAliveTransport, caplog: pytest.LogCaptureFixture, action: str
) -> None:
    """A server closes an idle keep-alive connection when its idle timeout runs out, possibly just as the
    client reuses it: the request meets a closed (FIN: the read sees the end of the stream) or reset (the read
    fails) connection before any byte of an answer. That is not the server failing, so the request goes out
    again at once on a new connection, without a warning and without spending one of the hook's retries (and
    their backoff)."""
    server.script = [ok(), action]
    await send(transport, server.url)
    with caplog.at_level(logging.DEBUG):
        response = await send(transport, server.url)
    assert response.status_code == 200 and response.content == BODY
    assert len(server.requests) == 3 and server.connections == 2, "sent again, once, on a new connection"
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


async def test_a_reused_connection_reset_before_the_request_is_written_is_retried(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    """A reset that reaches the client while the connection is idle makes the write itself fail."""
    await send(transport, server.url)
    reset(server.writers[0])
    await settle()
    assert (await send(transport, server.url)).status_code == 200
    assert len(server.requests) == 2 and server.connections == 2, "the request reached the server once"


async def test_a_failed_retry_raises_the_retry_s_error(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    await send(transport, server.url)
    server.script = [ok(), DROP, RESET, ok()]
    with pytest.raises(httpx.ReadError):
        await send(transport, server.url)
    assert len(server.requests) == 3, "one retry, no more"


@pytest.mark.parametrize(
    ("action", "error"), [(DROP, httpx.RemoteProtocolError), (RESET, httpx.ReadError)], ids=[DROP, RESET]
)
async def test_a_fresh_connection_that_fails_before_any_answer_is_not_retried(
    server: ScriptedServer, transport: KeepAliveTransport, action: str, error: type[httpx.HTTPError]
) -> None:
    """On a connection just opened, the server cannot have timed it out: the failure is the server's."""
    server.script = [action]
    with pytest.raises(error):
        await send(transport, server.url)
    assert len(server.requests) == 1


async def test_a_reused_connection_that_answered_in_part_is_not_retried(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    """Once a byte of the answer arrived, the server has taken the request: the hook decides about a retry."""
    server.script = [ok(), b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{", ok()]
    server.close_after = {2}
    await send(transport, server.url)
    with pytest.raises(httpx.RemoteProtocolError):
        await send(transport, server.url)
    assert len(server.requests) == 2


async def test_a_reused_connection_that_times_out_is_not_retried(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    """A slow server is not a closed connection: sending again would double the wait."""
    server.script = [ok(), HANG, ok()]
    await send(transport, server.url)
    with pytest.raises(httpx.ReadTimeout):
        await send(transport, server.url, timeout=0.1)
    assert len(server.requests) == 2


async def test_connection_refused(transport: KeepAliveTransport, unused_tcp_port: int) -> None:
    with pytest.raises(httpx.ConnectError, match=f"127.0.0.1:{unused_tcp_port}"):
        await send(transport, f"http://127.0.0.1:{unused_tcp_port}/v1/batches/batch_1")


@pytest.fixture
def blackhole() -> Iterator[tuple[str, int]]:
    """A loopback address where a connection attempt is neither accepted nor refused, as over a broken route:
    a listener whose accept queue (one connection) is full drops further connection requests unanswered."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address: tuple[str, int] = listener.getsockname()
        with socket.create_connection(address):
            yield address


async def test_a_host_whose_first_address_does_not_answer_is_reached_on_the_next(
    server: ScriptedServer,
    transport: KeepAliveTransport,
    blackhole: tuple[str, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host with IPv6 and IPv4 addresses behind a broken IPv6 route: the first address never answers. Tried
    one after the other, the addresses would spend the whole connect timeout on the first; with happy eyeballs
    the next one is tried while the first attempt is still pending, and the request goes through. The name
    resolves (here, by a stand-in for the resolver) to two loopback addresses: the unanswering one first."""
    loop = asyncio.get_running_loop()
    port = int(server.url.rsplit(":", 1)[1])
    stream = (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
    resolved: list[str] = []
    attempted: list[tuple[str, int]] = []

    async def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        resolved.append(host)
        return [(*stream, blackhole), (*stream, ("127.0.0.1", port))]

    sock_connect = loop.sock_connect

    async def recorded_sock_connect(sock: socket.socket, address: tuple[str, int]) -> None:
        attempted.append(address)
        await sock_connect(sock, address)

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(loop, "sock_connect", recorded_sock_connect)
    response = await send(transport, f"http://localhost:{port}/v1/batches/batch_1")
    assert response.status_code == 200 and response.content == BODY
    assert resolved == ["localhost"]
    assert attempted == [blackhole, ("127.0.0.1", port)], (
        "the second address was tried, the first still pending"
    )
    assert server.connections == 1


async def test_unsupported_scheme(transport: KeepAliveTransport) -> None:
    with pytest.raises(httpx.UnsupportedProtocol, match="'ftp'"):
        await send(transport, "ftp://127.0.0.1/v1/batches")


async def test_a_cancelled_request_does_not_leave_its_connection_in_the_pool(
    server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    server.script = [HANG, ok()]
    pending = asyncio.create_task(send(transport, server.url))
    await settle()
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    assert (await send(transport, server.url)).status_code == 200
    assert server.connections == 2


# -- TLS ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    cert_file: Path
    key_file: Path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate for ``localhost`` and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Certificate(cert_file, key_file)


@pytest.fixture
async def tls_server(certificate: Certificate) -> AsyncIterator[ScriptedServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert_file, certificate.key_file)
    scripted = ScriptedServer(tls=context)
    await scripted.start()
    yield scripted
    await scripted.aclose()


async def test_https_with_a_trusted_certificate(tls_server: ScriptedServer, certificate: Certificate) -> None:
    lean = KeepAliveTransport(
        ssl_context=ssl.create_default_context(cafile=certificate.cert_file), max_idle=2
    )
    try:
        for _ in range(2):
            response = await send(lean, f"{tls_server.url}/v1/batches/batch_1")
            assert response.json()["id"] == "batch_1"
    finally:
        await lean.aclose()
    assert tls_server.connections == 1


async def test_https_refuses_an_untrusted_certificate(
    tls_server: ScriptedServer, transport: KeepAliveTransport
) -> None:
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await send(transport, f"{tls_server.url}/v1/batches/batch_1")
    assert tls_server.requests == [], "nothing was sent to the untrusted server"


# -- choice of transport and TLS context in the shared client ------------------------------------------------


def settings_for(url: str) -> ConnectionSettings:
    return ConnectionSettings(conn_id="transport_test", api_key="sk-transport-test", base_url=url)


@pytest.mark.parametrize(
    ("variable", "url", "lean"),
    [
        (None, "https://api.openai.com/v1", True),
        ("HTTPS_PROXY", "https://api.openai.com/v1", False),
        ("https_proxy", "https://api.openai.com/v1", False),
        ("ALL_PROXY", "https://api.openai.com/v1", False),
        ("HTTP_PROXY", "https://api.openai.com/v1", True),
        ("HTTP_PROXY", "http://batch-proxy.internal/v1", False),
    ],
)
async def test_httpx_keeps_routing_when_a_proxy_is_configured(
    monkeypatch: pytest.MonkeyPatch, variable: str | None, url: str, lean: bool
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    if variable:
        monkeypatch.setenv(variable, "http://127.0.0.1:3128")
    settings = settings_for(url)
    shared = await _async_clients.acquire(settings)
    try:
        assert isinstance(shared.transport, KeepAliveTransport) is lean
    finally:
        await _async_clients.release(settings)


async def test_triggers_starting_together_build_one_tls_context(mocker: MockerFixture) -> None:
    _connection._ssl_contexts.clear()
    builds = mocker.spy(httpx, "create_ssl_context")
    settings = [settings_for(f"https://api{index}.openai.test/v1") for index in range(20)]
    try:
        clients = await asyncio.gather(*(_async_clients.acquire(each) for each in settings))
        assert builds.call_count == 1
        assert len({id(client.transport._ssl_context) for client in clients}) == 1  # type: ignore[union-attr]
    finally:
        for each in settings:
            await _async_clients.release(each)


async def test_a_failed_tls_context_build_is_retried_by_the_next_caller(mocker: MockerFixture) -> None:
    _connection._ssl_contexts.clear()
    real_build: Callable[..., ssl.SSLContext] = httpx.create_ssl_context
    mocker.patch.object(
        httpx, "create_ssl_context", side_effect=[OSError("CA bundle unreadable"), real_build()]
    )
    settings = settings_for("https://api.openai.test/v1")
    with pytest.raises(ValueError, match="CA bundle unreadable"):
        await _async_clients.acquire(settings)
    shared = await _async_clients.acquire(settings)
    await _async_clients.release(settings)
    assert shared.transport is not None


# -- private CAs: the connection's ca_bundle extra, SSL_CERT_FILE, REQUESTS_CA_BUNDLE -------------------------


@pytest.fixture
def fresh_tls_contexts(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No TLS context built yet, and no CA variables from the environment running the tests."""
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    _connection._ssl_contexts.clear()
    yield
    _connection._ssl_contexts.clear()


@pytest.mark.parametrize("source", ["ca_bundle extra", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
async def test_a_private_ca_is_trusted_sync_and_async(
    tls_server: ScriptedServer,
    certificate: Certificate,
    fresh_tls_contexts: None,
    monkeypatch: pytest.MonkeyPatch,
    source: str,
) -> None:
    extras: dict[str, str] = {}
    if source == "ca_bundle extra":
        extras["ca_bundle"] = str(certificate.cert_file)
    else:
        monkeypatch.setenv(source, str(certificate.cert_file))
    conn = Connection(
        conn_id="private_ca", conn_type="openai_batch", password="sk-ca-test", host=f"{tls_server.url}/v1"
    )
    settings = ConnectionSettings.from_connection(conn, extras)
    shared = await _async_clients.acquire(settings)
    try:
        assert (await shared.send(shared.client.build_request("GET", "/batches/batch_1"))).status_code == 200
    finally:
        await _async_clients.release(settings)
    with httpx.Client(**settings.client_kwargs()) as client:
        assert (await asyncio.to_thread(client.get, "/batches/batch_1")).status_code == 200
    assert len(tls_server.requests) == 2


async def test_an_unreadable_ca_bundle_is_named_before_any_request(
    tls_server: ScriptedServer, tmp_path: Path, fresh_tls_contexts: None
) -> None:
    missing = tmp_path / "corporate-ca.pem"
    settings = ConnectionSettings(
        conn_id="private_ca", api_key="sk-ca-test", base_url=f"{tls_server.url}/v1", ca_bundle=str(missing)
    )
    with pytest.raises(ValueError, match="corporate-ca.pem"):
        await _async_clients.acquire(settings)
    assert tls_server.requests == []
