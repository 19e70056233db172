"""Deferrable waits for OpenAI batches to finish cancelling, run in the triggerer's event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.sdk.exceptions import AirflowNotFoundException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_openai_batch.cancellation import CancellationEvent, CancellationStatus, CancellationWatch
from airflow_provider_openai_batch.exceptions import OpenAIBatchError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook


class OpenAIBatchCancellationTrigger(BaseTrigger):
    """Poll a batch until it leaves ``cancelling``, then fire one event with its partial results.

    The event's payload is a :class:`~airflow_provider_openai_batch.cancellation.CancellationEvent`: ``status``
    is ``cancelled``, or ``completed``/``failed``/``expired`` if the batch finished before the cancel took effect,
    or ``timeout``/``error``; it carries ``output_file_id``, ``error_file_id``, ``request_counts`` and the whole
    batch.

    The trigger only holds plain values, so it is safe to run again from :meth:`serialize` after a triggerer
    restart: polling resumes against the same absolute ``deadline``. While running it looks the connection up
    once, shares the event loop's HTTP client, and never blocks the loop.

    :param batch_id: the batch whose cancellation to wait for.
    :param conn_id: the Airflow connection of the OpenAI Batch API.
    :param poll_interval: seconds between polls.
    :param deadline: absolute UNIX time at which to stop waiting with a ``timeout`` event.
    """

    def __init__(self, batch_id: str, conn_id: str, poll_interval: float, deadline: float) -> None:
        super().__init__()
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.poll_interval = poll_interval
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_id": self.batch_id,
                "conn_id": self.conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            async with OpenAIBatchHook(self.conn_id) as hook:
                watch = CancellationWatch(self.batch_id, self.deadline)
                event = await wait_for_cancellation(hook, watch, self.poll_interval)
        except (OpenAIBatchError, ValueError, AirflowNotFoundException) as error:
            event = CancellationEvent.without_batch(
                self.batch_id, CancellationStatus.ERROR, f"Cannot poll batch '{self.batch_id}': {error}"
            )
        yield TriggerEvent(event.to_payload())


async def wait_for_cancellation(hook: OpenAIBatchHook, watch: CancellationWatch, poll_interval: float) -> CancellationEvent:
    """Poll ``watch.batch_id`` every ``poll_interval`` seconds until ``watch`` reports a final event.

    It sleeps before the first poll: the batch was just seen in ``cancelling``, and on a triggerer restart one
    interval's delay is cheaper than a wasted request for every resumed trigger.
    """
    while True:
        await asyncio.sleep(watch.seconds_to_next_poll(poll_interval))
        try:
            event = watch.on_batch(await hook.aget_batch(watch.batch_id))
        except OpenAIBatchError as error:
            event = watch.on_error(error)
        if event is not None:
            return event
