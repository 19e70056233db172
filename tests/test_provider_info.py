"""Registration with Airflow's ProvidersManager, as `airflow providers ...` sees it."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from airflow_provider_openai_batch.get_provider_info import PACKAGE_NAME, get_provider_info
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook


def airflow_cli(*args: str) -> str:
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run([str(airflow), *args], capture_output=True, text=True, env=os.environ, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_provider_info_matches_the_distribution() -> None:
    info = get_provider_info()
    assert info["package-name"] == PACKAGE_NAME == "airflow-provider-openai-batch"
    [entry] = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airflow_provider_openai_batch")]
    assert entry.load() is get_provider_info
    [conn] = info["connection-types"]
    assert conn["connection-type"] == OpenAIBatchHook.conn_type == "openai_batch"
    assert conn["hook-name"] == OpenAIBatchHook.hook_name == "OpenAI Batch"


def test_airflow_cli_lists_the_provider_and_its_hook() -> None:
    assert "airflow-provider-openai-batch" in airflow_cli("providers", "list", "--output", "plain")
    hooks = airflow_cli("providers", "hooks", "--output", "plain")
    assert "openai_batch" in hooks and "OpenAIBatchHook" in hooks


def test_the_api_server_builds_the_connection_form() -> None:
    """The form as the UI receives it, from the API server's own hook metadata: Airflow 3.2 and later build it
    from the provider info, 3.0 and 3.1 from the hook's WTForms fields."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    [meta] = [meta for meta in HookMetaService.hook_meta_data() if meta.connection_type == "openai_batch"]
    assert meta.hook_name == "OpenAI Batch"
    standard = meta.standard_fields
    assert (standard.password.title, standard.host.title) == ("API Key", "Base URL")
    assert standard.host.placeholder == "https://api.openai.com/v1"
    assert standard.login.hidden and standard.port.hidden and standard.url_schema.hidden
    extras = meta.extra_fields
    assert {name: field["schema"]["title"] for name, field in extras.items()} == {
        "organization": "Organization",
        "project": "Project",
        "api_type": "API type",
        "api_version": "API version",
        "timeout": "Timeout (seconds)",
        "max_retries": "Max retries",
    }
    assert extras["api_type"]["schema"]["enum"] == ["openai", "azure"]
    assert "null" in extras["timeout"]["schema"]["type"], "every extra is optional"
    assert "Default: 60" in extras["timeout"]["description"]
    assert "Default: 3" in extras["max_retries"]["description"]
