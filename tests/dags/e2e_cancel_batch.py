"""DAGs run with dag.test() by tests/test_e2e.py; batch ids (and the templated fields' values) come from
dag_run.conf."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context, task

from airflow_provider_openai_batch.callbacks import cancel_batch_on_failure
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAICancelBatchOperator,
    OpenAICancelStaleBatchesOperator,
)

START = pendulum.datetime(2024, 1, 1, tz="UTC")


def conf(key: str) -> Any:
    return get_current_context()["dag_run"].conf[key]


def cancel_and_collect(dag_id: str, *, deferrable: bool) -> None:
    @dag(dag_id=dag_id, schedule=None, start_date=START, catchup=False, tags=["e2e"])
    def build() -> None:
        @task
        def submit() -> dict[str, Any]:
            # Shaped like what a submitting operator returns: the whole batch, with its id under "id".
            return {"id": conf("batch_id"), "object": "batch"}

        cancel = OpenAICancelBatchOperator(
            task_id="cancel", batch_id=submit(), deferrable=deferrable, poll_interval=0.2, timeout=60
        )

        @task
        def collect(output_file_id: str, batch: dict[str, Any]) -> dict[str, Any]:
            return {"output_file_id": output_file_id, "status": batch["status"]}

        collect("{{ ti.xcom_pull(task_ids='cancel', key='output_file_id') }}", cancel.output)

    build()


cancel_and_collect("e2e_cancel_deferrable", deferrable=True)
cancel_and_collect("e2e_cancel_blocking", deferrable=False)


@dag(dag_id="e2e_cancel_mapped", schedule=None, start_date=START, catchup=False, tags=["e2e"])
def cancel_mapped() -> None:
    @task
    def submit_many() -> list[str]:
        return conf("batch_ids")

    OpenAICancelBatchOperator.partial(task_id="cancel", deferrable=True, poll_interval=0.2).expand(
        batch_id=submit_many()
    )


cancel_mapped()


@dag(dag_id="e2e_failure_callback", schedule=None, start_date=START, catchup=False, tags=["e2e"])
def failure_callback() -> None:
    @task
    def submit() -> str:
        return conf("batch_id")

    @task(on_failure_callback=cancel_batch_on_failure(xcom_task_id="submit"), retries=0)
    def build_features(batch_id: str) -> None:
        raise RuntimeError(f"feature build failed while batch {batch_id} was running")

    build_features(submit())


failure_callback()


@dag(
    dag_id="e2e_templated_fields",
    schedule=None,
    start_date=START,
    catchup=False,
    tags=["e2e"],
    render_template_as_native_obj=True,  # dry_run must render to a boolean
)
def templated_fields() -> None:
    """Every templated field of both operators, rendered by Airflow from the run's conf."""
    results_dir = "{{ dag_run.conf['results_dir'] }}"
    OpenAICancelBatchOperator(
        task_id="cancel",
        batch_id="{{ dag_run.conf['batch_id'] }}",
        conn_id="{{ dag_run.conf['conn_id'] }}",
        save_results_to=f"{results_dir}/cancel",
        deferrable=True,  # rendered again when the task resumes to save the results
        poll_interval=0.2,
        timeout=60,
    ) >> OpenAICancelStaleBatchesOperator(
        task_id="cleanup",
        older_than=timedelta(0),
        conn_id="{{ dag_run.conf['conn_id'] }}",
        metadata={"team": "{{ dag_run.conf['team'] }}"},
        created_after="{{ dag_run.conf['created_after'] }}",
        dry_run="{{ dag_run.conf['dry_run'] }}",
        save_results_to=f"{results_dir}/cleanup",
        poll_interval=0.2,
        timeout=60,
    )


templated_fields()
