"""Callbacks that stop paying for batches a failed, or late, run no longer needs.

:func:`cancel_batch_on_failure` cancels one batch whose id the run saved. :func:`run_batch_metadata` tags each
batch a task creates with the DAG run that created it, and :class:`cancel_run_batches` cancels every batch so
tagged, with no id saved anywhere: it covers a submit task that died between OpenAI accepting the batch and
the XCom being written, a run failed by hand, and (as a deadline alert's callback) a run still going when its
results were due.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Generator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow_provider_openai_batch import _arguments
from airflow_provider_openai_batch._compat import deadline_async_callback
from airflow_provider_openai_batch._time import unix_time
from airflow_provider_openai_batch.exceptions import BatchNotCancellableError, OpenAIBatchError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.ids import DEFAULT_CONN_ID, resolve_batch_id
from airflow_provider_openai_batch.models import Batch, check_metadata

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

log = logging.getLogger(__name__)

#: The metadata keys :func:`run_batch_metadata` writes, naming the DAG run and the task that created a batch.
#: :class:`cancel_run_batches` recognises a run's batches by the first two (a run id is unique per DAG only).
DAG_ID_KEY = "airflow_dag_id"
RUN_ID_KEY = "airflow_run_id"
TASK_ID_KEY = "airflow_task_id"

#: How much earlier than the run's start one of its batches may seem to have been created, the clocks of
#: Airflow and OpenAI disagreeing. The listing reads that much further back; the tags alone decide.
CLOCK_SKEW_MARGIN = timedelta(minutes=5)


def cancel_batch_on_failure(
    batch_id: str | None = None,
    *,
    xcom_task_id: str | None = None,
    xcom_key: str = "return_value",
    conn_id: str = DEFAULT_CONN_ID,
) -> Callable[[Context], None]:
    """Build an ``on_failure_callback`` (task or DAG level) that cancels a batch.

    The batch is ``batch_id`` if given, else pulled from XCom: ``xcom_key`` of task ``xcom_task_id`` (default:
    the failed task itself). An XCom holding a dict with an ``id`` or ``batch_id`` key works too. The callback
    sends the cancel and returns without waiting, since callbacks must be quick; it logs the outcome and never
    raises, so a failing cancel cannot hide the failure that triggered it.

    .. code-block:: python

        submit = PythonOperator(
            task_id="submit",
            python_callable=submit_batch,
            on_failure_callback=cancel_batch_on_failure(xcom_task_id="submit"),
        )
    """

    def callback(context: Context) -> None:
        try:
            found = batch_id if batch_id is not None else _pull_batch_id(context, xcom_task_id, xcom_key)
            resolved = resolve_batch_id(found)
            if resolved is None:
                log.warning(
                    "No batch to cancel: found no batch id (XCom task %r, key %r).", xcom_task_id, xcom_key
                )
                return
            with OpenAIBatchHook(conn_id) as hook:
                batch = hook.cancel_batch(resolved)
            log.info("Cancel of batch '%s' sent on failure; it is now '%s'.", resolved, batch.status)
        except BatchNotCancellableError as error:
            log.info("Nothing to cancel on failure: %s", error)
        except Exception:
            log.exception("Could not cancel the batch on failure; the original failure stands.")

    return callback


def _pull_batch_id(context: Context, task_id: str | None, key: str) -> Any:
    ti = context["ti"]
    return ti.xcom_pull(task_ids=task_id or ti.task_id, key=key)


# -- run tags ------------------------------------------------------------------------------------------------


def run_batch_metadata(context: Context, **extra: str) -> dict[str, str]:
    """The ``metadata`` to create a batch with: the DAG run and task creating it, plus ``extra`` keys.

    Call it in the task that creates the batch and pass the result as the create call's ``metadata``; then
    :class:`cancel_run_batches` finds the run's batches without any batch id having been kept. The tags are
    ``airflow_dag_id``, ``airflow_run_id`` and ``airflow_task_id``; ``extra`` cannot replace them.

    Raises ``ValueError``, before any request, if the metadata would break the Batch API's limits (16 keys,
    keys of 1 to 64 characters, string values of up to 512), which would make OpenAI refuse the batch.

    .. code-block:: python

        @task
        def submit(file_id: str) -> str:
            metadata = run_batch_metadata(get_current_context(), team="search")
            return client.batches.create(..., metadata=metadata).id
    """
    ti = context.get("ti")
    if ti is None:
        raise ValueError("run_batch_metadata needs the context of the task creating the batch (with 'ti').")
    tags = {DAG_ID_KEY: ti.dag_id, RUN_ID_KEY: ti.run_id, TASK_ID_KEY: ti.task_id}
    if clash := sorted(tags.keys() & extra.keys()):
        raise ValueError(f"run_batch_metadata sets {', '.join(clash)} itself; name your own keys otherwise.")
    metadata = {**tags, **extra}
    check_metadata(metadata)
    return metadata


# -- cancel a run's batches ----------------------------------------------------------------------------------


class cancel_run_batches:  # named as the function it is used as; a class, for the triggerer to await
    """Cancel every cancellable batch whose metadata names the current DAG run; never raises.

    One object, two uses, both with the same effect:

    * ``on_failure_callback=cancel_run_batches(conn_id=...)``, on any Airflow 3: Airflow calls it with the
      failed run's context, and it cancels synchronously.
    * as the callback of a ``DeadlineAlert`` (Airflow >= 3.1), through ``AsyncCallback``:
      ``callback=cancel_run_batches(conn_id=...).deadline_callback()``, which is
      ``AsyncCallback(cancel_run_batches, kwargs={"conn_id": ...})``. The triggerer imports this class by its
      path, builds it with those kwargs and the run's context, and awaits it, as it does Airflow's notifiers.
      It then runs on the async hook, and never blocks the triggerer's event loop.

    A batch is cancelled only if its metadata has the ``airflow_dag_id`` and ``airflow_run_id`` of this run
    (see :func:`run_batch_metadata`) and it is still validating, in progress or finalizing. The list is read
    newest first and only down to the run's start, less :data:`CLOCK_SKEW_MARGIN`: a run's batches cost a
    page or two, not the organization's history. (A DAG run that failed before any task ran gives its
    callback no start time; the whole list is read then.) The matches are cancelled concurrently through the
    hook's shared client, with its bound on requests in flight and its retries on 429 and 5xx.

    It logs one summary line and returns the summary as a JSON string (``dag_id``, ``run_id``, ``listed``,
    ``cancelled``, ``already_finished``, ``failed``, ``error``), which Airflow keeps as a deadline callback's
    output, a text column. It never raises, so the failure that triggered it stays the run's visible
    failure; a batch that finished between the listing and its cancel is reported under
    ``already_finished``. Neither what it returns nor the kwargs Airflow stores for it hold the API key: the
    kwargs are the connection id only.

    :param conn_id: the OpenAI Batch connection.
    :param context: the run's context, which the triggerer passes to a deadline callback; not for DAG files.
    """

    def __init__(self, conn_id: str = DEFAULT_CONN_ID, *, context: Context | None = None) -> None:
        self.conn_id = _arguments.connection_id(conn_id)
        self.context = context

    def deadline_callback(self) -> Any:
        """This callback as a ``DeadlineAlert``'s ``AsyncCallback``: Airflow >= 3.1, else ``ImportError``."""
        return deadline_async_callback()(type(self), kwargs={"conn_id": self.conn_id})

    def __call__(self, context: Context) -> str | None:
        """Cancel the run's batches now: the ``on_failure_callback`` form."""
        try:
            run = _Run.of(context)
            hook = OpenAIBatchHook(self.conn_id)
            # The connection is looked up here, synchronously, as callbacks do everywhere Airflow runs them;
            # the event loop below finds it cached and only sends requests.
            hook.settings  # noqa: B018
            return asyncio.run(_cancel_run_batches(hook, run))
        except Exception:
            log.exception("Could not cancel the DAG run's batches; the original failure stands.")
            return None

    def __await__(self) -> Generator[Any, None, str | None]:
        """Cancel the run's batches on the running event loop: the deadline-alert form."""
        return self._acancel().__await__()

    async def _acancel(self) -> str | None:
        try:
            return await _cancel_run_batches(OpenAIBatchHook(self.conn_id), _Run.of(self.context))
        except Exception:
            log.exception("Could not cancel the DAG run's batches; the original failure stands.")
            return None


@dataclass(frozen=True)
class _Run:
    """The DAG run a callback is about, and how far back in the batch list its batches can be."""

    dag_id: str
    run_id: str
    #: UNIX time before which none of the run's batches was created: its start less the clock-skew margin.
    #: ``None`` when the context does not say when the run started.
    created_after: float | None

    @classmethod
    def of(cls, context: Mapping[str, Any] | None) -> _Run:
        """Read the run from any of the contexts Airflow gives a callback.

        A failure callback gets the task context, whose ``dag_run`` is an object; a deadline callback gets a
        dict whose ``dag_run`` is the REST API's DAG run JSON (``dag_run_id``, ISO dates); a DAG run that
        failed before any task ran gives its failure callback only ``dag`` and ``run_id``.
        """
        context = context or {}
        dag_run = context.get("dag_run")
        if dag_run is None:
            dag_id, run_id, started = getattr(context.get("dag"), "dag_id", None), context.get("run_id"), None
        else:
            dag_id = _field(dag_run, "dag_id")
            run_id = _field(dag_run, "run_id") or _field(dag_run, "dag_run_id")
            # Not started yet (a deadline can pass while the run is queued): no batch can be older than that.
            dates = (_field(dag_run, name) for name in ("start_date", "queued_at", "run_after"))
            started = next((date for date in dates if date is not None), None)
        if not (isinstance(dag_id, str) and dag_id and isinstance(run_id, str) and run_id):
            names = f"DAG {dag_id!r:.80}, run {run_id!r:.80}"
            raise ValueError(f"The callback's context names no DAG run ({names}).")
        created_after = None
        if started is not None:
            margin = CLOCK_SKEW_MARGIN.total_seconds()
            created_after = max(0.0, unix_time(started, "the run's start") - margin)
        return cls(dag_id, run_id, created_after)

    def owns(self, batch: Batch) -> bool:
        """Whether ``batch`` is one of this run's and can still be cancelled."""
        metadata = batch.metadata or {}
        return (
            batch.is_cancellable
            and metadata.get(DAG_ID_KEY) == self.dag_id
            and metadata.get(RUN_ID_KEY) == self.run_id
        )


def _field(dag_run: Any, name: str) -> Any:
    return dag_run.get(name) if isinstance(dag_run, Mapping) else getattr(dag_run, name, None)


@dataclass
class _RunCancellation:
    """What one call did, batch by batch: the summary line, and the callback's result as JSON text."""

    dag_id: str
    run_id: str
    listed: int = 0
    cancelled: list[dict[str, str]] = field(default_factory=list)
    already_finished: list[dict[str, str | None]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    #: What stopped the work before its end (the connection lookup, the listing), if anything did.
    error: str | None = None

    def report(self) -> str:
        trouble = bool(self.failed or self.error)
        log.log(
            logging.WARNING if trouble else logging.INFO,
            "Batches of run %r of DAG %r: %d cancelled %s, %d already finished %s, %d failed %s; "
            "%d listed%s.",
            self.run_id,
            self.dag_id,
            len(self.cancelled),
            [entry["batch_id"] for entry in self.cancelled],
            len(self.already_finished),
            [entry["batch_id"] for entry in self.already_finished],
            len(self.failed),
            self.failed,
            self.listed,
            f", then stopped by {self.error}" if self.error else "",
        )
        return json.dumps(asdict(self))


async def _cancel_run_batches(hook: OpenAIBatchHook, run: _Run) -> str:
    """List the run's batches down to its start, cancel them concurrently, and report; raises nothing the API
    or the connection can cause."""
    outcome = _RunCancellation(run.dag_id, run.run_id)
    owned: list[str] = []
    try:
        async with hook:
            async for batch in hook.alist_batches(created_after=run.created_after):
                outcome.listed += 1
                if run.owns(batch):
                    owned.append(batch.id)
            for kind, entry in await asyncio.gather(*(_cancel_one(hook, batch_id) for batch_id in owned)):
                getattr(outcome, kind).append(entry)
    except Exception as error:  # noqa: BLE001 - reported in the summary line: the callback must not raise
        outcome.error = f"{type(error).__name__}: {error}"
    return outcome.report()


async def _cancel_one(hook: OpenAIBatchHook, batch_id: str) -> tuple[str, dict[str, Any]]:
    """Cancel one batch; return the summary list it belongs in, and its entry there."""
    try:
        batch = await hook.acancel_batch(batch_id)
    except BatchNotCancellableError as error:  # it finished between the listing and the cancel
        return "already_finished", {"batch_id": batch_id, "status": error.batch_status}
    except (OpenAIBatchError, ValueError) as error:  # ValueError: a malformed id in the listing
        return "failed", {"batch_id": batch_id, "error": str(error)}
    return "cancelled", {"batch_id": batch_id, "status": str(batch.status)}
