"""A cancel refused with a 409 the hook cannot read (Azure or a gateway words it differently): the batch's real
status decides, in the hook, both operator modes with the trigger, and the cleanup, over real HTTP."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from airflow.providers.common.compat.sdk import AirflowException, TaskDeferred

from airflow_provider_openai_batch.exceptions import BatchNotCancellableError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAICancelBatchOperator,
    OpenAICancelStaleBatchesOperator,
)
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault

#: Azure OpenAI's wording of the conflict: no status the hook could read from it.
AZURE_CONFLICT = (
    '{"error": {"code": "OperationNotAllowed", "message": "The batch is not in a state that allows this."}}'
)


def refuse_next_cancel(emulator: BatchAPIEmulator, batch_id: str, status: str) -> None:
    """Put the batch in ``status`` and make the next cancel answer a 409 in words the hook does not know."""
    emulator.set_status(batch_id, status)
    emulator.inject(Fault(kind="body", status=409, method="POST", path=r"/cancel$", body=AZURE_CONFLICT))


@pytest.fixture
def context() -> dict[str, Any]:
    return {"ti": mock.MagicMock(name="ti")}


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("status", ["cancelling", "cancelled"])
def test_hook_returns_a_batch_already_being_cancelled(
    emulator_connection: BatchAPIEmulator, path: str, status: str
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    refuse_next_cancel(emulator_connection, batch_id, status)
    batch = cancel_with_hook(batch_id, path)
    assert batch.status == status
    assert [(r.method, r.status) for r in emulator_connection.requests] == [("POST", 409), ("GET", 200)]


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("status", ["completed", "failed", "expired"])
def test_hook_reports_the_real_finished_status(
    emulator_connection: BatchAPIEmulator, path: str, status: str
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    refuse_next_cancel(emulator_connection, batch_id, status)
    with pytest.raises(BatchNotCancellableError, match=f"it is {status}") as refused:
        cancel_with_hook(batch_id, path)
    assert (refused.value.batch_status, refused.value.status_code) == (status, 409)
    assert "not in a state that allows this" in refused.value.api_message


def test_a_readable_finished_status_needs_no_lookup(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch(status="completed")["id"]
    with pytest.raises(BatchNotCancellableError) as refused:
        cancel_with_hook(batch_id, "sync")
    assert refused.value.batch_status == "completed"
    assert [r.method for r in emulator_connection.requests] == ["POST"]


def cancel_with_hook(batch_id: str, path: str) -> Any:
    if path == "sync":
        with OpenAIBatchHook() as hook:
            return hook.cancel_batch(batch_id)

    async def cancel() -> Any:
        async with OpenAIBatchHook() as hook:
            return await hook.acancel_batch(batch_id)

    return asyncio.run(cancel())


def test_blocking_operator_waits_for_a_batch_still_cancelling(
    emulator_connection: BatchAPIEmulator, context: dict
) -> None:
    batch_id = emulator_connection.add_batch(cancel_after_polls=2)["id"]
    refuse_next_cancel(emulator_connection, batch_id, "cancelling")
    result = OpenAICancelBatchOperator(task_id="cancel", batch_id=batch_id, poll_interval=0.01).execute(
        context
    )
    assert result["status"] == "cancelled" and result["output_file_id"]


def test_deferrable_operator_defers_and_the_trigger_sees_it_cancelled(
    emulator_connection: BatchAPIEmulator, context: dict
) -> None:
    batch_id = emulator_connection.add_batch(cancel_after_polls=2)["id"]
    refuse_next_cancel(emulator_connection, batch_id, "cancelling")
    operator = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=batch_id, poll_interval=0.01, deferrable=True
    )
    with pytest.raises(TaskDeferred) as deferred:
        operator.execute(context)

    async def first_event() -> dict[str, Any]:
        async for event in deferred.value.trigger.run():
            return event.payload
        raise AssertionError("the trigger fired no event")

    event = asyncio.run(first_event())
    assert event["status"] == "cancelled"
    result = getattr(operator, deferred.value.method_name)(context, event)
    assert result["status"] == "cancelled" and result["output_file_id"] == event["output_file_id"]


@pytest.mark.parametrize("deferrable", [False, True])
def test_operator_reports_a_batch_already_cancelled(
    emulator_connection: BatchAPIEmulator, context: dict, deferrable: bool
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    refuse_next_cancel(emulator_connection, batch_id, "cancelled")
    operator = OpenAICancelBatchOperator(task_id="cancel", batch_id=batch_id, deferrable=deferrable)
    assert operator.execute(context)["status"] == "cancelled"


@pytest.mark.parametrize("deferrable", [False, True])
def test_operator_applies_if_finished_to_a_finished_batch(
    emulator_connection: BatchAPIEmulator, context: dict, deferrable: bool
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    refuse_next_cancel(emulator_connection, batch_id, "completed")
    succeed = OpenAICancelBatchOperator(task_id="cancel", batch_id=batch_id, deferrable=deferrable)
    assert succeed.execute(context)["status"] == "completed"
    refuse_next_cancel(emulator_connection, batch_id, "completed")
    fail = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=batch_id, deferrable=deferrable, if_finished="fail"
    )
    with pytest.raises(AirflowException, match="had already completed"):
        fail.execute(context)


def test_cleanup_files_a_reworded_refusal_under_the_real_status(
    emulator_connection: BatchAPIEmulator, context: dict
) -> None:
    """The batch finishes between the listing and the cancel: the refusal is filed under its real status."""
    old = int(time.time()) - 3 * 86_400
    # Its first look is the listing's, its second the GET after the refusal: it completes in between.
    batch_id = emulator_connection.add_batch(created_at=old, finish_after_polls=2)["id"]
    emulator_connection.inject(
        Fault(kind="body", status=409, method="POST", path=r"/cancel$", body=AZURE_CONFLICT)
    )
    operator = OpenAICancelStaleBatchesOperator(
        task_id="cleanup", older_than=timedelta(days=1), wait_for_cancellation=False
    )
    summary = operator.execute(context)
    assert summary["selected"] == [batch_id]
    assert summary["already_finished"] == [{"batch_id": batch_id, "status": "completed"}]
    assert summary["failed"] == [] and summary["cancelled"] == []
