"""Cancel an OpenAI batch as soon as anything beside it fails, and keep what it already paid for.

A batch was submitted (here its id arrives as the ``batch_id`` param: swap ``receive_batch_id`` for your own
submitting task). Work that needs the batch runs beside it. If any of it fails, the batch's results are no
longer wanted: ``cancel_batch`` (``trigger_rule="one_failed"``) cancels it and waits in the triggerer, holding
no worker slot, until OpenAI reports it ``cancelled``. Back on a worker, it saves the batch's partial results to
``RESULTS_DIR/<batch_id>/``: ``output.jsonl`` (the requests that ran), ``errors.jsonl`` (those that failed) and
``remaining.jsonl`` (those that never ran, ready to be submitted again as they are). ``use_partial_results``
reads them through the manifest ``cancel_batch`` pushes as the XCom ``results``. ``fail_run`` keeps the run marked
failed, so alerting still fires.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

from airflow_provider_openai_batch.operators.openai_batch import XCOM_RESULTS_KEY, OpenAICancelBatchOperator

#: Seconds between status polls; the demo shortens it for the emulator.
POLL_INTERVAL = float(os.environ.get("OPENAI_BATCH_POLL_INTERVAL", "30"))
#: Where partial results are saved: any local folder, or object storage such as "s3://bucket/openai-batches".
RESULTS_DIR = os.environ.get(
    "OPENAI_BATCH_RESULTS_DIR", str(Path(tempfile.gettempdir()) / "openai-batch-results")
)


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
        save_results_to=RESULTS_DIR,
    )

    @task
    def use_partial_results(**context: Any) -> dict[str, int]:
        """Count what was saved, and read the requests still to run from remaining.jsonl."""
        results = context["ti"].xcom_pull(task_ids="cancel_batch", key=XCOM_RESULTS_KEY)
        counts = {name: (results[name] or {}).get("lines", 0) for name in ("output", "errors")}
        to_resubmit = []
        if results["remaining"]:  # None only if the batch's input file is gone
            # A local folder here; for object storage, open ObjectStoragePath(path) instead.
            with open(results["remaining"]["path"], "rb") as remaining:
                to_resubmit = [json.loads(line)["custom_id"] for line in remaining if line.strip()]
        print(
            f"Batch {results['batch_id']}: {counts['output']} results and {counts['errors']} errors saved; "
            f"{len(to_resubmit)} requests never ran (first: {to_resubmit[:3]}). Submit remaining.jsonl to run them."
        )
        return {**counts, "remaining": len(to_resubmit)}

    @task(trigger_rule="one_failed", retries=0)
    def fail_run() -> None:
        raise RuntimeError("An upstream task failed; the batch was cancelled.")

    [batch_id, features] >> cancel_batch >> use_partial_results()
    features >> fail_run()


example_openai_batch_cancel_on_upstream_failure()
