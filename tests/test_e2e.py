"""Real DAG runs with dag.test() on a SQLite metadata DB made by `airflow db migrate`, against the emulator."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch.testing import BatchAPIEmulator
from tests.conftest import DAGS_FOLDER, FAKE_API_KEY

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def metadata_db() -> None:
    """Migrate the SQLite metadata DB of the session's AIRFLOW_HOME, as a user would."""
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run(
        [str(airflow), "db", "migrate"],
        check=False,
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def dagbag(metadata_db: None) -> Any:
    from tests._compat import DagBag

    bag = DagBag(dag_folder=str(DAGS_FOLDER))
    assert bag.import_errors == {}
    return bag


def run_dag(
    dagbag: Any, dag_id: str, conf: dict[str, Any]
) -> tuple[str, dict[str, str], dict[tuple[str, str], Any]]:
    """Run a DAG with dag.test(); return the run's state, its task states and its XComs."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    run = dagbag.get_dag(dag_id).test(run_conf=conf)
    states = {
        f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: ti.state
        for ti in run.get_task_instances()
    }
    with create_session() as session:
        rows = (
            session.query(XComModel).filter(XComModel.dag_id == dag_id, XComModel.run_id == run.run_id).all()
        )
        xcoms = {
            (row.task_id if row.map_index < 0 else f"{row.task_id}[{row.map_index}]", row.key): row.value
            for row in rows
        }
    return run.state, states, xcoms


@pytest.mark.parametrize("dag_id", ["e2e_cancel_deferrable", "e2e_cancel_blocking"])
def test_cancel_and_hand_partial_results_downstream(
    dagbag: Any, emulator_connection: BatchAPIEmulator, dag_id: str
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    state, states, xcoms = run_dag(dagbag, dag_id, {"batch_id": batch_id})
    final = emulator_connection.batch(batch_id)
    assert state == "success", states
    assert states == {"submit": "success", "cancel": "success", "collect": "success"}
    assert final["status"] == "cancelled" and final["output_file_id"]
    assert xcoms[("cancel", "batch_id")] == batch_id
    assert xcoms[("cancel", "status")] == "cancelled"
    assert xcoms[("cancel", "output_file_id")] == final["output_file_id"]
    assert xcoms[("cancel", "error_file_id")] == final["error_file_id"]
    assert xcoms[("cancel", "return_value")] == final
    assert xcoms[("collect", "return_value")] == {
        "output_file_id": final["output_file_id"],
        "status": "cancelled",
    }
    assert xcoms[("cancel", "_link_OpenAIBatchLink")] == f"https://platform.openai.com/batches/{batch_id}"
    assert emulator_connection.cancel_count(batch_id) == 1


def test_mapped_cancellations(dagbag: Any, emulator_connection: BatchAPIEmulator) -> None:
    ids = [emulator_connection.add_batch()["id"] for _ in range(3)]
    state, states, xcoms = run_dag(dagbag, "e2e_cancel_mapped", {"batch_ids": ids})
    assert state == "success", states
    assert [states[f"cancel[{i}]"] for i in range(3)] == ["success"] * 3
    for index, batch_id in enumerate(ids):
        assert emulator_connection.batch(batch_id)["status"] == "cancelled"
        assert (
            xcoms[(f"cancel[{index}]", "output_file_id")]
            == emulator_connection.batch(batch_id)["output_file_id"]
        )


def test_failure_callback_cancels_the_batch(dagbag: Any, emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    state, states, _ = run_dag(dagbag, "e2e_failure_callback", {"batch_id": batch_id})
    assert state == "failed"
    assert states == {"submit": "success", "build_features": "failed"}
    assert emulator_connection.batch(batch_id)["status"] == "cancelling"
    assert emulator_connection.cancel_count(batch_id) == 1


def test_templated_fields_are_rendered_from_the_run(
    dagbag: Any, emulator: BatchAPIEmulator, set_connection: Callable[..., None], tmp_path: Path
) -> None:
    """Each operator's templated fields, rendered by Airflow from dag_run.conf: the batch, the connection (the
    only one defined: a connection id left as a template finds none), the results' folder, and the cleanup's
    metadata filter, listing bound and dry-run switch."""
    set_connection("openai_templated", password=FAKE_API_KEY, host=emulator.base_url)
    batch_id = emulator.add_batch()["id"]
    now = int(time.time())
    ours = emulator.add_batch(metadata={"team": "search"}, created_at=now - 60)["id"]
    other_team = emulator.add_batch(metadata={"team": "ads"}, created_at=now - 60)["id"]
    before_the_bound = emulator.add_batch(metadata={"team": "search"}, created_at=now - 3600)["id"]
    conf = {
        "batch_id": batch_id,
        "conn_id": "openai_templated",
        "results_dir": str(tmp_path),
        "team": "search",
        "created_after": now - 600,
        "dry_run": False,
    }
    state, states, xcoms = run_dag(dagbag, "e2e_templated_fields", conf)
    assert state == "success", states
    assert emulator.batch(batch_id)["status"] == "cancelled"
    saved = xcoms[("cancel", "results")]["remaining"]["path"]
    assert saved == str(tmp_path / "cancel" / batch_id / "remaining.jsonl")
    assert xcoms[("cleanup", "return_value")]["selected"] == [ours]
    assert emulator.batch(ours)["status"] == "cancelled"
    assert emulator.batch(other_team)["status"] == emulator.batch(before_the_bound)["status"] == "in_progress"
    assert (tmp_path / "cleanup" / ours / "output.jsonl").read_bytes() == emulator.file_content(
        emulator.batch(ours)["output_file_id"]
    )
