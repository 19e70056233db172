"""A DAG as a user writes one, run with dag.test() by tests/test_user_e2e.py: upload the requests and submit
them with the official OpenAI provider, then, when a task fails, cancel the batch with this provider and keep
what it paid for. The input file and the results folder come from dag_run.conf."""

from __future__ import annotations

import pendulum
from airflow.providers.openai.hooks.openai import OpenAIHook
from airflow.providers.openai.operators.openai import OpenAITriggerBatchOperator
from airflow.sdk import dag, get_current_context, task

from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator


@dag(
    dag_id="user_upload_submit_cancel",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    tags=["e2e"],
)
def user_upload_submit_cancel() -> None:
    @task
    def upload() -> str:
        requests = get_current_context()["dag_run"].conf["input_path"]
        return OpenAIHook(conn_id="openai_default").upload_file(requests, purpose="batch").id

    submit = OpenAITriggerBatchOperator(
        task_id="submit",
        file_id="{{ ti.xcom_pull(task_ids='upload') }}",
        endpoint="/v1/chat/completions",
        wait_for_completion=False,
        deferrable=False,
    )

    @task
    def build_features(batch_id: str) -> None:
        status = OpenAIHook(conn_id="openai_default").get_batch(batch_id).status
        raise RuntimeError(f"The feature build broke while batch {batch_id} was {status}.")

    cancel = OpenAICancelBatchOperator(
        task_id="cancel_batch",
        batch_id=submit.output,
        trigger_rule="one_failed",
        deferrable=True,
        poll_interval=0.2,
        timeout=60,
        save_results_to="{{ dag_run.conf['results_dir'] }}",
    )
    upload() >> submit
    [submit, build_features(submit.output)] >> cancel


user_upload_submit_cancel()
