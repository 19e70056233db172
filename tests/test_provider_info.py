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
    assert set(conn["conn-fields"]) == {"organization", "project", "api_type", "api_version", "timeout", "max_retries"}
    assert conn["ui-field-behaviour"]["relabeling"] == {"password": "API Key", "host": "Base URL"}


def test_airflow_cli_lists_the_provider_and_its_hook() -> None:
    assert "airflow-provider-openai-batch" in airflow_cli("providers", "list", "--output", "plain")
    hooks = airflow_cli("providers", "hooks", "--output", "plain")
    assert "openai_batch" in hooks and "OpenAIBatchHook" in hooks
