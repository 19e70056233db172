"""What waiting for a cancellation means.

:class:`CancellationWatch` holds no I/O: it is fed each poll's batch or error and answers either "keep
waiting" (``None``) or the final :class:`CancellationEvent`. One loop drives it, ``wait_for_cancellations`` in
the triggers module: the triggers run it in the triggerer, and the operators, when not deferrable, run the same
coroutine in the worker. Every wait therefore ends for exactly the same reasons, with the same payload.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Self, TypeVar

from airflow.providers.common.compat.sdk import AirflowException
from pydantic import AfterValidator, BaseModel, ValidationError

from airflow_provider_openai_batch.exceptions import OpenAIBatchError, OpenAIBatchRateLimitError
from airflow_provider_openai_batch.models import Batch, BatchRequestCounts, BatchStatus

log = logging.getLogger(__name__)

#: Consecutive failed polls (each already retried by the hook) after which a wait gives up.
MAX_CONSECUTIVE_FAILURES = 5
#: The latest a wait's next poll may run is the poll interval times a random factor in this range, so that the
#: waits of different processes (triggerers, workers) deferred in the same second drift apart instead of polling
#: (and hitting a shared rate limit) in lockstep. Within one event loop they share rounds (``status_board``).
POLL_JITTER = (0.9, 1.1)
#: The earliest a wait's next poll may run, as a share of the poll interval. A round that polls for waits due now
#: also serves the waits whose window has opened, so waits deferred seconds apart come to share one round. Under
#: 0.45, two groups of waits always merge: their rounds, at most 0.9 of an interval apart (the waits of a group
#: are due at the earliest of their jittered intervals), cannot each fall within this share of the other's.
EARLIEST_POLL = 0.4


class WaitStopped(StrEnum):
    """Why a wait ended without the batch reaching a final status."""

    TIMEOUT = "timeout"
    ERROR = "error"


def _final_or_stopped(status: BatchStatus | WaitStopped) -> BatchStatus | WaitStopped:
    if isinstance(status, BatchStatus) and not status.is_terminal:
        raise ValueError(f"a wait ends at a final batch status, not at {status.value!r}")
    return status


#: How a wait ended: the batch's final status (one of ``TERMINAL_STATUSES``), or why it stopped without one.
CancellationStatus = Annotated[BatchStatus | WaitStopped, AfterValidator(_final_or_stopped)]


class StatusSeen(BaseModel):
    """A status the wait saw the batch enter, and when (UNIX seconds): one entry of a wait's history."""

    status: str
    at: float


class CancellationEvent(BaseModel):
    """Payload of the trigger's single event, and the result of a synchronous wait.

    :param batch: the last Batch seen, as JSON, or ``None`` if no poll ever succeeded.
    :param status_history: each status the polls saw, once, when first seen. The worker logs it (see
        :meth:`history_line`); the triggerer does not, because a trigger's first log line makes Airflow open
        that trigger's log file on the event loop (``TriggerLoggingFactory``), which a thousand waits seeing the
        same change at once turn into a stalled loop. Empty in events of provider versions before it.
    """

    status: CancellationStatus
    batch_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    request_counts: BatchRequestCounts | None = None
    batch: dict[str, Any] | None = None
    status_history: list[StatusSeen] = []
    message: str

    @classmethod
    def from_batch(
        cls,
        batch: Batch,
        *,
        status: WaitStopped | None = None,
        message: str | None = None,
        history: Sequence[tuple[str, float]] = (),
    ) -> Self:
        return cls(
            status=status or BatchStatus(batch.status),
            batch_id=batch.id,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            request_counts=batch.request_counts,
            batch=batch.to_xcom(),
            status_history=[StatusSeen(status=seen, at=at) for seen, at in history],
            message=message or _final_message(batch),
        )

    @classmethod
    def without_batch(cls, batch_id: str, status: WaitStopped, message: str) -> Self:
        return cls(status=status, batch_id=batch_id, message=message)

    def to_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def history_line(self) -> str | None:
        """The wait's status changes as one log line, e.g. ``Batch 'b' was 'cancelling' at 12:00:01 UTC,
        then 'cancelled' at 12:03:10 UTC.``; ``None`` if no poll succeeded."""
        if not self.status_history:
            return None
        seen = ", then ".join(
            f"{entry.status!r} at {datetime.fromtimestamp(entry.at, UTC):%Y-%m-%d %H:%M:%S} UTC"
            for entry in self.status_history
        )
        return f"Batch '{self.batch_id}' was {seen}."


def _final_message(batch: Batch) -> str:
    if batch.status == BatchStatus.CANCELLED:
        return f"Batch '{batch.id}' is cancelled; partial results: output file {batch.output_file_id!r}."
    return (
        f"Batch '{batch.id}' finished as '{batch.status}' before the cancellation took effect; "
        f"output file {batch.output_file_id!r}."
    )


class CancellationWatch:
    """The state of one wait for a batch to leave ``cancelling``.

    :param batch_id: the batch being waited for.
    :param deadline: absolute UNIX time after which the wait ends with ``timeout``. Absolute, so that a
        restarted trigger keeps the clock it was given.
    :param max_consecutive_failures: transient poll failures in a row tolerated before ending with ``error``.
    """

    def __init__(
        self, batch_id: str, deadline: float, max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES
    ) -> None:
        self.batch_id = batch_id
        self.deadline = deadline
        self.max_consecutive_failures = max_consecutive_failures
        self.consecutive_failures = 0
        self.rate_limited = False
        self.last_batch: Batch | None = None
        #: (status, UNIX time first seen) per change: a poll that sees no change costs one comparison.
        self.history: list[tuple[str, float]] = []

    def on_batch(self, batch: Batch) -> CancellationEvent | None:
        """Record a successful poll; return the final event if the batch reached a final status."""
        self.consecutive_failures = 0
        self.rate_limited = False
        if self.last_batch is None or batch.status != self.last_batch.status:
            self.history.append((batch.status, time.time()))
        self.last_batch = batch
        if batch.is_terminal:
            return CancellationEvent.from_batch(batch, history=self.history)
        if not isinstance(batch.status, BatchStatus):
            log.warning(
                "Batch '%s' reports unknown status %r; still waiting for 'cancelled'.", batch.id, batch.status
            )
        return self._timeout_if_due()

    def on_error(self, error: OpenAIBatchError) -> CancellationEvent | None:
        """Record a failed poll; transient failures end the wait only after several in a row, and rate limiting
        (backpressure, not a failure) only at the deadline."""
        if isinstance(error, OpenAIBatchRateLimitError):
            self.rate_limited = True
            log.debug("Poll of batch '%s' was rate limited; will poll again: %s", self.batch_id, error)
            return self._timeout_if_due()
        if not error.transient:
            return self._error(f"Stopped waiting for batch '{self.batch_id}': {error}")
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.max_consecutive_failures:
            return self._error(
                f"Stopped waiting for batch '{self.batch_id}' after {self.consecutive_failures} failed polls "
                f"in a row; last error: {error}"
            )
        log.warning(
            "Poll %d of batch '%s' failed, will poll again: %s",
            self.consecutive_failures,
            self.batch_id,
            error,
        )
        return self._timeout_if_due()

    def poll_window(self, poll_interval: float) -> tuple[float, float]:
        """Seconds from now between which the next poll may run: from :data:`EARLIEST_POLL` of the interval to
        the interval with jitter, both cut at the deadline so that the last poll lands on it. The status board
        polls in the first round inside the window."""
        to_deadline = max(0.0, self.deadline - time.time())
        return (
            min(poll_interval * EARLIEST_POLL, to_deadline),
            min(poll_interval * random.uniform(*POLL_JITTER), to_deadline),
        )

    def _timeout_if_due(self) -> CancellationEvent | None:
        if time.time() < self.deadline:
            return None
        status = self.last_batch.status if self.last_batch else "unknown"
        throttled = " The API was rate limiting the polls (HTTP 429)." if self.rate_limited else ""
        message = (
            f"Batch '{self.batch_id}' is still '{status}' at the deadline; it may yet be cancelled by OpenAI."
            f"{throttled} Raise the operator's timeout to wait longer."
        )
        return self._event(WaitStopped.TIMEOUT, message)

    def _error(self, message: str) -> CancellationEvent:
        return self._event(WaitStopped.ERROR, message)

    def _event(self, status: WaitStopped, message: str) -> CancellationEvent:
        if self.last_batch is None:
            return CancellationEvent.without_batch(self.batch_id, status, message)
        return CancellationEvent.from_batch(
            self.last_batch, status=status, message=message, history=self.history
        )


class MultiCancellationEvent(BaseModel):
    """Payload of the multi-batch trigger's single event: each batch's outcome, in the order asked."""

    events: list[CancellationEvent]


EventT = TypeVar("EventT", CancellationEvent, MultiCancellationEvent)


def validated_event(model: type[EventT], payload: dict[str, Any]) -> EventT:
    """Validate a trigger event in ``execute_complete``. One that does not fit most likely comes from a trigger
    of another provider version (upgraded while the task was deferred): say so, rather than only what is off."""
    try:
        return model.model_validate(payload)
    except ValidationError as error:
        raise AirflowException(
            f"The trigger's event is not a valid {model.__name__} for this provider version: was the provider "
            f"upgraded or downgraded while the task was deferred? {error.error_count()} error(s), first: "
            f"{error.errors()[0]['msg']} at {'.'.join(map(str, error.errors()[0]['loc'])) or 'the top'}."
        ) from None
