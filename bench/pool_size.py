"""Diagnosis: this provider's trigger scale as a function of its shared client's request gate (and of GC freezing).

Usage: .venv/bin/python bench/pool_size.py [--n 1000] [--pools 1,10,32,100] [--repeats 2] [--gc-freeze]

Same measurement as bench/trigger_scale.py (this provider only), with the worker overriding
``hooks._async_clients.MAX_CONCURRENT_REQUESTS`` (the requests in flight, hence the most open connections, and
the idle connections kept) through ``BENCH_POOL_SIZE``. The package itself is not modified. ``--gc-freeze`` also
runs ``gc.freeze()`` after the warm-up, to separate Airflow-heap GC pauses from the provider's own lag: a quick
approximation, in the worker itself and without a fork, of a triggerer deployed with
docs/recipes/airflow_local_settings.py, which ``bench/trigger_scale.py --local-settings`` plays faithfully.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trigger_scale
from _common import ensure_official_venv, report


def measure(n: int, pools: list[int], repeats: int, gc_freeze: bool, polls: int = 3) -> list[dict[str, Any]]:
    rows = []
    for pool in pools:
        os.environ["BENCH_POOL_SIZE"] = str(pool)
        if gc_freeze:
            os.environ["BENCH_GC_FREEZE"] = "1"
        try:
            result = trigger_scale.measure([n], {n: repeats}, polls, cap=600.0, providers=("ours",))
        finally:
            os.environ.pop("BENCH_POOL_SIZE", None)
            os.environ.pop("BENCH_GC_FREEZE", None)
        block = result["by_n"][str(n)]
        rows.append({"pool": pool, "gc_freeze": gc_freeze, "poll_interval": block["poll_interval"],
                     "summary": block["summary"]["ours"], "runs": block["runs"]["ours"]})  # fmt: skip
    return rows


def format_table(n: int, rows: list[dict[str, Any]]) -> str:
    lines = [
        (
            "| N | pool size | gc.freeze | wall s | CPU/poll ms | lag max ms | lag p99 ms | max GC pause ms "
            "| RSS/trigger KiB | sockets at peak |"
        ),
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        s = row["summary"]
        gc_max = sorted(run["gc_pause_max_s"] for run in row["runs"])[len(row["runs"]) // 2]
        lines.append(
            f"| {n} | {row['pool']} | {'yes' if row['gc_freeze'] else 'no'} | {s['wall_s']:.1f} "
            f"| {1000 * s['cpu_per_request_s']:.2f} | {1000 * s['lag_max_s']:.0f} | {1000 * s['lag_p99_s']:.0f} "
            f"| {1000 * gc_max:.0f} | {s['rss_per_trigger'] / 1024:.1f} | {s['sockets_peak']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--pools", default="1,10,16,32,100")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gc-freeze", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    ensure_official_venv()
    rows = measure(args.n, [int(p) for p in args.pools.split(",")], args.repeats, args.gc_freeze)
    report(format_table(args.n, rows), rows, args.json)


if __name__ == "__main__":
    main()
