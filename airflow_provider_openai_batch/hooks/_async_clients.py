"""``httpx.AsyncClient`` instances shared by every hook on one event loop.

A triggerer runs up to a thousand triggers in one event loop. Giving each its own client would cost each a
TLS context (loading the CA bundle from disk: blocking file I/O on the loop) and a connection pool. Instead,
hooks with equal connection settings on the same loop share one reference-counted client, closed when its last
user leaves. Its requests go through :class:`KeepAliveTransport`, whose CPU per request does not grow with the
number of waiting triggers, behind a semaphore that bounds the requests in flight (and so the sockets open), and
behind the process's rate governor for the connection's API key (``_rate.py``), which every hook and client on
that key shares.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.request import getproxies

import httpx

from airflow_provider_openai_batch.hooks._connection import (
    ConnectionSettings,
    has_ssl_context,
    shared_ssl_context,
)
from airflow_provider_openai_batch.hooks._flights import Flights
from airflow_provider_openai_batch.hooks._rate import RateGovernor, governor_for
from airflow_provider_openai_batch.hooks._transport import KeepAliveTransport, read_whole

#: Requests in flight per shared client, hence its most open connections. It also bounds how many responses
#: one turn of the event loop can have to handle, which sets the loop's lag in a burst of polls (at 1,000
#: triggers: p99 12-16 ms with 16, 23-25 ms with 32; docs/performance.md). At the real API's ~200-300 ms latency
#: 16 carries 50-80 polls per second: a full triggerer (1,000 triggers) polling every 30 s needs 33.
MAX_CONCURRENT_REQUESTS = 16


@dataclass
class SharedAsyncClient:
    """One client, the lean transport it sends through (if any), the rate governor of its API key, the gate that
    bounds its concurrency, and the count of hooks using it."""

    client: httpx.AsyncClient
    transport: KeepAliveTransport | None
    governor: RateGovernor
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_REQUESTS))
    users: int = 0

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` (built by :attr:`client`) and return its response, read whole. The caller holds
        :attr:`gate` and its turn from :attr:`governor`.

        With the lean transport the request skips ``AsyncClient.send``: its auth flow, redirect loop, cookie jar
        and event hooks serve nothing here (the key is a preset header; the API sets no cookies and does not
        redirect) and would add a tenth of a poll's CPU.
        """
        if self.transport is None:
            return await read_whole(await self.client.send(request, stream=True))
        response = await self.transport.handle_async_request(request)
        response.read()  # the body is in memory: decoded there, without awaiting (see in_memory for why)
        return response


_clients: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, dict[ConnectionSettings, SharedAsyncClient]
] = weakref.WeakKeyDictionary()
#: The TLS context builds in flight, by CA bundle.
_tls_builds: Flights[str | None, object] = Flights()


async def acquire(settings: ConnectionSettings) -> SharedAsyncClient:
    """Return the loop's client for ``settings``, creating it on first use; pair every call with :func:`release`."""
    await _tls_context_built(settings.ca_bundle)
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    shared = per_loop.get(settings)
    if shared is None:
        transport = _transport_for(settings)
        client = httpx.AsyncClient(**settings.client_kwargs(), transport=transport)
        governor = governor_for(settings.base_url, settings.rate_key)
        shared = per_loop[settings] = SharedAsyncClient(client, transport, governor)
    shared.users += 1
    return shared


@asynccontextmanager
async def streaming_client(settings: ConnectionSettings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of its own for one streamed download, closed after it.

    Not the shared client: its lean transport reads every response whole, which suits a trigger's small polls
    and would hold a whole file in memory. httpx's default transport streams; it costs a little more CPU per
    request, which a download (rare, long, run in a worker) never notices. The TLS context is still the shared one.
    """
    await _tls_context_built(settings.ca_bundle)
    async with httpx.AsyncClient(**settings.client_kwargs()) as client:
        yield client


async def _tls_context_built(ca_bundle: str | None) -> None:
    """Build the process's TLS context for ``ca_bundle`` off the event loop (it reads the CA bundle from disk),
    once. Triggers that start together wait for the same build rather than each starting one."""
    if not has_ssl_context(ca_bundle):
        await _tls_builds.join(ca_bundle, lambda: asyncio.to_thread(shared_ssl_context, ca_bundle))


def _transport_for(settings: ConnectionSettings) -> KeepAliveTransport | None:
    """The lean transport, unless a proxy may apply: then ``None``, so that httpx routes through its proxy
    transports (with the ``NO_PROXY`` rules it reads from the same environment)."""
    proxies = getproxies()
    if proxies.get(httpx.URL(settings.base_url).scheme) or proxies.get("all"):
        return None
    return KeepAliveTransport(
        ssl_context=shared_ssl_context(settings.ca_bundle), max_idle=MAX_CONCURRENT_REQUESTS
    )


async def release(settings: ConnectionSettings) -> None:
    """Drop one use of the loop's client for ``settings``; the last one closes it."""
    per_loop = _clients.get(asyncio.get_running_loop(), {})
    shared = per_loop.get(settings)
    if shared is None:
        return
    shared.users -= 1
    if shared.users == 0:
        del per_loop[settings]
        await shared.client.aclose()
