from __future__ import annotations

import logging
from typing import Any
from unittest import mock

import pytest

from airflow_provider_openai_batch.callbacks import cancel_batch_on_failure
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault


def context_with_xcom(value: Any, task_id: str = "submit") -> dict[str, Any]:
    ti = mock.MagicMock(name="ti", task_id=task_id)
    ti.xcom_pull.return_value = value
    return {"ti": ti}


def test_cancels_a_given_batch_without_waiting(emulator_connection: BatchAPIEmulator, caplog) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    with caplog.at_level(logging.INFO):
        cancel_batch_on_failure(batch_id)(context_with_xcom(None))
    assert emulator_connection.batch(batch_id)["status"] == "cancelling"
    assert [r.method for r in emulator_connection.requests] == ["POST"]
    assert f"Cancel of batch '{batch_id}' sent on failure; it is now 'cancelling'" in caplog.text


@pytest.mark.parametrize("shape", ["plain", "batch_json", "batch_id_key"])
def test_pulls_the_batch_id_from_xcom(emulator_connection: BatchAPIEmulator, shape: str) -> None:
    batch = emulator_connection.add_batch()
    value = {"plain": batch["id"], "batch_json": batch, "batch_id_key": {"batch_id": batch["id"]}}[shape]
    context = context_with_xcom(value, task_id="failed_task")
    cancel_batch_on_failure(xcom_task_id="submit", xcom_key="batch")(context)
    context["ti"].xcom_pull.assert_called_once_with(task_ids="submit", key="batch")
    assert emulator_connection.batch(batch["id"])["status"] == "cancelling"


def test_defaults_to_the_failed_tasks_own_return_value(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    context = context_with_xcom(batch_id, task_id="submit")
    cancel_batch_on_failure()(context)
    context["ti"].xcom_pull.assert_called_once_with(task_ids="submit", key="return_value")
    assert emulator_connection.batch(batch_id)["status"] == "cancelling"


def test_no_batch_id_is_logged_not_raised(emulator_connection: BatchAPIEmulator, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        cancel_batch_on_failure(xcom_task_id="submit")(context_with_xcom(None))
    assert "found no batch id" in caplog.text
    assert emulator_connection.requests == []


def test_finished_batch_is_logged_not_raised(emulator_connection: BatchAPIEmulator, caplog) -> None:
    batch_id = emulator_connection.add_batch(status="completed")["id"]
    with caplog.at_level(logging.INFO):
        cancel_batch_on_failure(batch_id)(context_with_xcom(None))
    assert "Nothing to cancel on failure" in caplog.text and "completed" in caplog.text


@pytest.mark.parametrize("problem", ["server_down", "bad_id", "no_connection"])
def test_never_raises(emulator_connection: BatchAPIEmulator, monkeypatch, caplog, problem: str) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    if problem == "server_down":
        emulator_connection.inject(Fault(kind="status", status=502, times=100))
    elif problem == "bad_id":
        batch_id = "../files"
    else:
        monkeypatch.delenv("AIRFLOW_CONN_OPENAI_DEFAULT")
    with caplog.at_level(logging.ERROR):
        cancel_batch_on_failure(batch_id)(context_with_xcom(None))
    assert "Could not cancel the batch on failure; the original failure stands." in caplog.text
