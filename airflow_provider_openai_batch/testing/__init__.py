"""Test your DAGs against a local emulator of the OpenAI Batch API instead of api.openai.com.

The emulator is a real HTTP server on loopback, so the provider's hooks, operators and deferrable triggers run
unchanged: no mocks, no network, no key, no cost. Seed batches, point a connection at the emulator, run the
DAG, then assert on what the API saw::

    # conftest.py
    pytest_plugins = ["airflow_provider_openai_batch.testing.pytest_plugin"]

    # test_my_dag.py
    import json

    from airflow_provider_openai_batch.testing import Fault


    def test_cancels_stale_batches(openai_batch_emulator, monkeypatch):
        batch = openai_batch_emulator.add_batch(metadata={"team": "search"})
        openai_batch_emulator.inject(Fault.rate_limited(retry_after=0.1))  # the first request gets a 429
        connection = {
            "conn_type": "openai_batch",
            "host": openai_batch_emulator.base_url,
            "password": openai_batch_emulator.api_key,
        }
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps(connection))

        my_dag.test()

        assert openai_batch_emulator.batch(batch["id"])["status"] == "cancelled"
        assert openai_batch_emulator.cancel_count(batch["id"]) == 1

Without pytest, use ``with BatchAPIEmulator() as emulator: ...``. When the code under test runs in other
processes (an Airflow scheduler, a triggerer), start the emulator with
``python -m airflow_provider_openai_batch.testing --port 0``, read the URL it prints, and steer it with
:class:`EmulatorControl`.
"""

from airflow_provider_openai_batch.testing._token_exchange import RecordedExchange, TokenExchange
from airflow_provider_openai_batch.testing.emulator import (
    DEFAULT_API_KEY,
    BatchAPIEmulator,
    EmulatorControl,
    Fault,
    RecordedRequest,
    seed_demo,
)

__all__ = [
    "DEFAULT_API_KEY",
    "BatchAPIEmulator",
    "EmulatorControl",
    "Fault",
    "RecordedExchange",
    "RecordedRequest",
    "TokenExchange",
    "seed_demo",
]
