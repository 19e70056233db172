"""Failure callbacks that stop paying for a batch the failed run no longer needs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from airflow_provider_openai_batch.exceptions import BatchNotCancellableError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.ids import resolve_batch_id

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

log = logging.getLogger(__name__)


def cancel_batch_on_failure(
    batch_id: str | None = None,
    *,
    xcom_task_id: str | None = None,
    xcom_key: str = "return_value",
    conn_id: str = OpenAIBatchHook.default_conn_name,
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
                log.warning("No batch to cancel: found no batch id (XCom task %r, key %r).", xcom_task_id, xcom_key)
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
