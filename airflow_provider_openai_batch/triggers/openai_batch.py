"""Deferrable waits for OpenAI batches to finish cancelling, run in the triggerer's event loop."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Sequence
from itertools import repeat
from typing import Any, ClassVar

from airflow.providers.common.compat.sdk import AirflowNotFoundException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_openai_batch import _arguments, status_board
from airflow_provider_openai_batch.cancellation import (
    CancellationEvent,
    CancellationWatch,
    WaitStopped,
)
from airflow_provider_openai_batch.exceptions import OpenAIBatchError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.ids import validate_batch_id
from airflow_provider_openai_batch.models import Batch

#: What can go wrong before the first poll: a missing or invalid connection, or an unreachable API.
_SETUP_ERRORS = (OpenAIBatchError, ValueError, AirflowNotFoundException)


class _PlainKwargsTrigger(BaseTrigger):
    """A trigger rebuilt from the plain attributes named in ``serialized_fields``: no key, no connection."""

    serialized_fields: ClassVar[tuple[str, ...]]

    def serialize(self) -> tuple[str, dict[str, Any]]:
        classpath = f"{type(self).__module__}.{type(self).__qualname__}"
        return classpath, {name: getattr(self, name) for name in self.serialized_fields}


class OpenAIBatchCancellationTrigger(_PlainKwargsTrigger):
    """Poll a batch until it leaves ``cancelling``, then fire one event with its partial results.

    The event's payload is a :class:`~airflow_provider_openai_batch.cancellation.CancellationEvent`: ``status``
    is ``cancelled``, or ``completed``/``failed``/``expired`` if the batch finished before the cancel took effect,
    or ``timeout``/``error``; it carries ``output_file_id``, ``error_file_id``, ``request_counts`` and the whole
    batch.

    The trigger only holds plain values, so it is safe to run again from :meth:`serialize` after a triggerer
    restart: polling resumes against the same absolute ``deadline``. While running it looks the connection up
    once, shares the event loop's HTTP client, and never blocks the loop. Its arguments are checked when it runs,
    not when it is built: one rebuilt from a malformed row still fires its ``error`` event, naming the argument.

    :param batch_id: the batch whose cancellation to wait for.
    :param conn_id: the Airflow connection of the OpenAI Batch API.
    :param poll_interval: seconds between polls.
    :param deadline: absolute UNIX time at which to stop waiting with a ``timeout`` event.
    """

    serialized_fields = ("batch_id", "conn_id", "poll_interval", "deadline")

    def __init__(self, batch_id: str, conn_id: str, poll_interval: float, deadline: float) -> None:
        super().__init__()
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.poll_interval = poll_interval
        self.deadline = deadline

    async def run(self) -> AsyncIterator[TriggerEvent]:
        [event] = await wait_for_cancellations(
            self.conn_id, [self.batch_id], self.poll_interval, self.deadline
        )
        yield TriggerEvent(event.to_payload())


class OpenAIMultiBatchCancellationTrigger(_PlainKwargsTrigger):
    """One trigger waiting for many batches to leave ``cancelling``, with the guarantees of the single one.

    A cleanup that cancels fifty batches defers once, holds one triggerer slot and one connection lookup, and
    polls the batches still pending each round, concurrently. It fires a single event when every batch has a
    final outcome: ``{"events": [CancellationEvent payload, ...]}`` in the order of ``batch_ids``.

    :param batch_ids: the batches whose cancellation to wait for.
    :param conn_id: the Airflow connection of the OpenAI Batch API.
    :param poll_interval: seconds between polling rounds.
    :param deadline: absolute UNIX time at which every batch still pending ends with ``timeout``.
    """

    serialized_fields = ("batch_ids", "conn_id", "poll_interval", "deadline")

    def __init__(self, batch_ids: Sequence[str], conn_id: str, poll_interval: float, deadline: float) -> None:
        super().__init__()
        # Kept as given unless a list: a string is not iterated into one-letter ids, but refused when run.
        self.batch_ids = list(batch_ids) if isinstance(batch_ids, list | tuple) else batch_ids
        self.conn_id = conn_id
        self.poll_interval = poll_interval
        self.deadline = deadline

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            batch_ids = _arguments.batch_ids(self.batch_ids)
        except ValueError as error:
            events = [CancellationEvent.without_batch(_shown(self.batch_ids), WaitStopped.ERROR, str(error))]
        else:
            events = await wait_for_cancellations(self.conn_id, batch_ids, self.poll_interval, self.deadline)
        yield TriggerEvent({"events": [event.to_payload() for event in events]})


async def wait_for_cancellations(
    conn_id: str, batch_ids: Sequence[Any], poll_interval: float, deadline: float
) -> list[CancellationEvent]:
    """Wait for every batch's final outcome, in the order of ``batch_ids``; never raises for API trouble, nor
    for a malformed argument: a bad ``conn_id``, ``poll_interval`` or ``deadline`` ends every wait with an
    ``error`` event naming it, a malformed id ends its own wait only, before any request.

    Polls all pending batches every ``poll_interval`` seconds, through the status board of the event loop and
    connection, which serves the waits due together with list pages or GETs (``status_board``). The first poll
    comes one interval after the start: the batches were just seen in ``cancelling``, and after a triggerer
    restart one interval's delay is cheaper than a wasted request per resumed trigger.

    A triggerer holds a thousand of these frames between polls, and every full garbage collection walks what they
    keep alive, so they keep little: no comprehension over a local (it would make the local a cell object), no
    list of the last round's outcomes.
    """
    finished: dict[str, CancellationEvent] = {}
    try:
        conn_id = _arguments.connection_id(conn_id)
        poll_interval = _arguments.poll_interval(poll_interval)
        deadline = _arguments.deadline(deadline)
    except ValueError as error:
        return list(map(_setup_failed, batch_ids, repeat(error)))
    waits = list(map(_watch, batch_ids, repeat(deadline)))
    pending = [wait for wait in waits if isinstance(wait, CancellationWatch)]
    try:
        if pending:  # else every id was malformed: no connection to look up
            async with OpenAIBatchHook(conn_id) as hook, status_board.joined(hook) as board:
                while pending:
                    pending = _still_pending(
                        pending, await _poll_all(board, pending, poll_interval), finished
                    )
    except _SETUP_ERRORS as error:
        return list(map(_unpolled, waits, repeat(error)))
    return list(map(_outcome, waits, repeat(finished)))


def _watch(batch_id: Any, deadline: float) -> CancellationWatch | CancellationEvent:
    """The wait for ``batch_id``, or its final ``error`` event if it is not a batch id: it is never polled."""
    try:
        return CancellationWatch(validate_batch_id(batch_id), deadline)
    except ValueError as error:
        return CancellationEvent.without_batch(_shown(batch_id), WaitStopped.ERROR, str(error))


def _outcome(
    wait: CancellationWatch | CancellationEvent, finished: dict[str, CancellationEvent]
) -> CancellationEvent:
    return finished[wait.batch_id] if isinstance(wait, CancellationWatch) else wait


def _unpolled(wait: CancellationWatch | CancellationEvent, error: Exception) -> CancellationEvent:
    """A wait's outcome when polling could not start: the setup's error, or the malformed id's own."""
    return _setup_failed(wait.batch_id, error) if isinstance(wait, CancellationWatch) else wait


def _shown(batch_id: Any) -> str:
    """What an event names a batch by: its id, or for a value that is no string, its repr."""
    return batch_id if isinstance(batch_id, str) else f"{batch_id!r:.80}"


async def _poll_all(
    board: status_board.StatusBoard, watches: list[CancellationWatch], poll_interval: float
) -> list[CancellationEvent | None]:
    """Poll the batches in one round of the board, at most one interval from now: they share a deadline, so
    the first one's window is every one's."""
    results = await board.poll([watch.batch_id for watch in watches], *watches[0].poll_window(poll_interval))
    return list(map(_outcome_of_poll, watches, results))


def _still_pending(
    watches: list[CancellationWatch],
    outcomes: list[CancellationEvent | None],
    finished: dict[str, CancellationEvent],
) -> list[CancellationWatch]:
    """Record the round's final events in ``finished``; return the watches that go on."""
    pending = []
    for watch, event in zip(watches, outcomes, strict=True):
        if event is None:
            pending.append(watch)
        else:
            finished[watch.batch_id] = event
    return pending


def _setup_failed(batch_id: Any, error: Exception) -> CancellationEvent:
    message = f"Cannot poll batch '{_shown(batch_id)}': {error}"
    return CancellationEvent.without_batch(_shown(batch_id), WaitStopped.ERROR, message)


def _outcome_of_poll(watch: CancellationWatch, result: status_board.PollResult) -> CancellationEvent | None:
    if isinstance(result, Batch):
        return watch.on_batch(result)
    if isinstance(result, OpenAIBatchError):
        return watch.on_error(result)
    # The last guard of "one batch's trouble ends its wait only, the others go on".
    return CancellationEvent.without_batch(watch.batch_id, WaitStopped.ERROR, str(result))


def __getattr__(name: str) -> Any:
    """``OpenAIBatchesCancellationTrigger``, the multi-batch trigger's first name, two letters from the single
    one's: kept so that triggers serialised under it (deferred before an upgrade) still load."""
    if name == "OpenAIBatchesCancellationTrigger":
        warnings.warn(
            "OpenAIBatchesCancellationTrigger is deprecated: use OpenAIMultiBatchCancellationTrigger.",
            DeprecationWarning,
            stacklevel=2,
        )
        return OpenAIMultiBatchCancellationTrigger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
