"""Fuzz surface 4: the results files a cancelled batch leaves, saved by ``save_results`` over real loopback HTTP.

The emulator serves a cancelled batch whose output and error files mix well-formed lines for some of its
requests with hostile ones: blank lines, CRLF endings, a missing final newline, unknown fields and ids (all
benign), and bytes that are not UTF-8, nesting 100,000 deep, lines that are no JSON object, no string
``custom_id``, two ``custom_id``\\ s, truncated JSON (malformed). The promise:

* ``save_results`` returns a manifest or raises a documented :class:`OpenAIBatchError`, in bounded time;
* when it raises, nothing is left under the destination (all or nothing);
* when every line is benign, it succeeds; when one is malformed, it refuses;
* when it succeeds, everything it wrote is under ``<root>/<batch_id>/``; ``output.jsonl`` and ``errors.jsonl`` are
  the API's files byte for byte; ``remaining.jsonl`` is, in input order and byte for byte, exactly the input
  lines whose request is in neither file (or only in the error file as ``batch_cancelled``/``batch_expired``);
* the key is in no file written and no exception.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from airflow_provider_openai_batch import storage
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.results import save_results
from airflow_provider_openai_batch.testing import BatchAPIEmulator
from tests._guards import (  # noqa: F401 - fixtures: guard, and fast_backoff are autouse
    FAKE_API_KEY,
    Guard,
    assert_no_key_in_files,
    fast_backoff,
    guard,
    shared_emulator,
)
from tests.fuzz._hostile import assert_documented, bounded, budget, deeply_nested

pytestmark = pytest.mark.timeout(300)

REQUESTS = 6
#: Error codes the API writes for requests it never executed: such a request is still to run.
NEVER_RAN = ("batch_cancelled", "batch_expired")

#: Lines that must not stop the save: the API may well write them.
BENIGN = (
    b"",
    b"   ",
    b'{"custom_id": "foreign-1", "response": {"status_code": 200}}',
    b'{"id": "x", "custom_id": "foreign-2", "unknown": [1, {"deep": null}]}',
    b'{"custom_id": "foreign-3", "error": {"code": ["a", "list"], "message": null}}',
    b'{"custom_id": "caf\\u00e9"}',
    b'{"custom_id": "snow \xe2\x98\x83"}',
)
#: Lines from which no one can tell whether a request ran: saving must refuse them, never guess or crash.
MALFORMED = (
    b'{"custom_id": "foreign-\xff"}',
    deeply_nested(100_000).encode(),
    b"[1, 2, 3]",
    b"null",
    b"NaN",
    b"not json at all",
    b'{"custom_id": 42}',
    b'{"custom_id": null}',
    b'{"response": {}}',
    b'{"custom_id": "request-1", "custom_id": "foreign-5"}',
    b'{"custom\\u005fid": "request-2", "custom_id": "foreign-7"}',
    b'{"custom_id": "foreign-6", "custom\\u005fid": "request-3"}',
    b"\x00\x01\x02",
)
#: A truncated line whose ``custom_id`` is still readable (a foreign one): saving may take it or refuse it.
TRUNCATED = b'{"custom_id": "foreign-8", '


@pytest.fixture
def api(shared_emulator: BatchAPIEmulator) -> Iterator[BatchAPIEmulator]:
    shared_emulator.clear_faults()
    yield shared_emulator
    shared_emulator.clear_faults()


@pytest.fixture
def hook(api: BatchAPIEmulator, set_connection: Callable[..., None]) -> Iterator[OpenAIBatchHook]:
    set_connection(password=FAKE_API_KEY, host=api.base_url)
    with OpenAIBatchHook() as shared:
        yield shared


def request_line(custom_id: str) -> bytes:
    return json.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": {}}}).encode()


def error_line(custom_id: str, code: str) -> bytes:
    return json.dumps({"custom_id": custom_id, "error": {"code": code, "message": "m"}}).encode()


@st.composite
def results_files(draw: st.DrawFn, custom_ids: list[str]) -> tuple[bytes, bytes, set[str], bool, bool]:
    """``(output, errors, ran, malformed, truncated)``: the two files, the input requests they say ran, and
    whether a malformed or a truncated line is among them."""
    ran: set[str] = set()
    in_output = draw(st.lists(st.sampled_from(custom_ids), unique=True))
    output = [request_line(custom_id) for custom_id in in_output]
    ran.update(in_output)
    errors = []
    not_in_output = [custom_id for custom_id in custom_ids if custom_id not in ran]
    for custom_id in draw(st.lists(st.sampled_from(not_in_output), unique=True)) if not_in_output else []:
        code = draw(st.sampled_from([*NEVER_RAN, "server_error", "invalid_request"]))
        errors.append(error_line(custom_id, code))
        if code not in NEVER_RAN:
            ran.add(custom_id)
    hostile = draw(st.lists(st.sampled_from((*BENIGN, *MALFORMED, TRUNCATED)), min_size=1, max_size=3))
    for line in hostile:
        target = draw(st.sampled_from([output, errors]))
        target.insert(draw(st.integers(0, len(target))), line)
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    final = draw(st.sampled_from([newline, b""]))
    files = tuple(newline.join(lines) + (final if lines else b"") for lines in (output, errors))
    return files[0], files[1], ran, any(line in MALFORMED for line in hostile), TRUNCATED in hostile


def files_under(path: Path) -> list[Path]:
    return sorted(file for file in path.rglob("*") if file.is_file())


@budget(60)
@given(data=st.data())
def test_results_are_saved_whole_and_right_or_not_at_all(
    api: BatchAPIEmulator,
    hook: OpenAIBatchHook,
    guard: Guard,
    tmp_path_factory: pytest.TempPathFactory,
    data: Any,
) -> None:
    batch = api.add_batch(status="cancelled", total_requests=REQUESTS)
    input_lines = api.file_content(batch["input_file_id"]).splitlines()
    custom_ids = [json.loads(line)["custom_id"] for line in input_lines]
    output, errors, ran, malformed, truncated = data.draw(results_files(custom_ids))
    api.add_file(output, batch["output_file_id"])
    api.add_file(errors, batch["error_file_id"])
    destination = tmp_path_factory.mktemp("results")
    root = destination / "root"
    root.mkdir()

    manifest, error = bounded(
        lambda: save_results(hook, batch["id"], hook.get_batch(batch["id"]), storage.directory(root, "root"))
    )

    assert_no_key_in_files(destination)
    if error is not None:
        guard.check_exception(error)
        assert_documented(error, arguments=False)
        assert malformed or truncated, f"refused benign results files: {error!r:.500}"
        assert files_under(destination) == [], "a failed save left files behind"
        return
    assert not malformed, "saved results files from which no one can tell which requests ran"
    folder = root / batch["id"]
    assert manifest is not None and manifest.batch_id == batch["id"]
    assert {file.parent for file in files_under(destination)} == {folder}
    assert (folder / "output.jsonl").read_bytes() == output
    assert (folder / "errors.jsonl").read_bytes() == errors
    remaining = [
        line for line, custom_id in zip(input_lines, custom_ids, strict=True) if custom_id not in ran
    ]
    assert (folder / "remaining.jsonl").read_bytes().splitlines() == remaining
