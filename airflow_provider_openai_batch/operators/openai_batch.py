"""Operator that cancels an OpenAI batch and hands its partial results downstream."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from airflow.sdk import BaseOperator, BaseOperatorLink, conf
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from airflow_provider_openai_batch.cancellation import (
    FINISHED_FIRST,
    CancellationEvent,
    CancellationStatus,
    CancellationWatch,
)
from airflow_provider_openai_batch.exceptions import BatchNotCancellableError, OpenAIBatchError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook, validate_batch_id
from airflow_provider_openai_batch.models import BatchStatus
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchCancellationTrigger

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import TaskInstanceKey

BATCH_URL = "https://platform.openai.com/batches/{batch_id}"

#: What a missing upstream batch id looks like once templated: Jinja renders a missing XCom as "None".
_MISSING = (None, "", "None")


class OpenAIBatchLink(BaseOperatorLink):
    """Link to the batch's page on the OpenAI platform."""

    name = "OpenAI Batch"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        batch_id = XCom.get_value(ti_key=ti_key, key="batch_id")
        return BATCH_URL.format(batch_id=batch_id) if batch_id else ""


def resolve_batch_id(value: Any) -> str | None:
    """Return the batch id held by ``value``, ``None`` if it holds none, or raise ``ValueError`` if malformed.

    ``value`` is what the ``batch_id`` argument rendered to: an id, or a dict returned by another operator
    (a Batch JSON with ``id``, or anything with a ``batch_id`` key).
    """
    if isinstance(value, dict):
        value = value.get("batch_id", value.get("id"))
    if value in _MISSING:
        return None
    return validate_batch_id(value)


class OpenAICancelBatchOperator(BaseOperator):
    """Cancel an OpenAI batch and, by default, wait until it is ``cancelled`` to report its partial results.

    The API moves a cancelled batch to ``cancelling`` and, up to 10 minutes later, to ``cancelled``: only then is
    its ``output_file_id`` (the results computed so far) known. With ``deferrable=True`` the wait happens in the
    triggerer and holds no worker slot.

    The task returns the final Batch as JSON and pushes the XCom keys ``batch_id``, ``status``,
    ``output_file_id`` and ``error_file_id``. Cancelling is idempotent: a batch already ``cancelling`` or
    ``cancelled`` (a retried task, two tasks racing) is a success.

    :param batch_id: the batch to cancel (templated): an id, an XComArg such as ``submit.output``, or a dict
        with an ``id`` or ``batch_id`` key.
    :param conn_id: the OpenAI Batch connection (templated).
    :param wait_for_cancellation: wait for ``cancelled`` (and the output file id); if False, finish once the
        cancel request is accepted.
    :param deferrable: wait in the triggerer instead of the worker.
    :param poll_interval: seconds between status polls while waiting.
    :param timeout: how long to wait after the cancel before failing (the API promises at most 10 minutes).
    :param if_missing: when the upstream produced no batch id: ``"skip"`` the task or ``"fail"`` it.
    :param if_finished: when the batch had already completed, failed or expired (or did so before the cancel
        took effect): ``"succeed"`` and report it, ``"skip"``, or ``"fail"``.
    """

    template_fields: Sequence[str] = ("batch_id", "conn_id")
    operator_extra_links = (OpenAIBatchLink(),)
    ui_color = "#e8f4ef"

    def __init__(
        self,
        *,
        batch_id: Any,
        conn_id: str = OpenAIBatchHook.default_conn_name,
        wait_for_cancellation: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 30,
        timeout: timedelta | float = timedelta(minutes=15),
        if_missing: Literal["skip", "fail"] = "skip",
        if_finished: Literal["succeed", "skip", "fail"] = "succeed",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if if_missing not in ("skip", "fail"):
            raise ValueError(f"if_missing must be 'skip' or 'fail', not {if_missing!r}.")
        if if_finished not in ("succeed", "skip", "fail"):
            raise ValueError(f"if_finished must be 'succeed', 'skip' or 'fail', not {if_finished!r}.")
        timeout_seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
        if poll_interval <= 0 or timeout_seconds <= 0:
            raise ValueError(f"poll_interval and timeout must be positive, got {poll_interval!r} and {timeout!r}.")
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.wait_for_cancellation = wait_for_cancellation
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.timeout_seconds = timeout_seconds
        self.if_missing = if_missing
        self.if_finished = if_finished

    @property
    def hook(self) -> OpenAIBatchHook:
        return OpenAIBatchHook(self.conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        batch_id = resolve_batch_id(self.batch_id)
        if batch_id is None:
            reason = f"No batch id to cancel: batch_id rendered to {self.batch_id!r} (did the upstream submit one?)."
            if self.if_missing == "skip":
                raise AirflowSkipException(reason)
            raise AirflowException(reason)
        context["ti"].xcom_push(key="batch_id", value=batch_id)

        with self.hook as hook:
            try:
                batch = hook.cancel_batch(batch_id)
            except BatchNotCancellableError as error:
                self.log.info("%s", error)
                return self._finish(context, CancellationEvent.from_batch(hook.get_batch(batch_id)))
            self.log.info("Cancel of batch '%s' accepted; it is now '%s'.", batch_id, batch.status)
            if batch.status == BatchStatus.CANCELLED or not self.wait_for_cancellation:
                return self._report(context, batch.to_xcom())

            deadline = time.time() + self.timeout_seconds
            if self.deferrable:
                self.defer(
                    trigger=OpenAIBatchCancellationTrigger(
                        batch_id=batch_id, conn_id=self.conn_id, poll_interval=self.poll_interval, deadline=deadline
                    ),
                    method_name="execute_complete",
                )
            return self._finish(context, self._wait(hook, batch_id, deadline))

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger fired: validate its event and report the outcome."""
        if event is None:
            raise AirflowException("The cancellation trigger fired no event payload; cannot tell the batch's fate.")
        return self._finish(context, CancellationEvent.model_validate(event))

    def _wait(self, hook: OpenAIBatchHook, batch_id: str, deadline: float) -> CancellationEvent:
        """Synchronous twin of the trigger's wait, ending for the same reasons with the same event."""
        watch = CancellationWatch(batch_id, deadline)
        while True:
            time.sleep(watch.seconds_to_next_poll(self.poll_interval))
            try:
                event = watch.on_batch(hook.get_batch(batch_id))
            except OpenAIBatchError as error:
                event = watch.on_error(error)
            if event is not None:
                return event

    def _finish(self, context: Context, event: CancellationEvent) -> dict[str, Any]:
        """Apply the event: fail on timeout/error, apply ``if_finished``, else push XComs and return the batch."""
        self.log.info("%s", event.message)
        if event.status in (CancellationStatus.TIMEOUT, CancellationStatus.ERROR):
            raise AirflowException(event.message)
        if event.status in FINISHED_FIRST and self.if_finished != "succeed":
            reason = f"Batch '{event.batch_id}' had already {event.status} and could not be cancelled."
            if self.if_finished == "skip":
                raise AirflowSkipException(reason)
            raise AirflowException(reason)
        if event.batch is None:
            raise AirflowException(f"The cancellation event for batch '{event.batch_id}' carries no batch.")
        return self._report(context, event.batch)

    @staticmethod
    def _report(context: Context, batch: dict[str, Any]) -> dict[str, Any]:
        """Push the batch's status and file ids as XComs and return the batch as the task's result."""
        ti = context["ti"]
        for key in ("status", "output_file_id", "error_file_id"):
            ti.xcom_push(key=key, value=batch.get(key))
        return batch
