"""The provider in a real Airflow 3 deployment: scheduler, LocalExecutor workers, triggerer, dag-processor, API.

Unlike ``dag.test()``, here the task process really exits when it defers, the trigger's kwargs really go through
the ``trigger`` table, a separate ``airflow triggerer`` process really runs the trigger, and a new worker process
really resumes ``execute_complete``. Batches live in the emulator, in this process; the test holds a batch in
``cancelling`` for as long as it needs (``cancel_after_polls`` huge) and releases it with ``set_status``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sqlite3
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from airflow_provider_openai_batch.testing.emulator import Fault
from tests.system.deployment import (
    Deployment,
    blocked_loops,
    decrypt_trigger_kwargs,
    trigger_loop_gc_pauses,
    wait_for,
)

if TYPE_CHECKING:
    from airflow_provider_openai_batch.testing.emulator import BatchAPIEmulator, RecordedRequest

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

#: Triggerer CPU seconds one poll of one trigger may cost. Measured on 2 vCPUs: ~3.5 ms with a 20-connection
#: client pool, 20-30 ms with a 100-connection one (httpcore scans its whole pool on every request).
MAX_CPU_PER_POLL = 0.010
#: Seconds during which scenario 3 watches 200 triggers doing nothing but polling.
STEADY_WINDOW = 15
#: Scenario 3's bound on what its waits' polls cost with the status board, as a share of per-GET polling.
MAX_BOARD_SHARE = 0.25
#: The line the resumed task logs with its wait's status history (``CancellationEvent.history_line``), as
#: scenario 3's waits have it: first polled in ``cancelling``, last in ``cancelled``; times are whole seconds.
_WAIT_HISTORY = re.compile(
    r"Batch '(?P<batch>[^']+)' was 'cancelling' at (?P<first>[0-9-]+ [0-9:]+) UTC, "
    r"then 'cancelled' at (?P<last>[0-9-]+ [0-9:]+) UTC\."
)

TRIGGER_CLASSPATH = "airflow_provider_openai_batch.triggers.openai_batch.OpenAIBatchCancellationTrigger"
UPSTREAM_FAILURE_DAG = "system_openai_batch_cancel_on_upstream_failure"
DEADLINE_DAG = "system_openai_batch_cancel_on_deadline"
CALLBACK_PATH = "airflow_provider_openai_batch.callbacks.cancel_run_batches"
CANCEL_ONE_DAG = "system_openai_batch_cancel_one"
CANCEL_MANY_DAG = "system_openai_batch_cancel_many"
CANCEL_MANY_WORKLOAD_IDENTITY_DAG = "system_openai_batch_cancel_many_workload_identity"
#: Seconds a workload identity token lasts in scenario 9: it is refreshed after half, every 10 s.
TOKEN_LIFETIME = 20.0
#: Seconds during which scenario 9 counts the token exchanges of a triggerer polling 200 batches.
TOKEN_WINDOW = 45
#: A batch the test holds in ``cancelling`` until it calls ``set_status``.
HOLD = {"cancel_after_polls": 10**9}
#: The audit-log story of a task that deferred once, was resumed once, and succeeded.
DEFERRED_THEN_SUCCESS = ["running", "deferred", "running", "success"]


def gets_of(emulator: BatchAPIEmulator, batch_id: str) -> list[RecordedRequest]:
    return [r for r in emulator.requests if r.method == "GET" and r.path == f"/v1/batches/{batch_id}"]


def held_batch(emulator: BatchAPIEmulator, **kwargs: Any) -> str:
    return str(emulator.add_batch(**HOLD, **kwargs)["id"])


def board_requests(emulator: BatchAPIEmulator, prefix: str, since: float) -> list[RecordedRequest]:
    """What the triggerer's waits for the batches named ``prefix_NNN`` sent since ``since`` (monotonic) to learn
    their statuses: pages of the batch list, and GETs of single batches (cancels are not polls)."""
    single = re.compile(rf"/v1/batches/{re.escape(prefix)}_\d+")
    return [
        r
        for r in emulator.requests
        if r.at >= since and r.method == "GET" and (r.path == "/v1/batches" or single.fullmatch(r.path))
    ]


def wait_histories(deployment: Deployment, since: float) -> dict[str, tuple[float, float]]:
    """``{batch_id: (first poll, last poll)}`` (UNIX seconds, truncated to the second) of the waits that saw
    their batch go from ``cancelling`` to ``cancelled``, from the history line each resumed task logged."""
    found: dict[str, tuple[float, float]] = {}
    for path in deployment.task_log_files(since):
        for match in _WAIT_HISTORY.finditer(path.read_text(errors="replace")):
            first, last = (
                datetime.fromisoformat(match[key]).replace(tzinfo=UTC).timestamp()
                for key in ("first", "last")
            )
            found[match["batch"]] = (first, last)
    return found


def poll_interval_once_polling(
    deployment: Deployment, emulator: BatchAPIEmulator, dag_id: str, run_id: str, prefix: str
) -> float:
    """The ``poll_interval`` in the stored kwargs of the deferred ``cancel`` tasks of the run, once their waits
    poll. Every trigger's first poll comes within an interval (and its jitter) of its start: this waits for
    polls after that. The waits' histories show afterwards that every one had polled before (see
    :func:`assert_waits_kept_pace`)."""
    _, kwargs = decrypt_trigger_kwargs(
        deployment.triggers_of(dag_id, run_id, "cancel")[0]["kwargs"], deployment.fernet_key
    )
    interval = float(kwargs["poll_interval"])
    settled = time.monotonic() + 2 * interval
    wait_for(
        lambda: time.monotonic() > settled and board_requests(emulator, prefix, settled),
        timeout=120,
        what="every trigger to poll",
    )
    return interval


def assert_waits_kept_pace(
    histories: dict[str, tuple[float, float]],
    batch_ids: list[str],
    window_started_at: float,
    released_at: float,
    interval: float,
) -> None:
    """Every wait went from 'cancelling' to 'cancelled', was polling before the window began (UNIX time), and
    kept its pace: a round runs at most 1.1 intervals after its last answer, and answers within a second here,
    so it saw its batch 'cancelled' within two intervals of the release. A saturated loop would starve some."""
    assert sorted(histories) == sorted(batch_ids)
    assert [b for b, (first, _) in histories.items() if first > window_started_at] == []
    laggards = [b for b, (_, last) in histories.items() if last > released_at + 2 * interval]
    assert laggards == [], (
        f"{len(laggards)} triggers saw 'cancelled' over {2 * interval:.0f}s after the release"
    )


# ------------------------------------------------------------------------------------- the deployment itself


def test_deployment_defers_and_resumes_a_standard_sensor(deployment: Deployment) -> None:
    """Control: scheduler -> worker -> deferred -> triggerer -> worker, with Airflow's own DateTimeSensorAsync."""
    run_id = deployment.trigger_dag("system_smoke_deferrable")
    assert deployment.wait_for_dag_run("system_smoke_deferrable", run_id, timeout=180) == "success"
    assert deployment.state_history("system_smoke_deferrable", run_id, "wait") == {-1: DEFERRED_THEN_SUCCESS}


def test_triggerer_log_shows_a_blocked_event_loop(deployment: Deployment) -> None:
    """Control for scenario 3: a trigger that blocks the loop for 1 s is reported in the triggerer's log file."""
    offset = deployment.triggerer.log_size()
    run_id = deployment.trigger_dag("system_smoke_blocking_trigger")
    assert deployment.wait_for_dag_run("system_smoke_blocking_trigger", run_id, timeout=180) == "success"
    blocked = wait_for(
        lambda: [b for b in blocked_loops(deployment.triggerer.log_text(offset)) if b.seconds >= 1.0],
        timeout=30,
        what="the triggerer to log its event loop blocked for 1 s",
    )[0]
    # Scenario 3's messages do not put a real block down to the garbage collector.
    assert blocked.gc_pause == 0


# ------------------------------------------------------------------------------------------------ scenarios


def test_cancel_on_upstream_failure(deployment: Deployment, emulator: BatchAPIEmulator) -> None:
    """Scenario 1: upstream fails -> the batch is cancelled, deferrably -> its partial results reach downstream."""
    batch_id = emulator.add_batch(cancel_after_polls=10**9, cancel_after_seconds=10)["id"]
    run_id = deployment.trigger_dag(UPSTREAM_FAILURE_DAG, {"batch_id": batch_id})

    # Seen live: the task is deferred, and its trigger is in the trigger table, taken by the triggerer.
    wait_for(
        lambda: deployment.ti_states(UPSTREAM_FAILURE_DAG, run_id, "cancel").get(-1) == "deferred",
        timeout=180,
        what="the cancel task to be deferred",
    )
    [trigger] = wait_for(
        lambda: [
            t for t in deployment.triggers_of(UPSTREAM_FAILURE_DAG, run_id, "cancel") if t["triggerer_id"]
        ],
        timeout=60,
        what="the triggerer to take the trigger",
    )
    assert trigger["classpath"] == TRIGGER_CLASSPATH

    assert deployment.wait_for_dag_run(UPSTREAM_FAILURE_DAG, run_id, timeout=180) == "success"
    assert deployment.task_states(UPSTREAM_FAILURE_DAG, run_id) == {
        ("submit", -1): "success",
        ("process_results", -1): "failed",
        ("cancel", -1): "success",
        ("collect_partial_results", -1): "success",
    }
    assert deployment.state_history(UPSTREAM_FAILURE_DAG, run_id, "cancel") == {-1: DEFERRED_THEN_SUCCESS}

    batch = emulator.batch(batch_id)
    assert batch["status"] == "cancelled"
    assert batch["output_file_id"]
    assert emulator.cancel_count(batch_id) == 1
    # The worker cancelled; then only the trigger polled, until the batch was cancelled.
    requests = [r for r in emulator.requests if batch_id in r.path]
    assert (requests[0].method, requests[0].path, requests[0].status) == (
        "POST",
        f"/v1/batches/{batch_id}/cancel",
        200,
    )
    assert all(r.method == "GET" and r.status == 200 for r in requests[1:])

    assert deployment.xcom(UPSTREAM_FAILURE_DAG, run_id, "collect_partial_results") == {
        "output_file_id": batch["output_file_id"],
        "status": "cancelled",
    }
    assert deployment.xcom(UPSTREAM_FAILURE_DAG, run_id, "cancel", key="batch_id") == batch_id
    assert deployment.xcom(UPSTREAM_FAILURE_DAG, run_id, "cancel", key="status") == "cancelled"
    assert (
        deployment.xcom(UPSTREAM_FAILURE_DAG, run_id, "cancel", key="error_file_id") == batch["error_file_id"]
    )
    returned = deployment.xcom(UPSTREAM_FAILURE_DAG, run_id, "cancel")
    assert (returned["id"], returned["status"]) == (batch_id, "cancelled")


def test_trigger_kwargs_stored_without_the_api_key(
    deployment: Deployment, emulator: BatchAPIEmulator
) -> None:
    """Scenario 4: what the trigger table stores (decrypted, and as raw bytes) holds no API key."""
    batch_id = held_batch(emulator)
    before = time.time()
    run_id = deployment.trigger_dag(CANCEL_ONE_DAG, {"batch_id": batch_id})
    [trigger] = wait_for(
        lambda: [t for t in deployment.triggers_of(CANCEL_ONE_DAG, run_id, "cancel") if t["triggerer_id"]],
        timeout=180,
        what="the cancel task's trigger to be stored and taken by the triggerer",
    )
    wait_for(lambda: gets_of(emulator, batch_id), timeout=60, what="the trigger's first poll")
    # The key did travel: the trigger authenticated with it...
    assert gets_of(emulator, batch_id)[0].headers["authorization"] == f"Bearer {deployment.api_key}"

    # ...but is not in what was stored. Airflow 3.3 stores the kwargs of a task deferred from a worker as
    # plain JSON (the execution API encrypts only what the worker sent already encrypted), so they are
    # readable by anyone with DB access: all the more reason for them to hold no secret. Older rows may be
    # Fernet-encrypted: decrypt_trigger_kwargs reads both.
    raw = trigger["kwargs"]
    assert deployment.api_key not in raw
    plaintext, kwargs = decrypt_trigger_kwargs(raw, deployment.fernet_key)
    assert deployment.api_key not in plaintext
    assert set(kwargs) == {"batch_id", "conn_id", "poll_interval", "deadline"}
    assert kwargs["batch_id"] == batch_id
    assert kwargs["conn_id"] == "openai_default"
    assert kwargs["poll_interval"] == 1
    assert before + 600 <= kwargs["deadline"] <= time.time() + 600  # timeout=600 in the DAG
    assert deployment.api_key.encode() not in deployment.db_bytes()

    emulator.set_status(batch_id, "cancelled")
    assert deployment.wait_for_dag_run(CANCEL_ONE_DAG, run_id, timeout=180) == "success"

    # Nor anywhere else once the task is done (event payload, XComs, rendered fields, logs).
    assert deployment.api_key.encode() not in deployment.db_bytes()
    leaks = [str(path) for path in deployment.log_files() if deployment.api_key.encode() in path.read_bytes()]
    assert leaks == []


def test_triggerer_killed_mid_wait(deployment: Deployment, emulator: BatchAPIEmulator) -> None:
    """Scenario 2: SIGKILL the triggerer while the trigger waits; a new triggerer finishes the job, correctly."""
    batch_id = held_batch(emulator)
    run_id = deployment.trigger_dag(CANCEL_ONE_DAG, {"batch_id": batch_id})
    old_job = deployment.latest_triggerer_job()
    assert old_job is not None

    # The trigger runs in the current triggerer: taken by its job, and polling.
    [trigger] = wait_for(
        lambda: [t for t in deployment.triggers_of(CANCEL_ONE_DAG, run_id, "cancel") if t["triggerer_id"]],
        timeout=180,
        what="the trigger to be taken by the triggerer",
    )
    assert trigger["triggerer_id"] == old_job["id"]
    wait_for(lambda: len(gets_of(emulator, batch_id)) >= 2, timeout=60, what="the trigger to poll")
    _, kwargs_before = decrypt_trigger_kwargs(trigger["kwargs"], deployment.fernet_key)

    deployment.triggerer.kill()  # SIGKILL to the triggerer's whole process group: no clean shutdown of anything
    killed_at = time.monotonic()
    polls_at_kill = len(gets_of(emulator, batch_id))
    time.sleep(4)  # several poll intervals
    assert len(gets_of(emulator, batch_id)) <= polls_at_kill + 1, "something still polls after the kill"
    assert deployment.ti_states(CANCEL_ONE_DAG, run_id, "cancel") == {-1: "deferred"}

    deployment.start_triggerer()
    new_job = wait_for(
        lambda: (job := deployment.latest_triggerer_job()) and job["id"] != old_job["id"] and job,
        timeout=180,
        what="the new triggerer's job",
    )
    [moved] = wait_for(
        lambda: [
            t
            for t in deployment.triggers_of(CANCEL_ONE_DAG, run_id, "cancel")
            if t["triggerer_id"] == new_job["id"]
        ],
        timeout=120,
        what="the new triggerer to take over the trigger",
    )
    polls_before_release = wait_for(
        lambda: (n := len(gets_of(emulator, batch_id))) > polls_at_kill + 1 and n,
        timeout=60,
        what="the new triggerer to poll",
    )
    handover = time.monotonic() - killed_at

    # Same trigger row, same stored kwargs: the deadline was not reset by the restart.
    assert moved["id"] == trigger["id"]
    assert moved["kwargs"] == trigger["kwargs"]
    _, kwargs_after = decrypt_trigger_kwargs(moved["kwargs"], deployment.fernet_key)
    assert kwargs_after == kwargs_before
    assert kwargs_after["deadline"] > time.time()

    emulator.set_status(batch_id, "cancelled")
    assert deployment.wait_for_dag_run(CANCEL_ONE_DAG, run_id, timeout=180) == "success"
    assert deployment.task_states(CANCEL_ONE_DAG, run_id) == {
        ("cancel", -1): "success",
        ("report", -1): "success",
    }
    # One attempt, deferred once, resumed once: the restart cost no retry and no second deferral.
    assert deployment.state_history(CANCEL_ONE_DAG, run_id, "cancel") == {-1: DEFERRED_THEN_SUCCESS}
    # The cancel was sent exactly once (the trigger only ever polls); every request was answered 200.
    assert emulator.cancel_count(batch_id) == 1
    assert all(r.status == 200 for r in emulator.requests if batch_id in r.path)
    assert len(gets_of(emulator, batch_id)) > polls_before_release
    batch = emulator.batch(batch_id)
    assert deployment.xcom(CANCEL_ONE_DAG, run_id, "report") == batch["output_file_id"]
    print(f"\ntriggerer handover after SIGKILL took {handover:.1f}s")


def test_200_deferred_cancellations_in_one_triggerer(
    deployment: Deployment, emulator: BatchAPIEmulator
) -> None:
    """Scenario 3: 200 mapped cancellations deferred at once in one triggerer; its event loop is never blocked,
    and the status board makes their polls cost at most a quarter of the GETs that per-GET polling sends.

    The blocked-loop check is made over a window in which all 200 triggers are running and polling and nothing
    else happens in the deployment (no task runs): there, any warning is the triggers' doing. Warnings while
    the 200 tasks start and resume, when 16 worker processes share the machine's CPUs with the triggerer, are
    reported but not asserted on.

    The cost is counted at the emulator: every page of the batch list and every GET of one of the 200 batches
    from the run's start to its end. Only the triggerer sends those (a task sends its cancel, not counted, and
    defers). Per-GET polling, the provider before the board, pays each poll of each wait with one GET, so what
    the same waits cost with it is the number of polls they made. A wait's next poll runs at most 1.1 intervals
    after its previous answer (``POLL_JITTER``: the latest moment of its window, when the board runs a round for
    it at the latest), and the round answers within a second here (a page or two of the list, then GETs of any
    due batch the walk did not show, each answered in 0.3 s): its polls are less than two intervals apart. A
    wait that first polled its batch at ``first`` (seeing ``cancelling``) and last at ``last`` (seeing
    ``cancelled``) thus made at least ``1 + floor((last - first) / (2 x interval))`` polls. Both times come from
    the wait's own status history, in the line its resumed task logs; the line gives whole seconds, so each span
    loses one second. Counting a poll per two intervals undercounts the polls, which only makes the quarter
    harder to meet. The interval is the one in the triggers' stored kwargs.
    """
    count = 200
    prefix = f"batch_many{int(time.time())}"
    batch_ids = [held_batch(emulator, batch_id=f"{prefix}_{n:03d}") for n in range(count)]
    # Every poll is answered after 0.3 s, like the real API, be it a GET of one batch or a page of the list: a
    # trigger doing blocking I/O would then block the loop for that long on every poll (the watchdog's threshold
    # is 0.2 s), so it cannot pass unnoticed.
    emulator.inject(
        Fault("delay", times=10**9, method="GET", path=rf"^/v1/batches(/{prefix}_\d+)?$", delay=0.3)
    )

    triggerer = deployment.triggerer
    log_offset = triggerer.log_size()
    job = deployment.latest_triggerer_job()
    assert job is not None
    started, started_at = time.monotonic(), time.time()
    run_id = deployment.trigger_dag(CANCEL_MANY_DAG, {"batch_ids": batch_ids})

    def all_deferred_in_one_triggerer() -> bool:
        triggers = deployment.triggers_of(CANCEL_MANY_DAG, run_id, "cancel")
        return len(triggers) == count and {t["triggerer_id"] for t in triggers} == {job["id"]}

    wait_for(
        all_deferred_in_one_triggerer, timeout=600, interval=2, what=f"{count} triggers in the triggerer"
    )
    all_deferred = time.monotonic() - started
    wait_for(
        lambda: set(deployment.ti_states(CANCEL_MANY_DAG, run_id, "cancel").values()) == {"deferred"},
        timeout=60,
        what="no task instance left but deferred ones",
    )
    interval = poll_interval_once_polling(deployment, emulator, CANCEL_MANY_DAG, run_id, prefix)

    # The steady window: 200 triggers polling every 2 s, and nothing else going on.
    window_offset = triggerer.log_size()
    cpu_before, window_start, window_started_at = triggerer.cpu_seconds(), time.monotonic(), time.time()
    time.sleep(STEADY_WINDOW)
    cpu_used, window = triggerer.cpu_seconds() - cpu_before, time.monotonic() - window_start
    window_requests = len(board_requests(emulator, prefix, window_start))
    # The polls of the 200 waits in the window, at their pace of one per interval: the board serves each wait
    # due once per round, whether by a page or a GET, so its requests no longer count them.
    polls = count * window / interval
    steady_log = triggerer.log_text(window_offset)

    for batch_id in batch_ids:
        emulator.set_status(batch_id, "cancelled")
    released_at = time.time()
    assert deployment.wait_for_dag_run(CANCEL_MANY_DAG, run_id, timeout=600) == "success"
    total = time.monotonic() - started

    requests = board_requests(emulator, prefix, started)
    pages = sum(r.path == "/v1/batches" for r in requests)
    walks = sum(r.path == "/v1/batches" and "after" not in r.query for r in requests)
    histories = wait_histories(deployment, started_at)
    per_get = sum(
        1 + math.floor(max(0.0, last - first - 1) / (2 * interval)) for first, last in histories.values()
    )
    whole_log = triggerer.log_text(log_offset)
    blocked_steady = blocked_loops(steady_log)
    blocked_overall = blocked_loops(whole_log)
    gc_pauses = [round(end - start, 3) for start, end in trigger_loop_gc_pauses(whole_log)]
    print(
        f"\n{count} cancellations: all deferred after {all_deferred:.0f}s, run done after {total:.0f}s. Steady "
        f"window of {window:.0f}s: {window_requests} requests for {polls:.0f} polls, triggerer CPU "
        f"{cpu_used:.1f}s ({1000 * cpu_used / polls:.1f} ms per poll), blocked loop: "
        f"{list(map(str, blocked_steady))}. Whole run: {len(requests)} requests ({pages} list pages in {walks} "
        f"walks, {len(requests) - pages} GETs) where per-GET polling sends at least {per_get}; blocked loop "
        f"{list(map(str, blocked_overall))}, trigger-loop full GC pauses over 50 ms {gc_pauses} s."
    )

    states = deployment.ti_states(CANCEL_MANY_DAG, run_id, "cancel")
    assert len(states) == count and set(states.values()) == {"success"}
    history = deployment.state_history(CANCEL_MANY_DAG, run_id, "cancel")
    assert {index: events for index, events in history.items() if events != DEFERRED_THEN_SUCCESS} == {}
    assert {emulator.cancel_count(b) for b in batch_ids} == {1}
    outputs = deployment.query(
        "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = 'cancel' AND key = 'output_file_id'",
        (CANCEL_MANY_DAG, run_id),
    )
    assert sorted(json.loads(row["value"]) for row in outputs) == sorted(
        emulator.batch(b)["output_file_id"] for b in batch_ids
    )

    # The contention-proof twin of the watchdog: what each poll costs the triggerer in CPU time. A client that
    # scales badly with many triggers (e.g. a connection pool scanned on every request) shows up here.
    assert cpu_used / polls < MAX_CPU_PER_POLL, f"{1000 * cpu_used / polls:.1f} ms of CPU per poll"
    # No blocked loop at all. The triggerer runs with docs/recipes/airflow_local_settings.py, so the trigger loop
    # never collects the triggerer's ~280k start-up objects (0.2-0.4 s on a small VM, whatever the triggers; the
    # message says how much of a block such a pause explains): not while the 200 wait...
    assert list(map(str, blocked_steady)) == []
    # ...nor while they start (connection lookup, client set-up) and end (events) amid 16 busy workers.
    assert list(map(str, blocked_overall)) == []
    # Every wait was polling before the window began, and kept its pace to the end (the round's answers take
    # 0.3 s each here).
    assert_waits_kept_pace(histories, batch_ids, window_started_at, released_at, interval)
    # The status board: the rounds' pages and GETs cost at most a quarter of the GETs of per-GET polling.
    assert len(requests) <= MAX_BOARD_SHARE * per_get, (
        f"{len(requests)} requests, where per-GET polling sends at least {per_get}"
    )


def test_200_deferred_cancellations_with_workload_identity(
    deployment: Deployment, emulator: BatchAPIEmulator
) -> None:
    """Scenario 9: scenario 3's 200 deferred cancellations with a key-less connection (workload identity, a
    Kubernetes token file) whose tokens expire every 20 s. All succeed, and the triggerer that polls for all 200
    exchanges its token once per refresh: tokens are shared per process, not taken per trigger.

    The waits' polls are what scenario 3 counts: the status board's pages of the batch list and GETs of single
    batches (:func:`board_requests`), which only the triggerer sends. Every one of them, over the whole run,
    carried an issued, unexpired token.
    """
    count = 200
    prefix = f"batch_wi{int(time.time())}"
    batch_ids = [held_batch(emulator, batch_id=f"{prefix}_{n:03d}") for n in range(count)]
    emulator.token_exchange.lifetime = TOKEN_LIFETIME
    try:
        started, started_at = time.monotonic(), time.time()
        run_id = deployment.trigger_dag(CANCEL_MANY_WORKLOAD_IDENTITY_DAG, {"batch_ids": batch_ids})
        wait_for(
            lambda: (
                set(deployment.ti_states(CANCEL_MANY_WORKLOAD_IDENTITY_DAG, run_id, "cancel").values())
                == {"deferred"}
            ),
            timeout=600,
            interval=2,
            what=f"{count} cancellations deferred",
        )
        interval = poll_interval_once_polling(
            deployment, emulator, CANCEL_MANY_WORKLOAD_IDENTITY_DAG, run_id, prefix
        )

        # The window: nothing runs but the triggerer's 200 waits, each polling every 2 s with a token.
        window_start, window_started_at = time.monotonic(), time.time()
        time.sleep(TOKEN_WINDOW)
        window_end = time.monotonic()
        exchanges = [e for e in emulator.token_exchange.exchanges if window_start <= e.at < window_end]
        polls = [r for r in board_requests(emulator, prefix, window_start) if r.at < window_end]

        for batch_id in batch_ids:
            emulator.set_status(batch_id, "cancelled")
        released_at = time.time()
        assert (
            deployment.wait_for_dag_run(CANCEL_MANY_WORKLOAD_IDENTITY_DAG, run_id, timeout=600) == "success"
        )
    finally:
        emulator.token_exchange.lifetime = 3600.0
    issued = emulator.token_exchange.issued
    requests = board_requests(emulator, prefix, started)
    histories = wait_histories(deployment, started_at)
    window_tokens = {r.headers["authorization"] for r in polls}
    # The longest stretch of the window without a poll, its edges included.
    times = [window_start, *(r.at for r in polls), window_end]
    longest_gap = max(later - earlier for earlier, later in itertools.pairwise(times))
    print(
        f"\n{count} cancellations with workload identity: in {window_end - window_start:.0f}s of polling, "
        f"{len(polls)} requests ({sum(r.path == '/v1/batches' for r in polls)} list pages, "
        f"{sum(r.path != '/v1/batches' for r in polls)} GETs; longest gap {longest_gap:.1f}s) with "
        f"{len(window_tokens)} tokens, and {len(exchanges)} token exchanges. Whole run: {len(requests)} "
        f"requests ({sum(r.path == '/v1/batches' for r in requests)} list pages, "
        f"{sum(r.path != '/v1/batches' for r in requests)} GETs), {len(issued)} tokens issued."
    )

    # Key-less: every poll of the run carried an issued token, unexpired (the emulator answers an expired one
    # with a 401), and each batch got one cancel.
    assert {r.headers["authorization"].removeprefix("Bearer ") in issued for r in requests} == {True}
    assert {r.status for r in requests} == {200}
    assert {emulator.cancel_count(b) for b in batch_ids} == {1}
    # The waits polled all through the window, across its token refreshes. Per-GET polling sent each wait's
    # polls as its own GETs, and the test asked for two per wait in the window; the board's rounds serve all
    # the due waits at once, so its requests no longer count a wait's polls. What stands for that: the rounds
    # never stopped for two intervals (a round runs at most 1.1 intervals after the last one's answer), the
    # window's polls went out with more than one token (tokens last 20 s, the window 45 s), and every wait
    # polled before the window and saw its batch 'cancelled' within two intervals of the release.
    assert longest_gap < 2 * interval, f"no poll for {longest_gap:.1f}s in the window"
    assert len(window_tokens) >= 2
    assert_waits_kept_pace(histories, batch_ids, window_started_at, released_at, interval)
    states = deployment.ti_states(CANCEL_MANY_WORKLOAD_IDENTITY_DAG, run_id, "cancel")
    assert len(states) == count and set(states.values()) == {"success"}
    outputs = deployment.query(
        "SELECT value FROM xcom WHERE dag_id = ? AND run_id = ? AND task_id = 'cancel' AND key = 'output_file_id'",
        (CANCEL_MANY_WORKLOAD_IDENTITY_DAG, run_id),
    )
    assert sorted(json.loads(row["value"]) for row in outputs) == sorted(
        emulator.batch(b)["output_file_id"] for b in batch_ids
    )
    # One token per process, refreshed at half its life: the window spans two lifetimes, so the triggerer
    # exchanged a few times (not once per trigger, which would be 200 and more, nor once per request).
    assert 1 <= len(exchanges) <= TOKEN_WINDOW / (TOKEN_LIFETIME / 2) + 2, exchanges
    assert {(e.identity_provider_id, e.service_account_id, e.subject_token, e.status) for e in exchanges} == {
        ("idp_system", "sa_system", deployment.subject_token, 200)
    }
    # The subject token and the access tokens are secrets, as the key is: in no log, nowhere in the database.
    database = deployment.db_bytes()
    for secret in [deployment.subject_token, *issued]:
        assert secret.encode() not in database
        assert [str(path) for path in deployment.log_files() if secret.encode() in path.read_bytes()] == []


def without_type_tags(value: Any) -> Any:
    """A ``callback.data`` value without the ``{"__var": ..., "__type": ...}`` wrappers it is stored in."""
    if isinstance(value, dict):
        if value.keys() == {"__var", "__type"}:
            return without_type_tags(value["__var"])
        return {key: without_type_tags(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_type_tags(item) for item in value]
    return value


def batch_of_run(deployment: Deployment, emulator: BatchAPIEmulator, run_id: str) -> dict[str, Any]:
    """The batch the deadline DAG's task created in run ``run_id``, found by its tags, once it exists."""
    headers = {"Authorization": f"Bearer {deployment.api_key}"}

    def created_by_the_task() -> list[dict[str, Any]]:
        with httpx.Client(base_url=emulator.base_url, headers=headers, timeout=30) as http:
            newest = http.get("/batches", params={"limit": 100}).json()["data"]
        return [
            batch
            for batch in newest
            if (batch["metadata"] or {}).get("airflow_run_id") == run_id
            and batch["metadata"].get("airflow_task_id") == "submit_and_wait"
        ]

    [batch] = wait_for(
        created_by_the_task, timeout=180, interval=1, what="the task to create its tagged batch"
    )
    return batch


def deadline_callback(deployment: Deployment, run_id: str) -> tuple[float, sqlite3.Row | None]:
    """The run's deadline (UNIX time) and, once it has been missed, the callback Airflow made of it."""
    [row] = deployment.query(
        "SELECT d.deadline_time, c.type, c.state, c.data, c.output FROM deadline AS d "
        "JOIN dag_run AS r ON r.id = d.dagrun_id LEFT JOIN callback AS c ON c.id = d.callback_id "
        "WHERE r.dag_id = ? AND r.run_id = ?",
        (DEADLINE_DAG, run_id),
    )
    deadline_at = datetime.fromisoformat(row["deadline_time"]).replace(tzinfo=UTC).timestamp()
    return deadline_at, row if row["state"] in ("success", "failed") else None


def logs_with(deployment: Deployment, text: str) -> list[str]:
    return [path.name for path in deployment.log_files() if text in path.read_text(errors="replace")]


def summary_line(run_id: str, cancelled: list[str]) -> str:
    return f"Batches of run '{run_id}' of DAG '{DEADLINE_DAG}': {len(cancelled)} cancelled {cancelled}"


def test_deadline_alert_cancels_the_runs_batch_from_the_triggerer(
    deployment: Deployment, emulator: BatchAPIEmulator
) -> None:
    """Scenario 5: the run's deadline passes while its task still waits for the batch it created, tagged with
    the run. The deadline's AsyncCallback, cancel_run_batches, runs in the triggerer and cancels that batch,
    and no other batch: not another run's, not another DAG's with the same run id, not a finished one."""
    run_id = f"system_deadline__{int(time.time())}"
    tags = {"airflow_dag_id": DEADLINE_DAG, "airflow_run_id": run_id}
    left_alone = {
        "another run": emulator.add_batch(metadata={**tags, "airflow_run_id": f"{run_id}_other"})["id"],
        "another DAG": emulator.add_batch(metadata={**tags, "airflow_dag_id": CANCEL_ONE_DAG})["id"],
        "finished": emulator.add_batch(metadata=dict(tags), status="completed")["id"],
    }
    deployment.trigger_dag(DEADLINE_DAG, run_id=run_id)

    ours = batch_of_run(deployment, emulator, run_id)
    deadline_at, _ = deadline_callback(deployment, run_id)
    assert ours["created_at"] < deadline_at, "the task started too late: raise DEADLINE in the DAG file"
    wait_for(
        lambda: emulator.batch(ours["id"])["status"] in ("cancelling", "cancelled"),
        timeout=180,
        what="the deadline callback to cancel the run's batch",
    )
    assert deployment.wait_for_dag_run(DEADLINE_DAG, run_id, timeout=300) == "success"
    # The task saw its batch cancelled while it was still running: the deadline passed mid-run.
    assert deployment.xcom(DEADLINE_DAG, run_id, "submit_and_wait") == "cancelling"
    assert emulator.cancel_count(ours["id"]) == 1
    assert {name: emulator.batch(batch_id)["status"] for name, batch_id in left_alone.items()} == {
        "another run": "in_progress",
        "another DAG": "in_progress",
        "finished": "completed",
    }
    assert {emulator.cancel_count(batch_id) for batch_id in left_alone.values()} == {0}

    # The triggerer ran it: a TriggererCallback, run to success, whose output is the callback's summary.
    _, callback = wait_for(
        lambda: (found := deadline_callback(deployment, run_id))[1] and found,
        timeout=60,
        what="the deadline callback to end",
    )
    assert (callback["type"], callback["state"]) == ("triggerer", "success")
    data = without_type_tags(json.loads(callback["data"]))
    assert (data["path"], data["kwargs"]["conn_id"]) == (CALLBACK_PATH, "openai_default")
    assert data["kwargs"]["context"]["dag_run"]["dag_run_id"] == run_id
    summary = json.loads(callback["output"])
    assert (summary["dag_id"], summary["run_id"]) == (DEADLINE_DAG, run_id)
    assert summary["cancelled"] == [{"batch_id": ours["id"], "status": "cancelling"}]
    assert summary["failed"] == [] and summary["error"] is None
    logged_in = logs_with(deployment, summary_line(run_id, [ours["id"]]))
    assert logged_in and all(name.startswith("triggerer") for name in logged_in), logged_in

    # Neither the deadline's stored callback (kwargs, context, output) nor any log holds the key.
    assert deployment.api_key.encode() not in deployment.db_bytes()
    leaks = [str(path) for path in deployment.log_files() if deployment.api_key.encode() in path.read_bytes()]
    assert leaks == []


def test_failure_callback_cancels_the_runs_batch_from_the_dag_processor(
    deployment: Deployment, emulator: BatchAPIEmulator
) -> None:
    """Scenario 6: the task fails right after creating its batch, its id unsaved. The DAG processor runs the
    same callable as the DAG's failure callback, which cancels the batch before the deadline; when the
    deadline fires anyway (Airflow keeps a failed run's deadlines), it finds nothing left to cancel."""
    run_id = f"system_failure__{int(time.time())}"
    deployment.trigger_dag(DEADLINE_DAG, {"fail_after_submit": True}, run_id=run_id)
    ours = batch_of_run(deployment, emulator, run_id)
    assert deployment.wait_for_dag_run(DEADLINE_DAG, run_id, timeout=300) == "failed"
    wait_for(
        lambda: emulator.batch(ours["id"])["status"] in ("cancelling", "cancelled"),
        timeout=120,
        what="the failure callback to cancel the run's batch",
    )
    deadline_at, _ = deadline_callback(deployment, run_id)
    cancels = [r for r in emulator.requests if r.path == f"/v1/batches/{ours['id']}/cancel"]
    assert len(cancels) == 1
    logged_in = wait_for(
        lambda: logs_with(deployment, summary_line(run_id, [ours["id"]])), timeout=60, what="the summary line"
    )
    assert not any(name.startswith("triggerer") for name in logged_in), logged_in  # the DAG processor's

    _, callback = wait_for(
        lambda: (found := deadline_callback(deployment, run_id))[1] and found,
        timeout=deadline_at - time.time() + 120,
        what="the deadline to fire for the failed run",
    )
    assert (callback["type"], callback["state"]) == ("triggerer", "success")
    assert json.loads(callback["output"])["cancelled"] == []
    assert emulator.cancel_count(ours["id"]) == 1
