"""How many requests per second the emulator serves, so benchmark numbers can be checked against its limit.

Usage: .venv/bin/python bench/emulator_capacity.py [--connections 1,8,32] [--requests 4000] [--repeats 3]

A minimal asyncio HTTP/1.1 client (no httpx: its own cost would hide the server's) keeps C keep-alive connections
busy with GETs of seeded batches; the emulator runs in its own process, as in the other benchmarks. Reports
requests per second (best of ``--repeats``, each after waiting for a quiet machine) and the emulator's CPU seconds
per request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MAIN_PYTHON, cpu_seconds, wait_until_quiet
from _emulator import EmulatorProcess


async def _client(host: str, port: int, api_key: str, ids: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for batch_id in ids:
            writer.write(
                f"GET /v1/batches/{batch_id} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api_key}\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
    finally:
        writer.close()


async def _measure(emulator: EmulatorProcess, ids: list[str], connections: int) -> dict[str, Any]:
    host, port = emulator.base_url.split("//", 1)[1].split("/", 1)[0].split(":")
    shares = [ids[index::connections] for index in range(connections)]
    cpu_before = cpu_seconds(emulator.pid)
    started = time.perf_counter()
    await asyncio.gather(*(_client(host, int(port), emulator.api_key, share) for share in shares))
    wall = time.perf_counter() - started
    emulator_cpu = cpu_seconds(emulator.pid) - cpu_before
    return {
        "connections": connections,
        "requests": len(ids),
        "requests_per_s": len(ids) / wall,
        "emulator_cpu_per_request_ms": 1000 * emulator_cpu / len(ids),
        "emulator_busy": emulator_cpu / wall,
    }


def measure(connection_counts: list[int], requests: int, repeats: int = 3) -> list[dict[str, Any]]:
    rows = []
    with EmulatorProcess(MAIN_PYTHON) as emulator:
        ids = emulator.seed(requests)
        asyncio.run(_measure(emulator, ids[:200], 1))  # warm-up
        for connections in connection_counts:
            samples = []
            for _ in range(repeats):
                wait_until_quiet(120)
                samples.append(asyncio.run(_measure(emulator, ids, connections)))
            rows.append(max(samples, key=lambda row: row["requests_per_s"]))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| connections | requests/s | emulator CPU per request | emulator busy (of one core) |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['connections']} | {row['requests_per_s']:.0f} | {row['emulator_cpu_per_request_ms']:.2f} ms "
        f"| {100 * row['emulator_busy']:.0f}% |"
        for row in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", default="1,8,32")
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = measure([int(c) for c in args.connections.split(",")], args.requests, args.repeats)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
