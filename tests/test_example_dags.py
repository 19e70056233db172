"""The example DAGs: they parse cleanly without touching the network, and run green under dag.test()."""

from __future__ import annotations

import gc
import json
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
from airflow import __version__ as airflow_version
from packaging.version import Version

from airflow_provider_openai_batch.callbacks import cancel_run_batches
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.testing import BatchAPIEmulator
from tests._guards import private_emulator  # noqa: F401  (fixture)
from tests.conftest import RESULTS_DIR
from tests.test_e2e import dagbag, metadata_db, run_dag  # noqa: F401  (fixtures)
from tests.test_run_batches import (  # noqa: F401  (api: a fixture)
    api,
    fire_deadline_callback,
    seed_run_batch,
    tags,
)

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
        "example_openai_batch_cancel_on_deadline",
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


#: Airflow versions whose dag.test() raises at the end of a successful run of a DAG with a deadline alert,
#: when it prunes the run's deadlines: 3.2 to 3.3.2 pass a serialized alert where its id is expected
#: (apache/airflow#73428); 3.1 compares the run's end date before dag.test() has set it.
DAG_TEST_CRASHES_ON_SUCCESS_WITH_A_DEADLINE = Version("3.1") <= Version(airflow_version) <= Version("3.3.2")


def run_batches(emulator: BatchAPIEmulator, dag_id: str) -> list[dict[str, Any]]:
    """The batches the emulator holds that a run of ``dag_id`` created (by their tags)."""
    with OpenAIBatchHook() as hook:
        batches = [batch.to_xcom() for batch in hook.list_batches()]
    return [batch for batch in batches if (batch["metadata"] or {}).get("airflow_dag_id") == dag_id]


@pytest.mark.parametrize("fail_at", ["after_submit", "processing"])
def test_cancel_on_deadline_cancels_the_runs_batch_when_it_fails(
    examples: Any, emulator_connection: BatchAPIEmulator, fail_at: str
) -> None:
    """Even when the submit task died before saving the batch id ("after_submit"): the tags find it."""
    dag_id = "example_openai_batch_cancel_on_deadline"
    other_run = emulator_connection.add_batch(metadata={"airflow_dag_id": dag_id, "airflow_run_id": "other"})
    state, states, xcoms = run_dag(examples, dag_id, {"input_file_id": "file-in-1", "fail_at": fail_at})

    assert state == "failed"
    [batch] = [b for b in run_batches(emulator_connection, dag_id) if b["id"] != other_run["id"]]
    assert batch["status"] == "cancelling"
    assert batch["input_file_id"] == "file-in-1"
    assert batch["metadata"]["airflow_task_id"] == "submit_batch"
    assert batch["metadata"]["purpose"] == "example"
    if fail_at == "after_submit":
        assert states == {"submit_batch": "failed", "process_results": "upstream_failed"}
        assert ("submit_batch", "return_value") not in xcoms, "no id was saved, yet the batch was found"
    else:
        assert states == {"submit_batch": "success", "process_results": "failed"}
    assert emulator_connection.cancel_count(batch["id"]) == 1
    assert emulator_connection.batch(other_run["id"])["status"] == "in_progress", "another run's batch"


def test_cancel_on_deadline_cancels_nothing_when_the_run_succeeds(
    examples: Any, emulator_connection: BatchAPIEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    dag_id = "example_openai_batch_cancel_on_deadline"
    if DAG_TEST_CRASHES_ON_SUCCESS_WITH_A_DEADLINE:
        # dag.test() never fires a deadline: only its pruning at success would run, and that raises there.
        # test_cancel_on_deadline_has_a_deadline_alert_where_airflow_has_them checks this DAG's deadline.
        monkeypatch.setattr(examples.get_dag(dag_id), "deadline", None)
    request = {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    file_id = emulator_connection.add_file(json.dumps(request) + "\n")["id"]
    state, states, xcoms = run_dag(examples, dag_id, {"input_file_id": file_id, "fail_at": "nowhere"})
    assert state == "success" and set(states.values()) == {"success"}
    assert emulator_connection.batch(xcoms[("submit_batch", "return_value")])["status"] == "validating"
    assert [r.method for r in emulator_connection.requests if r.path.endswith("/cancel")] == []


def test_cancel_on_deadline_has_a_deadline_alert_where_airflow_has_them(
    examples: Any,
    api: BatchAPIEmulator,  # noqa: F811
) -> None:
    """Airflow >= 3.1: the DAG's deadline alert, stored as Airflow stores it and fired as the triggerer fires
    it, cancels the run's batches and leaves the others alone. Airflow 3.0 has no deadline alerts: the DAG has
    none, and its failure callback alone covers the run."""
    dag = examples.get_dag("example_openai_batch_cancel_on_deadline")
    assert isinstance(dag.on_failure_callback, cancel_run_batches)
    if airflow_version.startswith("3.0."):
        assert getattr(dag, "deadline", None) is None
        return
    [alert] = dag.deadline
    ours, other_run = seed_run_batch(api), seed_run_batch(api, metadata=tags(run_id="manual__other"))

    events = fire_deadline_callback(alert.callback.serialize())

    assert events[-1]["state"] == "success", events
    assert (api.batch(ours)["status"], api.batch(other_run)["status"]) == ("cancelling", "in_progress")
