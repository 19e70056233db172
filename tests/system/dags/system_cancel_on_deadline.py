"""A DAG whose task creates a batch tagged with the run, then waits on it, with ``cancel_run_batches`` as both
its deadline alert's callback and its failure callback.

Left alone, the deadline passes while the task still waits: the triggerer runs the callback, which cancels the
run's batch, and the task returns the first status it sees other than ``validating``/``in_progress``, so its
XCom shows that the batch was cancelled while it was still running. With ``{"fail_after_submit": true}`` in
the run's conf the task fails right after creating the batch, before the deadline: the DAG processor runs the
failure callback, which cancels the batch; the deadline still fires later, and finds nothing left to cancel.
"""

from __future__ import annotations

import time
from datetime import timedelta

from airflow.sdk import DAG, DeadlineAlert, DeadlineReference, get_current_context, task

from airflow_provider_openai_batch.callbacks import cancel_run_batches, run_batch_metadata
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

DAG_ID = "system_openai_batch_cancel_on_deadline"
#: After the run is queued. Long enough for the task to start and create its batch on a busy 2-CPU machine.
DEADLINE = timedelta(seconds=40)
#: How long the task waits for something to happen to its batch before failing the run.
TASK_WAIT = 300

cancel_this_runs_batches = cancel_run_batches(conn_id="openai_default")

with DAG(
    DAG_ID,
    schedule=None,
    catchup=False,
    default_args={"retries": 0},
    tags=["system-test"],
    on_failure_callback=cancel_this_runs_batches,
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=DEADLINE,
        callback=cancel_this_runs_batches.deadline_callback(),
    ),
):

    @task
    def submit_and_wait() -> str:
        context = get_current_context()
        request = {
            "input_file_id": "file-system-test",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": run_batch_metadata(context),
        }
        with OpenAIBatchHook("openai_default") as hook:
            response = hook.get_conn().post("/batches", json=request)
            response.raise_for_status()
            batch_id = response.json()["id"]
            if context["dag_run"].conf.get("fail_after_submit"):
                raise RuntimeError(f"Failing on purpose, with batch {batch_id} running and its id unsaved.")
            waited_until = time.monotonic() + TASK_WAIT
            while time.monotonic() < waited_until:
                status = hook.get_batch(batch_id).status
                if status not in ("validating", "in_progress"):
                    return str(status)
                time.sleep(1)
        raise RuntimeError(
            f"Batch {batch_id} was still running after {TASK_WAIT} s: the deadline did nothing."
        )

    submit_and_wait()
