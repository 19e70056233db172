"""Regression tests of issue 24's defects about arguments and results, one named test (or case) per defect.

Over real HTTP against the emulator, under ``tests._guards.guard`` (no leaked socket or task, the key nowhere).
Refused input must reach no endpoint: each such case asserts the emulator received no request at all. Triggers
are run as the triggerer runs them, rebuilt from the row Airflow stores, so on Airflow 3.0 a NaN argument comes
back as the string ``"nan"``: the assertions hold either way.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import json
import math
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch import storage
from airflow_provider_openai_batch.cancellation import CancellationEvent, WaitStopped
from airflow_provider_openai_batch.cleanup import CleanupSummary
from airflow_provider_openai_batch.exceptions import (
    OpenAIBatchError,
    OpenAIBatchResponseError,
    OpenAIFileDownloadError,
)
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAICancelBatchOperator,
    OpenAICancelStaleBatchesOperator,
)
from airflow_provider_openai_batch.results import save_results
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from airflow_provider_openai_batch.triggers.openai_batch import (
    OpenAIBatchCancellationTrigger,
    OpenAIMultiBatchCancellationTrigger,
)
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


@pytest.fixture
def api(emulator: BatchAPIEmulator, set_connection: Any) -> BatchAPIEmulator:
    set_connection(password=FAKE_API_KEY, host=emulator.base_url)
    return emulator


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The destination of results, inside ``tmp_path`` so that an escape from it can be seen."""
    (tmp_path / "results").mkdir()
    yield tmp_path / "results"
    assert_no_key_in_files(tmp_path)


def files_under(path: Path) -> list[str]:
    """Every file under ``path``, hidden ones included, relative to it."""
    return sorted(str(file.relative_to(path)) for file in path.rglob("*") if file.is_file())


def custom_ids(content: bytes) -> list[str]:
    return [json.loads(line)["custom_id"] for line in content.splitlines() if line.strip()]


def save(batch_id: str, root: Path) -> Any:
    with OpenAIBatchHook() as hook:
        return save_results(hook, batch_id, hook.get_batch(batch_id), storage.directory(root, "root"))


# -- 8: results stay under the destination, in the folder of the task's batch id ----------------------------------


def hostile_ids(api: BatchAPIEmulator, tmp_path: Path) -> dict[str, tuple[str, Path]]:
    """An id the API's answer may carry, and where the results went when it was trusted."""
    other = api.add_batch(status="cancelled")["id"]
    return {
        "parent": ("../escaped", tmp_path / "escaped"),
        "absolute": (str(tmp_path / "absolute"), tmp_path / "absolute"),
        "another_batch": (other, tmp_path / "results" / other),
    }


@pytest.mark.parametrize("case", ["parent", "absolute", "another_batch"])
def test_8_a_cancel_answer_naming_another_id_writes_nothing_outside_the_task_folder(
    api: BatchAPIEmulator, guard: Guard, root: Path, tmp_path: Path, case: str
) -> None:
    """The cancel's answer says ``cancelled`` with a foreign ``id``: nothing is written there, nor anywhere."""
    hostile, escaped_to = hostile_ids(api, tmp_path)[case]
    batch = api.add_batch(status="cancelled")
    answer = json.dumps({**batch, "id": hostile})
    api.inject(Fault("body", status=200, body=answer, method="POST", path="/cancel$"))
    operator = OpenAICancelBatchOperator(task_id="cancel", batch_id=batch["id"], save_results_to=str(root))
    context = TaskContext()

    with guard.raises(OpenAIBatchResponseError, match=f"The API's answer for batch '{batch['id']}' is about"):
        run_operator(operator, context, guard)

    assert not escaped_to.exists()
    assert files_under(tmp_path) == [], "nothing written anywhere"
    assert "results" not in context.xcoms


def test_8_a_deferred_wait_whose_last_poll_names_another_id_saves_nothing_outside(
    api: BatchAPIEmulator, guard: Guard, root: Path, tmp_path: Path
) -> None:
    """Deferred: the event's batch comes from a poll answering with ``"id": "../escaped"``."""
    batch = api.add_batch()
    cancelled = api.add_batch(status="cancelled")
    api.inject(
        Fault(
            "body",
            status=200,
            body=json.dumps({**cancelled, "id": "../escaped"}),
            method="GET",
            path=f"/batches/{batch['id']}$",
        )
    )
    operator = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=batch["id"], save_results_to=str(root), deferrable=True, poll_interval=0.01
    )

    with guard.raises(OpenAIBatchResponseError, match="is about batch '../escaped'"):
        run_operator(operator, TaskContext(), guard)

    assert files_under(tmp_path) == []


def test_8_cleanup_saves_in_the_folder_of_the_batch_it_cancelled_not_the_answer_s(
    api: BatchAPIEmulator, guard: Guard, root: Path
) -> None:
    """The cancel's answer names another batch: the cleanup files its outcome, and saves its results, under the
    id it selected and cancelled; the other batch's folder is not written."""
    stale = api.add_batch(created_at=0, metadata={"test": "answer-id"})["id"]
    other = api.add_batch(status="cancelled")["id"]
    # "cancelled" in the answer: no wait (the emulator, its answer replaced, never saw the cancel).
    answer = json.dumps({**api.batch(stale), "status": "cancelled", "id": other})
    api.inject(Fault("body", status=200, body=answer, method="POST", path="/cancel$"))
    operator = OpenAICancelStaleBatchesOperator(
        task_id="cleanup",
        older_than=timedelta(days=1),
        metadata={"test": "answer-id"},
        poll_interval=0.01,
        save_results_to=str(root),
    )

    summary = run_operator(operator, TaskContext("cleanup"), guard)

    assert [entry["batch_id"] for entry in summary["cancelled"]] == [stale]
    assert [manifest["batch_id"] for manifest in summary["results"]] == [stale]
    assert [path.name for path in root.iterdir()] == [stale]


def test_8_save_results_refuses_a_malformed_task_batch_id_before_any_request(
    api: BatchAPIEmulator, guard: Guard, root: Path
) -> None:
    batch = api.add_batch(status="cancelled")
    with OpenAIBatchHook() as hook:
        answer = hook.get_batch(batch["id"])
        api.clear_requests()
        for bad in ("../escaped", "/etc", ""):
            with guard.raises(ValueError, match="Invalid batch id"):
                save_results(hook, bad, answer.model_copy(update={"id": bad}), root)
    assert api.requests == []
    assert files_under(root) == []


# -- 9: results saving -------------------------------------------------------------------------------------------


def test_9_a_custom_id_that_is_not_utf8_fails_clearly(
    api: BatchAPIEmulator, guard: Guard, root: Path
) -> None:
    batch = api.add_batch(status="cancelled", total_requests=3)
    api.add_file(b'{"custom_id": "request-\xff"}\n', batch["output_file_id"])

    with guard.raises(
        OpenAIBatchError, match=rf"Line 1 of file '{batch['output_file_id']}' is not UTF-8 text"
    ):
        save(batch["id"], root)

    assert files_under(root) == []


def test_9_an_error_code_that_is_a_list_counts_as_a_request_that_ran(
    api: BatchAPIEmulator, guard: Guard, root: Path
) -> None:
    batch = api.add_batch(status="cancelled", total_requests=3)
    first, *others = custom_ids(api.file_content(batch["input_file_id"]))
    api.add_file(b"", batch["output_file_id"])
    error = {"custom_id": first, "error": {"code": ["batch_cancelled"], "message": "odd"}}
    api.add_file(json.dumps(error) + "\n", batch["error_file_id"])

    manifest = save(batch["id"], root)

    assert manifest.errors is not None and manifest.errors.lines == 1
    assert custom_ids((root / batch["id"] / "remaining.jsonl").read_bytes()) == others


@pytest.mark.parametrize(
    "line",
    [
        b'{"custom_id": "request-1", "custom_id": "request-2"}',
        b'{"custom_id": "request-1", "custom\\u005fid": "request-2"}',
        b'{"custom\\u005fid": "request-1", "custom_id": "request-2"}',
    ],
    ids=["plain", "escaped_second", "escaped_first"],
)
def test_9_a_line_with_two_custom_ids_is_refused_not_read_two_ways(
    api: BatchAPIEmulator, guard: Guard, root: Path, line: bytes
) -> None:
    """The leading-match fast path took the first, the JSON parse the last: remaining.jsonl was wrong."""
    batch = api.add_batch(status="cancelled", total_requests=3)
    api.add_file(line + b"\n", batch["output_file_id"])

    with guard.raises(OpenAIBatchError, match="Line 1 of file .* has more than one 'custom_id'"):
        save(batch["id"], root)

    assert files_under(root) == []


def test_9_a_failure_after_output_and_errors_leaves_none_of_the_three(
    api: BatchAPIEmulator, guard: Guard, root: Path
) -> None:
    """The input file's download fails once the output and error files are complete: neither is left under its
    name without the remaining.jsonl that says what did not run, nor any temporary file."""
    batch = api.add_batch(status="cancelled", total_requests=9)
    api.add_file(api.file_content(batch["input_file_id"]), batch["input_file_id"], bytes=10**6)

    with guard.raises(
        OpenAIFileDownloadError, match=f"Download of file '{batch['input_file_id']}' ended after"
    ):
        save(batch["id"], root)

    assert files_under(root) == []


def test_9_a_failed_rename_into_place_takes_back_the_files_already_renamed(
    api: BatchAPIEmulator, guard: Guard, root: Path
) -> None:
    """``remaining.jsonl`` cannot take its name (a directory is in the way): output.jsonl and errors.jsonl, renamed
    before it, are taken back."""
    batch = api.add_batch(status="cancelled", total_requests=9)
    in_the_way = root / batch["id"] / "remaining.jsonl"
    in_the_way.mkdir(parents=True)
    (in_the_way / "keep").write_text("not ours")

    with guard.raises(OSError):
        save(batch["id"], root)

    assert files_under(root) == [f"{batch['id']}/remaining.jsonl/keep"]


# -- 12: save_results_to refused up front ------------------------------------------------------------------------
# The cases "nul_byte", "file_url_relative" and "no_scheme" of test_bad_input.py's
# test_bad_destinations_are_refused_before_any_request: both operators, blocking and deferrable, no request.


# -- 4: triggers yield an error event, whatever their kwargs ------------------------------------------------------


def assert_error_event(event: dict[str, Any], *words: str) -> None:
    assert event["status"] == "error", event
    for word in words:
        assert word in event["message"], event["message"]


@pytest.mark.parametrize(
    "batch_id", [42, None, ["batch_1"], {"id": "batch_1"}], ids=["int", "none", "list", "dict"]
)
def test_4_single_trigger_with_a_non_string_id_yields_an_error_event(
    api: BatchAPIEmulator, guard: Guard, batch_id: Any
) -> None:
    event = run_trigger(
        OpenAIBatchCancellationTrigger(batch_id, "openai_default", 0.01, time.time() + 5), guard
    )
    assert_error_event(event, "A batch id must be a string")
    assert event["batch_id"] == repr(batch_id)
    assert api.requests == []


def test_4_multi_trigger_with_a_non_string_id_still_waits_for_the_others(
    api: BatchAPIEmulator, guard: Guard
) -> None:
    good = [api.add_batch(status="cancelling", cancel_after_polls=1)["id"] for _ in range(2)]
    ids = [good[0], 42, good[1]]

    payload = run_trigger(
        OpenAIMultiBatchCancellationTrigger(ids, "openai_default", 0.01, time.time() + 5), guard
    )

    events = payload["events"]
    assert [event["batch_id"] for event in events] == [good[0], "42", good[1]]
    assert_error_event(events[1], "A batch id must be a string, got int: 42.")
    assert [events[0]["status"], events[2]["status"]] == ["cancelled", "cancelled"]
    assert [r.path for r in api.requests] == ["/v1/batches"], "one list page showed both; nothing else sent"


def test_4_multi_trigger_given_one_string_does_not_iterate_it(api: BatchAPIEmulator, guard: Guard) -> None:
    """``batch_ids="batch_b"`` once GET /batches/b, /batches/a, ...: now one error event, and no request."""
    payload = run_trigger(
        OpenAIMultiBatchCancellationTrigger("batch_b", "openai_default", 0.01, time.time() + 5), guard
    )
    [event] = payload["events"]
    assert_error_event(event, "batch_ids must be a list of batch ids, got str: 'batch_b'.")
    assert api.requests == []


def test_4_multi_trigger_keeps_each_bad_id_s_own_error_when_the_connection_is_missing(
    api: BatchAPIEmulator, guard: Guard
) -> None:
    """A malformed id's event says what is wrong with it, whatever else fails; only polled batches get the
    connection's error. With no good id, no connection is looked up at all."""
    good = api.add_batch(status="cancelling")["id"]
    trigger = OpenAIMultiBatchCancellationTrigger([good, 42], "openai_missing", 0.01, time.time() + 5)

    first, second = run_trigger(trigger, guard)["events"]

    assert_error_event(first, f"Cannot poll batch '{good}'", "openai_missing")
    assert_error_event(second, "A batch id must be a string, got int: 42.")
    [only] = run_trigger(
        OpenAIMultiBatchCancellationTrigger([42], "openai_missing", 0.01, time.time() + 5), guard
    )["events"]
    assert_error_event(only, "A batch id must be a string, got int: 42.")
    assert api.requests == []


#: Trigger kwargs as a corrupted row, an older version or Airflow 3.0's serialiser may leave them.
BAD_WAIT_KWARGS: dict[str, tuple[dict[str, Any], str]] = {
    "poll_interval_string": ({"poll_interval": "30"}, "poll_interval"),
    "poll_interval_nan": ({"poll_interval": math.nan}, "poll_interval"),
    "poll_interval_inf": ({"poll_interval": math.inf}, "poll_interval"),
    "poll_interval_zero": ({"poll_interval": 0}, "poll_interval must be positive"),
    "poll_interval_negative": ({"poll_interval": -1}, "poll_interval must be positive"),
    "poll_interval_tiny": ({"poll_interval": 0.0001}, "poll_interval must be at least 0.01 seconds"),
    "deadline_none": ({"deadline": None}, "deadline must be finite UNIX seconds, got NoneType"),
    "deadline_string": ({"deadline": "tomorrow"}, "deadline must be finite UNIX seconds, got str"),
    "deadline_nan": ({"deadline": math.nan}, "deadline must be finite UNIX seconds"),
    "deadline_inf": ({"deadline": math.inf}, "deadline must be finite UNIX seconds"),
    "deadline_far": ({"deadline": 1e12}, "is more than 7 days away"),
    "conn_id_none": ({"conn_id": None}, "conn_id must be a connection id"),
}


@pytest.mark.parametrize("name", BAD_WAIT_KWARGS)
@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_4_11_triggers_with_bad_wait_kwargs_yield_an_error_event_naming_them(
    api: BatchAPIEmulator, guard: Guard, name: str, multi: bool
) -> None:
    """A string poll interval or a None deadline raised TypeError; an interval of 0 or below polled 2,000 times a
    second. Now every wait ends at once with an error event naming the argument, and nothing is requested."""
    batch_id = api.add_batch(status="cancelling", cancel_after_polls=1)["id"]
    override, expected = BAD_WAIT_KWARGS[name]
    kwargs = {"conn_id": "openai_default", "poll_interval": 0.01, "deadline": time.time() + 5, **override}
    if multi:
        [event] = run_trigger(OpenAIMultiBatchCancellationTrigger([batch_id], **kwargs), guard)["events"]
    else:
        event = run_trigger(OpenAIBatchCancellationTrigger(batch_id, **kwargs), guard)
    assert_error_event(event, f"Cannot poll batch '{batch_id}'", expected)
    assert event["batch_id"] == batch_id
    assert api.requests == []


def test_4_cleanup_resumed_with_an_error_about_no_batch_it_cancelled_reports_it_failed() -> None:
    """The multi-batch trigger's error event for a ``batch_ids`` it could not read names no cancelled batch:
    it becomes a failure instead of being dropped (the cleanup would have succeeded)."""
    summary = CleanupSummary(dry_run=False, selected=["batch_a"])
    summary.cancelled.append({"batch_id": "batch_a", "status": "cancelling"})
    error = CancellationEvent.without_batch("batch_a_b", WaitStopped.ERROR, "batch_ids must be a list")

    updated = summary.with_outcomes([error])

    assert updated.failed == [{"batch_id": "batch_a_b", "error": "batch_ids must be a list"}]


# -- 11 and 14a: operator arguments refused at construction, before any request -----------------------------------

OPERATOR_ARGUMENTS: dict[str, tuple[dict[str, Any], str]] = {
    "poll_interval_nan": ({"poll_interval": math.nan}, "poll_interval must be a number of seconds, got nan."),
    "poll_interval_inf": ({"poll_interval": math.inf}, "poll_interval must be at most 7 days, got inf."),
    "poll_interval_tiny": ({"poll_interval": 0.001}, "poll_interval must be at least 0.01 seconds"),
    "poll_interval_string": (
        {"poll_interval": "30"},
        "poll_interval must be a number of seconds or a timedelta",
    ),
    "poll_interval_bool": (
        {"poll_interval": True},
        "poll_interval must be a number of seconds or a timedelta",
    ),
    "timeout_nan": ({"timeout": math.nan}, "timeout must be a number of seconds, got nan."),
    "timeout_inf": ({"timeout": math.inf}, "timeout must be at most 7 days, got inf."),
    "timeout_huge": ({"timeout": 1e300}, "timeout must be at most 7 days"),
    "timeout_huge_int": ({"timeout": 10**400}, "timeout must be at most 7 days"),
    "timeout_max_timedelta": ({"timeout": timedelta.max}, "timeout must be at most 7 days"),
    "timeout_negative": ({"timeout": timedelta(seconds=-1)}, "timeout must be positive"),
}

CLEANUP_ARGUMENTS: dict[str, tuple[dict[str, Any], str]] = {
    **OPERATOR_ARGUMENTS,
    "metadata_list": (
        {"metadata": [("team", "search")]},
        "metadata must be a dict of string keys and values",
    ),
    "metadata_value_int": (
        {"metadata": {"team": 5}},
        "metadata must be a dict of string keys and values; 'team'",
    ),
    "max_concurrency_string": ({"max_concurrency": "8"}, "max_concurrency must be an integer, got str: '8'."),
    "max_concurrency_float": ({"max_concurrency": 2.5}, "max_concurrency must be an integer, got float"),
    "max_concurrency_bool": ({"max_concurrency": True}, "max_concurrency must be an integer, got bool"),
    "max_concurrency_zero": ({"max_concurrency": 0}, "max_concurrency must be at least 1"),
}


@pytest.mark.parametrize("name", OPERATOR_ARGUMENTS)
def test_11_cancel_operator_refuses_non_finite_and_unbounded_waits(api: BatchAPIEmulator, name: str) -> None:
    """``timeout=inf`` deferred raised OverflowError after the cancel, and blocking waited for ever;
    ``poll_interval=nan`` polled 1,700 times a second, ``timeout=nan`` failed just after the cancel."""
    batch_id = api.add_batch()["id"]
    override, expected = OPERATOR_ARGUMENTS[name]
    for deferrable in (False, True):
        with pytest.raises(ValueError) as caught:
            OpenAICancelBatchOperator(task_id="cancel", batch_id=batch_id, deferrable=deferrable, **override)
        assert str(caught.value).startswith(expected), str(caught.value)
    assert api.requests == []
    assert api.batch(batch_id)["status"] == "in_progress"


@pytest.mark.parametrize("name", CLEANUP_ARGUMENTS)
def test_11_14a_cleanup_refuses_bad_arguments_naming_them(api: BatchAPIEmulator, name: str) -> None:
    override, expected = CLEANUP_ARGUMENTS[name]
    with pytest.raises(ValueError) as caught:
        OpenAICancelStaleBatchesOperator(task_id="cleanup", older_than=timedelta(0), **override)
    assert str(caught.value).startswith(expected), str(caught.value)
    assert api.requests == []


def test_14a_cleanup_metadata_rendered_to_a_string_is_refused_before_any_request(
    api: BatchAPIEmulator, guard: Guard
) -> None:
    """A string may be a template rendering to a dict, so it passes construction; rendered to a string still,
    it is refused before the listing (it failed with AttributeError, after it)."""
    batch_id = api.add_batch(created_at=0)["id"]
    operator = OpenAICancelStaleBatchesOperator(task_id="cleanup", older_than=timedelta(0), metadata="team")

    with guard.raises(
        ValueError, match="metadata must be a dict of string keys and values, got str: 'team'."
    ):
        run_operator(operator, TaskContext("cleanup"), guard)

    assert api.requests == []
    assert api.batch(batch_id)["status"] == "in_progress"


def test_14a_cleanup_metadata_that_renders_later_passes_construction() -> None:
    """What renders at run time is checked then: a template string, an ``XComArg``, as a whole or as a value."""
    from airflow.sdk import DAG

    with DAG("hostile_metadata", schedule=None):
        upstream = OpenAICancelBatchOperator(task_id="submit", batch_id="batch_1")
        for index, metadata in enumerate(
            [
                upstream.output,
                {"airflow_run_id": upstream.output},
                "{{ params.tags }}",
                {"team": "{{ params.t }}"},
            ]
        ):
            operator = OpenAICancelStaleBatchesOperator(
                task_id=f"cleanup_{index}", older_than=timedelta(0), metadata=metadata
            )
            assert operator.metadata is metadata


def test_11_a_valid_wait_still_runs(api: BatchAPIEmulator, guard: Guard) -> None:
    """The bounds leave room: the floor interval and a timedelta timeout at the bound wait as before."""
    batch_id = api.add_batch(cancel_after_polls=2)["id"]
    operator = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=batch_id, poll_interval=0.01, timeout=timedelta(days=7)
    )
    assert run_operator(operator, TaskContext(), guard)["status"] == "cancelled"


def test_11_the_deferral_timeout_of_the_longest_wait_fits(api: BatchAPIEmulator, guard: Guard) -> None:
    """``timeout`` at its bound defers with a finite deferral timeout (inf raised OverflowError here)."""
    batch_id = api.add_batch(cancel_after_polls=1)["id"]
    deferred: list[Any] = []
    operator = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=batch_id, poll_interval=0.01, timeout=timedelta(days=7), deferrable=True
    )
    assert run_operator(operator, TaskContext(), guard, deferred=deferred)["status"] == "cancelled"
    assert timedelta(days=7) < deferred[0].timeout <= timedelta(days=7, minutes=10)
