"""`make demo`: the three example DAGs against the built-in emulator, with a short report.

Starts the Batch API emulator on a free loopback port with a few seeded batches, points
``AIRFLOW_CONN_OPENAI_DEFAULT`` at it, migrates a SQLite metadata DB in ``.airflow-demo/``, runs each example
DAG with ``dag.test()`` (deferrable cancellation included), checks what happened, and prints a report. Exits
non-zero if anything did not happen as expected. Airflow's own logs go to ``.airflow-demo/demo.log``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_openai_batch.testing import BatchAPIEmulator
from airflow_provider_openai_batch.testing.emulator import seed_demo

ROOT = Path(__file__).resolve().parents[1]
HOME = ROOT / ".airflow-demo"
LOG = HOME / "demo.log"
RESULTS = HOME / "results"
API_KEY = "sk-demo-not-a-real-key"


@dataclass
class Scenario:
    title: str
    dag_id: str
    conf: dict[str, Any]
    expected_state: str
    expected_tasks: dict[str, str]
    expected_batches: dict[str, str]  #: batch id -> status after the run
    saves_results: bool = False  #: cancel_batch saves the partial results that use_partial_results reads
    problems: list[str] = field(default_factory=list)


SCENARIOS = [
    Scenario(
        "Cancel on upstream failure (deferrable)",
        "example_openai_batch_cancel_on_upstream_failure",
        {"batch_id": "batch_demo_search_1", "simulate_failure": True},
        expected_state="failed",
        expected_tasks={
            "receive_batch_id": "success",
            "build_features": "failed",
            "cancel_batch": "success",
            "use_partial_results": "success",
            "fail_run": "failed",
        },
        expected_batches={"batch_demo_search_1": "cancelled"},
        saves_results=True,
    ),
    Scenario(
        "Cancel in a failure callback",
        "example_openai_batch_cancel_in_failure_callback",
        {"batch_id": "batch_demo_search_2", "simulate_failure": True},
        expected_state="failed",
        expected_tasks={"receive_batch_id": "success", "process_results": "failed"},
        expected_batches={"batch_demo_search_2": "cancelling"},
    ),
    Scenario(
        "Scheduled cleanup of stale batches (deferrable)",
        "example_openai_batch_cleanup_stale_batches",
        {"dry_run": False},
        expected_state="success",
        expected_tasks={"cancel_stale_batches": "success"},
        expected_batches={
            "batch_demo_stale": "cancelled",
            "batch_demo_search_3": "in_progress",
            "batch_demo_other_team": "in_progress",
            "batch_demo_completed": "completed",
        },
    ),
]


def main() -> int:
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir()
    with BatchAPIEmulator(api_key=API_KEY, cancel_after_polls=2) as emulator, LOG.open("w") as log:
        seed_demo(emulator)
        env = {
            **os.environ,
            "AIRFLOW_HOME": str(HOME),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(
                {"conn_type": "openai_batch", "password": API_KEY, "host": emulator.base_url}
            ),
            "OPENAI_BATCH_POLL_INTERVAL": "1",
            "OPENAI_BATCH_RESULTS_DIR": str(RESULTS),
        }
        print(
            f"OpenAI Batch provider demo: emulator at {emulator.base_url}, Airflow home {HOME.relative_to(ROOT)}/"
        )
        print("Migrating the SQLite metadata DB...", flush=True)
        airflow = Path(sys.executable).with_name("airflow")
        subprocess.run([str(airflow), "db", "migrate"], env=env, stdout=log, stderr=log, check=True)
        for number, scenario in enumerate(SCENARIOS, 1):
            run_scenario(number, scenario, emulator, env, log)
    failures = [problem for scenario in SCENARIOS for problem in scenario.problems]
    print()
    if failures:
        print(f"DEMO FAILED: {len(failures)} expectation(s) not met (Airflow logs: {LOG.relative_to(ROOT)}):")
        print("\n".join(f"  - {problem}" for problem in failures))
        return 1
    print(f"All expectations met. Airflow logs: {LOG.relative_to(ROOT)}")
    return 0


def run_scenario(number: int, scenario: Scenario, emulator: BatchAPIEmulator, env: dict, log: Any) -> None:
    before = {batch_id: emulator.batch(batch_id)["status"] for batch_id in scenario.expected_batches}
    output = HOME / f"{scenario.dag_id}.json"
    runner = [
        sys.executable,
        str(ROOT / "demo" / "run_dag.py"),
        scenario.dag_id,
        json.dumps(scenario.conf),
        str(output),
    ]
    print(f"\n{number}. {scenario.title}\n   DAG {scenario.dag_id}", flush=True)
    finished = subprocess.run(runner, check=False, env=env, stdout=log, stderr=log, timeout=600)
    if finished.returncode != 0 or not output.exists():
        scenario.problems.append(f"{scenario.dag_id}: dag.test() crashed (exit {finished.returncode})")
        return
    outcome = json.loads(output.read_text())
    expect(scenario, "run state", outcome["state"], scenario.expected_state)
    print(f"   run: {outcome['state']} (expected {scenario.expected_state})")
    print("   tasks: " + ", ".join(f"{task}={state}" for task, state in outcome["tasks"].items()))
    expect(scenario, "task states", outcome["tasks"], scenario.expected_tasks)
    for batch_id, expected in scenario.expected_batches.items():
        after = emulator.batch(batch_id)
        print(f"   {batch_id}: {before[batch_id]} -> {after['status']}" + files(after))
        expect(scenario, f"{batch_id} status", after["status"], expected)
    if scenario.saves_results:
        report_saved_results(
            scenario, outcome["xcoms"], emulator.batch(next(iter(scenario.expected_batches)))
        )
    summary = outcome["xcoms"].get("cancel_stale_batches.return_value")
    if summary:
        print(
            f"   cleanup summary: selected {summary['selected']}, cancelled "
            + str([(e["batch_id"], e["status"], e["output_file_id"]) for e in summary["cancelled"]])
        )


def report_saved_results(scenario: Scenario, xcoms: dict[str, Any], batch: dict[str, Any]) -> None:
    """The three files' line counts, as saved (the manifest) and as read downstream, against the batch's counts."""
    counts = batch["request_counts"]
    never_ran = counts["total"] - counts["completed"] - counts["failed"]
    expected = {"output": counts["completed"], "errors": counts["failed"], "remaining": never_ran}
    manifest = xcoms.get("cancel_batch.results") or {}
    saved = {name: (manifest.get(name) or {}).get("lines") for name in expected}
    folder = RESULTS / batch["id"]
    print(
        f"   partial results saved in {folder.relative_to(ROOT)}/: "
        + ", ".join(f"{name}.jsonl {lines(saved[name])}" for name in ("output", "errors", "remaining"))
    )
    read = xcoms.get("use_partial_results.return_value") or {}
    print(
        f"   read downstream: {read.get('remaining')} requests never ran, ready to resubmit from remaining.jsonl"
    )
    expect(scenario, "saved line counts", saved, expected)
    expect(scenario, "line counts read downstream", read, expected)
    expect(
        scenario,
        "files saved",
        sorted(path.name for path in folder.glob("*")),
        sorted(f"{n}.jsonl" for n in expected),
    )


def lines(count: int | None) -> str:
    return f"{count} line{'' if count == 1 else 's'}"


def files(batch: dict[str, Any]) -> str:
    if not batch["output_file_id"]:
        return ""
    return f" (output file {batch['output_file_id']}, error file {batch['error_file_id']})"


def expect(scenario: Scenario, what: str, actual: Any, expected: Any) -> None:
    if actual != expected:
        scenario.problems.append(f"{scenario.dag_id}: {what} is {actual!r}, expected {expected!r}")


if __name__ == "__main__":
    sys.exit(main())
