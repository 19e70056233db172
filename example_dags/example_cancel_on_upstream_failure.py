"""Cancel an OpenAI batch as soon as anything beside it fails, and use its partial results.

A batch was submitted (here its id arrives as the ``batch_id`` param: swap ``receive_batch_id`` for your own
submitting task). Work that needs the batch runs beside it. If any of it fails, the batch's results are no
longer wanted: ``cancel_batch`` (``trigger_rule="one_failed"``) cancels it and waits in the triggerer, holding
no worker slot, until OpenAI reports it ``cancelled``; ``use_partial_results`` then gets the output file with
whatever the batch had finished. ``fail_run`` keeps the run marked failed, so alerting still fires.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import Param, dag, task

from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator

#: Seconds between status polls; the demo shortens it for the emulator.
POLL_INTERVAL = float(os.environ.get("OPENAI_BATCH_POLL_INTERVAL", "30"))


@dag(
    dag_id="example_openai_batch_cancel_on_upstream_failure",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    tags=["example", "openai"],
    params={
        "batch_id": Param("batch_abc123", type="string", description="The batch to cancel if the run fails."),
        "simulate_failure": Param(True, type="boolean", description="Make build_features fail."),
    },
)
def example_openai_batch_cancel_on_upstream_failure() -> None:
    @task
    def receive_batch_id(params: dict) -> str:
        return params["batch_id"]

    @task(retries=0)
    def build_features(params: dict) -> None:
        if params["simulate_failure"]:
            raise RuntimeError("Feature build failed: the batch's results are no longer needed.")

    batch_id = receive_batch_id()
    features = build_features()

    cancel_batch = OpenAICancelBatchOperator(
        task_id="cancel_batch",
        batch_id=batch_id,
        trigger_rule="one_failed",
        deferrable=True,
        poll_interval=POLL_INTERVAL,
    )

    @task
    def use_partial_results(output_file_id: str, batch: dict) -> str:
        counts = batch.get("request_counts") or {}
        print(f"Partial results in {output_file_id}: {counts.get('completed')} of {counts.get('total')} requests done.")
        return output_file_id

    @task(trigger_rule="one_failed", retries=0)
    def fail_run() -> None:
        raise RuntimeError("An upstream task failed; the batch was cancelled.")

    [batch_id, features] >> cancel_batch
    use_partial_results("{{ ti.xcom_pull(task_ids='cancel_batch', key='output_file_id') }}", cancel_batch.output)
    features >> fail_run()


example_openai_batch_cancel_on_upstream_failure()
