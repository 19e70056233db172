"""The example DAGs: they parse cleanly without touching the network, and run green under dag.test()."""

from __future__ import annotations

import gc
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch.testing import BatchAPIEmulator
from tests.conftest import RESULTS_DIR
from tests.test_e2e import dagbag, metadata_db, run_dag  # noqa: F401  (fixtures)

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).parent.parent / "example_dags"
DAY = 86_400


@pytest.fixture
def examples(dagbag: Any) -> Any:  # noqa: F811
    return dagbag


def test_examples_parse_without_errors_warnings_or_network(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests._compat import DagBag

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("a DAG file opened a network connection at parse time")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    gc.collect()  # earlier tests' garbage must not raise its ResourceWarnings inside the parse below
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bag = DagBag(dag_folder=str(EXAMPLES))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == {
        "example_openai_batch_cancel_on_upstream_failure",
        "example_openai_batch_cancel_in_failure_callback",
        "example_openai_batch_cleanup_stale_batches",
    }
    assert bag.dags["example_openai_batch_cleanup_stale_batches"].catchup is False


def test_cancel_on_upstream_failure(
    examples: Any, emulator_connection: BatchAPIEmulator, monkeypatch
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    state, states, xcoms = run_dag(
        examples,
        "example_openai_batch_cancel_on_upstream_failure",
        {"batch_id": batch_id, "simulate_failure": True},
    )
    final = emulator_connection.batch(batch_id)
    assert state == "failed", "the run stays failed so alerting fires"
    assert states == {
        "receive_batch_id": "success",
        "build_features": "failed",
        "cancel_batch": "success",
        "use_partial_results": "success",
        "fail_run": "failed",
    }
    assert final["status"] == "cancelled"
    counts = final["request_counts"]
    never_ran = counts["total"] - counts["completed"] - counts["failed"]
    assert xcoms[("use_partial_results", "return_value")] == {
        "output": counts["completed"],
        "errors": counts["failed"],
        "remaining": never_ran,
    }
    results = xcoms[("cancel_batch", "results")]
    assert results["remaining"]["path"] == str(RESULTS_DIR / batch_id / "remaining.jsonl")
    assert sorted(path.name for path in (RESULTS_DIR / batch_id).iterdir()) == [
        "errors.jsonl",
        "output.jsonl",
        "remaining.jsonl",
    ]
    assert (RESULTS_DIR / batch_id / "output.jsonl").read_bytes() == emulator_connection.file_content(
        final["output_file_id"]
    )


def test_nothing_is_cancelled_when_nothing_fails(
    examples: Any, emulator_connection: BatchAPIEmulator
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    state, states, _ = run_dag(
        examples,
        "example_openai_batch_cancel_on_upstream_failure",
        {"batch_id": batch_id, "simulate_failure": False},
    )
    assert state == "success"
    assert states["cancel_batch"] == states["use_partial_results"] == states["fail_run"] == "skipped"
    assert emulator_connection.batch(batch_id)["status"] == "in_progress"
    assert emulator_connection.requests == []
    assert not (RESULTS_DIR / batch_id).exists()


def test_cancel_in_failure_callback(examples: Any, emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    state, states, _ = run_dag(
        examples,
        "example_openai_batch_cancel_in_failure_callback",
        {"batch_id": batch_id, "simulate_failure": True},
    )
    assert state == "failed"
    assert states == {"receive_batch_id": "success", "process_results": "failed"}
    assert emulator_connection.batch(batch_id)["status"] == "cancelling"
    assert emulator_connection.cancel_count(batch_id) >= 1


@pytest.mark.parametrize("dry_run", [True, False])
def test_cleanup_stale_batches(examples: Any, emulator_connection: BatchAPIEmulator, dry_run: bool) -> None:
    now = emulator_connection.batch(emulator_connection.add_batch(metadata={"team": "search"})["id"])[
        "created_at"
    ]
    stale = emulator_connection.add_batch(
        created_at=now - 3 * DAY, metadata={"team": "search", "purpose": "eval"}
    )["id"]
    other_team = emulator_connection.add_batch(created_at=now - 3 * DAY, metadata={"team": "ads"})["id"]
    done = emulator_connection.add_batch(
        created_at=now - 3 * DAY, status="completed", metadata={"team": "search"}
    )["id"]
    state, states, xcoms = run_dag(
        examples, "example_openai_batch_cleanup_stale_batches", {"dry_run": dry_run}
    )
    assert state == "success" and states == {"cancel_stale_batches": "success"}
    summary = xcoms[("cancel_stale_batches", "return_value")]
    assert summary["selected"] == [stale]
    assert emulator_connection.batch(other_team)["status"] == "in_progress"
    assert emulator_connection.batch(done)["status"] == "completed"
    if dry_run:
        assert summary["cancelled"] == [] and emulator_connection.batch(stale)["status"] == "in_progress"
    else:
        final = emulator_connection.batch(stale)
        assert final["status"] == "cancelled"
        assert summary["cancelled"] == [
            {
                "batch_id": stale,
                "status": "cancelled",
                "output_file_id": final["output_file_id"],
                "error_file_id": final["error_file_id"],
            }
        ]
