"""The cleanup of stale batches, apart from the operator that schedules it: which batches it selects, how it
cancels them, and the summary of what it did.

:class:`~airflow_provider_openai_batch.operators.openai_batch.OpenAICancelStaleBatchesOperator` adds what
belongs to a task: templated arguments, the wait (deferred or not), saving results, XComs and failing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Mapping
from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from airflow_provider_openai_batch.cancellation import CancellationEvent, WaitStopped
from airflow_provider_openai_batch.exceptions import (
    BatchNotCancellableError,
    BatchNotFoundError,
    OpenAIBatchError,
)
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.models import Batch, BatchStatus


def is_stale(
    batch: Batch,
    *,
    older_than: timedelta,
    statuses: Collection[BatchStatus],
    endpoint: str | None,
    metadata: Mapping[str, str],
) -> bool:
    """Whether the cleanup selects ``batch``: in ``statuses``, created more than ``older_than`` ago, for
    ``endpoint`` (any if ``None``), and with each of the ``metadata`` pairs."""
    cutoff = time.time() - older_than.total_seconds()
    return (
        batch.status in statuses
        and batch.created_at <= cutoff
        and (endpoint is None or batch.endpoint == endpoint)
        and all((batch.metadata or {}).get(key) == value for key, value in metadata.items())
    )


class CleanupSummary(BaseModel):
    """What a cleanup run did, batch by batch; JSON-serialisable for XCom and the deferral's kwargs."""

    dry_run: bool
    selected: list[str]
    cancelled: list[dict[str, Any]] = []
    already_finished: list[dict[str, Any]] = []
    not_found: list[str] = []
    failed: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []  #: the manifest of each batch whose results were saved

    def record_cancel(self, batch_id: str, batch: Batch) -> None:
        """File ``batch``, the answer to the cancel of ``batch_id``, under that id: the one that was checked
        and sent, whatever id the answer carries (results are later saved in that id's folder)."""
        self.cancelled.append(
            _cancelled_entry(batch_id, batch.status, batch.output_file_id, batch.error_file_id)
        )

    def with_outcomes(self, events: list[CancellationEvent]) -> CleanupSummary:
        """Update the cancelled batches with how their wait ended; timeouts and errors move to ``failed``, and
        so does an error about no batch cancelled here (a wait given malformed ids), rather than be dropped."""
        outcomes = {event.batch_id: event for event in events}
        summary = self.model_copy(deep=True)
        summary.cancelled = []
        waited = {entry["batch_id"] for entry in self.cancelled}
        summary.failed.extend(
            {"batch_id": event.batch_id, "error": event.message}
            for event in events
            if event.batch_id not in waited and isinstance(event.status, WaitStopped)
        )
        for entry in self.cancelled:
            event = outcomes.get(entry["batch_id"])
            if event is None:
                summary.cancelled.append(entry)
            elif isinstance(event.status, WaitStopped):
                summary.failed.append({"batch_id": event.batch_id, "error": event.message})
            else:
                summary.cancelled.append(
                    _cancelled_entry(event.batch_id, event.status, event.output_file_id, event.error_file_id)
                )
        return summary


async def cancel_all(hook: OpenAIBatchHook, summary: CleanupSummary, max_concurrency: int) -> None:
    """Cancel the ``summary``'s selected batches, ``max_concurrency`` at a time, filing each under its outcome.

    One batch failing to cancel does not stop the others: its error goes to ``failed``.
    """
    gate = asyncio.Semaphore(max_concurrency)

    async def cancel(batch_id: str) -> None:
        async with gate:
            try:
                summary.record_cancel(batch_id, await hook.acancel_batch(batch_id))
            except BatchNotCancellableError as error:
                summary.already_finished.append({"batch_id": batch_id, "status": error.batch_status})
            except BatchNotFoundError:
                summary.not_found.append(batch_id)
            except (OpenAIBatchError, ValueError) as error:  # ValueError: a malformed id in the listing
                summary.failed.append({"batch_id": batch_id, "error": str(error)})

    async with hook:
        await asyncio.gather(*(cancel(batch_id) for batch_id in summary.selected))


def _cancelled_entry(
    batch_id: str, status: str, output_file_id: str | None, error_file_id: str | None
) -> dict:
    return {
        "batch_id": batch_id,
        "status": str(status),
        "output_file_id": output_file_id,
        "error_file_id": error_file_id,
    }
