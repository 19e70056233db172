"""Diagnosis: the GC-tracked objects one waiting trigger keeps alive between polls, by type.

Usage: .venv/bin/python bench/objects_per_trigger.py [--n 500] [--top 25] [--json out.json]

Every full garbage collection walks these objects, so their number times N is what a trigger loop's full GC costs
once the triggerer's start-up heap is frozen (docs/recipes/airflow_local_settings.py). N triggers of this provider
wait on batches held in ``cancelling`` by an emulator in another process (so its objects are not counted). Once all
of them have polled once and sleep again (the poll interval is max(2 s, N / 250 s)), the objects the collector
tracks are counted against the count before the triggers were built. What the asyncio task running each trigger
adds is included, as in a triggerer.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MAIN_PYTHON, connection_json, report
from _emulator import EmulatorProcess


def poll_interval_for(n: int) -> float:
    """Long enough for N first polls (about 1 ms each here) to finish well within half an interval."""
    return max(2.0, n / 250)


def tracked_by_type() -> Counter[str]:
    gc.collect()
    return Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects())


async def _first_event(trigger: Any) -> Any:
    async for event in trigger.run():
        return event
    return None


async def measure(emulator: EmulatorProcess, n: int) -> Counter[str]:
    from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchCancellationTrigger

    def trigger(batch_id: str, poll_interval: float) -> OpenAIBatchCancellationTrigger:
        deadline = time.time() + 600
        return OpenAIBatchCancellationTrigger(
            batch_id=batch_id, conn_id="bench", poll_interval=poll_interval, deadline=deadline
        )

    [warm_up] = emulator.seed(1, status="cancelling", cancel_after_polls=1)
    # Imports, the shared client and the TLS context: one-time costs, not counted per trigger.
    await _first_event(trigger(warm_up, 0.01))
    held = emulator.seed(n, status="cancelling", cancel_after_polls=10**9)
    before = tracked_by_type()
    interval = poll_interval_for(n)
    tasks = [asyncio.create_task(_first_event(trigger(batch_id, interval))) for batch_id in held]
    await asyncio.sleep(1.5 * interval)  # every trigger has polled once and sleeps until its second poll
    during = tracked_by_type()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    polled = (during - before)["airflow_provider_openai_batch.models.Batch"]
    if polled != n:
        raise RuntimeError(f"only {polled} of {n} triggers had polled when counted: the machine is too busy")
    return during - before


def format_table(counts: Counter[str], n: int, top: int) -> str:
    rows = [
        f"GC-tracked objects per waiting trigger: {sum(counts.values()) / n:.1f} (N = {n})",
        "",
        "| objects per trigger | type |",
        "|---:|---|",
    ]
    rows += [
        f"| {count / n:.2f} | `{name}` |" for name, count in counts.most_common(top) if count / n >= 0.05
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> Counter[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", type=Path, help="write the counts per trigger here")
    args = parser.parse_args(argv)
    with EmulatorProcess(MAIN_PYTHON) as emulator:
        os.environ["AIRFLOW_CONN_BENCH"] = connection_json(
            "openai_batch", emulator.api_key, emulator.base_url
        )
        counts = asyncio.run(measure(emulator, args.n))
    per_trigger = {name: count / args.n for name, count in counts.most_common()}
    report(format_table(counts, args.n, args.top), {"n": args.n, "per_trigger": per_trigger}, args.json)
    return counts


if __name__ == "__main__":
    main()
