"""Keep the triggerer's start-up heap out of its trigger loop's garbage collections, and its trigger imports out of
the loop.

Copy these lines into ``$AIRFLOW_HOME/config/airflow_local_settings.py`` (or the ``airflow_local_settings`` module
your deployment already has) on the triggerers' hosts or image.

Why: ``airflow triggerer`` forks the process that runs every trigger in one asyncio event loop. That process
inherits the ~280,000 objects the triggerer created at start-up, and each full (generation 2) garbage collection
walks all of them: 0.1-0.5 s during which no trigger runs and Airflow logs a blocked event loop, whatever the
triggers do. Freezing just before the fork moves those objects into the permanent generation in the child, so its
collections walk only what the triggers create; the parent unfreezes at once and is unchanged. This is what
Airflow's ``LocalExecutor`` does around its worker forks. The trade-off, the same as theirs: garbage that already
exists at the fork is never collected in the child.

The same moment imports the trigger modules of ``WARM_IMPORTS``. Airflow imports a trigger's class when the first
trigger of that class starts, synchronously, on the event loop that runs every other trigger (``import_string`` in
``TriggerRunner.create_triggers``): 0.1 s for this provider's triggers on an idle machine, several times that on a
busy one, and logged as a blocked loop. Imported before the fork, the modules are already in the child (and frozen
with the rest).

Then, in the trigger runner, what outlives a collection of the middle generation is frozen too. A waiting
trigger keeps some 40 tracked objects (its task, coroutines, state, last batch) and replaces a few each poll; with
10,000 waits every full collection walked 420,000 objects, 0.3 s without a trigger running, at nearly every polling
round (bench/board_vs_get.py, docs/performance.md). Frozen, they are not walked, and a full collection costs what
is young. Objects frozen are still freed as soon as nothing refers to them: only garbage in reference cycles that
formed after its objects were frozen waits, until the next thaw. Every ``THAW_EVERY`` seconds the trigger runner
unfreezes instead, and the next full collection (one pause of the old kind) walks and frees everything.

Only the triggerer is changed: other Airflow processes fork for other reasons and manage their heap themselves
(the DAG processor freezes its own for good, which unfreezing after a fork would undo).
"""

import gc
import importlib
import os
import sys
import time

#: Modules of the triggers this triggerer runs; add your other providers' trigger modules.
WARM_IMPORTS = ("airflow_provider_openai_batch.triggers.openai_batch",)


#: Seconds between two thaws of the trigger runner's frozen objects, each followed by one full collection.
THAW_EVERY = 3600.0


def _before_fork() -> None:
    for module in WARM_IMPORTS:
        importlib.import_module(module)  # a no-op after the first fork
    gc.freeze()


class _FreezeSurvivors:
    """A ``gc.callbacks`` entry: after each collection of generation 1, freeze what survived it; every
    ``THAW_EVERY`` seconds, unfreeze instead, and freeze again once a full collection has run."""

    def __init__(self) -> None:
        self.thawed = False
        self.next_thaw = time.monotonic() + THAW_EVERY

    def __call__(self, phase: str, info: dict) -> None:
        if phase != "stop":
            return
        if self.thawed:
            if info["generation"] == 2:
                self.thawed, self.next_thaw = False, time.monotonic() + THAW_EVERY
        elif info["generation"] == 1:
            if time.monotonic() < self.next_thaw:
                gc.freeze()
            else:
                gc.unfreeze()
                self.thawed = True


def _in_trigger_runner() -> None:
    gc.callbacks.append(_FreezeSurvivors())


if sys.argv[1:2] == ["triggerer"]:
    os.register_at_fork(before=_before_fork, after_in_parent=gc.unfreeze, after_in_child=_in_trigger_runner)
