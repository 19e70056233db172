"""Provider metadata read by Airflow's ProvidersManager through the ``apache_airflow_provider`` entry point."""

from __future__ import annotations

from typing import Any

from airflow_provider_openai_batch import __version__

PACKAGE_NAME = "airflow-provider-openai-batch"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": PACKAGE_NAME,
        "name": "OpenAI Batch",
        "description": "Cancel `OpenAI Batch API <https://platform.openai.com/docs/api-reference/batch>`__ jobs "
        "from Airflow and wait, deferrably, for their partial results.",
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
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login"],
                    "relabeling": {"password": "API Key", "host": "Base URL"},
                    "placeholders": {"host": "https://api.openai.com/v1"},
                },
                "conn-fields": {
                    "organization": {
                        "label": "Organization",
                        "schema": {"type": ["string", "null"]},
                        "description": "Sent as the OpenAI-Organization header.",
                    },
                    "project": {
                        "label": "Project",
                        "schema": {"type": ["string", "null"]},
                        "description": "Sent as the OpenAI-Project header.",
                    },
                    "api_type": {
                        "label": "API type",
                        "schema": {"type": ["string", "null"], "enum": ["openai", "azure", None]},
                        "description": "'azure' sends the key as an api-key header (Azure OpenAI).",
                    },
                    "api_version": {
                        "label": "API version",
                        "schema": {"type": ["string", "null"]},
                        "description": "Azure OpenAI api-version query parameter.",
                    },
                    "timeout": {
                        "label": "Timeout (seconds)",
                        "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "schema": {"type": ["integer", "null"], "minimum": 0},
                    },
                },
            }
        ],
    }
