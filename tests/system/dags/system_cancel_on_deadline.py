"""A DAG whose deadline passes while its task still waits for the batch the task created, tagged with the run.

The deadline alert's callback is ``cancel_run_batches``: the triggerer runs it, and it cancels the run's batch.
The task watches its batch and returns the first status it sees other than ``validating``/``in_progress``,
so its XCom shows that the batch was cancelled while the task was still running.
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

with DAG(
    DAG_ID,
    schedule=None,
    catchup=False,
    default_args={"retries": 0},
    tags=["system-test"],
    deadline=DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=DEADLINE,
        callback=cancel_run_batches(conn_id="openai_default").deadline_callback(),
    ),
):

    @task
    def submit_and_wait() -> str:
        metadata = run_batch_metadata(get_current_context())
        request = {
            "input_file_id": "file-system-test",
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": metadata,
        }
        with OpenAIBatchHook("openai_default") as hook:
            response = hook.get_conn().post("/batches", json=request)
            response.raise_for_status()
            batch_id = response.json()["id"]
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
