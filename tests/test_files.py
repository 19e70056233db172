"""The hook's Files API over real HTTP against the emulator: metadata, streamed content, and downloads to local
paths and object storage, with every way a download can go wrong.

Every test runs under ``tests._guards.guard``: no socket or emulator thread outlives it, async code leaves no task
or shared client behind, and the fake API key appears in no log, exception or request.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import aclosing, closing
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import ObjectStoragePath
from fsspec.implementations.memory import MemoryFileSystem

from airflow_provider_openai_batch.exceptions import OpenAIFileDownloadError, OpenAIFileNotFoundError
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.models import File
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from tests._guards import (  # noqa: F401 - fixtures: guard and fast_backoff are autouse
    FAKE_API_KEY,
    Guard,
    emulator,
    fast_backoff,
    guard,
    private_emulator,
    run_async,
    shared_emulator,
)

try:  # Airflow >= 3.1
    from airflow.sdk.io import attach
except ImportError:  # Airflow 3.0
    from airflow.io.store import attach  # type: ignore[no-redef]

pytestmark = pytest.mark.timeout(60)

#: Content downloads of a file made by the connection's default of 3 retries: the first try and 3 restarts.
ATTEMPTS = 4


@pytest.fixture
def api(emulator: BatchAPIEmulator, set_connection: Any) -> BatchAPIEmulator:
    set_connection(password=FAKE_API_KEY, host=emulator.base_url)
    return emulator


@pytest.fixture
def memory_storage() -> Iterator[MemoryFileSystem]:
    """``memory://`` attached to Airflow's object storage, as a user attaches any fsspec filesystem."""
    fs = MemoryFileSystem()
    attach(protocol="memory", fs=fs)
    yield fs
    fs.rm("/", recursive=True)


def input_file(api: BatchAPIEmulator, total: int = 400, request_bytes: int | None = 600) -> tuple[str, bytes]:
    """A batch's input file (240 kB by default: several chunks on the wire) and its content."""
    file_id = api.add_batch(total_requests=total, request_bytes=request_bytes)["input_file_id"]
    return file_id, api.file_content(file_id)


def content_requests(api: BatchAPIEmulator, file_id: str) -> list[int]:
    return [r.status for r in api.requests if r.path == f"/v1/files/{file_id}/content"]


def download(file_id: str, destination: Any) -> int:
    with OpenAIBatchHook() as hook:
        return hook.download_file(file_id, destination)


def read_sync(file_id: str) -> list[bytes]:
    with OpenAIBatchHook() as hook:
        return list(hook.iter_file_content(file_id))


def read_async(file_id: str) -> list[bytes]:
    async def read() -> list[bytes]:
        async with OpenAIBatchHook() as hook:
            return [chunk async for chunk in hook.aiter_file_content(file_id)]

    return run_async(read())


READERS = {"sync": read_sync, "async": read_async}


# -- metadata and content ---------------------------------------------------------------------------------------


def test_get_file_sync_and_async(api: BatchAPIEmulator) -> None:
    file_id, content = input_file(api)

    async def aget() -> File:
        async with OpenAIBatchHook() as hook:
            return await hook.aget_file(file_id)

    with OpenAIBatchHook() as hook:
        synced = hook.get_file(file_id)
    for file in (synced, run_async(aget())):
        assert file.model_dump(mode="json") == api.file(file_id)
        assert (file.id, file.bytes, file.purpose) == (file_id, len(content), "batch")
    assert [(r.method, r.path) for r in api.requests] == [("GET", f"/v1/files/{file_id}")] * 2
    assert {r.headers["authorization"] for r in api.requests} == {f"Bearer {FAKE_API_KEY}"}


@pytest.mark.parametrize("mode", READERS)
def test_content_is_streamed_in_chunks(api: BatchAPIEmulator, mode: str) -> None:
    file_id, content = input_file(api)

    chunks = READERS[mode](file_id)

    assert b"".join(chunks) == content
    assert len(chunks) > 1, "the content arrives as it is received, not whole"
    assert content_requests(api, file_id) == [200]


@pytest.mark.parametrize("mode", READERS)
def test_an_error_before_the_content_is_retried(api: BatchAPIEmulator, mode: str) -> None:
    file_id, content = input_file(api)
    api.inject(Fault("status", status=503, times=2, path="/content$"))

    assert b"".join(READERS[mode](file_id)) == content
    assert content_requests(api, file_id) == [503, 503, 200]


@pytest.mark.parametrize("mode", READERS)
def test_a_connection_lost_mid_content_is_a_download_error(
    api: BatchAPIEmulator, guard: Guard, mode: str
) -> None:
    file_id, content = input_file(api)
    api.inject(Fault("drop", path="/content$"))

    with guard.raises(OpenAIFileDownloadError) as caught:
        READERS[mode](file_id)

    half = len(content) // 2
    assert str(caught.value).startswith(f"Download of file '{file_id}' was cut short after {half} bytes: ")
    assert (caught.value.file_id, caught.value.received_bytes, caught.value.transient) == (
        file_id,
        half,
        True,
    )
    assert content_requests(api, file_id) == [0], "the chunks were handed on: the stream cannot be retried"


@pytest.mark.parametrize("mode", [*READERS, "metadata", "download"])
def test_an_unknown_file_is_not_found(api: BatchAPIEmulator, guard: Guard, mode: str, tmp_path: Path) -> None:
    with guard.raises(OpenAIFileNotFoundError) as caught:
        if mode == "metadata":
            with OpenAIBatchHook() as hook:
                hook.get_file("file-gone")
        elif mode == "download":
            download("file-gone", tmp_path / "out.jsonl")
        else:
            READERS[mode]("file-gone")

    error = caught.value
    [answer] = api.requests  # a 404 is final: no retry
    assert str(error) == (
        "OpenAI Batch API found no file 'file-gone' (HTTP 404): No such File object: file-gone "
        f"(request id {answer.request_id})"
    ), "OpenAI support asks for the request id"
    assert (error.file_id, error.batch_id, error.status_code) == ("file-gone", None, 404)
    assert error.request_id == answer.request_id and answer.request_id.startswith("req_")
    assert list(tmp_path.iterdir()) == []


def test_stopping_early_frees_the_connection(api: BatchAPIEmulator) -> None:
    """The guard fails the test if either connection is left open."""
    file_id, content = input_file(api)
    with OpenAIBatchHook() as hook, closing(hook.iter_file_content(file_id)) as chunks:
        assert content.startswith(next(chunks))

    async def first_chunk() -> bytes:
        async with OpenAIBatchHook() as hook, aclosing(hook.aiter_file_content(file_id)) as chunks:
            chunk = await anext(chunks)
        # httpx's own generators under the stream, left mid-iteration, are closed by the loop in a task of their
        # own: one turn of the loop lets it run.
        await asyncio.sleep(0)
        return chunk

    assert content.startswith(run_async(first_chunk()))


# -- downloads --------------------------------------------------------------------------------------------------


def test_download_to_a_local_path(api: BatchAPIEmulator, tmp_path: Path) -> None:
    file_id, content = input_file(api)
    destination = tmp_path / "new" / "dir" / "input.jsonl"

    written = download(file_id, str(destination))

    assert written == len(content)
    assert destination.read_bytes() == content
    assert os.listdir(destination.parent) == ["input.jsonl"], "the temporary file was renamed"


@pytest.mark.parametrize("form", ["path", "url"])
def test_download_to_object_storage(
    api: BatchAPIEmulator, memory_storage: MemoryFileSystem, tmp_path: Path, form: str
) -> None:
    """A local ``file://`` store, and ``memory://`` standing for any other fsspec filesystem."""
    file_id, content = input_file(api)
    local = f"file://{tmp_path}/out/input.jsonl"
    remote = "memory://bucket/out/input.jsonl"
    for url in (local, remote):
        destination = ObjectStoragePath(url) if form == "path" else url
        assert download(file_id, destination) == len(content)
        assert ObjectStoragePath(url).read_bytes() == content
    assert memory_storage.ls("/bucket/out", detail=False) == ["/bucket/out/input.jsonl"]
    assert os.listdir(tmp_path / "out") == ["input.jsonl"]


def test_a_dropped_download_starts_again_from_the_start(
    api: BatchAPIEmulator, guard: Guard, tmp_path: Path
) -> None:
    file_id, content = input_file(api)
    api.inject(Fault("drop", times=2, path="/content$"))
    destination = tmp_path / "input.jsonl"

    assert download(file_id, destination) == len(content)

    assert destination.read_bytes() == content
    assert content_requests(api, file_id) == [0, 0, 200]
    # Counted by retry number, not by line: Airflow 3.0's logging writes each record to more than one sink.
    logged = guard.output()
    assert "Downloading it again from the start" in logged
    assert "(retry 2 of" in logged and "(retry 3 of" not in logged
    assert os.listdir(tmp_path) == ["input.jsonl"]


def test_a_download_dropped_every_time_leaves_nothing_that_looks_complete(
    api: BatchAPIEmulator, guard: Guard, tmp_path: Path
) -> None:
    file_id, _ = input_file(api)
    earlier = tmp_path / "input.jsonl"
    earlier.write_bytes(b"the previous run's file\n")
    api.inject(Fault("drop", times=100, path="/content$"))

    with guard.raises(OpenAIFileDownloadError, match=f"Gave up after {ATTEMPTS} attempt"):
        download(file_id, earlier)
    with guard.raises(OpenAIFileDownloadError):
        download(file_id, tmp_path / "fresh.jsonl")

    assert content_requests(api, file_id) == [0] * 2 * ATTEMPTS
    assert earlier.read_bytes() == b"the previous run's file\n", "replaced only by a complete download"
    assert os.listdir(tmp_path) == ["input.jsonl"], "no partial file left behind"


def test_a_complete_download_replaces_an_older_file(api: BatchAPIEmulator, tmp_path: Path) -> None:
    file_id, content = input_file(api)
    (tmp_path / "input.jsonl").write_bytes(b"old")

    download(file_id, tmp_path / "input.jsonl")

    assert (tmp_path / "input.jsonl").read_bytes() == content


def test_fewer_bytes_than_the_file_has_are_a_cut_short_download(
    api: BatchAPIEmulator, guard: Guard, tmp_path: Path
) -> None:
    content = b'{"custom_id": "a"}\n'
    api.add_file(content, "file-short", bytes=len(content) + 10)

    with guard.raises(OpenAIFileDownloadError) as caught:
        download("file-short", tmp_path / "short.jsonl")

    assert str(caught.value) == (
        f"Download of file 'file-short' ended after 19 of its 29 bytes. Gave up after {ATTEMPTS} attempt(s)."
    )
    assert (caught.value.expected_bytes, caught.value.received_bytes) == (29, 19)
    assert content_requests(api, "file-short") == [200] * ATTEMPTS
    assert list(tmp_path.iterdir()) == []


def test_more_bytes_than_the_file_has_fail_at_once(
    api: BatchAPIEmulator, guard: Guard, tmp_path: Path
) -> None:
    api.add_file(b'{"custom_id": "a"}\n' * 1000, "file-long", bytes=100)

    with guard.raises(OpenAIFileDownloadError) as caught:
        download("file-long", tmp_path / "long.jsonl")

    assert str(caught.value).startswith("File 'file-long' has 100 bytes, but its download sent more (")
    assert caught.value.transient is False
    assert content_requests(api, "file-long") == [200], "asking again would get the same surprise"
    assert list(tmp_path.iterdir()) == []


def test_a_slow_answer_times_out_and_is_retried(
    private_emulator: BatchAPIEmulator, set_connection: Any, guard: Guard, tmp_path: Path
) -> None:
    set_connection(password=FAKE_API_KEY, host=private_emulator.base_url, extra={"timeout": 0.3})
    file_id, content = input_file(private_emulator)
    private_emulator.inject(Fault("delay", delay=2.0, path="/content$"))

    assert download(file_id, tmp_path / "input.jsonl") == len(content)
    assert (tmp_path / "input.jsonl").read_bytes() == content
    assert f"GET /v1/files/{file_id}/content got ReadTimeout" in guard.output()
