"""Test-only instrumentation, imported at start-up by every Airflow process of the system-test deployment.

With ``SYSTEM_TEST_LOG_GC_PAUSES=1`` (set for triggerers only), every full (generation 2) garbage collection
that pauses the process for more than 50 ms is reported on stderr, which the triggerer copies into its log, with
``forked=1`` when it happens in a process the triggerer forked (the one that runs the triggers). A full collection of the
triggerer's ~280,000 start-up objects takes 0.2-0.4 s on a small VM and freezes the trigger loop like a blocking
trigger would; the system tests use these lines to tell such pauses from the triggers' own, and to check that the
deployment's ``airflow_local_settings`` (docs/recipes) keeps them out of the trigger loop.
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
