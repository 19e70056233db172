"""OpenAIBatchCancellationTrigger against the emulator over real HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from airflow.providers.common.compat.module_loading import import_string

from airflow_provider_openai_batch.hooks import _async_clients
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchCancellationTrigger
from tests._guards import built_by_the_triggerer, stored_by_airflow
from tests.conftest import FAKE_API_KEY


def make_trigger(
    batch_id: str, *, deadline_in: float = 30, poll_interval: float = 0.01
) -> OpenAIBatchCancellationTrigger:
    return OpenAIBatchCancellationTrigger(
        batch_id=batch_id,
        conn_id="openai_default",
        poll_interval=poll_interval,
        deadline=time.time() + deadline_in,
    )


async def run_to_end(trigger: OpenAIBatchCancellationTrigger) -> dict[str, Any]:
    """Run as the triggerer does; assert the trigger fires exactly one event and then stops."""
    events = [event async for event in trigger.run()]
    assert len(events) == 1
    return events[0].payload


@pytest.fixture
def fast_connection(emulator: BatchAPIEmulator, set_connection: Callable) -> BatchAPIEmulator:
    """The emulator, with hook retries off so transient-failure tests run in milliseconds."""
    set_connection(password=FAKE_API_KEY, host=emulator.base_url, extra={"max_retries": 0})
    return emulator


def cancelling(emulator: BatchAPIEmulator, **kwargs: Any) -> str:
    batch_id = emulator.add_batch(**kwargs)["id"]
    emulator.set_status(batch_id, "cancelling")
    return batch_id


@pytest.fixture
def other_connection(emulator: BatchAPIEmulator, set_connection: Callable) -> BatchAPIEmulator:
    """The emulator behind ``openai_other`` only: a trigger rebuilt without its ``conn_id`` finds no
    connection."""
    set_connection("openai_other", password=FAKE_API_KEY, host=emulator.base_url)
    return emulator


@pytest.mark.timeout(30)  # a poll interval lost on the way (the operator's default is 30 s) fails it
async def test_rebuilt_from_what_airflow_stores_it_resumes_the_same_wait(
    other_connection: BatchAPIEmulator,
) -> None:
    """Stored as a Trigger row and built again by the triggerer: the same batch, through the same connection,
    at the same interval, against the same absolute deadline (30 s ahead: not reached, the wait goes on)."""
    batch_id = cancelling(other_connection, cancel_after_polls=3)
    cancelling(other_connection)  # another batch, which it must not poll
    row = stored_by_airflow(
        OpenAIBatchCancellationTrigger(
            batch_id=batch_id, conn_id="openai_other", poll_interval=0.01, deadline=time.time() + 30
        )
    )
    rebuilt = built_by_the_triggerer(row)
    assert type(rebuilt) is OpenAIBatchCancellationTrigger
    event = await run_to_end(rebuilt)
    assert (event["status"], event["batch_id"]) == ("cancelled", batch_id)
    assert [r.path for r in other_connection.requests] == [f"/v1/batches/{batch_id}"] * 3


async def test_waits_until_cancelled_and_reports_partial_results(
    emulator_connection: BatchAPIEmulator,
) -> None:
    batch_id = cancelling(emulator_connection, cancel_after_polls=3)
    event = await run_to_end(make_trigger(batch_id))
    assert event["status"] == "cancelled"
    assert event["batch_id"] == batch_id
    assert event["output_file_id"] == emulator_connection.batch(batch_id)["output_file_id"] is not None
    assert event["error_file_id"] == emulator_connection.batch(batch_id)["error_file_id"] is not None
    assert event["request_counts"] == emulator_connection.batch(batch_id)["request_counts"]
    assert event["batch"] == emulator_connection.batch(batch_id)
    assert "cancelled" in event["message"]
    assert [r.path for r in emulator_connection.requests] == [f"/v1/batches/{batch_id}"] * 3


@pytest.mark.parametrize("finish_as", ["completed", "failed", "expired"])
async def test_batch_that_finishes_before_the_cancel(
    emulator_connection: BatchAPIEmulator, finish_as: str
) -> None:
    batch_id = cancelling(emulator_connection, cancel_after_polls=1, finish_as=finish_as)
    event = await run_to_end(make_trigger(batch_id))
    assert event["status"] == finish_as
    assert event["batch"]["status"] == finish_as
    assert "before the cancellation took effect" in event["message"]


async def test_times_out_at_the_deadline(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = cancelling(emulator_connection, cancel_after_polls=10**9)
    started = time.monotonic()
    event = await run_to_end(make_trigger(batch_id, deadline_in=0.5, poll_interval=0.1))
    assert 0.45 <= time.monotonic() - started < 3
    assert event["status"] == "timeout"
    assert event["batch"]["status"] == "cancelling"
    assert event["output_file_id"] is None
    assert "still 'cancelling' at the deadline" in event["message"]


async def test_deadline_already_passed_polls_once_then_times_out(
    emulator_connection: BatchAPIEmulator,
) -> None:
    batch_id = cancelling(emulator_connection, cancel_after_polls=10**9)
    event = await run_to_end(make_trigger(batch_id, deadline_in=-5, poll_interval=60))
    assert event["status"] == "timeout"
    assert len(emulator_connection.requests) == 1


async def test_transient_failures_do_not_end_the_wait(fast_connection: BatchAPIEmulator) -> None:
    batch_id = cancelling(fast_connection, cancel_after_polls=1)
    fast_connection.inject(Fault(kind="status", status=503, times=2))
    fast_connection.inject(Fault(kind="drop", times=1))
    fast_connection.inject(
        Fault(kind="body", status=200, body=b"<html>oops</html>", content_type="text/html")
    )
    event = await run_to_end(make_trigger(batch_id))
    assert event["status"] == "cancelled"
    assert [r.status for r in fast_connection.requests] == [503, 503, 0, 200, 200]


async def test_persistent_transient_failures_end_with_error(fast_connection: BatchAPIEmulator) -> None:
    batch_id = cancelling(fast_connection)
    fast_connection.inject(Fault(kind="status", status=502, times=100))
    event = await run_to_end(make_trigger(batch_id))
    assert event["status"] == "error"
    assert "after 5 failed polls in a row" in event["message"] and "HTTP 502" in event["message"]
    assert len(fast_connection.requests) == 5


@pytest.mark.parametrize(("status", "expected"), [(404, "HTTP 404"), (401, "HTTP 401")])
async def test_permanent_errors_end_the_wait_at_once(
    fast_connection: BatchAPIEmulator, status: int, expected: str
) -> None:
    batch_id = cancelling(fast_connection)
    fast_connection.inject(Fault(kind="status", status=status, times=100))
    event = await run_to_end(make_trigger(batch_id))
    assert event["status"] == "error"
    assert expected in event["message"] and batch_id in event["message"]
    assert len(fast_connection.requests) == 1


async def test_missing_connection_is_an_error_event(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_OPENAI_DEFAULT", raising=False)
    event = await run_to_end(make_trigger("batch_1"))
    assert event["status"] == "error"
    assert "openai_default" in event["message"]


async def test_never_blocks_the_loop_and_releases_everything(
    emulator_connection: BatchAPIEmulator, connection_lookups: list[str], mocker
) -> None:
    batch_id = cancelling(emulator_connection, cancel_after_polls=2)
    sync_send = mocker.patch("httpx.Client.send", side_effect=AssertionError("sync HTTP inside a trigger"))
    before = asyncio.all_tasks()
    assert (await run_to_end(make_trigger(batch_id)))["status"] == "cancelled"
    assert connection_lookups == ["openai_default"] and sync_send.call_count == 0
    assert asyncio.all_tasks() == before
    assert _async_clients._clients.get(asyncio.get_running_loop(), {}) == {}


async def test_restart_resumes_with_the_same_deadline(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = cancelling(emulator_connection, cancel_after_polls=10**9, cancel_after_seconds=0.6)
    first = make_trigger(batch_id, poll_interval=0.05)
    task = asyncio.create_task(run_to_end(first))
    await asyncio.sleep(0.2)
    task.cancel()  # the triggerer stops: the wait is abandoned mid-way
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _async_clients._clients.get(asyncio.get_running_loop(), {}) == {}, (
        "the client is released on cancel"
    )

    second = built_by_the_triggerer(stored_by_airflow(first))
    assert second.deadline == first.deadline
    event = await run_to_end(second)
    assert event["status"] == "cancelled"
    assert emulator_connection.cancel_count(batch_id) == 0, (
        "the trigger only polls; it never re-sends the cancel"
    )


async def test_many_triggers_share_one_client(emulator_connection: BatchAPIEmulator, mocker) -> None:
    ids = [cancelling(emulator_connection, cancel_after_polls=2) for _ in range(50)]
    constructed = mocker.spy(_async_clients.httpx, "AsyncClient")
    events = await asyncio.gather(*(run_to_end(make_trigger(batch_id)) for batch_id in ids))
    assert {event["status"] for event in events} == {"cancelled"}
    assert constructed.call_count == 1


CDN_CHALLENGE = (
    "<!DOCTYPE html><html><title>Attention Required! | Cloudflare</title><body>Checking...</body></html>"
)


async def test_a_cdn_error_page_is_transient_not_an_authentication_error(
    emulator_connection: BatchAPIEmulator,
) -> None:
    """The real API sits behind a CDN: its HTML 403 challenge says nothing about the key or the batch."""
    batch_id = cancelling(emulator_connection, cancel_after_polls=2)
    emulator_connection.inject(
        Fault("body", status=403, times=2, method="GET", body=CDN_CHALLENGE, content_type="text/html")
    )
    event = await run_to_end(make_trigger(batch_id))
    assert event["status"] == "cancelled"
    assert [r.status for r in emulator_connection.requests][:2] == [403, 403]


def test_the_multi_batch_trigger_s_old_name_still_loads_with_a_warning() -> None:
    """Triggers deferred under the old classpath, before an upgrade, must still load in the triggerer."""
    with pytest.warns(DeprecationWarning, match="OpenAIMultiBatchCancellationTrigger"):
        old = import_string(
            "airflow_provider_openai_batch.triggers.openai_batch.OpenAIBatchesCancellationTrigger"
        )
    trigger = old(["batch_1"], "openai_default", 5.0, 1.0)
    assert type(trigger).__name__ == "OpenAIMultiBatchCancellationTrigger"
    assert trigger.serialize()[0].endswith(".OpenAIMultiBatchCancellationTrigger")
