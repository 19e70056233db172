"""Provider metadata read by Airflow's ProvidersManager through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_provider_openai_batch import __version__
from airflow_provider_openai_batch.hooks._connection_form import EXTRA_FIELDS, provider_info_behaviour

PACKAGE_NAME = "airflow-provider-openai-batch"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": PACKAGE_NAME,
        "name": "OpenAI Batch",
        "description": "Cancel `OpenAI Batch API <https://platform.openai.com/docs/api-reference/batch>`__ jobs "
        "from Airflow, wait, deferrably, for their partial results, and save them with the requests that never "
        "ran.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "OpenAI Batch",
                "external-doc-url": "https://platform.openai.com/docs/api-reference/batch",
                "tags": ["software"],
            }
        ],
        "hooks": [
            {
                "integration-name": "OpenAI Batch",
                "python-modules": ["airflow_provider_openai_batch.hooks.openai_batch"],
            }
        ],
        "operators": [
            {
                "integration-name": "OpenAI Batch",
                "python-modules": ["airflow_provider_openai_batch.operators.openai_batch"],
            }
        ],
        "triggers": [
            {
                "integration-name": "OpenAI Batch",
                "python-modules": ["airflow_provider_openai_batch.triggers.openai_batch"],
            }
        ],
        "connection-types": [
            {
                "connection-type": "openai_batch",
                "hook-class-name": "airflow_provider_openai_batch.hooks.openai_batch.OpenAIBatchHook",
                "hook-name": "OpenAI Batch",
                "ui-field-behaviour": provider_info_behaviour(),
                "conn-fields": EXTRA_FIELDS,
            }
        ],
    }
