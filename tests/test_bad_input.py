"""Bad input: malformed batch ids and broken connections, refused before any request, with a specific error.

Every case asserts that the emulator received no request at all (or, for the clear-text warning, only the
expected ones) and that no batch changed state. Cases run under ``tests._guards.guard``: no leaked socket or
task, and the fake key in no log, exception or request.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow import __version__ as airflow_version
from airflow.providers.common.compat.sdk import AirflowException, AirflowSkipException

from airflow_provider_openai_batch.callbacks import cancel_batch_on_failure
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAICancelBatchOperator,
    OpenAICancelStaleBatchesOperator,
)
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from airflow_provider_openai_batch.triggers.openai_batch import (
    OpenAIBatchCancellationTrigger,
    OpenAIMultiBatchCancellationTrigger,
)
from tests._guards import (  # noqa: F401 - fixtures: guard, and fast_backoff are autouse
    FAKE_API_KEY,
    Guard,
    TaskContext,
    emulator,
    fast_backoff,
    guard,
    run_async,
    run_operator,
    run_trigger,
    shared_emulator,
)

pytestmark = pytest.mark.timeout(60)

NOT_A_STRING = "A batch id must be a string, got"
MALFORMED = "expected 1 to 256 ASCII letters, digits, '_' or '-' (like 'batch_abc123')."

#: id, and the start of the error it must get.
BAD_IDS: dict[str, tuple[Any, str]] = {
    "none": (None, f"{NOT_A_STRING} NoneType"),
    "empty": ("", f"Invalid batch id '': {MALFORMED}"),
    "whitespace": ("   ", f"Invalid batch id '   ': {MALFORMED}"),
    "tab_newline": ("\t\n", "Invalid batch id '\\t\\n'"),
    "trailing_newline": ("batch_1\n", "Invalid batch id 'batch_1\\n'"),
    "int": (42, f"{NOT_A_STRING} int: 42."),
    "float": (1.5, f"{NOT_A_STRING} float: 1.5."),
    "bool": (True, f"{NOT_A_STRING} bool: True."),
    "bytes": (b"batch_1", f"{NOT_A_STRING} bytes: b'batch_1'."),
    "list": (["batch_1"], f"{NOT_A_STRING} list: ['batch_1']."),
    "dict": ({"id": "batch_1"}, f"{NOT_A_STRING} dict"),
    "parent_path": ("../files", "Invalid batch id '../files'"),
    "cancel_suffix": ("batch_1/cancel", "Invalid batch id 'batch_1/cancel'"),
    "query": ("batch?x=1", "Invalid batch id 'batch?x=1'"),
    "fragment": ("batch_1#x", "Invalid batch id 'batch_1#x'"),
    "percent_encoded": ("batch_1%2Fcancel", "Invalid batch id 'batch_1%2Fcancel'"),
    "dot": ("batch.1", "Invalid batch id 'batch.1'"),
    "null_byte": ("batch_1\x00", "Invalid batch id 'batch_1\\x00'"),
    "very_long": ("b" * 100_000, "Invalid batch id 'bbbbbbbb"),
    "one_too_long": ("b" * 257, "Invalid batch id 'bbbbbbbb"),
    "unicode_letter": ("batch_é", "Invalid batch id 'batch_é'"),
    "cyrillic": ("батч_1", "Invalid batch id 'батч_1'"),
    "emoji": ("batch_🔥", "Invalid batch id 'batch_🔥'"),
    "fullwidth_digits": ("batch_１２", "Invalid batch id 'batch_１２'"),
}
#: What an operator's templated batch_id renders to when the upstream produced nothing: skipped, not an error.
MISSING = {"none", "empty"}
#: Ids the operator resolves from a dict (an upstream's Batch JSON): a dict is not a bad id for it.
OPERATOR_IDS = {**BAD_IDS, "dict": ({"id": "../files"}, "Invalid batch id '../files'")}


@pytest.fixture
def api(emulator: BatchAPIEmulator, set_connection: Any) -> BatchAPIEmulator:
    """The emulator with one running batch, and ``openai_default`` pointing at it."""
    set_connection(password=FAKE_API_KEY, host=emulator.base_url)
    emulator.untouched = emulator.add_batch()["id"]  # type: ignore[attr-defined]
    return emulator


def assert_nothing_sent(emulator: BatchAPIEmulator) -> None:
    assert emulator.requests == [], "refused before any request"
    assert emulator.batch(emulator.untouched)["status"] == "in_progress", "nothing was cancelled"  # type: ignore[attr-defined]


def assert_clear(error: BaseException, expected: str) -> None:
    message = str(error)
    assert message.startswith(expected), message
    assert len(message) < 300, "a 100 kB id is not echoed back whole"


# -- batch ids: hook ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BAD_IDS)
def test_hook_rejects_bad_ids(api: BatchAPIEmulator, guard: Guard, name: str) -> None:
    """Sync and async: retrieve, cancel, and the ``after`` cursor of the list (where ``None`` means no cursor)."""
    batch_id, expected = BAD_IDS[name]
    as_cursor = name != "none"

    async def async_calls() -> list[BaseException]:
        errors = []
        async with OpenAIBatchHook() as hook:
            for call in (hook.aget_batch, hook.acancel_batch):
                with guard.raises(ValueError) as caught:
                    await call(batch_id)
                errors.append(caught.value)
            if as_cursor:
                with guard.raises(ValueError) as caught:
                    await anext(hook.alist_batches(after=batch_id))
                errors.append(caught.value)
        return errors

    errors = []
    with OpenAIBatchHook() as hook:
        for call in (hook.get_batch, hook.cancel_batch):
            with guard.raises(ValueError) as caught:
                call(batch_id)
            errors.append(caught.value)
        if as_cursor:
            with guard.raises(ValueError) as caught:
                next(hook.list_batches(after=batch_id))
            errors.append(caught.value)
    errors += run_async(async_calls())
    assert len(errors) == (6 if as_cursor else 4)
    for error in errors:
        assert_clear(error, expected)
    assert_nothing_sent(api)


# -- batch ids: operator, callback ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPERATOR_IDS)
def test_operator_rejects_bad_ids(api: BatchAPIEmulator, guard: Guard, name: str) -> None:
    """Blocking and deferrable alike: no request, no deferral, no XCom."""
    batch_id, expected = OPERATOR_IDS[name]
    for deferrable in (False, True):
        context = TaskContext()
        operator = OpenAICancelBatchOperator(
            task_id="cancel", batch_id=batch_id, deferrable=deferrable, poll_interval=0.01
        )
        if name in MISSING:  # the upstream submitted nothing: skip (the default) or fail, as asked
            with guard.raises(AirflowSkipException, match="No batch id to cancel: batch_id rendered to"):
                run_operator(operator, context, guard)
            operator.if_missing = "fail"
            with guard.raises(AirflowException, match="No batch id to cancel") as caught:
                run_operator(operator, context, guard)
            assert not isinstance(caught.value, AirflowSkipException)
        else:
            with guard.raises(ValueError) as caught:
                run_operator(operator, context, guard)
            assert_clear(caught.value, expected)
        assert context.xcoms == {}, "nothing is pushed for a batch that was never touched"
    assert_nothing_sent(api)


@pytest.mark.parametrize("name", OPERATOR_IDS)
def test_failure_callback_logs_bad_ids_and_never_raises(
    api: BatchAPIEmulator, guard: Guard, name: str
) -> None:
    batch_id, expected = OPERATOR_IDS[name]
    context = TaskContext(task_id="submit")
    context.xcoms["return_value"] = batch_id  # what the failed task had pushed
    cancel_batch_on_failure(xcom_task_id="submit")(context)  # must not raise
    logged = guard.new_output()
    if name in MISSING:
        assert "No batch to cancel: found no batch id (XCom task 'submit', key 'return_value')." in logged
    else:
        assert "Could not cancel the batch on failure; the original failure stands." in logged
        assert expected[:60] in logged
    assert_nothing_sent(api)


@pytest.mark.parametrize("name", ["parent_path", "cancel_suffix", "query", "unicode_letter"])
def test_single_trigger_with_a_bad_id_ends_with_an_error_event(
    api: BatchAPIEmulator, guard: Guard, name: str
) -> None:
    """A trigger is only ever built by the operator with a checked id; one rebuilt from a corrupted row still
    refuses to poll it, and says why."""
    batch_id, expected = BAD_IDS[name]
    event = run_trigger(
        OpenAIBatchCancellationTrigger(batch_id, "openai_default", 0.01, time.time() + 5), guard
    )
    assert event["status"] == "error" and event["batch_id"] == batch_id
    assert expected in event["message"]
    assert_nothing_sent(api)


def test_multi_trigger_with_one_bad_id_still_waits_for_the_others(
    api: BatchAPIEmulator, guard: Guard
) -> None:
    """One malformed id among good ones: it gets its own error event and is never requested; the good batches
    are polled to their real outcome; no poll task is left running (``run_async`` fails on one)."""
    good = [api.add_batch(cancel_after_polls=1)["id"] for _ in range(2)]
    for batch_id in good:
        api.set_status(batch_id, "cancelling")
    ids = [good[0], "../files", good[1]]
    payload = run_trigger(
        OpenAIMultiBatchCancellationTrigger(ids, "openai_default", 0.01, time.time() + 5), guard
    )
    events = {event["batch_id"]: event for event in payload["events"]}
    assert events["../files"]["status"] == "error"
    assert "Invalid batch id '../files'" in events["../files"]["message"]
    assert [events[batch_id]["status"] for batch_id in good] == ["cancelled", "cancelled"]
    assert [r.path for r in api.requests] == ["/v1/batches"], "one list page showed both; nothing else sent"


def test_cleanup_with_a_malformed_id_in_the_listing_still_cancels_the_others(
    api: BatchAPIEmulator, guard: Guard
) -> None:
    """The API (or a proxy) lists a batch whose id is not a batch id. That batch lands in ``failed`` with the
    reason, the other stale batches are still cancelled, and no request goes to a path built from the bad id;
    the task then fails, having pushed its summary, like for any batch it could not cancel."""
    stale = [api.add_batch(created_at=int(time.time()) - 3 * 86_400)["id"] for _ in range(3)]
    listing = {
        "object": "list",
        "data": [
            {**api.batch(batch_id), "id": "../files" if index == 1 else batch_id}
            for index, batch_id in enumerate(stale)
        ],
        "has_more": False,
    }
    api.inject(Fault("body", status=200, body=json.dumps(listing), method="GET", path="/batches$"))
    context = TaskContext(task_id="cleanup")
    operator = OpenAICancelStaleBatchesOperator(
        task_id="cleanup", older_than=timedelta(days=1), wait_for_cancellation=False
    )
    with guard.raises(AirflowException, match=r"Could not cancel 1 batch\(es\)"):
        run_operator(operator, context, guard)
    summary = context.xcoms["summary"]
    assert [entry["batch_id"] for entry in summary["failed"]] == ["../files"]
    assert "Invalid batch id '../files'" in summary["failed"][0]["error"]
    assert sorted(entry["batch_id"] for entry in summary["cancelled"]) == sorted([stale[0], stale[2]])
    assert {r.path for r in api.requests if r.method == "POST"} == {
        f"/v1/batches/{stale[i]}/cancel" for i in (0, 2)
    }


# -- file ids: hook -----------------------------------------------------------------------------------------------

#: The same ids as file ids: the same checks, the error naming a file id.
FILE_IDS = {
    name: (value, expected.replace("batch id", "file id").replace("'batch_abc123'", "'file-abc123'"))
    for name, (value, expected) in BAD_IDS.items()
}


@pytest.mark.parametrize("name", FILE_IDS)
def test_hook_rejects_bad_file_ids(api: BatchAPIEmulator, guard: Guard, name: str, tmp_path: Path) -> None:
    """Sync and async: metadata, both content streams (refused when called, not at the first chunk), download."""
    file_id, expected = FILE_IDS[name]

    async def async_calls() -> list[BaseException]:
        errors = []
        async with OpenAIBatchHook() as hook:
            for call in (hook.aget_file, hook.aiter_file_content):
                with guard.raises(ValueError) as caught:
                    await call(file_id)  # type: ignore[misc]
                errors.append(caught.value)
        return errors

    errors = []
    with OpenAIBatchHook() as hook:
        calls = (
            hook.get_file,
            hook.iter_file_content,
            lambda bad: hook.download_file(bad, tmp_path / "f.jsonl"),
        )
        for call in calls:
            with guard.raises(ValueError) as caught:
                call(file_id)
            errors.append(caught.value)
    errors += run_async(async_calls())
    assert len(errors) == 5
    for error in errors:
        assert_clear(error, expected)
    assert_nothing_sent(api)
    assert list(tmp_path.iterdir()) == []


# -- destinations: download_file, save_results_to -----------------------------------------------------------------


def bad_destinations(tmp_path: Path) -> dict[str, tuple[Any, type[Exception], str]]:
    """Destination, the error it gets, and what its message says (``{name}``: the parameter's name)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("in the way")
    return {
        "none": (
            None,
            TypeError,
            "{name} must be a local path, a URL string or an ObjectStoragePath, got NoneType",
        ),
        "int": (
            42,
            TypeError,
            "{name} must be a local path, a URL string or an ObjectStoragePath, got int: 42.",
        ),
        "dict": (
            {"path": "/tmp"},
            TypeError,
            "{name} must be a local path, a URL string or an ObjectStoragePath",
        ),
        "empty": ("", ValueError, "{name} is an empty string"),
        "blank": ("  ", ValueError, "{name} is an empty string"),
        "relative": (
            "results/today",
            ValueError,
            "{name} 'results/today' is a relative path; give an absolute one",
        ),
        "home": ("~/results", ValueError, "{name} '~/results' is a relative path"),
        "unknown_scheme": (
            "nosuchfs://bucket/results",
            ValueError,
            "{name} 'nosuchfs://bucket/results': Airflow has no filesystem for it",
        ),
        "under_a_file": (
            f"{a_file}/results",
            ValueError,
            f"{{name}} '{a_file}/results' cannot be created: '{a_file}' is a file, not a directory.",
        ),
        "under_a_file_url": (
            f"file://{a_file}/results",
            ValueError,
            f"{{name}} 'file://{a_file}/results' cannot be created: '{a_file}' is a file, not a directory.",
        ),
        # Issue 24, defect 12: passed the check, then failed after the cancel, or wrote under the working directory.
        "nul_byte": ("/data/a\x00b", ValueError, "{name} '/data/a\\x00b' holds a NUL character"),
        "file_url_relative": ("file://rel/x", ValueError, "{name} 'file://rel/x' is a relative path"),
        "no_scheme": ("://x", ValueError, "{name} '://x' has no scheme before '://'"),
    }


@pytest.mark.parametrize(
    "name", ["none", "int", "dict", "empty", "blank", "relative", "home", "unknown_scheme", "under_a_file",
             "under_a_file_url", "nul_byte", "file_url_relative", "no_scheme"]
)  # fmt: skip
def test_bad_destinations_are_refused_before_any_request(
    api: BatchAPIEmulator, guard: Guard, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By ``download_file`` and by both operators' ``save_results_to``, blocking and deferrable: nothing is sent,
    nothing cancelled, nothing written (not even under the working directory, which a relative URL resolved
    against). ``None`` is only bad for ``download_file``: it means "save nothing"."""
    monkeypatch.chdir(tmp_path)
    destination, error_type, expected = bad_destinations(tmp_path)[name]
    before = sorted(tmp_path.iterdir())
    file_id = api.batch(api.untouched)["input_file_id"]  # type: ignore[attr-defined]
    with OpenAIBatchHook() as hook, guard.raises(error_type) as caught:
        hook.download_file(file_id, destination)
    assert str(caught.value).startswith(expected.format(name="destination")), str(caught.value)
    if destination is not None:
        for deferrable in (False, True):
            operators = [
                OpenAICancelBatchOperator(
                    task_id="cancel",
                    batch_id=api.untouched,
                    deferrable=deferrable,
                    save_results_to=destination,
                ),  # type: ignore[attr-defined]
                OpenAICancelStaleBatchesOperator(
                    task_id="cleanup",
                    older_than=timedelta(0),
                    deferrable=deferrable,
                    save_results_to=destination,
                ),
            ]
            for operator in operators:
                context = TaskContext()
                with guard.raises(error_type) as caught:
                    run_operator(operator, context, guard)
                assert str(caught.value).startswith(expected.format(name="save_results_to")), str(
                    caught.value
                )
                assert "results" not in context.xcoms and "summary" not in context.xcoms
    assert_nothing_sent(api)
    assert sorted(tmp_path.iterdir()) == before


def test_a_directory_is_not_a_file_to_download_to(
    api: BatchAPIEmulator, guard: Guard, tmp_path: Path
) -> None:
    file_id = api.batch(api.untouched)["input_file_id"]  # type: ignore[attr-defined]
    for destination in (tmp_path, f"{tmp_path}/new/"):
        with (
            OpenAIBatchHook() as hook,
            guard.raises(ValueError, match="is a directory; give the path of the file"),
        ):
            hook.download_file(file_id, destination)
    assert_nothing_sent(api)


def test_a_file_is_not_a_directory_to_save_results_under(
    api: BatchAPIEmulator, guard: Guard, tmp_path: Path
) -> None:
    (tmp_path / "a_file").write_text("in the way")
    operator = OpenAICancelBatchOperator(
        task_id="cancel",
        batch_id=api.untouched,
        save_results_to=tmp_path / "a_file",  # type: ignore[attr-defined]
    )
    with guard.raises(ValueError, match=f"save_results_to '{tmp_path}/a_file' is a file, not a directory."):
        run_operator(operator, TaskContext(), guard)
    assert_nothing_sent(api)


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[Path]:
    """A directory this process may not write in: read-only by its mode, and immutable as well when the tests run
    as root (CI does), since root writes anywhere whatever the mode."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:
        yield locked
        return
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True, check=False).returncode != 0:
        pytest.skip(
            "root may write anywhere, and this filesystem cannot make a directory immutable (chattr +i)"
        )
    try:
        yield locked
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_an_unwritable_directory_is_refused(api: BatchAPIEmulator, guard: Guard, locked: Path) -> None:
    operator = OpenAICancelBatchOperator(
        task_id="cancel",
        batch_id=api.untouched,
        save_results_to=locked / "results",  # type: ignore[attr-defined]
    )
    with guard.raises(ValueError, match=f"'{locked}' is not writable by this worker"):
        run_operator(operator, TaskContext(), guard)
    assert_nothing_sent(api)


# -- connections ------------------------------------------------------------------------------------------------


#: Connection fields (``{key}``: the fake key, ``{url}``: the emulator's base URL, ``{hostport}``: its host and
#: port), and the error they must get.
BAD_CONNECTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "missing_password": ({"host": "{url}"}, "Connection 'openai_default' has no API key: set its password"),
    "empty_password": ({"host": "{url}", "password": ""}, "Connection 'openai_default' has no API key"),
    "base_url_without_scheme": (
        {"password": "{key}", "host": "{hostport}/v1"},
        "Connection 'openai_default': base URL '{hostport}/v1' must be an absolute http(s) URL",
    ),
    "base_url_localhost_without_scheme": (
        {"password": "{key}", "host": "localhost:1/v1"},
        "Connection 'openai_default': base URL 'localhost:1/v1' must be an absolute http(s) URL",
    ),
    "base_url_other_scheme": (
        {"password": "{key}", "host": "ftp://{hostport}/v1"},
        "Connection 'openai_default': base URL 'ftp://{hostport}/v1' must be an absolute http(s) URL",
    ),
    "non_numeric_timeout": (
        {"password": "{key}", "host": "{url}", "extra": {"timeout": "soon"}},
        "Connection 'openai_default': extra 'timeout' must be a number, got 'soon'.",
    ),
    "boolean_timeout": (
        {"password": "{key}", "host": "{url}", "extra": {"timeout": True}},
        "Connection 'openai_default': extra 'timeout' must be a number, got True.",
    ),
    "zero_timeout": (
        {"password": "{key}", "host": "{url}", "extra": {"timeout": "0"}},
        "Connection 'openai_default': extra 'timeout' must be greater than 0, got '0'.",
    ),
    "non_numeric_max_retries": (
        {"password": "{key}", "host": "{url}", "extra": {"max_retries": "three"}},
        "Connection 'openai_default': extra 'max_retries' must be an integer, got 'three'.",
    ),
    "negative_max_retries": (
        {"password": "{key}", "host": "{url}", "extra": {"max_retries": -1}},
        "Connection 'openai_default': extra 'max_retries' must be at least 0, got -1.",
    ),
    "unknown_api_type": (
        {"password": "{key}", "host": "{url}", "extra": {"api_type": "bedrock"}},
        "Connection 'openai_default': extra 'api_type' must be 'openai' or 'azure', not 'bedrock'.",
    ),
    "client_kwargs_not_an_object": (
        {"password": "{key}", "host": "{url}", "extra": {"openai_client_kwargs": "api_key=sk"}},
        "Connection 'openai_default': extra 'openai_client_kwargs' must be a JSON object.",
    ),
    # Issue 24, defect 5: wrong types, ranges and characters, each named instead of an error of the HTTP stack.
    "api_type_not_a_string": (
        {"password": "{key}", "host": "{url}", "extra": {"api_type": 5}},
        "Connection 'openai_default': extra 'api_type' must be a string, not a number.",
    ),
    "organization_a_number": (
        {"password": "{key}", "host": "{url}", "extra": {"organization": 123}},
        "Connection 'openai_default': extra 'organization' must be a string, not a number.",
    ),
    "project_an_object": (
        {"password": "{key}", "host": "{url}", "extra": {"project": {}}},
        "Connection 'openai_default': extra 'project' must be a string, not an object.",
    ),
    "organization_not_ascii": (
        {"password": "{key}", "host": "{url}", "extra": {"organization": "orgé"}},
        "Connection 'openai_default': extra 'organization' is sent as a header, so it must be ASCII",
    ),
    "project_with_a_newline": (
        {
            "password": "{key}",
            "host": "{url}",
            "extra": {"openai_client_kwargs": {"project": "p\nX-Evil: 1"}},
        },
        "Connection 'openai_default': extra 'openai_client_kwargs.project' must not contain control characters",
    ),
    "ca_bundle_a_number": (
        {"password": "{key}", "host": "{url}", "extra": {"ca_bundle": 5}},
        "Connection 'openai_default': extra 'ca_bundle' must be a string, not a number.",
    ),
    "client_kwargs_base_url_a_number": (
        {"password": "{key}", "extra": {"openai_client_kwargs": {"base_url": 5}}},
        "Connection 'openai_default': base URL (extra 'openai_client_kwargs.base_url') must be a string, not a number.",
    ),
    "max_retries_infinity": (
        {"password": "{key}", "host": "{url}", "extra": {"max_retries": "Infinity"}},
        "Connection 'openai_default': extra 'max_retries' must be an integer, got 'Infinity'.",
    ),
    "max_retries_a_fraction": (
        {"password": "{key}", "host": "{url}", "extra": {"max_retries": 1.9}},
        "Connection 'openai_default': extra 'max_retries' must be an integer, got 1.9.",
    ),
    "max_retries_too_many": (
        {"password": "{key}", "host": "{url}", "extra": {"max_retries": 10**6}},
        "Connection 'openai_default': extra 'max_retries' must be at most 100, got 1000000.",
    ),
    "timeout_nan": (
        {"password": "{key}", "host": "{url}", "extra": {"timeout": "NaN"}},
        "Connection 'openai_default': extra 'timeout' must be a number, got 'NaN'.",
    ),
    "timeout_inf": (
        {"password": "{key}", "host": "{url}", "extra": {"timeout": "inf"}},
        "Connection 'openai_default': extra 'timeout' must be a number, got 'inf'.",
    ),
    "timeout_too_long": (
        {"password": "{key}", "host": "{url}", "extra": {"timeout": 1e300}},
        "Connection 'openai_default': extra 'timeout' must be at most 86400, got 1e+300.",
    ),
    "host_not_a_url": (
        {"password": "{key}", "host": "http://[::1"},
        "Connection 'openai_default': base URL 'http://[::1' (host) is not a valid URL",
    ),
    "host_port_out_of_range": (
        {"password": "{key}", "host": "http://127.0.0.1:99999/v1"},
        "Connection 'openai_default': base URL 'http://127.0.0.1/v1' (host): port 99999 is not between 1 and 65535.",
    ),
    "blank_password": (
        {"password": "   ", "host": "{url}"},
        "Connection 'openai_default' has no API key: set its password",
    ),
    "host_with_a_query": (
        {"password": "{key}", "host": "{url}?api-key=secret"},
        "Connection 'openai_default': base URL (host) must not have a query or a fragment",
    ),
    # Issue 24, defect 14: httpx sent 'user:pw@' as Basic auth on the sync path only; refused on both.
    "host_with_credentials": (
        {"password": "{key}", "host": "http://user:pw@{hostport}/v1"},
        "Connection 'openai_default': base URL (host) must not hold a user name or password",
    ),
}
SURFACES = [
    "hook_sync",
    "hook_async",
    "test_connection",
    "operator",
    "deferrable",
    "trigger",
    "multi_trigger",
    "callback",
    "cleanup",
]


def connect(emulator: BatchAPIEmulator, set_connection: Any, fields: dict[str, Any]) -> dict[str, str]:
    names = {
        "key": FAKE_API_KEY,
        "url": emulator.base_url,
        "hostport": emulator.base_url.removeprefix("http://").removesuffix("/v1"),
    }
    rendered = json.dumps(fields)
    for name, value in names.items():
        rendered = rendered.replace(f"{{{name}}}", value)
    set_connection(**json.loads(rendered))
    return names


def use(surface: str, batch_id: str, guard: Guard) -> tuple[BaseException | None, str | None]:
    """Drive ``surface`` against the batch; return what it raised, or (trigger, test button) its message."""

    async def via_async_hook() -> None:
        async with OpenAIBatchHook() as hook:
            await hook.acancel_batch(batch_id)

    def operator(deferrable: bool) -> None:
        run_operator(
            OpenAICancelBatchOperator(
                task_id="cancel", batch_id=batch_id, deferrable=deferrable, poll_interval=0.01
            ),
            TaskContext(),
            guard,
        )

    try:
        if surface == "hook_sync":
            with OpenAIBatchHook() as hook:
                hook.cancel_batch(batch_id)
        elif surface == "hook_async":
            run_async(via_async_hook())
        elif surface == "test_connection":
            with OpenAIBatchHook() as hook:
                ok, message = hook.test_connection()
            assert not ok
            return None, message
        elif surface in ("operator", "deferrable"):
            operator(surface == "deferrable")
        elif surface == "trigger":
            event = run_trigger(
                OpenAIBatchCancellationTrigger(batch_id, "openai_default", 0.01, time.time() + 5), guard
            )
            assert event["status"] == "error"
            return None, event["message"]
        elif surface == "multi_trigger":
            trigger = OpenAIMultiBatchCancellationTrigger([batch_id], "openai_default", 0.01, time.time() + 5)
            [event] = run_trigger(trigger, guard)["events"]
            assert event["status"] == "error"
            return None, event["message"]
        elif surface == "callback":
            guard.new_output()
            cancel_batch_on_failure(batch_id)(TaskContext())  # never raises
            return None, guard.new_output()
        elif surface == "cleanup":
            run_operator(
                OpenAICancelStaleBatchesOperator(task_id="cleanup", older_than=timedelta(0)),
                TaskContext(),
                guard,
            )
    except Exception as error:  # noqa: BLE001 - returned for the test to assert on
        guard.check_exception(error)
        return error, None
    raise AssertionError(f"{surface} went ahead with a broken connection")


@pytest.mark.parametrize("name", BAD_CONNECTIONS)
def test_bad_connection_is_refused_before_any_request(
    emulator: BatchAPIEmulator, set_connection: Any, guard: Guard, name: str
) -> None:
    """Through every entry point: both hooks, the UI's Test button, both operator modes, both triggers, the
    failure callback (which logs it) and the cleanup."""
    fields, expected = BAD_CONNECTIONS[name]
    names = connect(emulator, set_connection, fields)
    expected = expected.replace("{hostport}", names["hostport"])
    batch_id = emulator.add_batch()["id"]
    for surface in SURFACES:
        error, message = use(surface, batch_id, guard)
        if error is not None:
            assert isinstance(error, ValueError), f"{surface}: {error!r}"
            message = str(error)
        assert expected in message, f"{surface}: {message}"
        assert emulator.requests == [], f"{surface}: refused before any request"
        assert emulator.batch(batch_id)["status"] == "in_progress", f"{surface}: nothing was cancelled"


@pytest.mark.parametrize("surface", ["hook_sync", "hook_async", "trigger"])
def test_an_extra_that_is_a_json_list_is_refused(
    emulator: BatchAPIEmulator, set_connection: Any, guard: Guard, surface: str
) -> None:
    """Regression (issue 24, defect 5): an extra that is a JSON list raised ``AttributeError``. Airflow 3.0 and
    3.1 refuse to load such a connection themselves, so there the lookup's own error is what the caller gets."""
    set_connection(password=FAKE_API_KEY, host=emulator.base_url, extra=[{"organization": "org-1"}])
    batch_id = emulator.add_batch()["id"]
    error, message = use(surface, batch_id, guard)
    if error is not None:
        message = str(error)
    if airflow_version.startswith(("3.0.", "3.1.")):
        assert not isinstance(error, AttributeError), f"{surface}: {error!r}"
        assert "The conn_id `openai_default` isn't defined" in str(message)
    else:
        assert isinstance(error, ValueError) or surface == "trigger", f"{surface}: {error!r}"
        assert "Connection 'openai_default': its extra must be a JSON object, not a list." in str(message)
    assert emulator.requests == [], f"{surface}: refused before any request"


@pytest.mark.parametrize("surface", [s for s in SURFACES if s != "test_connection"])
def test_clear_text_http_to_a_remote_host_warns_and_works(
    emulator: BatchAPIEmulator,
    set_connection: Any,
    guard: Guard,
    monkeypatch: pytest.MonkeyPatch,
    surface: str,
) -> None:
    """``http://`` to a host that is not loopback sends the key in clear text: allowed (an internal proxy), but
    warned about, naming the connection and the host, never the key. The emulator stands in for that host as
    an HTTP proxy, so the requests really go out."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{emulator.port}")
    monkeypatch.setenv("NO_PROXY", "")
    for name in ("http_proxy", "ALL_PROXY", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    set_connection(password=FAKE_API_KEY, host="http://batch-proxy.internal/v1")
    created = int(time.time()) - 3 * 86_400
    batch_id = emulator.add_batch(created_at=created, cancel_after_polls=1, metadata={"test": surface})["id"]
    if surface in ("trigger", "multi_trigger"):
        emulator.set_status(batch_id, "cancelling")
    assert use_ok(surface, batch_id, guard, emulator) in ("cancelling", "cancelled")
    warning = "Connection 'openai_default' sends the API key in clear text over http:// to batch-proxy.internal; use https://."
    assert warning in guard.output()
    assert emulator.requests and all(r.headers["host"] == "batch-proxy.internal" for r in emulator.requests)


def use_ok(surface: str, batch_id: str, guard: Guard, emulator: BatchAPIEmulator) -> str:
    """Drive ``surface`` to success; return the batch's resulting status."""

    async def via_async_hook() -> str:
        async with OpenAIBatchHook() as hook:
            return str((await hook.acancel_batch(batch_id)).status)

    if surface == "hook_sync":
        with OpenAIBatchHook() as hook:
            return str(hook.cancel_batch(batch_id).status)
    if surface == "hook_async":
        return run_async(via_async_hook())
    if surface in ("operator", "deferrable"):
        operator = OpenAICancelBatchOperator(
            task_id="cancel", batch_id=batch_id, deferrable=surface == "deferrable", poll_interval=0.01
        )
        return run_operator(operator, TaskContext(), guard)["status"]
    if surface == "trigger":
        return run_trigger(
            OpenAIBatchCancellationTrigger(batch_id, "openai_default", 0.01, time.time() + 5), guard
        )["status"]
    if surface == "multi_trigger":
        trigger = OpenAIMultiBatchCancellationTrigger([batch_id], "openai_default", 0.01, time.time() + 5)
        return run_trigger(trigger, guard)["events"][0]["status"]
    if surface == "callback":
        cancel_batch_on_failure(batch_id)(TaskContext())
        return emulator.batch(batch_id)["status"]
    operator = OpenAICancelStaleBatchesOperator(
        task_id="cleanup",
        older_than=timedelta(days=1),
        wait_for_cancellation=False,
        metadata={"test": "cleanup"},
    )
    summary = run_operator(operator, TaskContext(task_id="cleanup"), guard)
    assert [entry["batch_id"] for entry in summary["cancelled"]] == [batch_id]
    return summary["cancelled"][0]["status"]
