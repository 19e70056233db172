"""The statuses of a batch's lifecycle, and the sets of them that decide what a cancel does.

Kept apart from :mod:`airflow_provider_openai_batch.models` (which re-exports them) and free of pydantic, because
the operators check ``statuses`` arguments when a DAG file constructs them, at every parse.
"""

from __future__ import annotations

from enum import StrEnum


class BatchStatus(StrEnum):
    """The eight states of a batch's lifecycle."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """Whether the batch will never change state again."""
        return self in TERMINAL_STATUSES

    @property
    def is_cancellable(self) -> bool:
        """Whether ``POST /batches/{id}/cancel`` moves the batch to ``cancelling``."""
        return self in CANCELLABLE_STATUSES


TERMINAL_STATUSES = frozenset(
    {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)
CANCELLABLE_STATUSES = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING})
#: Final statuses a batch reaches on its own: a cancel arriving then is refused, and there is nothing to stop.
FINISHED_STATUSES = TERMINAL_STATUSES - {BatchStatus.CANCELLED}
