"""``httpx.AsyncClient`` instances shared by every hook on one event loop.

A triggerer runs up to a thousand triggers in one event loop. Giving each its own client would cost each a
TLS context (loading the CA bundle from disk: blocking file I/O on the loop) and a connection pool. Instead,
hooks with equal connection settings on the same loop share one reference-counted client, closed when its last
user leaves. A semaphore in front of it keeps the number of requests in flight at the pool size: without it,
httpcore's pool queue grows with the number of waiters and each request costs an order of magnitude more CPU.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field

import httpx

from airflow_provider_openai_batch.hooks._connection import ConnectionSettings, shared_ssl_context

#: Requests in flight per shared client; also its connection pool size. httpcore walks the whole pool for
#: every request, so a pool of 100 costs the triggerer ~25 ms CPU per poll at 200 waiting triggers and blocks
#: its loop; 16 costs ~3 ms and still carries ~80 polls/s at the real API's ~200 ms latency.
MAX_CONCURRENT_REQUESTS = 16


@dataclass
class SharedAsyncClient:
    """One pooled client, the gate that bounds its concurrency, and the count of hooks using it."""

    client: httpx.AsyncClient
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_CONCURRENT_REQUESTS))
    users: int = 0


_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[ConnectionSettings, SharedAsyncClient]] = (
    weakref.WeakKeyDictionary()
)


async def acquire(settings: ConnectionSettings) -> SharedAsyncClient:
    """Return the loop's client for ``settings``, creating it on first use; pair every call with :func:`release`."""
    if shared_ssl_context.cache_info().currsize == 0:
        # Reads the CA bundle from disk: done once per process, off the event loop.
        await asyncio.to_thread(shared_ssl_context)
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    shared = per_loop.get(settings)
    if shared is None:
        limits = httpx.Limits(max_connections=MAX_CONCURRENT_REQUESTS, max_keepalive_connections=MAX_CONCURRENT_REQUESTS)
        client = httpx.AsyncClient(**settings.client_kwargs(), limits=limits)
        shared = per_loop[settings] = SharedAsyncClient(client)
    shared.users += 1
    return shared


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
