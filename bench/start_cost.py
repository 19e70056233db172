"""What starting many waits at once costs the event loop: each hook's connection lookup, shared or not.

Usage: .venv/bin/python bench/start_cost.py [--n 3000] [--runs 3] [--json out.json]

A triggerer that takes on thousands of triggers starts them within a second or two, and each looks its connection
up once (``OpenAIBatchHook.asettings``). Each sample is a fresh interpreter of ``.bench-venv`` with the connection
in an ``AIRFLOW_CONN_*`` variable (Airflow's environment secrets backend), that starts ``--n`` hooks' lookups the
way the triggerer's ``create_triggers`` starts triggers (yielding to the loop twice per trigger), in two modes:

* ``shared``: ``asettings()`` as the hook has it, where hooks on one loop asking for one connection at the same time
  share the lookup in flight;
* ``own``: every hook makes its own lookup, parse and masking (``_alook_up``), as every wait did before they were
  shared. A bench mode only.

It reports the lookups made, the event loop's own CPU per start (``time.thread_time`` on the loop's thread: what
holds the loop), the process's CPU per start (asgiref's worker thread, where Airflow's async lookup runs the
secrets backends, included), and the loop's lag (a 1 ms sleep, over and over, measuring how late it wakes). The
start-up heap is frozen first, as the GC recipe (docs/recipes/airflow_local_settings.py) does in a triggerer, so a
full collection of Airflow's heap does not stand in for the lag of the starts.
Modes alternate run by run; medians are reported. It needs no emulator: nothing is sent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH_PYTHON,
    bench_env,
    connection_json,
    ensure_official_venv,
    median,
    percentile,
    report,
    wait_until_quiet,
)

MODES = ("shared", "own")

_CHILD = r"""
import asyncio, gc, json, sys, time
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

mode, n = sys.argv[1], int(sys.argv[2])
lookups = 0


class CountingHook(OpenAIBatchHook):
    async def _alook_up(self):
        global lookups
        lookups += 1
        return await super()._alook_up()


async def start(hook):
    await (hook.asettings() if mode == "shared" else hook._alook_up())


async def probe(lags, stop):
    while not stop.is_set():
        began = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(max(0.0, time.perf_counter() - began - 0.001))


async def main():
    global lookups
    await start(CountingHook("start_cost"))  # warm-up: imports, secrets backends, asgiref's thread
    lookups = 0
    gc.collect()
    gc.freeze()  # the start-up heap out of the collector's reach, as docs/recipes/airflow_local_settings.py does
    lags, stop = [], asyncio.Event()
    prober = asyncio.create_task(probe(lags, stop))
    wall, loop_cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
    tasks = []
    for _ in range(n):  # as create_triggers: yield, build, create the task, yield
        await asyncio.sleep(0)
        hook = CountingHook("start_cost")
        tasks.append(asyncio.create_task(start(hook)))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    loop_cpu, process_cpu = time.thread_time() - loop_cpu, time.process_time() - process_cpu
    wall = time.perf_counter() - wall
    stop.set()
    await prober
    print(json.dumps({
        "lookups": lookups, "wall_s": wall, "loop_cpu_s": loop_cpu, "process_cpu_s": process_cpu, "lags_s": lags,
    }))


asyncio.run(main())
"""


def sample(mode: str, n: int) -> dict[str, Any]:
    env = bench_env(
        AIRFLOW_CONN_START_COST=connection_json("openai", "sk-start-cost", "http://127.0.0.1:9/v1"),
    )
    done = subprocess.run(
        [str(BENCH_PYTHON), "-c", _CHILD, mode, str(n)], env=env, capture_output=True, text=True, check=True
    )
    child = json.loads(done.stdout.strip().splitlines()[-1])
    lags = child["lags_s"]
    return {
        "lookups": child["lookups"],
        "wall_s": child["wall_s"],
        "loop_cpu_per_start_ms": child["loop_cpu_s"] / n * 1000,
        "process_cpu_per_start_ms": child["process_cpu_s"] / n * 1000,
        "lag_p99_ms": percentile(lags, 99) * 1000,
        "lag_max_ms": max(lags, default=0.0) * 1000,
    }


def run(n: int, runs: int) -> dict[str, Any]:
    ensure_official_venv()
    wait_until_quiet(120)
    samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for _ in range(runs):
        for mode in MODES:
            samples[mode].append(sample(mode, n))
    fields = (
        "lookups",
        "wall_s",
        "loop_cpu_per_start_ms",
        "process_cpu_per_start_ms",
        "lag_p99_ms",
        "lag_max_ms",
    )
    return {
        "n": n,
        "runs": runs,
        "samples": samples,
        "medians": {
            mode: {field: median(s[field] for s in samples[mode]) for field in fields} for mode in MODES
        },
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Starting {result['n']:,} waits' connection lookups on one loop (medians of {result['runs']} runs)",
        "| mode | lookups | wall s | loop CPU per start ms | process CPU per start ms | lag p99 ms | lag max ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, m in result["medians"].items():
        lines.append(
            f"| {mode} | {m['lookups']:,.0f} | {m['wall_s']:.2f} | {m['loop_cpu_per_start_ms']:.3f} "
            f"| {m['process_cpu_per_start_ms']:.3f} | {m['lag_p99_ms']:.1f} | {m['lag_max_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = run(args.n, args.runs)
    report(table(result), result, args.json)


if __name__ == "__main__":
    main()
