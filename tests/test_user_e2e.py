"""A user's DAG, written as a user writes it, run with dag.test() against the emulator: the requests uploaded
with the official provider's ``OpenAIHook``, submitted with its ``OpenAITriggerBatchOperator``, a task fails,
and this provider's cancel operator cancels the batch and saves its results. ``remaining.jsonl`` must be
exactly the requests that never ran."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch.testing import BatchAPIEmulator
from tests.conftest import FAKE_API_KEY
from tests.test_e2e import dagbag, metadata_db, run_dag  # noqa: F401  (fixtures)

pytestmark = pytest.mark.e2e


def test_a_failed_run_cancels_its_batch_and_keeps_the_requests_that_never_ran(
    dagbag: Any,  # noqa: F811
    emulator: BatchAPIEmulator,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    # One connection for both providers, as the official one defines it: its hook reads host as the base URL.
    connection = {"conn_type": "openai", "host": emulator.base_url, "password": FAKE_API_KEY}
    monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", json.dumps(connection))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say something kind."}]}
    lines = [
        json.dumps({"custom_id": f"task-{n}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        for n in range(40)
    ]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    results = tmp_path / "results"

    state, states, xcoms = run_dag(
        dagbag, "user_upload_submit_cancel", {"input_path": str(requests), "results_dir": str(results)}
    )

    assert state == "success", "Airflow judges a run by its leaves, and the cancel task is the leaf"
    assert states == {
        "upload": "success",
        "submit": "success",
        "build_features": "failed",
        "cancel_batch": "success",
    }
    batch_id = xcoms[("submit", "return_value")]
    batch = emulator.batch(batch_id)
    assert batch["status"] == "cancelled"
    assert emulator.file_content(batch["input_file_id"]) == requests.read_bytes(), "uploaded as written"
    assert batch["request_counts"]["total"] == 40
    ran = {
        json.loads(line)["custom_id"]
        for file_id in (batch["output_file_id"], batch["error_file_id"])
        for line in emulator.file_content(file_id).splitlines()
    }
    assert 0 < len(ran) < 40, "cancelled on its way: some ran, some never did"
    never_ran = [line for line in lines if json.loads(line)["custom_id"] not in ran]
    saved = results / batch_id
    assert (saved / "remaining.jsonl").read_text() == "".join(line + "\n" for line in never_ran)
    assert (saved / "output.jsonl").read_bytes() == emulator.file_content(batch["output_file_id"])
    assert xcoms[("cancel_batch", "results")]["remaining"]["lines"] == len(never_ran)
