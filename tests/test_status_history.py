"""Each wait records the batch's status changes, not its polls; the worker logs them, the triggerer does not."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest

from airflow_provider_openai_batch.cancellation import CancellationEvent
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAICancelBatchOperator,
    OpenAICancelStaleBatchesOperator,
)
from airflow_provider_openai_batch.testing import BatchAPIEmulator
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchCancellationTrigger

PROVIDER_LOGGER = "airflow_provider_openai_batch"


def history_lines(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> list[str]:
    """The history lines the operators logged: through stdlib logging, or else structlog's console (Airflow 3.3).

    Airflow 3.0 sends a record both ways (to caplog and to its console handler): one source is read, not both.
    """
    printed = capfd.readouterr()
    logged = history_in([record.getMessage() for record in caplog.records])
    return logged or history_in((printed.out + printed.err).splitlines())


def history_in(lines: list[str]) -> list[str]:
    return [line[line.index("Batch '") :] for line in lines if " was 'cancelling' at " in line]


async def test_the_trigger_records_each_change_once_and_logs_nothing(
    emulator_connection: BatchAPIEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    batch_id = emulator_connection.add_batch(cancel_after_polls=4)["id"]
    emulator_connection.set_status(batch_id, "cancelling")
    trigger = OpenAIBatchCancellationTrigger(
        batch_id=batch_id, conn_id="openai_default", poll_interval=0.01, deadline=time.time() + 30
    )
    started = time.time()
    with caplog.at_level(logging.DEBUG, logger=PROVIDER_LOGGER):
        [event] = [event async for event in trigger.run()]
    history = event.payload["status_history"]

    assert len(emulator_connection.requests) == 4, "three polls saw 'cancelling', the fourth 'cancelled'"
    assert [entry["status"] for entry in history] == ["cancelling", "cancelled"]
    assert started <= history[0]["at"] <= history[1]["at"] <= time.time()
    # A trigger's first log line opens its log file on the triggerer's event loop: a healthy wait writes none.
    assert [record.getMessage() for record in caplog.records if record.name.startswith(PROVIDER_LOGGER)] == []


def test_the_sync_wait_logs_the_history_in_the_worker(
    emulator_connection: BatchAPIEmulator, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    batch_id = emulator_connection.add_batch(cancel_after_polls=3)["id"]
    operator = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=batch_id, poll_interval=0.01, deferrable=False
    )
    with caplog.at_level(logging.INFO):
        operator.execute({"ti": mock.MagicMock(name="ti")})
    [line] = history_lines(caplog, capfd)
    assert line.startswith(f"Batch '{batch_id}' was 'cancelling' at ")
    assert line.count(", then ") == 1 and "then 'cancelled' at " in line and " UTC." in line


def test_the_cleanup_logs_each_batch_s_history(
    emulator_connection: BatchAPIEmulator, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    batch_ids = [batch["id"] for batch in emulator_connection.add_batches(3, cancel_after_polls=2)]
    operator = OpenAICancelStaleBatchesOperator(
        task_id="cleanup", older_than=timedelta(0), poll_interval=0.01, deferrable=False
    )
    with caplog.at_level(logging.INFO):
        operator.execute({"ti": mock.MagicMock(name="ti")})
    logged = sorted(line.split("'")[1] for line in history_lines(caplog, capfd))
    assert logged == sorted(batch_ids)


def test_an_event_from_before_the_history_still_completes(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    """A trigger deferred under an older provider version fires an event without ``status_history``."""
    batch: dict[str, Any] = {"id": "batch_old", "status": "cancelled", "output_file_id": "file-1"}
    old_event = {
        "status": "cancelled",
        "batch_id": "batch_old",
        "batch": batch,
        "message": "Batch is cancelled.",
    }
    operator = OpenAICancelBatchOperator(task_id="cancel", batch_id="batch_old")
    with caplog.at_level(logging.INFO):
        result = operator.execute_complete({"ti": mock.MagicMock(name="ti")}, old_event)
    assert result == batch
    assert history_lines(caplog, capfd) == []


def test_a_wait_with_no_successful_poll_has_no_history_line() -> None:
    event = CancellationEvent.without_batch("batch_x", status="error", message="Cannot poll.")  # type: ignore[arg-type]
    assert event.status_history == [] and event.history_line() is None
