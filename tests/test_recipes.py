"""The deployment recipe in docs/recipes/airflow_local_settings.py: what it changes, and in which processes.

Each case runs in a fresh interpreter, since a fork hook cannot be unregistered from the test process. The effect
on a real triggerer (no full collection of the start-up heap in its trigger loop) is checked by system-test
scenario 3, whose deployment uses this file as its ``airflow_local_settings``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).parent.parent / "docs" / "recipes" / "airflow_local_settings.py"

#: ``python -c FORK_AND_REPORT RECIPE [COMMAND...]``: loads the recipe in a process started as ``airflow COMMAND``,
#: forks once, and prints the frozen-object counts of the parent (after the fork) and of the child, and the count
#: the interpreter started with (not always 0: CPython 3.12.1 starts with 375 objects frozen); and whether the
#: provider's trigger module was imported before the fork, and in the child.
FORK_AND_REPORT = """
import gc, json, os, runpy, sys
TRIGGERS = "airflow_provider_openai_batch.triggers.openai_batch"
at_start = gc.get_freeze_count()
recipe, sys.argv = sys.argv[1], ["airflow", *sys.argv[2:]]
runpy.run_path(recipe)
heap = [[object()] for _ in range(5_000)]  # start-up state the parent keeps
imported_before = TRIGGERS in sys.modules
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(write, json.dumps([gc.get_freeze_count(), TRIGGERS in sys.modules]).encode())
    os._exit(0)
os.waitpid(pid, 0)
child, in_child = json.loads(os.read(read, 64))
print(json.dumps({
    "at_start": at_start, "parent": gc.get_freeze_count(), "child": child,
    "imported_before_fork": imported_before, "imported_in_child": in_child,
}))
"""


def freeze_counts_after_fork(*command: str) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", FORK_AND_REPORT, str(RECIPE), *command],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(done.stdout)


def test_the_triggerers_forked_child_starts_with_the_parents_heap_frozen() -> None:
    counts = freeze_counts_after_fork("triggerer", "--capacity", "2000")

    assert counts["child"] > 10_000  # the 5,000 lists built before the fork, and everything imported
    assert counts["parent"] == 0  # unfrozen at once: the triggerer itself collects as before


def test_the_triggerers_forked_child_starts_with_the_trigger_module_imported() -> None:
    """Not on the trigger loop, where Airflow would import it when the first of its triggers starts."""
    counts = freeze_counts_after_fork("triggerer")

    assert (counts["imported_before_fork"], counts["imported_in_child"]) == (False, True)


@pytest.mark.parametrize("command", [("scheduler",), ("dag-processor",), ("api-server",), ()])
def test_other_airflow_processes_are_left_alone(command: tuple[str, ...]) -> None:
    counts = freeze_counts_after_fork(*command)

    assert counts["parent"] == counts["child"] == counts["at_start"]
    assert not counts["imported_in_child"]


#: ``python -c COLLECT_IN_CHILD RECIPE``: in the triggerer's forked child, what the recipe's collection hook does
#: with objects that outlive a generation-1 collection, with garbage, and at a thaw.
COLLECT_IN_CHILD = """
import gc, json, os, runpy, sys, weakref
recipe, sys.argv = sys.argv[1], ["airflow", "triggerer"]
runpy.run_path(recipe)
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    class State:
        pass
    hook = gc.callbacks[-1]
    report = {}
    gc.collect(1)
    base = gc.get_freeze_count()
    kept = [State() for _ in range(1_000)]
    gc.collect(1)
    report["frozen_survivors"] = gc.get_freeze_count() - base
    del kept
    report["left_after_release"] = gc.get_freeze_count() - base
    cycle = State()
    cycle.self = cycle
    alive = weakref.ref(cycle)
    gc.collect(1)
    del cycle
    gc.collect(2)
    report["frozen_cycle_after_full_collection"] = alive() is not None
    hook.next_thaw = 0
    gc.collect(1)
    report["thawed"] = gc.get_freeze_count() == 0
    gc.collect(2)
    report["cycle_after_thaw_and_full_collection"] = alive() is not None
    gc.collect(1)
    report["frozen_again"] = gc.get_freeze_count() > 0
    os.write(write, json.dumps(report).encode())
    os._exit(0)
os.waitpid(pid, 0)
print(os.read(read, 4096).decode())
"""


def test_the_trigger_runner_freezes_what_outlives_young_collections_and_thaws_on_schedule() -> None:
    """Waits' long-lived state is frozen, so full collections do not walk it; freed as usual once released; a
    cycle formed in frozen objects waits for the next thaw, whose full collection frees it."""
    done = subprocess.run(
        [sys.executable, "-c", COLLECT_IN_CHILD, str(RECIPE)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    report = json.loads(done.stdout)

    assert report["frozen_survivors"] >= 1_000
    assert report["left_after_release"] < 100, "released objects are freed, frozen or not"
    assert report["frozen_cycle_after_full_collection"], "a frozen cycle is not walked"
    assert report["thawed"]
    assert not report["cycle_after_thaw_and_full_collection"], "the thaw's full collection frees it"
    assert report["frozen_again"]
