"""CPU floor of one poll on this machine: sequential GETs through each HTTP stack, one keep-alive connection.

Usage: .venv/bin/python bench/client_floor.py [--requests 2000] [--repeats 3]

Puts the trigger-scale "CPU per poll" in context: the same GET against the emulator (its own process), one at a
time, through a bare asyncio HTTP/1.1 exchange, ``httpx.Client``, ``httpx.AsyncClient`` with its default transport
(httpcore over anyio) and with this provider's ``KeepAliveTransport`` (h11 over asyncio streams), and this
provider's ``OpenAIBatchHook.aget_batch`` (the same transport without ``AsyncClient.send``'s layers, plus parsing
into a ``Batch``). No concurrency, so no pool bookkeeping:
what remains is each stack's fixed cost per request, kernel time for the loopback sockets included. Each stack is
measured ``--repeats`` times, after waiting for a quiet machine, and the lowest is kept: a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MAIN_PYTHON, connection_json, wait_until_quiet
from _emulator import EmulatorProcess

WARMUP = 100


async def _timed_async(ids: list[str], get: Callable[[str], Awaitable[Any]]) -> float:
    for batch_id in ids[:WARMUP]:
        await get(batch_id)
    started = time.process_time()
    for batch_id in ids:
        await get(batch_id)
    return (time.process_time() - started) / len(ids)


def _timed_sync(ids: list[str], get: Callable[[str], Any]) -> float:
    for batch_id in ids[:WARMUP]:
        get(batch_id)
    started = time.process_time()
    for batch_id in ids:
        get(batch_id)
    return (time.process_time() - started) / len(ids)


async def _raw(emulator: EmulatorProcess, ids: list[str]) -> float:
    host, port = emulator.base_url.split("//", 1)[1].split("/", 1)[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))

    async def get(batch_id: str) -> bytes:
        writer.write(
            f"GET /v1/batches/{batch_id} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {emulator.api_key}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(h.split(b":", 1)[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")
        )
        return await reader.readexactly(length)

    try:
        return await _timed_async(ids, get)
    finally:
        writer.close()


async def _httpx_async(emulator: EmulatorProcess, ids: list[str], lean: bool = False) -> float:
    """``httpx.AsyncClient.get``, through httpx's default transport or (``lean``) this provider's."""
    import httpx

    from airflow_provider_openai_batch.hooks._connection import shared_ssl_context
    from airflow_provider_openai_batch.hooks._transport import KeepAliveTransport

    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    transport = KeepAliveTransport(ssl_context=shared_ssl_context(), max_idle=1) if lean else None
    async with httpx.AsyncClient(base_url=emulator.base_url, headers=headers, transport=transport) as client:

        async def get(batch_id: str) -> bytes:
            return (await client.get(f"/batches/{batch_id}")).content

        return await _timed_async(ids, get)


def _httpx_sync(emulator: EmulatorProcess, ids: list[str]) -> float:
    import httpx

    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    with httpx.Client(base_url=emulator.base_url, headers=headers) as client:
        return _timed_sync(ids, lambda batch_id: client.get(f"/batches/{batch_id}").content)


async def _hook(ids: list[str]) -> float:
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    async with OpenAIBatchHook("bench") as hook:
        return await _timed_async(ids, hook.aget_batch)


def measure(requests: int, repeats: int = 3) -> dict[str, float]:
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-airflow-home-"))
    best: dict[str, float] = {}
    with EmulatorProcess(MAIN_PYTHON) as emulator:
        os.environ["AIRFLOW_CONN_BENCH"] = connection_json(
            "openai_batch", emulator.api_key, emulator.base_url
        )
        ids = emulator.seed(requests)
        for _ in range(repeats):
            wait_until_quiet(120)
            for name, seconds in (
                ("bare asyncio HTTP/1.1", asyncio.run(_raw(emulator, ids))),
                ("httpx.Client (sync)", _httpx_sync(emulator, ids)),
                ("httpx.AsyncClient", asyncio.run(_httpx_async(emulator, ids))),
                (
                    "httpx.AsyncClient + KeepAliveTransport",
                    asyncio.run(_httpx_async(emulator, ids, lean=True)),
                ),
                ("OpenAIBatchHook.aget_batch", asyncio.run(_hook(ids))),
            ):
                best[name] = min(seconds, best.get(name, seconds))
    return best


def format_table(result: dict[str, float]) -> str:
    lines = ["| client, sequential GETs | CPU per request |", "|---|---:|"]
    lines += [f"| {name} | {1000 * seconds:.2f} ms |" for name, seconds in result.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = measure(args.requests, args.repeats)
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
