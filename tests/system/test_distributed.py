"""System scenario 7: the provider in a distributed deployment, and two triggerers that cover for each other.

PostgreSQL, the CeleryExecutor with Redis, one Celery worker and two triggerers (distributed.py). 200 mapped
deferrable cancellations run against an API serving 10 requests/s; once the triggers are shared between the
triggerers, the one holding more (at least 100) is SIGKILLed and not replaced, and the other must finish its
waits without sending a second cancel.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.system.deployment import blocked_loops, wait_for
from tests.system.test_deployment import DEFERRED_THEN_SUCCESS, HOLD

if TYPE_CHECKING:
    from airflow_provider_openai_batch.testing.emulator import BatchAPIEmulator
    from tests.system.distributed import DistributedDeployment

pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]

DAG_ID = "system_openai_batch_cancel_distributed"
COUNT = 200
#: A blocked trigger-loop step, profiled by support/sitecustomize.py: its seconds and the frames on its stack.
SLOW_STEP = re.compile(r"SYSTEM_TEST_SLOW_STEP end=\S+ seconds=(\S+) .* top=\[(.*)\]$", re.MULTILINE)
#: Requests per second the emulator serves, as an organisation's rate limit would; 429 beyond.
RATE_LIMIT = 10


def test_distributed_deployment_survives_a_lost_triggerer(
    distributed_deployment: DistributedDeployment, system_emulator: BatchAPIEmulator
) -> None:
    """Scenario 7: a triggerer holding 100+ waits is SIGKILLed; the other one adopts and finishes them."""
    deployment, emulator = distributed_deployment, system_emulator
    prefix = f"batch_dist{int(time.time())}"
    batch_ids = [str(emulator.add_batch(**HOLD, batch_id=f"{prefix}_{n:03d}")["id"]) for n in range(COUNT)]
    ours = set(batch_ids)
    jobs = deployment.triggerer_jobs()
    triggerers = {key: deployment.processes[key] for key in jobs}
    log_offsets = {key: process.log_size() for key, process in triggerers.items()}
    emulator.limit_rate(RATE_LIMIT)
    try:
        started = time.monotonic()
        run_id = deployment.trigger_dag(DAG_ID, {"batch_ids": batch_ids})

        # Every task deferred, every trigger taken by one of the two triggerers and polling.
        def all_taken() -> list[dict[str, object]]:
            triggers = deployment.triggers_of(DAG_ID, run_id, "cancel")
            taken = len(triggers) == COUNT and all(t["triggerer_id"] in jobs.values() for t in triggers)
            return triggers if taken else []

        wait_for(all_taken, timeout=600, interval=2, what=f"{COUNT} triggers taken by the triggerers")
        all_deferred = time.monotonic() - started
        wait_for(
            lambda: set(deployment.ti_states(DAG_ID, run_id, "cancel").values()) == {"deferred"},
            timeout=120,
            what="no task instance left but deferred ones",
        )
        # A wait learns its batch's status from a GET or from a list page of its status board (both are looks).
        wait_for(
            lambda: all(emulator.look_count(batch_id) for batch_id in batch_ids),
            timeout=180,
            interval=2,
            what="every trigger to poll",
        )

        # The victim: the triggerer holding more of the waits, so at least half of them.
        triggers = all_taken()
        held = {key: [t for t in triggers if t["triggerer_id"] == job] for key, job in jobs.items()}
        victim = max(held, key=lambda key: len(held[key]))
        [survivor] = set(jobs) - {victim}
        victims_triggers = {t["id"]: t["map_index"] for t in held[victim]}
        assert len(victims_triggers) >= COUNT // 2
        deployment.kill(victim)
        killed_at = time.monotonic()

        # The survivor takes every one of the dead triggerer's triggers (same rows), and polls their batches.
        def adopted() -> bool:
            now = {t["id"]: t["triggerer_id"] for t in deployment.triggers_of(DAG_ID, run_id, "cancel")}
            return all(now.get(trigger_id) == jobs[survivor] for trigger_id in victims_triggers)

        wait_for(adopted, timeout=180, interval=1, what=f"{survivor} to adopt {victim}'s triggers")
        adopted_after = time.monotonic() - killed_at
        # The survivor's polls look at the adopted batches. A list page shows every batch, so the looks alone do
        # not tell whose wait asked; the trigger logs below show that the survivor ran the adopted waits.
        looks_at_kill = {
            batch_ids[index]: emulator.look_count(batch_ids[index]) for index in victims_triggers.values()
        }
        wait_for(
            lambda: all(emulator.look_count(batch_id) > looks for batch_id, looks in looks_at_kill.items()),
            timeout=180,
            interval=2,
            what=f"{survivor} to poll the adopted batches",
        )

        for batch_id in batch_ids:
            emulator.set_status(batch_id, "cancelled")
        assert deployment.wait_for_dag_run(DAG_ID, run_id, timeout=600) == "success"
        total = time.monotonic() - started
    finally:
        emulator.limit_rate(None)

    requests = [
        r
        for r in emulator.requests
        if r.at >= started and (r.path == "/v1/batches" or any(batch_id in r.path for batch_id in ours))
    ]
    after_kill = [r for r in emulator.requests if r.at > killed_at]
    rate_limited = sum(1 for r in requests if r.status == 429)
    blocked = {
        key: list(map(str, blocked_loops(process.log_text(log_offsets[key]))))
        for key, process in triggerers.items()
    }
    for key, process in triggerers.items():
        for step in SLOW_STEP.findall(process.log_text(log_offsets[key])):
            print(f"\n{key}: trigger loop step of {step[0]} s; on its stack: {step[1]}")
    print(
        f"\n{COUNT} cancellations: all deferred after {all_deferred:.0f}s; {victim} killed holding "
        f"{len(victims_triggers)} triggers, all adopted by {survivor} {adopted_after:.0f}s later; run done after "
        f"{total:.0f}s. {len(requests)} requests, {rate_limited} answered 429. Blocked trigger loops: {blocked}."
    )

    # Each batch got exactly one cancel, and is cancelled; each task deferred once and resumed once.
    assert {emulator.cancel_count(b) for b in batch_ids} == {1}
    assert {emulator.batch(b)["status"] for b in batch_ids} == {"cancelled"}
    history = deployment.state_history(DAG_ID, run_id, "cancel")
    assert len(history) == COUNT
    assert {index: events for index, events in history.items() if events != DEFERRED_THEN_SUCCESS} == {}
    # Every output file id reached the downstream task.
    assert sorted(deployment.xcom(DAG_ID, run_id, "output_file_ids")) == sorted(
        emulator.batch(b)["output_file_id"] for b in batch_ids
    )
    # After the kill, nothing but status reads reached the API: no trigger (nor resumed task) sent a cancel.
    assert {(r.method, r.path.count("/")) for r in after_kill} <= {("GET", 3), ("GET", 2)}, {
        (r.method, r.path) for r in after_kill if r.method != "GET"
    }

    # The survivor ran the dead triggerer's triggers: each one's start is in its trigger log of the task instance
    # (Airflow writes it when the trigger starts; the wait itself logs nothing unless a poll fails or is refused,
    # so nothing later is looked for: the polls after the kill and the output file ids above show the rest).
    def started_by_survivor(trigger_id: int, map_index: int) -> bool:
        path = trigger_log(deployment, run_id, map_index, jobs[survivor])
        return path.exists() and f"(ID {trigger_id}) starting" in path.read_text(errors="replace")

    def not_started() -> list[int]:
        return [
            index
            for trigger_id, index in victims_triggers.items()
            if not started_by_survivor(trigger_id, index)
        ]

    with contextlib.suppress(TimeoutError):
        wait_for(lambda: not not_started(), timeout=120, interval=2, what="the survivor's trigger logs")
    assert not_started() == [], f"no start of these map indexes' triggers in {survivor}'s trigger logs"

    # The key: in no log, and nowhere in clear in a dump of the database.
    leaks = [str(path) for path in deployment.log_files() if deployment.api_key.encode() in path.read_bytes()]
    assert leaks == []
    assert deployment.api_key.encode() not in deployment.db_bytes()


def trigger_log(deployment: DistributedDeployment, run_id: str, map_index: int, job_id: int) -> Path:
    """The log file that triggerer job ``job_id`` wrote for the trigger of mapped task instance ``map_index``."""
    task_logs = deployment.home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}" / "task_id=cancel"
    return task_logs / f"map_index={map_index}" / f"attempt=1.log.trigger.{job_id}.log"
