"""DAGs for the system tests of the OpenAI Batch provider; batch ids come from the run's ``conf``."""

from __future__ import annotations

from typing import Any

from airflow.sdk import DAG, task

from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator

DEFAULT_ARGS = {"retries": 0}

# An upstream task fails; the batch it was feeding is cancelled and its partial results reach a downstream task.
with DAG(
    "system_openai_batch_cancel_on_upstream_failure",
    schedule=None,
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["system-test"],
):

    @task
    def submit(**context: Any) -> str:
        """Stands for the task that submitted the batch: its id comes from the run's conf."""
        return context["dag_run"].conf["batch_id"]

    @task
    def process_results() -> None:
        raise RuntimeError("Simulated failure of the task consuming the batch.")

    @task
    def collect_partial_results(output_file_id: str, status: str) -> dict[str, str]:
        if not output_file_id or output_file_id == "None":
            raise ValueError(f"No output file id reached the downstream task: {output_file_id!r}")
        return {"output_file_id": output_file_id, "status": status}

    batch = submit()
    failing = process_results()
    cancel = OpenAICancelBatchOperator(
        task_id="cancel",
        batch_id=batch,
        trigger_rule="one_failed",
        deferrable=True,
        poll_interval=1,
        timeout=300,
    )
    batch >> failing >> cancel
    cancel >> collect_partial_results(
        "{{ ti.xcom_pull(task_ids='cancel', key='output_file_id') }}",
        "{{ ti.xcom_pull(task_ids='cancel', key='status') }}",
    )

# One cancellation, its id templated from conf: for the triggerer-restart and stored-kwargs scenarios.
with DAG(
    "system_openai_batch_cancel_one",
    schedule=None,
    catchup=False,
    default_args=DEFAULT_ARGS,
    tags=["system-test"],
):
    cancel_one = OpenAICancelBatchOperator(
        task_id="cancel",
        batch_id="{{ dag_run.conf['batch_id'] }}",
        deferrable=True,
        poll_interval=1,
        timeout=600,
    )

    @task
    def report(output_file_id: str) -> str:
        return output_file_id

    cancel_one >> report("{{ ti.xcom_pull(task_ids='cancel', key='output_file_id') }}")

# Many deferred cancellations at once: one mapped task instance per batch id in conf; with the key (scenario 3),
# and with the workload identity connection (scenario 9).
for dag_id, conn_id in (
    ("system_openai_batch_cancel_many", "openai_default"),
    ("system_openai_batch_cancel_many_workload_identity", "openai_workload_identity"),
):
    with DAG(
        dag_id,
        schedule=None,
        catchup=False,
        default_args=DEFAULT_ARGS,
        max_active_tasks=256,
        tags=["system-test"],
    ):

        @task
        def batch_ids(**context: Any) -> list[str]:
            return list(context["dag_run"].conf["batch_ids"])

        OpenAICancelBatchOperator.partial(
            task_id="cancel", conn_id=conn_id, deferrable=True, poll_interval=2, timeout=600
        ).expand(batch_id=batch_ids())

# The distributed scenario: many deferred cancellations shared by two triggerers, polls spaced out so that 200
# waits stay within an API limit of 10 requests/s, and every output file id handed to one downstream task.
with DAG(
    "system_openai_batch_cancel_distributed",
    schedule=None,
    catchup=False,
    default_args=DEFAULT_ARGS,
    max_active_tasks=256,
    tags=["system-test"],
):

    @task
    def distributed_batch_ids(**context: Any) -> list[str]:
        return list(context["dag_run"].conf["batch_ids"])

    cancelled = OpenAICancelBatchOperator.partial(
        task_id="cancel", deferrable=True, poll_interval=30, timeout=1200
    ).expand(batch_id=distributed_batch_ids())

    @task
    def output_file_ids(batches: list[dict[str, Any]]) -> list[str]:
        return [batch["output_file_id"] for batch in batches]

    output_file_ids(cancelled.output)
