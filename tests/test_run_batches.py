"""Run tags and cancel_run_batches: the tags and their limits, the early stop, what is (not) cancelled, never
raising, and the deadline-alert form on the event loop, against the emulator over real HTTP.

Every test runs under tests._guards.guard: the fake key must appear in no log line, stdout/stderr or request
body, and no socket or emulator thread may outlive the test.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from airflow import __version__ as airflow_version
from airflow.providers.common.compat.module_loading import import_string

from airflow_provider_openai_batch.callbacks import (
    CLOCK_SKEW_MARGIN,
    cancel_run_batches,
    run_batch_metadata,
)
from airflow_provider_openai_batch.hooks import _async_clients
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from tests._guards import (  # noqa: F401 - fixtures: guard and fast_backoff are autouse
    FAKE_API_KEY,
    Guard,
    fast_backoff,
    guard,
    private_emulator,
    run_async,
)

DAG_ID = "nightly_eval"
RUN_ID = "scheduled__2025-06-01T00:00:00+00:00"
#: When the run under test started: the batches it created are younger, the organization's history older.
STARTED = int(time.time()) - 3600
HAS_DEADLINES = not airflow_version.startswith("3.0.")
SUMMARY_LINE = re.compile(r"Batches of run .* of DAG .*: \d+ cancelled .* \d+ listed.*\.")


@pytest.fixture
def api(private_emulator: BatchAPIEmulator, set_connection: Callable[..., None]) -> BatchAPIEmulator:
    """A fresh emulator per test, so that its list holds only what the test seeds and pages can be counted."""
    set_connection(password=FAKE_API_KEY, host=private_emulator.base_url)
    return private_emulator


def tags(dag_id: str = DAG_ID, run_id: str = RUN_ID, task_id: str = "submit") -> dict[str, str]:
    return {"airflow_dag_id": dag_id, "airflow_run_id": run_id, "airflow_task_id": task_id}


def seed_history(emulator: BatchAPIEmulator, count: int, **kwargs: Any) -> None:
    """``count`` batches created before the run, and before the clock-skew margin."""
    before = STARTED - CLOCK_SKEW_MARGIN.total_seconds() - 1
    for i in range(count):
        emulator.add_batch(created_at=int(before - i), **kwargs)


def seed_run_batch(emulator: BatchAPIEmulator, after_start: float = 10, **kwargs: Any) -> str:
    kwargs.setdefault("metadata", tags())
    return emulator.add_batch(created_at=int(STARTED + after_start), **kwargs)["id"]


def failure_context(run_id: str = RUN_ID, started: float | None = STARTED) -> dict[str, Any]:
    """What a failure callback gets: the task context, its ``dag_run`` an object with datetimes."""
    start_date = None if started is None else datetime.fromtimestamp(started, UTC)
    dag_run = SimpleNamespace(dag_id=DAG_ID, run_id=run_id, start_date=start_date, run_after=start_date)
    return {"dag_run": dag_run, "run_id": run_id, "reason": "task_failure"}


def deadline_context(start_date: float | None = STARTED, queued_at: float = STARTED - 30) -> dict[str, Any]:
    """What a deadline callback gets: ``dag_run`` as the REST API's DAG run JSON, dates as ISO strings."""

    def iso(moment: float | None) -> str | None:
        return None if moment is None else datetime.fromtimestamp(moment, UTC).isoformat()

    dag_run = {
        "dag_run_id": RUN_ID,
        "dag_id": DAG_ID,
        "logical_date": iso(STARTED - 86400),
        "queued_at": iso(queued_at),
        "start_date": iso(start_date),
        "run_after": iso(STARTED - 86400),
        "state": "running",
        "conf": {},
    }
    return {
        "dag_run": dag_run,
        "deadline": {"id": "0199f2d5-0000-7000-8000-000000000000", "deadline_time": iso(STARTED)},
    }


def fire_deadline_callback(stored: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a deadline alert's callback, as Airflow stores it (``serialize()``), through the trigger the
    triggerer runs for it (Airflow 3.1: DeadlineCallbackTrigger; 3.2+: CallbackTrigger); return its events."""
    try:
        from airflow.triggers.callback import CallbackTrigger as Trigger  # Airflow >= 3.2
    except ImportError:
        from airflow.triggers.deadline import DeadlineCallbackTrigger as Trigger  # Airflow 3.1

    trigger = Trigger(
        callback_path=stored["path"], callback_kwargs={**stored["kwargs"], "context": deadline_context()}
    )

    async def run_trigger() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    return run_async(run_trigger())


def list_pages(emulator: BatchAPIEmulator) -> int:
    return sum(1 for r in emulator.requests if r.path == "/v1/batches")


def cancelled_ids(emulator: BatchAPIEmulator) -> set[str]:
    return {r.path.split("/")[3] for r in emulator.requests if r.method == "POST"}


def parsed(result: str | None) -> dict[str, Any] | None:
    """The callback's result: JSON text (Airflow keeps a deadline callback's in a text column), or None."""
    assert result is None or isinstance(result, str), result
    return None if result is None else json.loads(result)


def on_failure(context: dict[str, Any] | None) -> dict[str, Any] | None:
    """What Airflow does with ``on_failure_callback=cancel_run_batches()``: call it with the context."""
    return parsed(cancel_run_batches()(context))  # type: ignore[arg-type]


def at_deadline(context: dict[str, Any] | None, conn_id: str = "openai_default") -> dict[str, Any] | None:
    """What the triggerer does with ``AsyncCallback(cancel_run_batches, kwargs=...)``: build it with the
    kwargs and the context, then await it; on a fresh loop, to be left with no task and no client open."""

    async def deadline_fires() -> str | None:
        return await cancel_run_batches(conn_id=conn_id, context=context)

    return parsed(run_async(deadline_fires()))


def run_form(form: str) -> dict[str, Any] | None:
    """One of the two forms, with the context Airflow gives it for the run under test."""
    return on_failure(failure_context()) if form == "failure" else at_deadline(deadline_context())


# -- run tags ------------------------------------------------------------------------------------------------


def task_context(task_id: str = "submit") -> dict[str, Any]:
    return {"ti": SimpleNamespace(dag_id=DAG_ID, run_id=RUN_ID, task_id=task_id, map_index=-1)}


def test_tags_name_the_run_and_the_task_plus_extra_keys() -> None:
    assert run_batch_metadata(task_context(), team="search", purpose="eval") == {
        **tags(),
        "team": "search",
        "purpose": "eval",
    }
    assert run_batch_metadata(task_context("embed")) == tags(task_id="embed")


def test_metadata_at_the_api_limits_is_accepted() -> None:
    extra = {f"k{i:02d}".ljust(64, "x"): "v" * 512 for i in range(13)}
    metadata = run_batch_metadata(task_context(), **extra)
    assert len(metadata) == 16
    assert max(map(len, metadata)) == 64 and max(map(len, metadata.values())) == 512


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {f"k{i}": "v" for i in range(14)},
            "Batch metadata takes at most 16 keys; got 17: ['airflow_dag_id', 'airflow_run_id'",
        ),
        ({"k" * 65: "v"}, "Batch metadata keys are 1 to 64 characters; 'kkkk"),
        ({"": "v"}, "Batch metadata keys are 1 to 64 characters; '' has 0."),
        (
            {"notes": "v" * 513},
            "Batch metadata values are at most 512 characters; the value of 'notes' has 513.",
        ),
        ({"attempt": 2}, "Batch metadata values are strings; 'attempt' is int 2."),
        ({"airflow_run_id": "other"}, "run_batch_metadata sets airflow_run_id itself"),
    ],
    ids=["17-keys", "long-key", "empty-key", "long-value", "int-value", "replaces-a-tag"],
)
def test_metadata_the_api_would_refuse_is_a_clear_error(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        run_batch_metadata(task_context(), **extra)


def test_tags_at_the_limits_are_accepted_by_the_api_and_found_again(api: BatchAPIEmulator) -> None:
    """Created over HTTP with the tags, as a submit task does; the emulator refuses what the API refuses."""
    extra = {f"k{i:02d}".ljust(64, "x"): "v" * 512 for i in range(13)}
    body = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    api.add_file(
        '{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n', "file-1"
    )
    with OpenAIBatchHook() as hook:
        created = hook.get_conn().post(
            "/batches", json={**body, "metadata": run_batch_metadata(task_context(), **extra)}
        )
    assert created.status_code == 200, created.text
    summary = on_failure(failure_context(started=time.time() - 60))
    assert summary["cancelled"] == [{"batch_id": created.json()["id"], "status": "cancelling"}]


def test_tags_need_a_task_context() -> None:
    with pytest.raises(ValueError, match="needs the context of the task creating the batch"):
        run_batch_metadata({"dag_run": SimpleNamespace(run_id=RUN_ID)})  # type: ignore[arg-type]


# -- the early stop ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["failure", "deadline"])
@pytest.mark.parametrize(
    ("recent_others", "pages"), [(0, 1), (150, 2)], ids=["run-in-first-page", "run-spans-two-pages"]
)
def test_reads_the_list_only_down_to_the_run_start(
    api: BatchAPIEmulator, form: str, recent_others: int, pages: int
) -> None:
    seed_history(api, 300)
    seed_history(api, 1, metadata=tags())  # tagged, but older than the run (less the margin): past the stop
    ours = [seed_run_batch(api, after_start=20 + i) for i in range(3)]
    for i in range(recent_others):  # other DAGs' batches created while the run was going
        api.add_batch(created_at=STARTED + 10 + i, metadata=tags(dag_id="other_dag"))

    summary = run_form(form)
    assert list_pages(api) == pages, "pages past the run's start are never requested"
    assert summary["listed"] == 3 + recent_others  # the first batch past the margin ends the listing
    assert cancelled_ids(api) == set(ours)
    assert {entry["batch_id"] for entry in summary["cancelled"]} == set(ours)


def test_a_batch_within_the_clock_skew_margin_is_cancelled(api: BatchAPIEmulator) -> None:
    seed_history(api, 120)
    early = seed_run_batch(api, after_start=-CLOCK_SKEW_MARGIN.total_seconds() + 30)
    summary = on_failure(failure_context())
    assert [entry["batch_id"] for entry in summary["cancelled"]] == [early]
    assert list_pages(api) == 1


def test_without_a_start_time_the_whole_list_is_read(api: BatchAPIEmulator) -> None:
    """A DAG run failed before any task ran: its failure callback gets only ``dag`` and ``run_id``."""
    seed_history(api, 250)
    ours = seed_run_batch(api)
    summary = on_failure({"dag": SimpleNamespace(dag_id=DAG_ID), "run_id": RUN_ID, "reason": "x"})
    assert list_pages(api) == 3
    assert [entry["batch_id"] for entry in summary["cancelled"]] == [ours]


def test_a_deadline_before_the_run_started_reads_from_its_queued_time(api: BatchAPIEmulator) -> None:
    seed_history(api, 150)
    ours = seed_run_batch(api, after_start=-60)  # created after it was queued; the run never started
    summary = at_deadline(deadline_context(start_date=None, queued_at=STARTED - 90))
    assert [entry["batch_id"] for entry in summary["cancelled"]] == [ours]
    assert list_pages(api) == 1


# -- what is cancelled ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["failure", "deadline"])
def test_only_the_runs_cancellable_batches_are_cancelled(api: BatchAPIEmulator, form: str) -> None:
    ours = {
        status: seed_run_batch(api, status=status) for status in ("validating", "in_progress", "finalizing")
    }
    left_alone = {
        "completed": seed_run_batch(api, status="completed"),
        "failed": seed_run_batch(api, status="failed"),
        "expired": seed_run_batch(api, status="expired"),
        "cancelled": seed_run_batch(api, status="cancelled"),
        "another run": seed_run_batch(api, metadata=tags(run_id="manual__2025-06-01T08:00:00+00:00")),
        "another DAG, same run id": seed_run_batch(api, metadata=tags(dag_id="other_dag")),
        "run id only": seed_run_batch(api, metadata={"airflow_run_id": RUN_ID}),
        "no metadata": seed_run_batch(api, metadata=None),
        "the user's own keys": seed_run_batch(api, metadata={"team": "search"}),
    }
    before = {name: api.batch(batch_id)["status"] for name, batch_id in left_alone.items()}

    summary = run_form(form)

    assert cancelled_ids(api) == set(ours.values())
    assert {name: api.batch(batch_id)["status"] for name, batch_id in left_alone.items()} == before
    assert {api.batch(batch_id)["status"] for batch_id in ours.values()} == {"cancelling"}
    assert sorted(summary["cancelled"], key=lambda entry: entry["batch_id"]) == sorted(
        ({"batch_id": batch_id, "status": "cancelling"} for batch_id in ours.values()),
        key=lambda e: e["batch_id"],
    )
    assert summary["already_finished"] == summary["failed"] == [] and summary["error"] is None


@pytest.mark.parametrize(
    "refusal",
    [
        '{"error": {"message": "Cannot cancel a batch with status \'completed\'."}}',
        '{"error": {"message": "Conflict."}}',  # a gateway's wording: the batch's real status decides
    ],
    ids=["api-wording", "other-wording"],
)
@pytest.mark.parametrize("form", ["failure", "deadline"])
def test_a_batch_that_finished_meanwhile_is_reported_not_failed(
    api: BatchAPIEmulator, form: str, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Listed in progress, completed by the time its cancel arrives: the API answers 409."""
    racing = seed_run_batch(
        api, finish_after_polls=2
    )  # looked at by the listing, completes at the GET after the 409
    other = seed_run_batch(api)
    api.inject(Fault(kind="body", status=409, path=f"{racing}/cancel$", body=refusal))
    with caplog.at_level(logging.INFO, logger="airflow_provider_openai_batch.callbacks"):
        summary = run_form(form)
    assert summary["already_finished"] == [{"batch_id": racing, "status": "completed"}]
    assert summary["cancelled"] == [{"batch_id": other, "status": "cancelling"}]
    assert summary["failed"] == [] and summary["error"] is None
    [line] = [r for r in caplog.records if SUMMARY_LINE.search(r.getMessage())]
    assert line.levelno == logging.INFO
    assert f"1 already finished ['{racing}']" in line.getMessage()


# -- never raising -------------------------------------------------------------------------------------------


def break_api(api: BatchAPIEmulator, monkeypatch: pytest.MonkeyPatch, problem: str) -> str:
    """Make one thing go wrong; return what the logged line must say about it."""
    if problem == "api-down":
        api.inject(Fault(kind="status", status=503, times=100, headers={"retry-after-ms": "1"}))
        return "HTTP 503"
    if problem == "wrong-key":
        monkeypatch.setenv(
            "AIRFLOW_CONN_OPENAI_DEFAULT",
            f'{{"conn_type": "openai_batch", "password": "sk-wrong-0123456789", "host": "{api.base_url}"}}',
        )
        return "HTTP 401"
    if problem == "no-connection":
        monkeypatch.delenv("AIRFLOW_CONN_OPENAI_DEFAULT")
        return "openai_default"
    if problem == "malformed-list":
        api.inject(Fault(kind="body", status=200, times=100, body="<html>proxy</html>", method="GET"))
        return "not a valid BatchList"
    raise AssertionError(problem)


@pytest.mark.parametrize("form", ["failure", "deadline"])
@pytest.mark.parametrize("problem", ["api-down", "wrong-key", "no-connection", "malformed-list"])
def test_never_raises_when_the_api_or_the_connection_fails(
    api: BatchAPIEmulator,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    form: str,
    problem: str,
) -> None:
    batch_id = seed_run_batch(api)
    expected = break_api(api, monkeypatch, problem)
    with caplog.at_level(logging.INFO, logger="airflow_provider_openai_batch.callbacks"):
        summary = run_form(form)
    assert api.batch(batch_id)["status"] == "in_progress"
    assert [r.method for r in api.requests if r.method != "GET"] == []
    [line] = [r for r in caplog.records if r.name == "airflow_provider_openai_batch.callbacks"]
    assert line.levelno >= logging.WARNING
    assert expected in line.getMessage() + str(line.exc_info)
    if form == "failure" and problem == "no-connection":  # it fails before the listing: no summary
        assert summary is None
    else:
        assert expected in summary["error"] and summary["cancelled"] == []
        assert SUMMARY_LINE.search(line.getMessage())


@pytest.mark.parametrize("form", ["failure", "deadline"])
def test_one_batch_failing_to_cancel_does_not_stop_the_others(
    api: BatchAPIEmulator, caplog: pytest.LogCaptureFixture, form: str
) -> None:
    ids = [seed_run_batch(api, after_start=i) for i in range(4)]
    broken = ids[1]
    api.inject(
        Fault(kind="status", status=500, times=100, path=f"{broken}/cancel$", headers={"retry-after-ms": "1"})
    )
    with caplog.at_level(logging.INFO, logger="airflow_provider_openai_batch.callbacks"):
        summary = run_form(form)
    assert {entry["batch_id"] for entry in summary["cancelled"]} == set(ids) - {broken}
    assert [entry["batch_id"] for entry in summary["failed"]] == [broken]
    assert "HTTP 500" in summary["failed"][0]["error"]
    [line] = [r for r in caplog.records if SUMMARY_LINE.search(r.getMessage())]
    assert line.levelno == logging.WARNING and "3 cancelled" in line.getMessage()


@pytest.mark.parametrize(
    "context",
    [
        None,
        {},
        {"dag_run": {"dag_id": DAG_ID}},
        {"dag_run": {"dag_id": DAG_ID, "dag_run_id": RUN_ID, "start_date": "not a date"}},
    ],
    ids=["none", "empty", "no-run-id", "bad-start-date"],
)
@pytest.mark.parametrize("form", ["failure", "deadline"])
def test_a_context_without_a_run_is_logged_not_raised(
    api: BatchAPIEmulator, caplog: pytest.LogCaptureFixture, form: str, context: dict | None
) -> None:
    seed_run_batch(api)
    with caplog.at_level(logging.ERROR, logger="airflow_provider_openai_batch.callbacks"):
        result = on_failure(context) if form == "failure" else at_deadline(context)
    assert result is None
    assert api.requests == []
    assert "Could not cancel the DAG run's batches; the original failure stands." in caplog.text


def test_bad_conn_id_is_refused_when_the_dag_is_parsed() -> None:
    with pytest.raises(ValueError, match="conn_id must be a connection id"):
        cancel_run_batches(conn_id="")
    with pytest.raises(ValueError, match="conn_id must be a connection id"):
        cancel_run_batches(conn_id=None)  # type: ignore[arg-type]


# -- the deadline-alert form, on the event loop --------------------------------------------------------------


async def test_async_form_never_blocks_the_loop(
    api: BatchAPIEmulator, connection_lookups: list[str], mocker: Any
) -> None:
    """The connection is looked up asynchronously (a synchronous lookup on the loop fails the test), no
    synchronous HTTP is sent, and the loop is left with no task and no client of its own."""
    seed_history(api, 120)
    ours = [seed_run_batch(api, after_start=i) for i in range(3)]
    sync_send = mocker.patch("httpx.Client.send", side_effect=AssertionError("sync HTTP on the event loop"))
    before = asyncio.all_tasks()
    summary = parsed(await cancel_run_batches(context=deadline_context()))
    assert {entry["batch_id"] for entry in summary["cancelled"]} == set(ours)
    assert connection_lookups == ["openai_default"] and sync_send.call_count == 0
    assert asyncio.all_tasks() == before
    assert _async_clients._clients.get(asyncio.get_running_loop(), {}) == {}


def test_sync_form_looks_the_connection_up_before_its_loop(
    api: BatchAPIEmulator, connection_lookups: list[str]
) -> None:
    """Where failure callbacks run (DAG processor, worker), the synchronous lookup is the reliable one: it is
    made before the event loop starts (made on the loop, the guard would fail it), never the async one."""
    ours = seed_run_batch(api)
    summary = on_failure(failure_context())
    assert [entry["batch_id"] for entry in summary["cancelled"]] == [ours]
    assert connection_lookups == []


@pytest.mark.skipif(not HAS_DEADLINES, reason="deadline alerts came in Airflow 3.1")
def test_as_a_deadline_alert_callback_through_airflows_own_trigger(
    api: BatchAPIEmulator, guard: Guard
) -> None:
    """The DeadlineAlert's AsyncCallback, serialized as Airflow stores it, run by the trigger the triggerer
    runs for it (Airflow 3.1: DeadlineCallbackTrigger; 3.2+: CallbackTrigger)."""
    from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

    ours = seed_run_batch(api)
    callback = cancel_run_batches(conn_id="openai_default").deadline_callback()
    alert = DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT, interval=timedelta(hours=1), callback=callback
    )
    stored = guard.check(alert.callback.serialize(), "the callback Airflow stores")
    assert stored == {
        "path": "airflow_provider_openai_batch.callbacks.cancel_run_batches",
        "kwargs": {"conn_id": "openai_default"},
    }
    assert import_string(stored["path"]) is cancel_run_batches

    events = fire_deadline_callback(stored)
    assert [event["state"] for event in events] == ["running", "success"]
    summary = parsed(guard.check(events[-1]["body"], "the callback's result"))
    assert summary["cancelled"] == [{"batch_id": ours, "status": "cancelling"}]
    assert api.batch(ours)["status"] == "cancelling"


@pytest.mark.skipif(HAS_DEADLINES, reason="Airflow 3.0 only: it has no deadline alerts")
def test_deadline_callback_says_which_airflow_it_needs_on_3_0() -> None:
    with pytest.raises(
        ImportError, match=rf"Deadline alerts need Airflow 3.1 or later; this is Airflow {airflow_version}"
    ):
        cancel_run_batches().deadline_callback()
