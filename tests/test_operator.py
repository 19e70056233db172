"""OpenAICancelBatchOperator's execute paths, against the emulator, with a stand-in task instance for XCom."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from airflow.providers.common.compat.sdk import AirflowException, AirflowSkipException, TaskDeferred

from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAIBatchLink,
    OpenAICancelBatchOperator,
    resolve_batch_id,
)
from airflow_provider_openai_batch.testing import BatchAPIEmulator
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchCancellationTrigger


@pytest.fixture
def context() -> dict[str, Any]:
    return {"ti": mock.MagicMock(name="ti")}


def pushed(context: dict[str, Any]) -> dict[str, Any]:
    return {call.kwargs["key"]: call.kwargs["value"] for call in context["ti"].xcom_push.call_args_list}


def operator(batch_id: Any, **kwargs: Any) -> OpenAICancelBatchOperator:
    return OpenAICancelBatchOperator(task_id="cancel", batch_id=batch_id, poll_interval=0.05, **kwargs)


def test_deferrable_cancels_then_defers_with_an_absolute_deadline(
    emulator_connection: BatchAPIEmulator, context: dict
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    before = time.time()
    with pytest.raises(TaskDeferred) as deferred:
        operator(batch_id, deferrable=True, timeout=600).execute(context)
    trigger = deferred.value.trigger
    assert isinstance(trigger, OpenAIBatchCancellationTrigger)
    assert (trigger.batch_id, trigger.conn_id, trigger.poll_interval) == (batch_id, "openai_default", 0.05)
    assert before + 600 <= trigger.deadline <= time.time() + 600
    assert deferred.value.method_name == "execute_complete"
    # A backstop for a trigger lost with its triggerer: the deadline plus a margin.
    assert timedelta(minutes=10) < deferred.value.timeout <= timedelta(seconds=600, minutes=10)
    assert emulator_connection.batch(batch_id)["status"] == "cancelling"
    assert pushed(context) == {"batch_id": batch_id}, "the link's batch id is pushed before deferring"


def test_sync_wait_reports_partial_results(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    result = operator(batch_id, deferrable=False).execute(context)
    final = emulator_connection.batch(batch_id)
    assert result == final and result["status"] == "cancelled"
    assert pushed(context) == {
        "batch_id": batch_id,
        "status": "cancelled",
        "output_file_id": final["output_file_id"],
        "error_file_id": final["error_file_id"],
    }
    assert final["output_file_id"] is not None


def test_sync_wait_times_out(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    batch_id = emulator_connection.add_batch(cancel_after_polls=10**9)["id"]
    with pytest.raises(AirflowException, match=f"Batch '{batch_id}' is still 'cancelling' at the deadline"):
        operator(batch_id, deferrable=False, timeout=0.3).execute(context)


def test_without_waiting_finishes_at_cancelling(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    result = operator(batch_id, wait_for_cancellation=False, deferrable=True).execute(context)
    assert result["status"] == "cancelling"
    assert pushed(context)["status"] == "cancelling" and pushed(context)["output_file_id"] is None
    assert [r.method for r in emulator_connection.requests] == ["POST"]


def test_already_cancelled_batch_finishes_without_deferring(
    emulator_connection: BatchAPIEmulator, context: dict
) -> None:
    batch_id = emulator_connection.add_batch(status="cancelled")["id"]
    result = operator(batch_id, deferrable=True).execute(context)
    assert result["status"] == "cancelled"
    assert pushed(context)["output_file_id"] == emulator_connection.batch(batch_id)["output_file_id"]


def test_retried_task_is_idempotent(emulator_connection: BatchAPIEmulator, context: dict) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    with pytest.raises(TaskDeferred):
        operator(batch_id, deferrable=True).execute(context)
    with pytest.raises(TaskDeferred):  # second try: the batch is already cancelling, still a success path
        operator(batch_id, deferrable=True).execute(context)
    assert emulator_connection.cancel_count(batch_id) == 2


@pytest.mark.parametrize("status", ["completed", "failed", "expired"])
def test_finished_batch_with_if_finished_succeed(
    emulator_connection: BatchAPIEmulator, context: dict, status: str
) -> None:
    batch_id = emulator_connection.add_batch(status=status)["id"]
    result = operator(batch_id, deferrable=True).execute(context)
    assert result["status"] == status
    assert pushed(context)["status"] == status


def test_finished_batch_with_if_finished_skip_and_fail(
    emulator_connection: BatchAPIEmulator, context: dict
) -> None:
    batch_id = emulator_connection.add_batch(status="completed")["id"]
    with pytest.raises(AirflowSkipException, match=f"Batch '{batch_id}' had already completed"):
        operator(batch_id, if_finished="skip").execute(context)
    with pytest.raises(AirflowException, match="could not be cancelled"):
        operator(batch_id, if_finished="fail").execute(context)


@pytest.mark.parametrize("missing", [None, "", "None", {}, {"id": None}])
def test_missing_batch_id_skips_or_fails(
    emulator_connection: BatchAPIEmulator, context: dict, missing: Any
) -> None:
    with pytest.raises(AirflowSkipException, match="No batch id to cancel"):
        operator(missing).execute(context)
    with pytest.raises(AirflowException, match="No batch id to cancel") as caught:
        operator(missing, if_missing="fail").execute(context)
    assert not isinstance(caught.value, AirflowSkipException)
    assert emulator_connection.requests == []


@pytest.mark.parametrize("bad", [" ", "../files", "batch_1/cancel", ["batch_1"], 7, {"id": "a/b"}])
def test_malformed_batch_id_fails_before_any_request(
    emulator_connection: BatchAPIEmulator, context: dict, bad: Any
) -> None:
    with pytest.raises(ValueError, match="batch id"):
        operator(bad).execute(context)
    assert emulator_connection.requests == []


def test_resolve_batch_id_accepts_dicts() -> None:
    assert resolve_batch_id({"id": "batch_1", "status": "in_progress"}) == "batch_1"
    assert resolve_batch_id({"batch_id": "batch_2"}) == "batch_2"
    assert resolve_batch_id("batch_3") == "batch_3"


@pytest.mark.parametrize("status", ["cancelled", "completed"])
def test_execute_complete_success(context: dict, status: str) -> None:
    batch = {"id": "batch_1", "status": status, "output_file_id": "file-out", "error_file_id": "file-err"}
    event = {
        "status": status,
        "batch_id": "batch_1",
        "output_file_id": "file-out",
        "batch": batch,
        "message": "done",
    }
    assert operator("batch_1").execute_complete(context, event) == batch
    assert pushed(context) == {"status": status, "output_file_id": "file-out", "error_file_id": "file-err"}


@pytest.mark.parametrize("status", ["timeout", "error"])
def test_execute_complete_failures(context: dict, status: str) -> None:
    event = {"status": status, "batch_id": "batch_1", "batch": None, "message": f"it went {status}"}
    with pytest.raises(AirflowException, match=f"it went {status}"):
        operator("batch_1").execute_complete(context, event)
    assert pushed(context) == {}


def test_execute_complete_applies_if_finished(context: dict) -> None:
    event = {"status": "expired", "batch_id": "batch_1", "batch": {"id": "batch_1"}, "message": "m"}
    with pytest.raises(AirflowSkipException, match="had already expired"):
        operator("batch_1", if_finished="skip").execute_complete(context, event)


def test_execute_complete_rejects_bad_events(context: dict) -> None:
    with pytest.raises(AirflowException, match="no event payload"):
        operator("batch_1").execute_complete(context, None)
    with pytest.raises(AirflowException, match="while the task was deferred.* at status"):
        operator("batch_1").execute_complete(
            context, {"status": "paused", "batch_id": "batch_1", "message": "?"}
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"if_missing": "ignore"}, "if_missing must be"),
        ({"if_finished": "maybe"}, "if_finished must be"),
        ({"poll_interval": 0}, "must be positive"),
        ({"timeout": -1}, "must be positive"),
        (
            {"save_results_to": "/tmp/results", "wait_for_cancellation": False},
            "save_results_to needs wait_for",
        ),
    ],
)
def test_constructor_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OpenAICancelBatchOperator(task_id="cancel", batch_id="batch_1", **kwargs)


@pytest.mark.parametrize(
    ("api_type", "expected"), [("openai", "https://platform.openai.com/batches/batch_42"), ("azure", "")]
)
def test_extra_link_is_for_openai_connections_only(
    set_connection, mocker, api_type: str, expected: str
) -> None:
    set_connection(password="sk-link-test", extra={"api_type": api_type, "api_version": "2024-10-21"})
    mocker.patch("airflow.sdk.execution_time.xcom.XCom.get_value", return_value="batch_42")
    assert OpenAIBatchLink().get_link(operator("x"), ti_key=mock.sentinel.ti_key) == expected


def test_extra_link_reads_the_pushed_batch_id(set_connection, mocker) -> None:
    set_connection(password="sk-link-test")
    get_value = mocker.patch("airflow.sdk.execution_time.xcom.XCom.get_value", return_value="batch_42")
    link = OpenAIBatchLink().get_link(operator("x"), ti_key=mock.sentinel.ti_key)
    assert link == "https://platform.openai.com/batches/batch_42"
    get_value.assert_called_once_with(ti_key=mock.sentinel.ti_key, key="batch_id")
    get_value.return_value = None
    assert OpenAIBatchLink().get_link(operator("x"), ti_key=mock.sentinel.ti_key) == ""
