"""Saving a batch's partial results: the three files, the manifest, the operators' ``save_results_to``.

Over real HTTP against the emulator, under ``tests._guards.guard`` (no leaked socket, task or key), and every file
written is checked for the key as well.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import (
    AirflowException,
    AirflowSkipException,
    ObjectStoragePath,
    TaskDeferred,
)

from airflow_provider_openai_batch import storage
from airflow_provider_openai_batch.exceptions import OpenAIBatchError, OpenAIFileDownloadError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAICancelBatchOperator,
    OpenAICancelStaleBatchesOperator,
)
from airflow_provider_openai_batch.results import ResultsManifest, save_results
from airflow_provider_openai_batch.testing import BatchAPIEmulator
from tests._guards import (  # noqa: F401 - fixtures: guard and fast_backoff are autouse
    FAKE_API_KEY,
    Guard,
    TaskContext,
    assert_no_key_in_files,
    emulator,
    fast_backoff,
    guard,
    run_operator,
    run_trigger,
    shared_emulator,
)

pytestmark = pytest.mark.timeout(60)

OLD = 0  # created_at of the batches the cleanup selects


@pytest.fixture
def api(emulator: BatchAPIEmulator, set_connection: Any) -> BatchAPIEmulator:
    set_connection(password=FAKE_API_KEY, host=emulator.base_url)
    return emulator


@pytest.fixture
def results_dir(tmp_path: Path) -> Iterator[Path]:
    """Where results go; checked for the key after the test."""
    yield tmp_path
    assert_no_key_in_files(tmp_path)


def jsonl_ids(content: bytes) -> list[str]:
    return [json.loads(line)["custom_id"] for line in content.splitlines() if line.strip()]


def expected_files(api: BatchAPIEmulator, batch_id: str) -> dict[str, bytes | None]:
    """What the three files must hold, worked out from the emulator's own files."""
    batch = api.batch(batch_id)
    output = api.file_content(batch["output_file_id"]) if batch["output_file_id"] else None
    errors = api.file_content(batch["error_file_id"]) if batch["error_file_id"] else None
    ran = set(jsonl_ids(output or b"")) | set(jsonl_ids(errors or b""))
    lines = api.file_content(batch["input_file_id"]).splitlines(keepends=True)
    remaining = b"".join(line for line in lines if json.loads(line)["custom_id"] not in ran)
    return {"output.jsonl": output, "errors.jsonl": errors, "remaining.jsonl": remaining}


def manifest_of(batch_id: str, folder: str, files: dict[str, bytes | None]) -> dict[str, Any]:
    """The manifest expected for ``files`` written under ``folder`` (a path or URL)."""

    def entry(name: str) -> dict[str, Any] | None:
        content = files[name]
        if content is None:
            return None
        return {"path": f"{folder}/{name}", "bytes": len(content), "lines": len(content.splitlines())}

    return {
        "batch_id": batch_id,
        "output": entry("output.jsonl"),
        "errors": entry("errors.jsonl"),
        "remaining": entry("remaining.jsonl"),
    }


def assert_written(folder: Path, files: dict[str, bytes | None]) -> None:
    assert sorted(os.listdir(folder)) == sorted(
        name for name, content in files.items() if content is not None
    )
    for name, content in files.items():
        if content is not None:
            assert (folder / name).read_bytes() == content, name


def save(batch_id: str, root: Any) -> ResultsManifest:
    with OpenAIBatchHook() as hook:
        return save_results(hook, batch_id, hook.get_batch(batch_id), storage.directory(root, "root"))


def file_requests(api: BatchAPIEmulator) -> list[str]:
    return [r.path for r in api.requests if r.path.startswith("/v1/files/")]


# -- save_results -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["local", "object_storage"])
def test_the_three_files_and_their_manifest(api: BatchAPIEmulator, results_dir: Path, form: str) -> None:
    batch = api.add_batch(status="cancelled", total_requests=300, completed_requests=140, failed_requests=10)
    root = str(results_dir) if form == "local" else ObjectStoragePath(f"file://{results_dir}")
    files = expected_files(api, batch["id"])

    manifest = save(batch["id"], root).to_xcom()

    folder = f"{results_dir}/{batch['id']}" if form == "local" else f"file://{results_dir}/{batch['id']}"
    assert manifest == manifest_of(batch["id"], folder, files)
    assert (manifest["output"]["lines"], manifest["errors"]["lines"], manifest["remaining"]["lines"]) == (
        140,
        10,
        150,
    )
    assert_written(results_dir / batch["id"], files)
    assert set(jsonl_ids(files["remaining.jsonl"])).isdisjoint(jsonl_ids(files["output.jsonl"]))
    requests = [r.path for r in api.requests]
    assert requests.count(f"/v1/files/{batch['input_file_id']}/content") == 1, "the input is read once"


def test_remaining_is_byte_for_byte_in_input_order(api: BatchAPIEmulator, results_dir: Path) -> None:
    """CRLF and LF endings, escapes, custom_id not the first key, blank lines, no final line break."""
    lines = [
        b'{"custom_id": "r1", "method": "POST", "body": {"text": "caf\xc3\xa9"}}\r\n',
        b'{"custom_id": "r\\"2", "method": "POST"}\n',
        b'{"method": "POST", "custom_id": "r3", "body": {"custom_id": "decoy"}}\n',
        b"\n",
        b'  {"custom_id" : "r4"}\n',
        b'{"custom_id": "r5", "body": {"messages": [{"content": "\\u00e9 {\\"custom_id\\": \\"r1\\"}"}]}}\n',
        b'{"custom_id": "r6"}',
    ]
    batch = api.add_batch(status="cancelled", total_requests=6, completed_requests=1, failed_requests=1)
    api.add_file(b"".join(lines), batch["input_file_id"])
    api.add_file(
        b'{"id": "batch_req_1", "custom_id": "r3", "response": {}, "error": null}\n', batch["output_file_id"]
    )
    api.add_file(
        b'{"id": "batch_req_2", "custom_id": "r\\"2", "response": {}, "error": null}', batch["error_file_id"]
    )

    manifest = save(batch["id"], results_dir)

    remaining = lines[0] + lines[4] + lines[5] + lines[6]
    assert (results_dir / batch["id"] / "remaining.jsonl").read_bytes() == remaining
    assert (manifest.remaining.lines, manifest.remaining.bytes) == (4, len(remaining))
    assert (manifest.output.lines, manifest.errors.lines) == (1, 1), "a last line without a line break counts"


def test_requests_the_api_never_executed_remain(api: BatchAPIEmulator, results_dir: Path) -> None:
    """The API lists requests a cancel or an expiry stopped before they ran in the error file, with these codes."""
    batch = api.add_batch(status="cancelled", total_requests=5, completed_requests=1, failed_requests=3)
    output = api.file_content(batch["output_file_id"])
    done = jsonl_ids(output)[0]
    others = [f"request-{n}" for n in range(1, 6) if f"request-{n}" != done]
    errors = [
        {"custom_id": others[0], "response": {"status_code": 400}, "error": None},
        {
            "custom_id": others[1],
            "response": None,
            "error": {"code": "batch_cancelled", "message": "cancelled"},
        },
        {"custom_id": others[2], "response": None, "error": {"code": "batch_expired", "message": "expired"}},
    ]
    api.add_file(
        "".join(json.dumps({"id": "batch_req_x", **line}) + "\n" for line in errors), batch["error_file_id"]
    )

    save(batch["id"], results_dir)

    remaining = (results_dir / batch["id"] / "remaining.jsonl").read_bytes()
    assert jsonl_ids(remaining) == sorted(others[1:], key=lambda custom_id: int(custom_id.split("-")[1]))


def test_lines_longer_than_a_chunk(api: BatchAPIEmulator, results_dir: Path) -> None:
    batch = api.add_batch(
        status="cancelled", total_requests=12, completed_requests=5, failed_requests=2, request_bytes=300_000
    )
    files = expected_files(api, batch["id"])

    manifest = save(batch["id"], results_dir)

    assert_written(results_dir / batch["id"], files)
    assert manifest.remaining.lines == 5 and manifest.remaining.bytes == 5 * 300_000


def test_a_batch_without_an_error_file(api: BatchAPIEmulator, results_dir: Path) -> None:
    batch = api.add_batch(status="cancelled", total_requests=20, completed_requests=8, failed_requests=0)
    assert batch["error_file_id"] is None
    files = expected_files(api, batch["id"])

    manifest = save(batch["id"], results_dir).to_xcom()

    assert manifest["errors"] is None and manifest["remaining"]["lines"] == 12
    assert_written(results_dir / batch["id"], files)


def test_an_output_file_gone_from_the_api_leaves_remaining_unwritten(
    api: BatchAPIEmulator, guard: Guard, results_dir: Path
) -> None:
    """Which requests ran can no longer be told: a remaining file would run some requests twice."""
    batch = api.add_batch(status="cancelled", total_requests=20)
    api.remove_file(batch["output_file_id"])

    manifest = save(batch["id"], results_dir).to_xcom()

    assert manifest["output"] is None and manifest["remaining"] is None
    assert manifest["errors"]["lines"] == 1
    assert os.listdir(results_dir / batch["id"]) == ["errors.jsonl"]
    logged = guard.output()
    assert f"names output file '{batch['output_file_id']}', but the API has no such file" in logged
    assert "not writing remaining.jsonl, as which requests ran cannot be told" in logged


def test_an_input_file_gone_from_the_api(api: BatchAPIEmulator, results_dir: Path) -> None:
    batch = api.add_batch(status="cancelled", total_requests=20)
    files = {**expected_files(api, batch["id"]), "remaining.jsonl": None}
    api.remove_file(batch["input_file_id"])

    manifest = save(batch["id"], results_dir).to_xcom()

    assert manifest == manifest_of(batch["id"], f"{results_dir}/{batch['id']}", files)
    assert_written(results_dir / batch["id"], files)


def test_a_line_without_a_custom_id_fails_clearly(
    api: BatchAPIEmulator, guard: Guard, results_dir: Path
) -> None:
    batch = api.add_batch(status="cancelled", total_requests=3)
    api.add_file(b'{"id": "batch_req_1", "custom_id": "request-1"}\n[1, 2]\n', batch["output_file_id"])

    with guard.raises(
        OpenAIBatchError, match=rf"Line 2 of file '{batch['output_file_id']}' is not a JSON object"
    ):
        save(batch["id"], results_dir)

    assert not (results_dir / batch["id"] / "output.jsonl").exists()


# -- OpenAICancelBatchOperator ------------------------------------------------------------------------------------


def cancel(batch_id: str, root: Any, **kwargs: Any) -> OpenAICancelBatchOperator:
    kwargs.setdefault("poll_interval", 0.01)
    return OpenAICancelBatchOperator(task_id="cancel", batch_id=batch_id, save_results_to=root, **kwargs)


def test_blocking_operator_saves_the_results_once_cancelled(
    api: BatchAPIEmulator, guard: Guard, results_dir: Path
) -> None:
    batch_id = api.add_batch(total_requests=60, cancel_after_polls=2)["id"]
    context = TaskContext()

    result = run_operator(cancel(batch_id, str(results_dir)), context, guard)

    assert result["status"] == "cancelled"
    files = expected_files(api, batch_id)
    assert context.xcoms["results"] == manifest_of(batch_id, f"{results_dir}/{batch_id}", files)
    assert context.xcoms["results"]["remaining"]["lines"] == 60 - 20 - 1
    assert_written(results_dir / batch_id, files)


def test_deferrable_operator_saves_the_results_in_the_worker_not_the_triggerer(
    api: BatchAPIEmulator, guard: Guard, results_dir: Path
) -> None:
    batch_id = api.add_batch(total_requests=60, cancel_after_polls=2)["id"]
    context = TaskContext()
    operator = cancel(batch_id, ObjectStoragePath(f"file://{results_dir}"), deferrable=True)

    with guard.raises(TaskDeferred) as deferred:
        operator.execute(context)
    event = run_trigger(deferred.value.trigger, guard)
    assert event["status"] == "cancelled"
    assert file_requests(api) == [] and not (results_dir / batch_id).exists(), "the trigger downloads nothing"
    assert "results" not in context.xcoms
    result = operator.execute_complete(context, event)

    assert result["status"] == "cancelled"
    files = expected_files(api, batch_id)
    assert context.xcoms["results"] == manifest_of(batch_id, f"file://{results_dir}/{batch_id}", files)
    assert_written(results_dir / batch_id, files)


@pytest.mark.parametrize("deferrable", [False, True])
def test_a_batch_that_finished_first_is_saved_when_the_task_succeeds(
    api: BatchAPIEmulator, guard: Guard, results_dir: Path, deferrable: bool
) -> None:
    """All its requests ran: remaining.jsonl is written, empty, for downstream code that always reads it."""
    batch_id = api.add_batch(cancel_after_polls=1, finish_as="completed", total_requests=40)["id"]
    context = TaskContext()

    result = run_operator(cancel(batch_id, results_dir, deferrable=deferrable), context, guard)

    assert result["status"] == "completed"
    assert context.xcoms["results"]["remaining"] == {
        "path": f"{results_dir}/{batch_id}/remaining.jsonl",
        "bytes": 0,
        "lines": 0,
    }
    assert (context.xcoms["results"]["output"]["lines"], context.xcoms["results"]["errors"]["lines"]) == (
        38,
        2,
    )
    assert_written(results_dir / batch_id, expected_files(api, batch_id))


def test_an_already_cancelled_batch_is_saved_without_waiting(
    api: BatchAPIEmulator, guard: Guard, results_dir: Path
) -> None:
    batch_id = api.add_batch(status="cancelled", total_requests=10)["id"]
    context = TaskContext()

    run_operator(cancel(batch_id, results_dir, deferrable=True), context, guard)

    assert context.xcoms["results"]["remaining"]["lines"] == 10 - 3 - 1
    assert_written(results_dir / batch_id, expected_files(api, batch_id))


@pytest.mark.parametrize("if_finished", ["skip", "fail"])
def test_nothing_is_saved_when_if_finished_does_not_let_the_task_succeed(
    api: BatchAPIEmulator, guard: Guard, results_dir: Path, if_finished: str
) -> None:
    batch_id = api.add_batch(status="completed")["id"]
    context = TaskContext()

    with guard.raises(AirflowSkipException if if_finished == "skip" else AirflowException):
        run_operator(cancel(batch_id, results_dir, if_finished=if_finished), context, guard)

    assert "results" not in context.xcoms
    assert file_requests(api) == [] and list(results_dir.iterdir()) == []


def test_a_download_that_fails_fails_the_task_after_the_batch_xcoms(
    api: BatchAPIEmulator, guard: Guard, results_dir: Path
) -> None:
    batch = api.add_batch(status="cancelled")
    api.add_file(b'{"custom_id": "request-1"}\n', batch["output_file_id"], bytes=10_000)
    context = TaskContext()

    with guard.raises(OpenAIFileDownloadError, match="ended after 27 of its 10000 bytes"):
        run_operator(cancel(batch["id"], results_dir), context, guard)

    assert context.xcoms["status"] == "cancelled" and "results" not in context.xcoms
    assert not (results_dir / batch["id"] / "output.jsonl").exists()


# -- OpenAICancelStaleBatchesOperator -----------------------------------------------------------------------------


def cleanup(root: Any, tag: str, **kwargs: Any) -> OpenAICancelStaleBatchesOperator:
    return OpenAICancelStaleBatchesOperator(
        task_id="cleanup",
        older_than=timedelta(days=1),
        metadata={"test": tag},
        poll_interval=0.01,
        save_results_to=root,
        **kwargs,
    )


@pytest.mark.parametrize("deferrable", [False, True])
def test_cleanup_saves_one_folder_per_cancelled_batch(
    api: BatchAPIEmulator, guard: Guard, results_dir: Path, deferrable: bool
) -> None:
    tag = f"cleanup-{deferrable}"
    ids = [api.add_batch(created_at=OLD, metadata={"test": tag}, total_requests=30)["id"] for _ in range(2)]
    api.add_batch(created_at=OLD, metadata={"test": tag}, status="completed")  # not cancelled: nothing saved

    summary = run_operator(
        cleanup(str(results_dir), tag, deferrable=deferrable), TaskContext("cleanup"), guard
    )

    assert sorted(entry["batch_id"] for entry in summary["cancelled"]) == sorted(ids)
    assert sorted(summary["results"], key=lambda manifest: manifest["batch_id"]) == [
        manifest_of(batch_id, f"{results_dir}/{batch_id}", expected_files(api, batch_id))
        for batch_id in sorted(ids)
    ]
    assert sorted(os.listdir(results_dir)) == sorted(ids)
    for batch_id in ids:
        assert_written(results_dir / batch_id, expected_files(api, batch_id))


def test_cleanup_saves_the_others_when_one_batch_cannot_be_saved(
    api: BatchAPIEmulator, guard: Guard, results_dir: Path
) -> None:
    good = api.add_batch(created_at=OLD, metadata={"test": "partial-save"}, cancel_after_polls=1)["id"]
    bad = api.add_batch(created_at=OLD, metadata={"test": "partial-save"}, cancel_after_polls=1)["id"]
    api.add_file(b'{"custom_id": "request-1"}\n', f"file-out-{bad.removeprefix('batch_')}", bytes=999)
    context = TaskContext("cleanup")

    with guard.raises(AirflowException, match=r"Could not cancel or save the results of 1 batch\(es\)"):
        run_operator(cleanup(results_dir, "partial-save"), context, guard)

    summary = context.xcoms["summary"]
    assert [manifest["batch_id"] for manifest in summary["results"]] == [good]
    assert [entry["batch_id"] for entry in summary["failed"]] == [bad]
    assert summary["failed"][0]["error"].startswith(
        "Cancelled, but its results could not be saved: Download of"
    )
    assert {entry["batch_id"] for entry in summary["cancelled"]} == {good, bad}
    assert os.listdir(results_dir / bad) == [], "no partial file"
    assert_written(results_dir / good, expected_files(api, good))


def test_cleanup_dry_run_saves_nothing(api: BatchAPIEmulator, guard: Guard, results_dir: Path) -> None:
    api.add_batch(created_at=OLD, metadata={"test": "dry"})

    summary = run_operator(cleanup(results_dir, "dry", dry_run=True), TaskContext("cleanup"), guard)

    assert summary["results"] == [] and list(results_dir.iterdir()) == []
    assert file_requests(api) == []


def test_save_results_to_needs_the_wait() -> None:
    for make in (
        lambda: cancel("batch_1", "/tmp/results", wait_for_cancellation=False),
        lambda: cleanup("/tmp/results", "x", wait_for_cancellation=False),
    ):
        with pytest.raises(ValueError, match="save_results_to needs wait_for_cancellation=True"):
            make()
