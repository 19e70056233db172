"""One trigger-scale measurement in a fresh process: N triggers of one provider in one event loop.

Usage: .bench-venv/bin/python bench/_scale_worker.py --provider ours|official --ids-file F --poll-interval P
       [--cold] [--local-settings] [--per-get]
(started by bench/trigger_scale.py, which seeds the emulator, sets ``AIRFLOW_CONN_*`` and samples this process)

Like the triggerer, it runs every trigger's ``run()`` async generator as its own asyncio task and consumes its
first event. Protocol on stdout, one JSON object a line: ``{"phase": "ready", ...}`` once imports, one warm-up
trigger (so lazily imported modules and one-time caches are not counted per trigger) and a ``gc.collect()`` are
done; the parent then writes one line to stdin to start the measured run; ``{"phase": "done", ...}`` ends it. If
``--cap`` seconds pass first, a watchdog thread reports ``complete: false`` with what was measured so far and
exits: the official trigger's synchronous HTTP calls can hold the loop long enough that the loop itself could
never notice the cap.

With ``--local-settings`` it plays a triggerer deployed with docs/recipes/airflow_local_settings.py: it imports
Airflow, loads that file as ``airflow triggerer`` would, and forks; the child, whose pid the ``ready`` line gives,
runs the triggers as the triggerer's trigger runner does, with the heap it inherited frozen.

This provider's waits share each round's requests through the event loop's status board; the worker counts the
board's rounds and the wait-rounds (one wait's batch served in one round) it served. ``--per-get`` polls as
before the board, for comparison: the board never walks the list, so every due wait gets its own GET. That is
an option of this bench only; the provider has no such knob.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import runpy
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, peak_rss_bytes, percentile, reset_peak_rss, rss_bytes

PROBE_INTERVAL = 0.010  #: the lag probe sleeps this long and records how late it wakes up
#: Lags above this (seconds; ``BENCH_LAG_SPIKE`` to diagnose smaller ones) are also reported with the time they
#: started at, to find their cause.
SPIKE = float(os.environ.get("BENCH_LAG_SPIKE", "0.1"))
LOCAL_SETTINGS = ROOT / "docs" / "recipes" / "airflow_local_settings.py"


def make_trigger(provider: str, conn_id: str, batch_id: str, poll_interval: float, timeout: float) -> Any:
    """The provider's trigger, built with the arguments its operator would serialise."""
    if provider == "ours":
        from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchCancellationTrigger

        return OpenAIBatchCancellationTrigger(
            batch_id=batch_id, conn_id=conn_id, poll_interval=poll_interval, deadline=time.time() + timeout
        )
    from airflow.providers.openai.triggers.openai import OpenAIBatchTrigger

    return OpenAIBatchTrigger(
        conn_id=conn_id, batch_id=batch_id, poll_interval=poll_interval, timeout=timeout
    )


class Run:
    """State of the measured run, readable by the watchdog thread while the loop is busy."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lags: list[float] = []
        self.spikes: list[tuple[float, float]] = []
        self.constructions: Counter[str] = Counter()
        self.gc_pauses: list[tuple[int, float, int]] = []  # (generation, seconds, objects freed) per GC run
        self._gc_started = 0.0
        self.event_times: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.done = 0
        self.started = 0.0
        self.cpu_started = 0.0
        self.last_event = 0.0
        self.baseline_rss = 0
        self.pool_size: int | None = None
        self.wait_rounds = (
            0  #: batches the status board was asked for: one per wait and round it took part in
        )
        self.board_rounds = 0
        self.tracked_objects_baseline = 0
        self.full_collect_baseline_s = 0.0
        self.hwm_reset = False
        self.reported = threading.Lock()

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """``gc.callbacks`` hook: time each collection, so lag spikes can be told apart from GC pauses."""
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pauses.append(
                (info["generation"], time.perf_counter() - self._gc_started, info["collected"])
            )

    def report(self, complete: bool) -> dict[str, Any]:
        now = time.perf_counter()
        lags = list(self.lags)
        return {
            "phase": "done",
            "complete": complete,
            "n": self.n,
            "events": self.done,
            "statuses": dict(self.statuses),
            "wall_s": (self.last_event if complete else now) - self.started,
            "elapsed_s": now - self.started,
            "cpu_s": time.process_time() - self.cpu_started,
            "lag_max_s": max(lags, default=0.0),
            "lag_p99_s": percentile(lags, 99),
            "lag_p50_s": percentile(lags, 50),
            "lag_samples": len(lags),
            "lag_over_200ms": sum(1 for lag in lags if lag > 0.2),
            "lag_spikes": list(self.spikes),
            "constructions": dict(self.constructions),
            "gc_collections": len(self.gc_pauses),
            "gc_pause_max_s": max((pause for _, pause, _ in self.gc_pauses), default=0.0),
            "gc_pause_total_s": sum(pause for _, pause, _ in self.gc_pauses),
            "gc_collected": sum(collected for _, _, collected in self.gc_pauses),
            "gc_gen2": [(round(pause, 4), collected) for gen, pause, collected in self.gc_pauses if gen == 2][
                :20
            ],
            "tracked_objects_baseline": self.tracked_objects_baseline,
            "full_collect_baseline_s": self.full_collect_baseline_s,
            "tracked_objects_now": len(gc.get_objects()),
            "first_event_s": min(self.event_times, default=None),
            "median_event_s": percentile(self.event_times, 50) if self.event_times else None,
            "baseline_rss": self.baseline_rss,
            "peak_rss": peak_rss_bytes(),
            "end_rss": rss_bytes(),
            "hwm_reset": self.hwm_reset,
            "pool_size": self.pool_size,
            "wait_rounds": self.wait_rounds,
            "board_rounds": self.board_rounds,
            "frozen_objects": gc.get_freeze_count(),
        }


def count_constructions(counts: Counter[str]) -> None:
    """Count, from now on, every HTTP client and TLS context built, whichever provider builds them.

    ``httpx`` is this provider's HTTP library; the ``openai`` SDK the official provider uses builds on its
    ``httpx2`` fork. A shared client shows up as one construction per run, a per-trigger one as N or more.
    """
    import importlib
    import ssl

    for module_name in ("httpx", "httpx2"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for class_name in ("Client", "AsyncClient"):
            cls = getattr(module, class_name)
            cls.__init__ = _counting(cls.__init__, counts, f"{module_name}.{class_name}")
    original_new = ssl.SSLContext.__new__

    def counting_new(cls: type, *args: Any, **kwargs: Any) -> Any:
        counts["ssl.SSLContext"] += 1
        return original_new(cls, *args, **kwargs)

    ssl.SSLContext.__new__ = staticmethod(counting_new)  # type: ignore[method-assign,assignment]


def _counting(init: Any, counts: Counter[str], key: str) -> Any:
    def counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        counts[key] += 1
        init(self, *args, **kwargs)

    return counting_init


def count_board_use(run: Run, per_get: bool) -> None:
    """Count the status board's rounds and the batches waits asked it for; with ``per_get``, keep it from ever
    walking the list, as waits polled before it: one GET per due wait and round."""
    from airflow_provider_openai_batch.status_board import StatusBoard

    poll, round_ = StatusBoard.poll, StatusBoard._round

    async def counted_poll(self: StatusBoard, batch_ids: Any, *args: Any) -> Any:
        run.wait_rounds += len(batch_ids)
        return await poll(self, batch_ids, *args)

    async def counted_round(self: StatusBoard, due: Any) -> None:
        run.board_rounds += 1
        await round_(self, due)

    StatusBoard.poll = counted_poll  # type: ignore[method-assign]
    StatusBoard._round = counted_round  # type: ignore[method-assign]
    if per_get:
        StatusBoard.walk_pays = lambda self, due: False  # type: ignore[method-assign]


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


async def consume(trigger: Any, run: Run) -> None:
    """What the triggerer's ``run_trigger`` does, minus logging, tracing and the database: drain ``run()``."""
    async for event in trigger.run():
        run.statuses[str(event.payload.get("status"))] += 1
        run.done += 1
        run.last_event = time.perf_counter()
        run.event_times.append(run.last_event - run.started)


async def start_all(triggers: Iterator[Any], run: Run) -> list[asyncio.Task[None]]:
    """Build and start one task per trigger the way the triggerer's ``create_triggers`` does: yielding to the loop
    twice per trigger (after loading its class, then after building it and creating its task), so earlier
    triggers start running while later ones are built."""
    tasks = []
    while True:
        await asyncio.sleep(0)
        if (trigger := next(triggers, None)) is None:
            return tasks
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(consume(trigger, run)))


async def probe(run: Run, stop: asyncio.Event) -> None:
    """Sleep ``PROBE_INTERVAL`` over and over, recording how late each wake-up is: the loop's lag."""
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(PROBE_INTERVAL)
        lag = max(0.0, time.perf_counter() - start - PROBE_INTERVAL)
        run.lags.append(lag)
        if lag > SPIKE and len(run.spikes) < 50:
            run.spikes.append((round(start - run.started, 3), round(lag, 4)))


def _apply_experiments() -> None:
    """Diagnosis only: ``BENCH_POOL_SIZE`` overrides this provider's shared-client pool size and request gate;
    ``BENCH_GC_FREEZE=1`` moves everything allocated before the measured run out of the cyclic GC's reach;
    ``BENCH_GC_NO_FULL=1`` keeps the collector from ever running a full (generation 2) collection, to see what
    the loop's lag is without them."""
    if os.environ.get("BENCH_GC_FREEZE") == "1":
        gc.freeze()
    if os.environ.get("BENCH_GC_NO_FULL") == "1":
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, 2**30)
    if pool_size := os.environ.get("BENCH_POOL_SIZE"):
        from airflow_provider_openai_batch.hooks import _async_clients

        _async_clients.MAX_CONCURRENT_REQUESTS = int(pool_size)


async def main_async(args: argparse.Namespace) -> None:
    targets: list[list[str]] = json.loads(Path(args.ids_file).read_text())
    warmup_conn, warmup_batch = targets.pop(0)
    run = Run(len(targets))
    if args.provider == "ours":
        count_board_use(run, args.per_get)
    if args.cold:
        make_trigger(args.provider, warmup_conn, warmup_batch, 1.0, 1.0)  # imports only: nothing runs
    else:
        # Warm-up: one full wait, quick, so first-use imports and caches are in the baseline.
        await consume(make_trigger(args.provider, warmup_conn, warmup_batch, 0.05, args.cap + 60), Run(1))
    collect_started = time.perf_counter()
    gc.collect()
    full_collect_s = time.perf_counter() - collect_started
    _apply_experiments()
    run.wait_rounds = run.board_rounds = 0  # the warm-up's
    if args.provider == "ours":
        from airflow_provider_openai_batch.hooks import _async_clients

        run.pool_size = _async_clients.MAX_CONCURRENT_REQUESTS
    run.tracked_objects_baseline = len(gc.get_objects())
    run.full_collect_baseline_s = full_collect_s
    run.baseline_rss = rss_bytes()
    run.hwm_reset = reset_peak_rss()
    count_constructions(run.constructions)
    emit({"phase": "ready", "pid": os.getpid(), "baseline_rss": run.baseline_rss})
    sys.stdin.readline()  # blocking on purpose: nothing else runs yet, and no executor thread is created

    watchdog = threading.Timer(args.cap, _give_up, args=(run,))
    watchdog.daemon = True
    run.started = time.perf_counter()
    run.cpu_started = time.process_time()
    watchdog.start()
    gc.callbacks.append(run.on_gc)
    stop = asyncio.Event()
    prober = asyncio.create_task(probe(run, stop))
    triggers = (
        make_trigger(args.provider, conn, batch, args.poll_interval, args.cap + 60) for conn, batch in targets
    )
    await asyncio.gather(*await start_all(triggers, run))
    stop.set()
    await prober
    watchdog.cancel()
    if run.reported.acquire(blocking=False):
        emit(run.report(complete=True))


def _give_up(run: Run) -> None:
    if run.reported.acquire(blocking=False):
        emit(run.report(complete=False))
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=("ours", "official"), required=True)
    parser.add_argument(
        "--ids-file", required=True, help="JSON list of [conn_id, batch_id]; the first is warm-up"
    )
    parser.add_argument("--poll-interval", type=float, required=True)
    parser.add_argument("--cap", type=float, default=600.0, help="give up after this many seconds")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="no warm-up: the run starts like a freshly started triggerer (imports excepted)",
    )
    parser.add_argument(
        "--local-settings",
        action="store_true",
        help="fork from a triggerer-like parent that loaded docs/recipes/airflow_local_settings.py",
    )
    parser.add_argument(
        "--per-get",
        action="store_true",
        help="this provider polls one GET per wait and round, as before the status board",
    )
    args = parser.parse_args(argv)
    if args.local_settings:
        become_trigger_runner()
    asyncio.run(main_async(args))


def become_trigger_runner() -> None:
    """Fork as ``airflow triggerer`` forks its trigger runner, with the recipe loaded; only the child returns.

    Before the fork the parent holds what the triggerer surely has by then (Airflow and its task SDK imported), no
    more: the providers' modules are imported after the fork, in the child, as in the real trigger runner.
    """
    import airflow.sdk
    import airflow.triggers.base  # noqa: F401  (imported for its heap, like the triggerer)

    argv, sys.argv = sys.argv, ["airflow", "triggerer"]
    runpy.run_path(str(LOCAL_SETTINGS))
    sys.argv = argv
    child = os.fork()
    if child:
        _, status = os.waitpid(child, 0)
        os._exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
