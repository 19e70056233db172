"""Shared test set-up: an isolated AIRFLOW_HOME, the Batch API emulator, and connections pointing at it."""

from __future__ import annotations

import asyncio
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
for _dag_file in [
    *(Path(__file__).parent / "dags").glob("*.py"),
    *(Path(__file__).parents[1] / "example_dags").glob("*.py"),
]:
    (DAGS_FOLDER / _dag_file.name).symlink_to(_dag_file)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_FOLDER)
os.environ.pop("AIRFLOW_CONN_OPENAI_DEFAULT", None)
os.environ["OPENAI_BATCH_POLL_INTERVAL"] = "0.2"  # the example DAGs poll every 30 s by default
RESULTS_DIR = _AIRFLOW_HOME / "results"  # where the example DAG saves partial results
os.environ["OPENAI_BATCH_RESULTS_DIR"] = str(RESULTS_DIR)

import pytest

from airflow_provider_openai_batch.hooks import _rate
from airflow_provider_openai_batch.hooks._retry import RetryPolicy
from airflow_provider_openai_batch.testing import BatchAPIEmulator

#: Recognisable fake key: the secret-leak tests look for it everywhere.
FAKE_API_KEY = "sk-test-SECRET-4f1d9c2b7a6e"
#: Retries that keep the real policy's shape but take milliseconds.
FAST_RETRIES = RetryPolicy(
    max_retries=3, initial_delay=0.01, max_delay=0.05, max_retry_after=1.0, rate_limit_patience=0.5
)


def pytest_report_header() -> str:
    """Name the Airflow under test and where the provider comes from: `make test-compat` runs this suite once
    per Airflow line, against the installed wheel."""
    import airflow

    import airflow_provider_openai_batch

    return (
        f"Airflow {airflow.__version__}; provider from {Path(airflow_provider_openai_batch.__file__).parent}"
    )


@pytest.fixture(autouse=True)
def fresh_rate_governors() -> Iterator[None]:
    """Every test starts as a new process does, with no rate limit learnt: the governors are per process, and
    one test's 429s would otherwise pace the next test's requests."""
    yield
    _rate._governors.clear()


@pytest.fixture
def emulator() -> Iterator[BatchAPIEmulator]:
    with BatchAPIEmulator(api_key=FAKE_API_KEY, cancel_after_polls=2) as server:
        yield server


@pytest.fixture
def set_connection(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Define an Airflow connection through its ``AIRFLOW_CONN_*`` environment variable."""

    def define(conn_id: str = "openai_default", **fields: object) -> None:
        monkeypatch.setenv(
            f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "openai_batch", **fields})
        )

    return define


@pytest.fixture
def emulator_connection(emulator: BatchAPIEmulator, set_connection: Callable[..., None]) -> BatchAPIEmulator:
    """``openai_default`` pointing at the emulator with the fake key."""
    set_connection(password=FAKE_API_KEY, host=emulator.base_url)
    return emulator


@pytest.fixture
def connection_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the connections the hooks look up, sync or async, as they happen.

    A synchronous lookup is what Airflow 3.0 to 3.3.1 must do for an async caller too (through common-compat, in
    a worker thread); made on a thread that runs an event loop, it fails the test: it would block the loop.
    """
    from airflow_provider_openai_batch.hooks import openai_batch as hook_module

    lookups: list[str] = []
    sync_lookup = hook_module.OpenAIBatchHook.get_connection
    async_lookup = hook_module.get_async_connection

    def guarded_sync_lookup(conn_id: str) -> object:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return sync_lookup(conn_id)
        raise AssertionError(f"connection {conn_id!r} looked up synchronously on the event loop")

    async def counted_async_lookup(conn_id: str, **kwargs: object) -> object:
        lookups.append(conn_id)
        return await async_lookup(conn_id, **kwargs)

    monkeypatch.setattr(hook_module.OpenAIBatchHook, "get_connection", staticmethod(guarded_sync_lookup))
    monkeypatch.setattr(hook_module, "get_async_connection", counted_async_lookup)
    return lookups
