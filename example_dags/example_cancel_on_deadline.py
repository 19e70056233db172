"""Cancel every batch a DAG run started, with no batch id kept: when the run fails, or when it runs late.

A nightly run submits a batch whose results are due six hours after the run's scheduled time (its logical
date). The submit task tags the batch with the run (``run_batch_metadata``). When the run fails, the DAG's
``on_failure_callback`` cancels every batch so tagged that is still running, even one whose id never reached
XCom: trigger with ``{"fail_at": "after_submit"}`` to see a submit task die right after OpenAI accepted its
batch. When the run is still going at the deadline, a deadline alert runs the same callable in the
triggerer, on the async hook: the results are late, so stop paying for them.

Deadline alerts came in Airflow 3.1. On Airflow 3.0 this DAG has no deadline, and the failure callback alone
covers the run. The deadline counts from the logical date, so trigger manual runs with one.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from airflow_provider_openai_batch.callbacks import cancel_run_batches, run_batch_metadata
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

try:  # Airflow >= 3.2
    from airflow.sdk import DeadlineAlert, DeadlineReference
except ImportError:
    try:  # Airflow 3.1
        from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference
    except ImportError:  # Airflow 3.0: no deadline alerts
        DeadlineAlert = DeadlineReference = None

CONN_ID = "openai_default"
cancel_this_runs_batches = cancel_run_batches(conn_id=CONN_ID)

results_due = (
    {}
    if DeadlineAlert is None
    else {
        "deadline": DeadlineAlert(
            reference=DeadlineReference.DAGRUN_LOGICAL_DATE,
            interval=timedelta(hours=6),
            callback=cancel_this_runs_batches.deadline_callback(),
        )
    }
)


@dag(
    dag_id="example_openai_batch_cancel_on_deadline",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "openai"],
    on_failure_callback=cancel_this_runs_batches,
    params={
        "input_file_id": Param("file-abc123", type="string", description="The uploaded JSONL of requests."),
        "fail_at": Param(
            "nowhere",
            enum=["nowhere", "after_submit", "processing"],
            description="Fail right after the batch is created (before its id is saved), or later.",
        ),
    },
    **results_due,
)
def example_openai_batch_cancel_on_deadline() -> None:
    @task(retries=0)
    def submit_batch(params: dict) -> str:
        """Create the batch, tagged with this run.

        Any create call does: the official provider's ``OpenAIHook.create_batch(..., metadata=...)`` or the
        ``openai`` client's ``batches.create(..., metadata=...)``. This one sends it with the provider's
        connection, so that the example runs unchanged against the API and the emulator.
        """
        metadata = run_batch_metadata(get_current_context(), purpose="example")
        request = {
            "input_file_id": params["input_file_id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": metadata,
        }
        with OpenAIBatchHook(CONN_ID) as hook:
            response = hook.get_conn().post("/batches", json=request)
        response.raise_for_status()
        batch_id = response.json()["id"]
        if params["fail_at"] == "after_submit":
            raise RuntimeError(f"The worker died once OpenAI accepted batch {batch_id}, before saving it.")
        return batch_id

    @task(retries=0)
    def process_results(batch_id: str, params: dict) -> str:
        """A real pipeline waits for the batch here, then processes its output."""
        if params["fail_at"] == "processing":
            raise RuntimeError(f"Processing failed; batch {batch_id} is no longer needed.")
        return batch_id

    process_results(submit_batch())


example_openai_batch_cancel_on_deadline()
