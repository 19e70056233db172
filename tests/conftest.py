"""Shared test set-up: an isolated AIRFLOW_HOME, the Batch API emulator, and connections pointing at it."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

# Before anything imports Airflow: never touch the developer's ~/airflow.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="openai-batch-tests-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# dag.test() only runs DAGs whose files sit in the DAGs folder: gather the test DAGs and the examples there.
DAGS_FOLDER = _AIRFLOW_HOME / "dags"
DAGS_FOLDER.mkdir()
for _dag_file in [*(Path(__file__).parent / "dags").glob("*.py"), *(Path(__file__).parents[1] / "example_dags").glob("*.py")]:
    (DAGS_FOLDER / _dag_file.name).symlink_to(_dag_file)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_FOLDER)
os.environ.pop("AIRFLOW_CONN_OPENAI_DEFAULT", None)
os.environ["OPENAI_BATCH_POLL_INTERVAL"] = "0.2"  # the example DAGs poll every 30 s by default

import pytest  # noqa: E402

from airflow_provider_openai_batch.hooks._retry import RetryPolicy  # noqa: E402
from airflow_provider_openai_batch.testing import BatchAPIEmulator  # noqa: E402

#: Recognisable fake key: the secret-leak tests look for it everywhere.
FAKE_API_KEY = "sk-test-SECRET-4f1d9c2b7a6e"
#: Retries that keep the real policy's shape but take milliseconds.
FAST_RETRIES = RetryPolicy(max_retries=3, initial_delay=0.01, max_delay=0.05, max_retry_after=1.0)


@pytest.fixture
def emulator() -> Iterator[BatchAPIEmulator]:
    with BatchAPIEmulator(api_key=FAKE_API_KEY, cancel_after_polls=2) as server:
        yield server


@pytest.fixture
def set_connection(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Define an Airflow connection through its ``AIRFLOW_CONN_*`` environment variable."""

    def define(conn_id: str = "openai_default", **fields: object) -> None:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "openai_batch", **fields}))

    return define


@pytest.fixture
def emulator_connection(emulator: BatchAPIEmulator, set_connection: Callable[..., None]) -> BatchAPIEmulator:
    """``openai_default`` pointing at the emulator with the fake key."""
    set_connection(password=FAKE_API_KEY, host=emulator.base_url)
    return emulator
