"""OpenAICancelStaleBatchesOperator and the multi-batch trigger, against the emulator."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest
from airflow.providers.common.compat.sdk import AirflowException, TaskDeferred

from airflow_provider_openai_batch.hooks import _async_clients
from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelStaleBatchesOperator
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIMultiBatchCancellationTrigger
from tests._guards import built_by_the_triggerer, stored_by_airflow
from tests.conftest import FAKE_API_KEY

DAY = 86_400
NOW = int(time.time())


@pytest.fixture
def context() -> dict[str, Any]:
    return {"ti": mock.MagicMock(name="ti")}


def cleanup(**kwargs: Any) -> OpenAICancelStaleBatchesOperator:
    kwargs.setdefault("older_than", timedelta(days=1))
    kwargs.setdefault("poll_interval", 0.05)
    return OpenAICancelStaleBatchesOperator(task_id="cleanup", **kwargs)


def seed(emulator: BatchAPIEmulator, age_days: float, **kwargs: Any) -> str:
    kwargs.setdefault("created_at", int(NOW - age_days * DAY))
    return emulator.add_batch(**kwargs)["id"]


def test_selects_by_age_status_metadata_and_endpoint(
    emulator_connection: BatchAPIEmulator, context: dict
) -> None:
    stale = seed(emulator_connection, 3, metadata={"team": "search", "job": "eval"})
    seed(emulator_connection, 0.5, metadata={"team": "search"})  # too young
    seed(emulator_connection, 3, metadata={"team": "ads"})  # other team
    seed(emulator_connection, 3)  # no metadata
    seed(emulator_connection, 3, status="completed", metadata={"team": "search"})  # not cancellable
    seed(emulator_connection, 3, metadata={"team": "search"}, endpoint="/v1/embeddings")  # other endpoint
    validating = seed(
        emulator_connection,
        2,
        status="validating",
        metadata={"team": "search"},
        endpoint="/v1/chat/completions",
    )

    summary = cleanup(metadata={"team": "search"}, endpoint="/v1/chat/completions", dry_run=True).execute(
        context
    )
    assert summary["dry_run"] is True
    assert sorted(summary["selected"]) == sorted([stale, validating])
    assert summary["cancelled"] == [] and summary["failed"] == []
    assert all(r.method == "GET" for r in emulator_connection.requests), "a dry run cancels nothing"


def test_pages_through_the_whole_list(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    stale = [seed(emulator_connection, 2 + i / 100) for i in range(5)]
    for _ in range(250):
        seed(emulator_connection, 0)
    summary = cleanup(dry_run=True).execute(context)
    assert sorted(summary["selected"]) == sorted(stale)
    list_calls = [r for r in emulator_connection.requests if r.path == "/v1/batches"]
    assert len(list_calls) == 3, "255 batches at 100 per page"


def test_created_after_stops_the_listing_early(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    """The task-level form of cancel_run_batches: this run's batches, found in the first page of the list."""
    tags = {"airflow_dag_id": "etl", "airflow_run_id": "manual__1"}
    started = NOW - 600
    for i in range(250):  # the organization's history, older than the run
        seed(emulator_connection, 1 + i / 1000, metadata=dict(tags) if i % 50 == 0 else None)
    ours = [seed(emulator_connection, 0, metadata=dict(tags), created_at=started + i) for i in range(3)]
    seed(emulator_connection, 0, metadata={**tags, "airflow_run_id": "manual__2"}, created_at=started + 5)

    summary = cleanup(
        older_than=timedelta(0), created_after=str(started), metadata=dict(tags), wait_for_cancellation=False
    ).execute(context)
    assert sorted(summary["selected"]) == sorted(ours)
    assert {entry["batch_id"] for entry in summary["cancelled"]} == set(ours)
    list_calls = [r for r in emulator_connection.requests if r.path == "/v1/batches"]
    assert len(list_calls) == 1, "the first batch older than created_after ends the listing"


def test_task_level_form_of_cancel_run_batches(emulator_connection: BatchAPIEmulator) -> None:
    """The README's operator, templates rendered with a task context: this run's batches, and only them."""
    from airflow.sdk.execution_time import macros

    started = NOW - 600
    tags = {"airflow_dag_id": "nightly_eval", "airflow_run_id": "scheduled__1"}
    for i in range(150):
        seed(emulator_connection, 1, created_at=started - 301 - i, metadata=dict(tags) if i == 0 else None)
    ours = seed(emulator_connection, 0, created_at=started - 120, metadata=dict(tags))  # within the margin
    other_run = seed(emulator_connection, 0, created_at=started + 5, metadata={**tags, "airflow_run_id": "x"})
    operator = cleanup(
        older_than=timedelta(0),
        created_after="{{ dag_run.start_date - macros.timedelta(minutes=5) }}",
        metadata={"airflow_dag_id": "{{ dag.dag_id }}", "airflow_run_id": "{{ run_id }}"},
        wait_for_cancellation=False,
    )
    context = {
        "dag": mock.Mock(dag_id="nightly_eval"),
        "run_id": "scheduled__1",
        "dag_run": mock.Mock(start_date=datetime.fromtimestamp(started, UTC)),
        "macros": macros,
        "ti": mock.MagicMock(name="ti"),
    }
    operator.render_template_fields(context)
    summary = operator.execute(context)
    assert summary["selected"] == [ours]
    assert emulator_connection.batch(other_run)["status"] == "in_progress"
    assert sum(1 for r in emulator_connection.requests if r.path == "/v1/batches") == 1


def test_created_after_is_templated(emulator_connection: BatchAPIEmulator) -> None:
    operator = cleanup(created_after="{{ dag_run.start_date }}")
    operator.render_template_fields({"dag_run": mock.Mock(start_date=datetime(2025, 6, 1, tzinfo=UTC))})
    assert operator.created_after == "2025-06-01 00:00:00+00:00"


def test_cancels_and_waits_for_partial_results(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    ids = [seed(emulator_connection, 2) for _ in range(4)]
    summary = cleanup(deferrable=False).execute(context)
    assert sorted(summary["selected"]) == sorted(ids)
    assert {entry["batch_id"] for entry in summary["cancelled"]} == set(ids)
    for entry in summary["cancelled"]:
        final = emulator_connection.batch(entry["batch_id"])
        assert final["status"] == entry["status"] == "cancelled"
        assert entry["output_file_id"] == final["output_file_id"] is not None
    assert summary["failed"] == [] and summary["already_finished"] == [] and summary["not_found"] == []


def test_without_waiting_reports_cancelling(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    batch_id = seed(emulator_connection, 2)
    summary = cleanup(wait_for_cancellation=False).execute(context)
    assert summary["cancelled"] == [
        {"batch_id": batch_id, "status": "cancelling", "output_file_id": None, "error_file_id": None}
    ]


def test_one_batch_failing_does_not_stop_the_others(
    emulator_connection: BatchAPIEmulator, context: dict
) -> None:
    ids = [seed(emulator_connection, 2 + i / 10) for i in range(4)]
    finished, vanished, broken, fine = ids
    emulator_connection.inject(
        Fault(
            kind="body",
            status=409,
            path=f"{finished}/cancel$",
            body='{"error": {"message": "Cannot cancel a batch with status \'completed\'."}}',
        )
    )
    emulator_connection.inject(Fault(kind="status", status=404, path=f"{vanished}/cancel$"))
    emulator_connection.inject(Fault(kind="status", status=400, path=f"{broken}/cancel$"))
    with pytest.raises(AirflowException, match=f"Could not cancel 1 batch.*{broken}"):
        cleanup(wait_for_cancellation=False).execute(context)
    summary = context["ti"].xcom_push.call_args.kwargs["value"]
    assert context["ti"].xcom_push.call_args.kwargs["key"] == "summary"
    assert [entry["batch_id"] for entry in summary["cancelled"]] == [fine]
    assert summary["already_finished"] == [{"batch_id": finished, "status": "completed"}]
    assert summary["not_found"] == [vanished]
    assert [entry["batch_id"] for entry in summary["failed"]] == [broken]
    assert "HTTP 400" in summary["failed"][0]["error"]


def test_concurrency_is_bounded(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    for _ in range(12):
        seed(emulator_connection, 2)
    emulator_connection.inject(Fault(kind="delay", delay=0.2, times=12, method="POST"))
    started = time.monotonic()
    cleanup(max_concurrency=3, wait_for_cancellation=False).execute(context)
    elapsed = time.monotonic() - started
    cancels = sorted(r.at for r in emulator_connection.requests if r.method == "POST")
    assert len(cancels) == 12
    # At most 3 cancels can arrive within any 0.2 s window while each one takes 0.2 s to answer.
    assert max(sum(1 for t in cancels if start <= t < start + 0.19) for start in cancels) <= 3
    assert elapsed >= 0.8, "12 slow cancels, 3 at a time, take at least 4 rounds"


def test_deferrable_defers_once_for_all_batches(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    ids = [seed(emulator_connection, 2) for _ in range(3)]
    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        cleanup(deferrable=True, timeout=300).execute(context)
    trigger = deferred.value.trigger
    assert isinstance(trigger, OpenAIMultiBatchCancellationTrigger)
    assert sorted(trigger.batch_ids) == sorted(ids)
    assert before + 300 <= trigger.deadline <= time.time() + 300

    assert deferred.value.kwargs is None
    saved = context["ti"].xcom_push.call_args.kwargs
    assert saved["key"] == "summary" and sorted(saved["value"]["selected"]) == sorted(ids)

    event = asyncio.run(first_event(trigger))
    context["ti"].xcom_pull.return_value = saved["value"]
    summary = cleanup(deferrable=True).execute_complete(context, event)
    assert context["ti"].xcom_pull.call_args.kwargs["key"] == "summary"
    assert {entry["status"] for entry in summary["cancelled"]} == {"cancelled"}
    assert {entry["output_file_id"] for entry in summary["cancelled"]} == {
        emulator_connection.batch(batch_id)["output_file_id"] for batch_id in ids
    }


def test_timeout_while_waiting_fails_after_reporting(
    emulator_connection: BatchAPIEmulator, context: dict
) -> None:
    slow = seed(emulator_connection, 2, cancel_after_polls=10**9)
    fast = seed(emulator_connection, 2)
    with pytest.raises(AirflowException, match=f"Could not cancel 1 batch.*{slow}.*deadline"):
        cleanup(deferrable=False, timeout=0.5).execute(context)
    summary = context["ti"].xcom_push.call_args.kwargs["value"]
    assert [entry["batch_id"] for entry in summary["cancelled"]] == [fast]


def test_nothing_stale_is_a_quiet_success(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    seed(emulator_connection, 0)
    summary = cleanup().execute(context)
    assert summary["selected"] == [] and summary["cancelled"] == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"older_than": 3600}, "older_than must be a non-negative timedelta"),
        ({"statuses": ["running"]}, "statuses must be batch statuses"),
        ({"statuses": []}, "statuses must be batch statuses"),
        ({"max_concurrency": 0}, "max_concurrency must be at least 1"),
        ({"timeout": 0}, "timeout must be positive"),
        ({"created_after": datetime(2025, 6, 1)}, "created_after has no time zone"),
        ({"created_after": -5}, "created_after must be non-negative"),
    ],
)
def test_constructor_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cleanup(**kwargs)


@pytest.mark.parametrize("rendered", ["None", "", "yesterday", "2025-06-01T00:00:00"])
def test_created_after_rendered_to_no_date_fails_before_any_request(
    emulator_connection: BatchAPIEmulator, context: dict, rendered: str
) -> None:
    seed(emulator_connection, 2)
    with pytest.raises(ValueError, match="created_after"):
        cleanup(created_after=rendered).execute(context)
    assert emulator_connection.requests == []


# -- the multi-batch trigger --------------------------------------------------------------------------------------


async def first_event(trigger: OpenAIMultiBatchCancellationTrigger) -> dict[str, Any]:
    events = [event async for event in trigger.run()]
    assert len(events) == 1
    return events[0].payload


@pytest.mark.timeout(30)  # a poll interval lost on the way (the operator's default is 30 s) fails it
async def test_multi_trigger_rebuilt_from_what_airflow_stores_resumes_the_same_wait(
    emulator: BatchAPIEmulator, set_connection: Any
) -> None:
    """Stored as a Trigger row and built again by the triggerer: the same batches in the same order, through
    the same connection (the only one defined), at the same interval, against the same absolute deadline."""
    set_connection("openai_other", password=FAKE_API_KEY, host=emulator.base_url)
    polls = (3, 1, 2)
    ids = [emulator.add_batch(cancel_after_polls=n)["id"] for n in polls]
    for batch_id in ids:
        emulator.set_status(batch_id, "cancelling")
    trigger = OpenAIMultiBatchCancellationTrigger(ids, "openai_other", 0.01, deadline=time.time() + 30)
    row = stored_by_airflow(trigger)
    rebuilt = built_by_the_triggerer(row)
    assert type(rebuilt) is OpenAIMultiBatchCancellationTrigger
    event = await first_event(rebuilt)
    assert [(e["batch_id"], e["status"]) for e in event["events"]] == [(i, "cancelled") for i in ids]
    # Each round looks at every batch still waited for: a list page while two are, then the last one's GET.
    assert [r.path for r in emulator.requests] == ["/v1/batches", "/v1/batches", f"/v1/batches/{ids[0]}"]


async def test_multi_trigger_reports_each_outcome_in_order(emulator_connection: BatchAPIEmulator) -> None:
    ids = [
        emulator_connection.add_batch(cancel_after_polls=1)["id"],
        emulator_connection.add_batch(cancel_after_polls=4, finish_as="completed")["id"],
        emulator_connection.add_batch(cancel_after_polls=10**9)["id"],
    ]
    for batch_id in ids:
        emulator_connection.set_status(batch_id, "cancelling")
    trigger = OpenAIMultiBatchCancellationTrigger(
        ids, "openai_default", poll_interval=0.05, deadline=time.time() + 1
    )
    event = await first_event(trigger)
    assert [e["batch_id"] for e in event["events"]] == ids
    assert [e["status"] for e in event["events"]] == ["cancelled", "completed", "timeout"]
    paths = [r.path for r in emulator_connection.requests]
    assert paths[:4] == ["/v1/batches"] * 4, "list pages while two or three batches are waited for"
    assert set(paths[4:]) == {f"/v1/batches/{ids[2]}"}, (
        "then GETs of the one left: the finished are not asked for"
    )
    assert _async_clients._clients.get(asyncio.get_running_loop(), {}) == {}


async def test_multi_trigger_restart_keeps_the_deadline(emulator_connection: BatchAPIEmulator) -> None:
    ids = [
        emulator_connection.add_batch(cancel_after_polls=10**9, cancel_after_seconds=0.5)["id"]
        for _ in range(3)
    ]
    for batch_id in ids:
        emulator_connection.set_status(batch_id, "cancelling")
    first = OpenAIMultiBatchCancellationTrigger(
        ids, "openai_default", poll_interval=0.05, deadline=time.time() + 30
    )
    task = asyncio.create_task(first_event(first))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    second = built_by_the_triggerer(stored_by_airflow(first))
    assert second.deadline == first.deadline
    event = await first_event(second)
    assert [e["status"] for e in event["events"]] == ["cancelled"] * 3


@pytest.mark.parametrize(
    "event",
    [{"events": [{"status": "cancelled"}]}, {"outcomes": []}, {"events": "cancelled"}],
    ids=["old-event-shape", "no-events", "not-a-list"],
)
def test_an_event_from_another_provider_version_fails_naming_the_skew(event: dict) -> None:
    operator = OpenAICancelStaleBatchesOperator(task_id="cleanup", older_than=timedelta(days=1))
    ti = mock.MagicMock(name="ti")
    ti.xcom_pull.return_value = {"selected": [], "dry_run": False}
    with pytest.raises(AirflowException, match="upgraded or downgraded while the task was deferred"):
        operator.execute_complete({"ti": ti}, event)
