"""Requests per cancellation: HTTP requests one cancel-and-wait costs, against the minimum 1 + ceil(T / P).

Usage: .bench-venv/bin/python bench/requests_per_cancel.py [--batches 10] [--json out.json]

The emulator (its own process) keeps each cancelled batch ``cancelling`` for T seconds (``cancel_after_seconds``)
and then reports it ``cancelled``. For several (T, P) pairs, this provider's ``OpenAICancelBatchOperator`` cancels
``--batches`` batches concurrently, deferrable (each trigger then runs to its event straight away, as if the
triggerer picked it up at once) and not deferrable (the worker waits), polling every P seconds; the emulator
counts the requests per batch. The minimum for a wait that starts at the cancel is one cancel plus ceil(T / P)
polls, the first poll at or after T being the one that sees ``cancelled``. (A wait that starts later, e.g. after a
slow hand-over to the triggerer, legitimately needs fewer polls.)

For comparison, the official provider has no cancel operator: its ``OpenAIHook.cancel_batch`` followed by its
``OpenAIBatchTrigger`` is the closest equivalent. That trigger takes ``cancelling`` for final, so it costs two
requests whatever T is, and fires before the batch is cancelled: the table says, from the status the emulator
served on each trigger's last GET, whether its event was based on a batch really ``cancelled`` (with its partial
results' output file).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import MAIN_PYTHON, connection_json, median, report
from _emulator import EmulatorProcess

#: (cancelling time T, poll interval P) pairs, in seconds.
CASES: tuple[tuple[float, float], ...] = ((0.5, 1.0), (1.0, 0.25), (2.0, 0.5), (3.0, 1.0), (5.0, 2.0))
HOLD = 10**9  #: ``cancel_after_polls`` that never triggers: only time ends the cancellation


class _TaskInstance:
    """Just enough of a task instance for the operator outside a DAG run: it records XCom pushes."""

    def __init__(self) -> None:
        self.xcoms: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcoms[key] = value


def minimum_requests(cancelling_seconds: float, poll_interval: float) -> int:
    """One cancel, then polls every ``poll_interval`` until the first one at or after ``cancelling_seconds``."""
    return 1 + max(1, math.ceil(cancelling_seconds / poll_interval))


async def _drain(trigger: Any) -> dict[str, Any]:
    events = [event async for event in trigger.run()]
    return events[0].payload


def ours_deferrable(batch_ids: list[str], poll_interval: float) -> list[dict[str, Any]]:
    """Per batch: the deferrable operator cancels it (in a worker thread), then the trigger it deferred to runs."""
    from airflow.sdk.exceptions import TaskDeferred

    from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator

    def cancel_and_defer(batch_id: str) -> Any:
        operator = OpenAICancelBatchOperator(
            task_id=f"cancel_{batch_id}", batch_id=batch_id, conn_id="bench", deferrable=True,
            poll_interval=poll_interval, timeout=120,
        )  # fmt: skip
        try:
            operator.execute({"ti": _TaskInstance()})  # type: ignore[typeddict-item]
        except TaskDeferred as deferred:
            return deferred.trigger
        raise RuntimeError(f"the operator did not defer for {batch_id}")

    async def one(batch_id: str) -> dict[str, Any]:
        return await _drain(await asyncio.to_thread(cancel_and_defer, batch_id))

    async def run_all() -> list[dict[str, Any]]:
        return await asyncio.gather(*(one(batch_id) for batch_id in batch_ids))

    return asyncio.run(run_all())


def ours_blocking(batch_ids: list[str], poll_interval: float) -> list[dict[str, Any]]:
    """Cancel and wait with the non-deferrable operator, one worker thread per batch."""
    from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator

    def one(batch_id: str) -> dict[str, Any]:
        operator = OpenAICancelBatchOperator(
            task_id=f"cancel_{batch_id}", batch_id=batch_id, conn_id="bench", deferrable=False,
            poll_interval=poll_interval, timeout=120,
        )  # fmt: skip
        return operator.execute({"ti": _TaskInstance()})  # type: ignore[typeddict-item]

    with ThreadPoolExecutor(len(batch_ids)) as pool:
        return list(pool.map(one, batch_ids))


def official(batch_ids: list[str], poll_interval: float) -> list[dict[str, Any]]:
    """The official hook's cancel, then its trigger, per batch."""
    from airflow.providers.openai.hooks.openai import OpenAIHook
    from airflow.providers.openai.triggers.openai import OpenAIBatchTrigger

    async def wait(batch_id: str) -> dict[str, Any]:
        await asyncio.to_thread(OpenAIHook(conn_id="bench_official").cancel_batch, batch_id)
        return await _drain(
            OpenAIBatchTrigger(
                conn_id="bench_official", batch_id=batch_id, poll_interval=poll_interval, timeout=120
            )
        )

    async def run_all() -> list[dict[str, Any]]:
        return await asyncio.gather(*(wait(batch_id) for batch_id in batch_ids))

    return asyncio.run(run_all())


def measure_case(cancelling_seconds: float, poll_interval: float, batches: int) -> dict[str, Any]:
    """All three flows for one (T, P), each on batches of its own in a fresh emulator."""
    row: dict[str, Any] = {
        "cancelling_s": cancelling_seconds,
        "poll_interval_s": poll_interval,
        "minimum": minimum_requests(cancelling_seconds, poll_interval),
    }
    flows = ("ours_deferrable", "ours_blocking", "official")
    with EmulatorProcess(MAIN_PYTHON, cancel_after_polls=HOLD) as emulator:
        os.environ["AIRFLOW_CONN_BENCH"] = connection_json(
            "openai_batch", emulator.api_key, emulator.base_url
        )
        os.environ["AIRFLOW_CONN_BENCH_OFFICIAL"] = connection_json(
            "openai", emulator.api_key, emulator.base_url
        )
        for flow in flows:
            ids = emulator.seed(batches, status="in_progress", cancel_after_polls=HOLD,
                                cancel_after_seconds=cancelling_seconds)  # fmt: skip
            started = time.perf_counter()
            if flow == "ours_deferrable":
                results = ours_deferrable(ids, poll_interval)
                correct = [r["status"] == "cancelled" and r["output_file_id"] is not None for r in results]
            elif flow == "ours_blocking":
                results = ours_blocking(ids, poll_interval)
                correct = [r["status"] == "cancelled" and r["output_file_id"] is not None for r in results]
            else:
                results = official(ids, poll_interval)
                # What the trigger's last GET saw is what its event was based on.
                seen = emulator.call("last_served", ids=ids)["statuses"]
                correct = [seen[batch_id] == "cancelled" for batch_id in ids]
            per_batch = emulator.call("requests_for", ids=ids)["per_batch"]
            counts = [per_batch.get(batch_id, 0) for batch_id in ids]
            row[flow] = {
                "requests_median": median(counts),
                "requests_max": max(counts),
                "requests_min": min(counts),
                "correct": sum(correct),
                "batches": batches,
                "wall_s": time.perf_counter() - started,
                "event_statuses": sorted({str(r.get("status")) for r in results}),
            }
    return row


def format_table(result: dict[str, Any]) -> str:
    lines = [
        (
            "| cancelling T s | poll P s | minimum 1+ceil(T/P) | this, deferrable (median / max) "
            "| this, not deferrable (median / max) | official hook + trigger | official event while really cancelled |"
        ),
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["cases"]:
        ours_d, ours_b, off = row["ours_deferrable"], row["ours_blocking"], row["official"]
        lines.append(
            f"| {row['cancelling_s']:g} | {row['poll_interval_s']:g} | {row['minimum']} "
            f"| {ours_d['requests_median']:g} / {ours_d['requests_max']} ({ours_d['correct']}/{ours_d['batches']} "
            f"cancelled with output) | {ours_b['requests_median']:g} / {ours_b['requests_max']} "
            f"({ours_b['correct']}/{ours_b['batches']}) | {off['requests_median']:g} / {off['requests_max']} "
            f"| {off['correct']}/{off['batches']} |"
        )
    return "\n".join(lines)


def measure(batches: int = 10, cases: tuple[tuple[float, float], ...] = CASES) -> dict[str, Any]:
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-airflow-home-"))
    os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    rows = []
    for cancelling_seconds, poll_interval in cases:
        print(
            f"  requests per cancel T={cancelling_seconds:g} s P={poll_interval:g} s",
            file=sys.stderr,
            flush=True,
        )
        rows.append(measure_case(cancelling_seconds, poll_interval, batches))
    return {"batches": batches, "cases": rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=10, help="batches per (T, P) and flow")
    parser.add_argument("--cases", help="T:P pairs in seconds, e.g. '1:0.25,3:1' (default: five pairs)")
    parser.add_argument("--json", type=Path, help="write the full result here")
    args = parser.parse_args(argv)
    cases = (
        tuple((float(t), float(p)) for t, p in (pair.split(":") for pair in args.cases.split(",")))
        if args.cases
        else CASES
    )
    result = measure(args.batches, cases)
    report(format_table(result), result, args.json)
    return result


if __name__ == "__main__":
    main()
