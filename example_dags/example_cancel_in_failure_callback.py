"""Cancel an OpenAI batch from failure callbacks, at task and DAG level.

When the task that consumes the batch fails, its ``on_failure_callback`` cancels the batch right away, without
waiting (callbacks must be quick). The DAG-level callback does the same when the run fails, whichever task
failed; cancelling twice is harmless. Neither callback ever raises, so the original failure stays visible.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from airflow_provider_openai_batch.callbacks import cancel_batch_on_failure

cancel_submitted_batch = cancel_batch_on_failure(xcom_task_id="receive_batch_id")


@dag(
    dag_id="example_openai_batch_cancel_in_failure_callback",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "openai"],
    on_failure_callback=cancel_submitted_batch,
    params={
        "batch_id": Param("batch_abc123", type="string", description="The batch to cancel if the run fails."),
        "simulate_failure": Param(True, type="boolean", description="Make process_results fail."),
    },
)
def example_openai_batch_cancel_in_failure_callback() -> None:
    @task
    def receive_batch_id(params: dict) -> str:
        return params["batch_id"]

    @task(on_failure_callback=cancel_submitted_batch, retries=0)
    def process_results(batch_id: str, params: dict) -> None:
        if params["simulate_failure"]:
            raise RuntimeError(f"Processing failed; batch {batch_id} is no longer needed.")

    process_results(receive_batch_id())


example_openai_batch_cancel_in_failure_callback()
