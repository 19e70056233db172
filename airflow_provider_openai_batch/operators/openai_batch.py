"""Operators that cancel OpenAI batches and hand their partial results downstream, saved to storage if asked."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowSkipException,
    BaseOperator,
    BaseOperatorLink,
    conf,
)

from airflow_provider_openai_batch import _arguments
from airflow_provider_openai_batch._time import unix_time
from airflow_provider_openai_batch.ids import DEFAULT_CONN_ID, resolve_batch_id
from airflow_provider_openai_batch.statuses import CANCELLABLE_STATUSES, BatchStatus

# A DAG file only constructs operators, at every parse: what running them needs (the hook, the triggers, the
# cleanup, results and storage) is imported where they run, in execute and execute_complete.
if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context, ObjectStoragePath, TaskInstanceKey

    from airflow_provider_openai_batch.cancellation import CancellationEvent
    from airflow_provider_openai_batch.cleanup import CleanupSummary
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.storage import Target

    ResultsDestination = str | os.PathLike | ObjectStoragePath

BATCH_URL = "https://platform.openai.com/batches/{batch_id}"

#: How long past the wait's deadline a deferred task is given before Airflow fails it (TaskDeferralTimeout).
DEFER_TIMEOUT_MARGIN = timedelta(minutes=10)

#: XCom keys the operators push, besides the return value.
XCOM_BATCH_ID_KEY = "batch_id"
XCOM_STATUS_KEY = "status"
XCOM_OUTPUT_FILE_ID_KEY = "output_file_id"
XCOM_ERROR_FILE_ID_KEY = "error_file_id"
#: The saved results' manifest (``save_results_to``).
XCOM_RESULTS_KEY = "results"
#: The cleanup's summary: pushed when it fails, and kept there while it is deferred.
XCOM_SUMMARY_KEY = "summary"
#: The batch's fields pushed under their own names.
_BATCH_FIELD_KEYS = (XCOM_STATUS_KEY, XCOM_OUTPUT_FILE_ID_KEY, XCOM_ERROR_FILE_ID_KEY)


class OpenAIBatchLink(BaseOperatorLink):
    """Link to the batch's page on the OpenAI platform, for OpenAI connections only.

    An Azure OpenAI batch lives in the Azure portal, under a subscription and resource that the connection does
    not name, so no link is better than one to a platform that does not have the batch. Airflow computes the
    link in the worker once the task ran, where looking the connection up is allowed.
    """

    name = "OpenAI Batch"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.providers.common.compat.sdk import XCom

        from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

        batch_id = XCom.get_value(ti_key=ti_key, key=XCOM_BATCH_ID_KEY)
        if not batch_id:
            return ""
        try:
            api_type = OpenAIBatchHook(getattr(operator, "conn_id", DEFAULT_CONN_ID)).settings.api_type
        except Exception:  # noqa: BLE001 - the link is a convenience: a connection problem shows in the task, not here
            return ""
        return BATCH_URL.format(batch_id=batch_id) if api_type == "openai" else ""


class OpenAICancelBatchOperator(BaseOperator):
    """Cancel an OpenAI batch and, by default, wait until it is ``cancelled`` to report its partial results.

    The API moves a cancelled batch to ``cancelling`` and, up to 10 minutes later, to ``cancelled``: only then is
    its ``output_file_id`` (the results computed so far) known. With ``deferrable=True`` the wait happens in the
    triggerer and holds no worker slot.

    The task returns the final Batch as JSON and pushes the XCom keys ``batch_id``, ``status``,
    ``output_file_id`` and ``error_file_id``. Cancelling is idempotent: a batch already ``cancelling`` or
    ``cancelled`` (a retried task, two tasks racing) is a success.

    With ``save_results_to``, once the wait is over (the batch ``cancelled``, or finished first with
    ``if_finished="succeed"``) the worker writes ``<save_results_to>/<batch_id>/output.jsonl``, ``errors.jsonl``
    and ``remaining.jsonl`` (the input lines of the requests that never ran: resubmit it to run exactly those; see
    :mod:`airflow_provider_openai_batch.results`) and pushes their manifest as the XCom ``results``:
    ``{"batch_id", "output", "errors", "remaining"}``, each ``{"path", "bytes", "lines"}`` or ``None`` for a file
    that does not exist. Deferred, this happens in ``execute_complete``, on a worker: never in the triggerer.

    :param batch_id: the batch to cancel (templated): an id, an XComArg such as ``submit.output``, or a dict
        with an ``id`` or ``batch_id`` key.
    :param conn_id: the OpenAI Batch connection (templated).
    :param wait_for_cancellation: wait for ``cancelled`` (and the output file id); if False, finish once the
        cancel request is accepted.
    :param deferrable: wait in the triggerer instead of the worker.
    :param poll_interval: seconds between status polls while waiting (at least 0.01).
    :param timeout: how long to wait after the cancel before failing (the API promises at most 10 minutes); at
        most 7 days. Like ``poll_interval``, a finite, positive number of seconds or a ``timedelta``.
    :param if_missing: when the upstream produced no batch id: ``"skip"`` the task or ``"fail"`` it.
    :param if_finished: when the batch had already completed, failed or expired (or did so before the cancel
        took effect): ``"succeed"`` and report it, ``"skip"``, or ``"fail"``.
    :param save_results_to: a local directory (absolute), an ``ObjectStoragePath`` or a URL such as
        ``s3://bucket/prefix`` (templated) under which to save the batch's results; ``None`` saves nothing.
        Checked before the cancel is sent. Needs ``wait_for_cancellation``: the files exist once it is over.
    """

    template_fields: Sequence[str] = ("batch_id", "conn_id", "save_results_to")
    operator_extra_links = (OpenAIBatchLink(),)
    ui_color = "#e8f4ef"

    def __init__(
        self,
        *,
        batch_id: Any,
        conn_id: str = DEFAULT_CONN_ID,
        wait_for_cancellation: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 30,
        timeout: timedelta | float = timedelta(minutes=15),
        if_missing: Literal["skip", "fail"] = "skip",
        if_finished: Literal["succeed", "skip", "fail"] = "succeed",
        save_results_to: ResultsDestination | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_saving(save_results_to, wait_for_cancellation)
        if if_missing not in ("skip", "fail"):
            raise ValueError(f"if_missing must be 'skip' or 'fail', not {if_missing!r}.")
        if if_finished not in ("succeed", "skip", "fail"):
            raise ValueError(f"if_finished must be 'succeed', 'skip' or 'fail', not {if_finished!r}.")
        self.batch_id = batch_id
        self.conn_id = conn_id
        self.wait_for_cancellation = wait_for_cancellation
        self.deferrable = deferrable
        self.poll_interval = _arguments.poll_interval(poll_interval)
        self.timeout_seconds = _arguments.timeout(timeout)
        self.if_missing = if_missing
        self.if_finished = if_finished
        self.save_results_to = save_results_to

    @cached_property
    def hook(self) -> OpenAIBatchHook:
        from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

        return OpenAIBatchHook(self.conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_provider_openai_batch.cancellation import CancellationEvent
        from airflow_provider_openai_batch.exceptions import BatchNotCancellableError
        from airflow_provider_openai_batch.triggers.openai_batch import (
            OpenAIBatchCancellationTrigger,
            wait_for_cancellations,
        )

        batch_id = resolve_batch_id(self.batch_id)
        if batch_id is None:
            reason = f"No batch id to cancel: batch_id rendered to {self.batch_id!r} (did the upstream submit one?)."
            if self.if_missing == "skip":
                raise AirflowSkipException(reason)
            raise AirflowException(reason)
        self._results_root()  # a bad destination fails the task before anything is cancelled
        context["ti"].xcom_push(key=XCOM_BATCH_ID_KEY, value=batch_id)

        with self.hook as hook:
            try:
                batch = hook.cancel_batch(batch_id)
            except BatchNotCancellableError as error:
                self.log.info("%s", error)
                return self._finish(
                    context, batch_id, CancellationEvent.from_batch(hook.get_finished_batch(batch_id, error))
                )
            self.log.info("Cancel of batch '%s' accepted; it is now '%s'.", batch_id, batch.status)
            if batch.status == BatchStatus.CANCELLED or not self.wait_for_cancellation:
                return self._report(context, batch_id, batch.to_xcom())

            deadline = time.time() + self.timeout_seconds
            if self.deferrable:
                self.defer(
                    trigger=OpenAIBatchCancellationTrigger(
                        batch_id=batch_id,
                        conn_id=self.conn_id,
                        poll_interval=self.poll_interval,
                        deadline=deadline,
                    ),
                    method_name="execute_complete",
                    timeout=_defer_timeout(deadline),
                )
        [event] = asyncio.run(wait_for_cancellations(self.conn_id, [batch_id], self.poll_interval, deadline))
        return self._finish(context, batch_id, event)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger fired: validate its event and report the outcome."""
        from airflow_provider_openai_batch.cancellation import CancellationEvent, validated_event

        if event is None:
            raise AirflowException(
                "The cancellation trigger fired no event payload; cannot tell the batch's fate."
            )
        # The task's own id, rendered again for the resumed task: the event's is only what the trigger was given.
        batch_id = resolve_batch_id(self.batch_id)
        if batch_id is None:
            raise AirflowException(
                f"batch_id rendered to {self.batch_id!r} on resume: no batch id to report on."
            )
        return self._finish(context, batch_id, validated_event(CancellationEvent, event))

    def _finish(self, context: Context, batch_id: str, event: CancellationEvent) -> dict[str, Any]:
        """Apply the event: fail on timeout/error, apply ``if_finished``, else push XComs and return the batch."""
        from airflow_provider_openai_batch.cancellation import WaitStopped
        from airflow_provider_openai_batch.statuses import FINISHED_STATUSES

        _log_waits(self, [event])
        self.log.info("%s", event.message)
        if isinstance(event.status, WaitStopped):
            raise AirflowException(event.message)
        if event.status in FINISHED_STATUSES and self.if_finished != "succeed":
            reason = f"Batch '{event.batch_id}' had already {event.status} and could not be cancelled."
            if self.if_finished == "skip":
                raise AirflowSkipException(reason)
            raise AirflowException(reason)
        if event.batch is None:
            raise AirflowException(f"The cancellation event for batch '{event.batch_id}' carries no batch.")
        return self._report(context, batch_id, event.batch)

    def _report(self, context: Context, batch_id: str, batch: dict[str, Any]) -> dict[str, Any]:
        """Push the batch's status and file ids as XComs, save its results if asked (under the folder of
        ``batch_id``, the task's), and return the batch."""
        from airflow_provider_openai_batch.models import Batch
        from airflow_provider_openai_batch.results import save_results

        ti = context["ti"]
        for key in _BATCH_FIELD_KEYS:
            ti.xcom_push(key=key, value=batch.get(key))
        if (root := self._results_root()) is not None:
            with self.hook as hook:
                manifest = save_results(hook, batch_id, Batch.model_validate(batch), root)
            ti.xcom_push(key=XCOM_RESULTS_KEY, value=manifest.to_xcom())
        return batch

    def _results_root(self) -> Target | None:
        return _results_root(self.save_results_to)


class OpenAICancelStaleBatchesOperator(BaseOperator):
    """Cancel every batch still running past an age limit: the scheduled cleanup of forgotten, costly batches.

    It reads the batch list, newest first, selects the batches in ``statuses`` created more than
    ``older_than`` ago whose metadata and endpoint match, and cancels them concurrently. One batch failing to
    cancel does not stop the others. With ``wait_for_cancellation`` it then waits for all of them at once (one
    trigger when deferrable). Stale batches are the oldest, at the end of the list, so it reads the whole list
    unless ``created_after`` bounds it: then it stops at the first batch created before that time.

    With ``older_than=timedelta(0)``,
    ``created_after="{{ dag_run.start_date - macros.timedelta(minutes=5) }}"`` and
    ``metadata={"airflow_dag_id": "{{ dag.dag_id }}", "airflow_run_id": "{{ run_id }}"}`` it cancels what the
    current DAG run started (the batches tagged by
    :func:`~airflow_provider_openai_batch.callbacks.run_batch_metadata`) for a page or two of listing: the
    task-level form of :class:`~airflow_provider_openai_batch.callbacks.cancel_run_batches`.

    The task returns a JSON summary: ``selected`` ids, ``cancelled`` (with each batch's final status and output
    file ids), ``already_finished`` (the API answered 409), ``not_found``, and ``failed`` (with the error). If any
    batch failed the task fails too, after pushing the summary as the XCom ``summary``, so alerts fire. Before
    deferring, the summary so far is kept in that same XCom, for the resumed task to complete.

    With ``save_results_to``, every batch it cancelled that reached a final status gets a folder of its own,
    ``<save_results_to>/<batch_id>/``, written as :class:`OpenAICancelBatchOperator` does, and its manifest goes
    in the summary's ``results`` list. A batch whose results cannot be saved is added to ``failed``; the others
    are still saved.

    :param conn_id: the OpenAI Batch connection (templated).
    :param older_than: minimum age, measured from the batch's ``created_at``.
    :param statuses: statuses a batch must be in to be selected (default: the cancellable ones).
    :param metadata: only batches whose metadata has each of these key/value pairs, all strings (templated).
    :param endpoint: only batches for this endpoint, e.g. ``/v1/chat/completions``.
    :param created_after: only batches created at or after this time, where the listing stops (templated): a
        datetime with a time zone, its ISO 8601 string, or UNIX seconds. Taken as given: subtract a margin
        yourself if the clocks of Airflow and OpenAI may disagree.
    :param dry_run: select and report, but cancel nothing (templated: must render to a boolean).
    :param max_concurrency: cancel requests in flight at once (an integer, at least 1).
    :param wait_for_cancellation: wait until the cancelled batches are ``cancelled``, to report output files.
    :param deferrable: wait in the triggerer instead of the worker.
    :param poll_interval: seconds between polling rounds while waiting (at least 0.01).
    :param timeout: how long to wait after the cancels before reporting the still-cancelling batches as failed;
        at most 7 days.
    :param save_results_to: as for :class:`OpenAICancelBatchOperator` (templated), one folder per batch.
    """

    template_fields: Sequence[str] = ("conn_id", "metadata", "dry_run", "created_after", "save_results_to")
    ui_color = "#e8f4ef"

    def __init__(
        self,
        *,
        older_than: timedelta,
        conn_id: str = DEFAULT_CONN_ID,
        statuses: Collection[str] = tuple(CANCELLABLE_STATUSES),
        metadata: dict[str, str] | None = None,
        endpoint: str | None = None,
        created_after: datetime | float | str | None = None,
        dry_run: bool | str = False,
        max_concurrency: int = 8,
        wait_for_cancellation: bool = True,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        poll_interval: float = 30,
        timeout: timedelta | float = timedelta(minutes=15),
        save_results_to: ResultsDestination | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_saving(save_results_to, wait_for_cancellation)
        if not isinstance(older_than, timedelta) or older_than < timedelta(0):
            raise ValueError(f"older_than must be a non-negative timedelta, got {older_than!r}.")
        unknown = set(statuses) - set(BatchStatus)
        if unknown or not statuses:
            raise ValueError(
                f"statuses must be batch statuses ({', '.join(BatchStatus)}), got {sorted(statuses)}."
            )
        if created_after is not None and not isinstance(created_after, str):  # a string may be a template
            unix_time(created_after, "created_after")
        self.conn_id = conn_id
        self.older_than = older_than
        self.statuses = frozenset(BatchStatus(status) for status in statuses)
        self.metadata = _arguments.metadata_filter(metadata or {}, rendered=False)  # rendered: in execute
        self.endpoint = endpoint
        self.created_after = created_after
        # Shadows BaseOperator.dry_run(), a template-rendering helper nothing in Airflow 3 calls.
        self.dry_run = dry_run  # type: ignore[method-assign,assignment]
        self.max_concurrency = _arguments.positive_int(max_concurrency, "max_concurrency")
        self.wait_for_cancellation = wait_for_cancellation
        self.deferrable = deferrable
        self.poll_interval = _arguments.poll_interval(poll_interval)
        self.timeout_seconds = _arguments.timeout(timeout)
        self.save_results_to = save_results_to

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_provider_openai_batch.cleanup import CleanupSummary, cancel_all, is_stale
        from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
        from airflow_provider_openai_batch.triggers.openai_batch import (
            OpenAIMultiBatchCancellationTrigger,
            wait_for_cancellations,
        )

        if not isinstance(self.dry_run, bool):  # a value problem (what the template rendered), not a type one
            raise ValueError(  # noqa: TRY004
                f"dry_run rendered to {self.dry_run!r}, not a boolean: template it in a DAG with "
                "render_template_as_native_obj=True."
            )
        metadata = _arguments.metadata_filter(self.metadata)  # as rendered
        _results_root(self.save_results_to)  # a bad destination fails the task before anything is cancelled
        hook = OpenAIBatchHook(self.conn_id)
        with hook:
            listed = hook.list_batches(created_after=self.created_after)  # checks it before the first request
            selected = [
                batch
                for batch in listed
                if is_stale(
                    batch,
                    older_than=self.older_than,
                    statuses=self.statuses,
                    endpoint=self.endpoint,
                    metadata=metadata,
                )
            ]
        summary = CleanupSummary(dry_run=self.dry_run, selected=[batch.id for batch in selected])
        self.log.info("Selected %d stale batch(es): %s", len(selected), summary.selected)
        if self.dry_run or not selected:
            return self._report(context, summary)

        asyncio.run(cancel_all(hook, summary, self.max_concurrency))
        waiting = [
            entry["batch_id"] for entry in summary.cancelled if entry["status"] != BatchStatus.CANCELLED
        ]
        if not (self.wait_for_cancellation and waiting):
            return self._report(context, self._with_results(summary))
        deadline = time.time() + self.timeout_seconds
        if self.deferrable:
            # Kept in XCom rather than in the deferral's kwargs, which dag.test() drops on resume.
            context["ti"].xcom_push(key=XCOM_SUMMARY_KEY, value=summary.model_dump())
            self.defer(
                trigger=OpenAIMultiBatchCancellationTrigger(
                    batch_ids=waiting,
                    conn_id=self.conn_id,
                    poll_interval=self.poll_interval,
                    deadline=deadline,
                ),
                method_name="execute_complete",
                timeout=_defer_timeout(deadline),
            )
        events = asyncio.run(wait_for_cancellations(self.conn_id, waiting, self.poll_interval, deadline))
        _log_waits(self, events)
        return self._report(context, self._with_results(summary.with_outcomes(events)))

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resume after the trigger fired: merge each batch's outcome into the summary saved before deferring."""
        from airflow_provider_openai_batch.cancellation import MultiCancellationEvent, validated_event
        from airflow_provider_openai_batch.cleanup import CleanupSummary

        if event is None:
            raise AirflowException(
                "The cancellation trigger fired no event payload; cannot tell the batches' fate."
            )
        ti = context["ti"]
        saved = ti.xcom_pull(task_ids=ti.task_id, key=XCOM_SUMMARY_KEY, map_indexes=ti.map_index)
        if saved is None:
            raise AirflowException("The cleanup summary saved before deferring is missing from XCom.")
        events = validated_event(MultiCancellationEvent, event).events
        _log_waits(self, events)
        summary = CleanupSummary.model_validate(saved).with_outcomes(events)
        return self._report(context, self._with_results(summary))

    def _with_results(self, summary: CleanupSummary) -> CleanupSummary:
        """Save the results of every cancelled batch that reached a final status, if asked; one failing to save
        is added to ``failed`` and does not stop the others."""
        from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
        from airflow_provider_openai_batch.results import save_results
        from airflow_provider_openai_batch.statuses import TERMINAL_STATUSES

        root = _results_root(self.save_results_to)
        if root is None:
            return summary
        summary = summary.model_copy(deep=True)
        with OpenAIBatchHook(self.conn_id) as hook:
            for entry in summary.cancelled:
                if entry["status"] not in TERMINAL_STATUSES:
                    continue
                try:
                    manifest = save_results(hook, entry["batch_id"], hook.get_batch(entry["batch_id"]), root)
                except Exception as error:  # noqa: BLE001 - any storage's error, reported with the batch
                    self.log.warning("Could not save the results of batch '%s': %s", entry["batch_id"], error)
                    message = f"Cancelled, but its results could not be saved: {error}"
                    summary.failed.append({"batch_id": entry["batch_id"], "error": message})
                else:
                    summary.results.append(manifest.to_xcom())
        return summary

    def _report(self, context: Context, summary: CleanupSummary) -> dict[str, Any]:
        result = summary.model_dump()
        self.log.info(
            "Cleanup: %d selected, %d cancelled, %d already finished, %d not found, %d failed%s.",
            len(summary.selected),
            len(summary.cancelled),
            len(summary.already_finished),
            len(summary.not_found),
            len(summary.failed),
            " (dry run: nothing was cancelled)" if summary.dry_run else "",
        )
        if summary.failed:
            context["ti"].xcom_push(key=XCOM_SUMMARY_KEY, value=result)
            what = "cancel" if self.save_results_to is None else "cancel or save the results of"
            raise AirflowException(f"Could not {what} {len(summary.failed)} batch(es): {summary.failed}")
        return result


def _log_waits(operator: BaseOperator, events: list[CancellationEvent]) -> None:
    """Log each batch's status changes during its wait, here in the worker (see ``status_history``)."""
    for event in events:
        if (line := event.history_line()) is not None:
            operator.log.info("%s", line)


def _check_saving(save_results_to: object, wait_for_cancellation: bool) -> None:
    if save_results_to is not None and not wait_for_cancellation:
        raise ValueError(
            "save_results_to needs wait_for_cancellation=True: a batch's result files exist only once it is "
            "cancelled."
        )


def _results_root(save_results_to: object) -> Target | None:
    """The directory results are saved under (checked), or None when none was asked for."""
    from airflow_provider_openai_batch import storage

    return None if save_results_to is None else storage.directory(save_results_to, "save_results_to")


def _defer_timeout(deadline: float) -> timedelta:
    """The deferral's own timeout: the wait's deadline plus a margin. The trigger ends the wait at its deadline
    itself; this is the backstop for a trigger lost with its triggerer, so no task stays deferred for ever."""
    return timedelta(seconds=max(0.0, deadline - time.time())) + DEFER_TIMEOUT_MARGIN
