"""Test-only instrumentation, imported at start-up by every Airflow process of the system-test deployment.

With ``SYSTEM_TEST_LOG_GC_PAUSES=1`` (set for triggerers only), every full (generation 2) garbage collection
that pauses the process for more than 50 ms is reported on stderr, which the triggerer copies into its log, with
``forked=1`` when it happens in a process the triggerer forked (the one that runs the triggers). A full collection of the
triggerer's ~280,000 start-up objects takes 0.2-0.4 s on a small VM and freezes the trigger loop like a blocking
trigger would; the system tests use these lines to tell such pauses from the triggers' own, and to check that the
deployment's ``airflow_local_settings`` (docs/recipes) keeps them out of the trigger loop.

With ``SYSTEM_TEST_PROFILE_SLOW_STEPS=1`` (the distributed deployment's triggerers), the processes the triggerer
forks time every step of their event loop and sample the loop thread's stack every few milliseconds; a step over
0.15 s is reported as ``SYSTEM_TEST_SLOW_STEP`` with the handle it ran and the functions most often on the stack
meanwhile (inclusive sample counts): a profile of each blocked loop, to tell Airflow's own stalls from a trigger's.
"""

from __future__ import annotations

import os

if os.environ.get("SYSTEM_TEST_LOG_GC_PAUSES") == "1":
    import gc
    import sys
    import time

    _started: list[float] = [0.0]
    _triggerer_pid = os.getpid()  # any other pid seen below is a forked child

    def _report_gc_pause(phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        seconds = time.perf_counter() - _started[0]
        if seconds > 0.05:
            forked = int(os.getpid() != _triggerer_pid)
            sys.stderr.write(
                f"SYSTEM_TEST_GC_PAUSE end={time.time():.3f} seconds={seconds:.3f} forked={forked}\n"
            )
            sys.stderr.flush()

    gc.callbacks.append(_report_gc_pause)


if os.environ.get("SYSTEM_TEST_PROFILE_SLOW_STEPS") == "1":
    import asyncio.events
    import collections
    import sys
    import threading
    import time

    SLOW_STEP = 0.15
    SAMPLE_EVERY = 0.004
    #: Frames of the event loop's own machinery, on every sample's stack: they tell nothing.
    _BORING = ("asyncio/", "importlib._bootstrap", "<frozen importlib", "sitecustomize.py")

    def _profile_slow_steps() -> None:
        """In a forked child: time each event-loop step, and sample the stack of the thread running the loop."""
        samples: collections.deque[tuple[float, list[str]]] = collections.deque(maxlen=5_000)
        loop_thread: list[int] = []

        def sample() -> None:
            while True:
                time.sleep(SAMPLE_EVERY)
                if not loop_thread:
                    continue
                frame = sys._current_frames().get(loop_thread[0])
                stack = []
                while frame is not None and len(stack) < 60:
                    code = frame.f_code
                    where = "/".join(code.co_filename.rsplit("/", 2)[-2:])
                    stack.append(f"{code.co_name}@{where}:{frame.f_lineno}")
                    frame = frame.f_back
                samples.append((time.perf_counter(), stack))

        run = asyncio.events.Handle._run

        def timed_run(handle: asyncio.events.Handle) -> None:
            if not loop_thread:
                loop_thread.append(threading.get_ident())
            started = time.perf_counter()
            run(handle)
            seconds = time.perf_counter() - started
            if seconds > SLOW_STEP:
                counts: collections.Counter[str] = collections.Counter()
                taken = [stack for at, stack in list(samples) if started <= at <= started + seconds]
                for stack in taken:
                    counts.update({f for f in stack if not any(b in f for b in _BORING)})
                top = "; ".join(f"{name} x{n}" for name, n in counts.most_common(25))
                sys.stderr.write(
                    f"SYSTEM_TEST_SLOW_STEP end={time.time():.3f} seconds={seconds:.3f} samples={len(taken)} "
                    f"handle={str(handle)[:300]} top=[{top}]\n"
                )
                sys.stderr.flush()

        asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]
        threading.Thread(target=sample, name="slow-step-sampler", daemon=True).start()

    os.register_at_fork(after_in_child=_profile_slow_steps)
