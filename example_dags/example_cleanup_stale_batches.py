"""Hourly cleanup: cancel the search team's batches still running a day after they were created.

Forgotten batches keep costing money. This DAG lists every batch, selects those still validating, in progress
or finalizing, created more than a day ago, with ``{"team": "search"}`` in their metadata, and cancels them,
waiting (deferred) for their partial results. Trigger it with ``{"dry_run": true}`` to see what it would cancel.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag

from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelStaleBatchesOperator

POLL_INTERVAL = float(os.environ.get("OPENAI_BATCH_POLL_INTERVAL", "30"))


@dag(
    dag_id="example_openai_batch_cleanup_stale_batches",
    schedule="@hourly",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["example", "openai"],
    # dry_run must render to a real boolean, not the string "False".
    render_template_as_native_obj=True,
    params={
        "dry_run": Param(False, type="boolean", description="Report what would be cancelled; cancel nothing.")
    },
)
def example_openai_batch_cleanup_stale_batches() -> None:
    OpenAICancelStaleBatchesOperator(
        task_id="cancel_stale_batches",
        older_than=timedelta(days=1),
        metadata={"team": "search"},
        dry_run="{{ params.dry_run }}",
        max_concurrency=8,
        deferrable=True,
        poll_interval=POLL_INTERVAL,
    )


example_openai_batch_cleanup_stale_batches()
