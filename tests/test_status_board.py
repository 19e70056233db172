"""The status board: waits on one event loop and connection share each round's requests, over real HTTP.

Every test counts what the emulator received: list pages (``GET /v1/batches``) and GETs of one batch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from airflow_provider_openai_batch import status_board
from airflow_provider_openai_batch.cancellation import MAX_CONSECUTIVE_FAILURES
from airflow_provider_openai_batch.hooks import _async_clients
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.models import Batch
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from airflow_provider_openai_batch.triggers.openai_batch import (
    OpenAIBatchCancellationTrigger,
    OpenAIMultiBatchCancellationTrigger,
    wait_for_cancellations,
)
from tests._guards import built_by_the_triggerer, stored_by_airflow
from tests.conftest import FAKE_API_KEY

#: Long enough that every wait a test starts has joined before the first round (which comes at 0.9 of it).
INTERVAL = 0.6
LIST = "/v1/batches"


def cancelling(emulator: BatchAPIEmulator, count: int, **kwargs: Any) -> list[str]:
    ids = [batch["id"] for batch in emulator.add_batches(count, **kwargs)]
    for batch_id in ids:
        emulator.set_status(batch_id, "cancelling")
    return ids


def paths(emulator: BatchAPIEmulator) -> list[str]:
    return [request.path for request in emulator.requests if request.method == "GET"]


def pages_and_gets(emulator: BatchAPIEmulator) -> tuple[int, int]:
    seen = paths(emulator)
    return seen.count(LIST), len(seen) - seen.count(LIST)


async def each_alone(conn_id: str, batch_ids: list[str], interval: float = INTERVAL) -> list[dict[str, Any]]:
    """One single-batch trigger per batch, each run as the triggerer runs it: its own task, one event."""

    async def run(batch_id: str) -> dict[str, Any]:
        trigger = OpenAIBatchCancellationTrigger(batch_id, conn_id, interval, time.time() + 60)
        [event] = [event async for event in trigger.run()]
        return event.payload

    return list(await asyncio.gather(*map(run, batch_ids)))


@pytest.fixture
def api(emulator: BatchAPIEmulator, set_connection: Callable[..., None]) -> BatchAPIEmulator:
    """The emulator behind ``openai_default``, hook retries off: a failed page is a failed page."""
    set_connection(password=FAKE_API_KEY, host=emulator.base_url, extra={"max_retries": 0})
    return emulator


def assert_board_gone() -> None:
    """Every board of every loop closed, with the shared clients it held."""
    assert all(not boards for boards in status_board._boards.values())
    assert all(not clients for clients in _async_clients._clients.values())


async def test_a_crowd_of_single_waits_is_served_by_list_pages_only(api: BatchAPIEmulator) -> None:
    """250 single-batch triggers, each batch ``cancelled`` at its second look: two rounds of one walk each,
    three pages a walk, and not one GET (which would have been 500)."""
    ids = cancelling(api, 250, cancel_after_polls=2)
    events = await each_alone("openai_default", ids)
    assert [event["status"] for event in events] == ["cancelled"] * 250
    assert pages_and_gets(api) == (6, 0)
    assert_board_gone()


async def test_a_few_waits_stay_on_gets_once_a_walk_proved_dearer(api: BatchAPIEmulator) -> None:
    """Three waits whose batches sit under 500 newer ones. The first round's walk expects them on the first page;
    the second page, past that, shows none either, so it stops, and the three get their GETs in the same round.
    From then on the board knows a walk costs more, and polls with three GETs a round."""
    ids = cancelling(api, 3, created_at=int(time.time()) - 3600, cancel_after_polls=3)
    api.add_batches(500)
    events = await each_alone("openai_default", ids)
    assert [event["status"] for event in events] == ["cancelled"] * 3
    seen = paths(api)
    assert seen[:2] == [LIST] * 2, "a walk stopped at the first page past its depth that shows none due"
    assert sorted(seen[2:5]) == sorted(f"{LIST}/{batch_id}" for batch_id in ids), "the unseen, in one round"
    assert pages_and_gets(api) == (2, 9), "then GETs only: two more rounds of three"


async def test_a_walk_stops_at_a_page_past_its_depth_that_shows_none_due(api: BatchAPIEmulator) -> None:
    """150 waits on the newest batches (pages 1 and 2) and 3 on batches under 500 others (page 7). A walk expects
    the due batches on 2 pages; the third, past that, shows none of them: it stops there, and the 3 get GETs.
    Cheaper than walking to page 7, and far cheaper than the bound (153 pages) when a few are buried deep."""
    old = cancelling(api, 3, created_at=int(time.time()) - 3600, cancel_after_polls=2)
    api.add_batches(500, created_at=int(time.time()) - 60)
    new = cancelling(api, 150, cancel_after_polls=2)
    events = await wait_for_cancellations("openai_default", [*old, *new], INTERVAL, time.time() + 60)
    assert [event.status for event in events] == ["cancelled"] * 153
    seen = paths(api)
    one_round = (LIST, LIST, LIST, *sorted(f"{LIST}/{batch_id}" for batch_id in old))
    assert [*seen[:3], *sorted(seen[3:6]), *seen[6:9], *sorted(seen[9:])] == [*one_round, *one_round]


async def test_a_batch_missing_from_the_list_gets_its_own_get(api: BatchAPIEmulator) -> None:
    """A list that does not show one of the due batches (nothing says it must) costs that batch one GET in the
    same round; the others are served by the page."""
    shown, hidden = cancelling(api, 2, cancel_after_polls=1)
    api.set_status(shown, "cancelled")  # the page below shows it final: it is not polled again
    page = {
        "object": "list",
        "data": [api.batch(shown)],
        "first_id": shown,
        "last_id": shown,
        "has_more": False,
    }
    api.inject(Fault("body", method="GET", path=f"{LIST}$", status=200, body=json.dumps(page)))
    events = await wait_for_cancellations("openai_default", [shown, hidden], INTERVAL, time.time() + 60)
    assert [(event.batch_id, event.status) for event in events] == [
        (shown, "cancelled"),
        (hidden, "cancelled"),
    ]
    assert paths(api) == [LIST, f"{LIST}/{hidden}"]


@pytest.mark.parametrize(
    "failure",
    [
        Fault("status", method="GET", path=f"{LIST}$", status=500),
        Fault("body", method="GET", path=f"{LIST}$", status=200, body="<html>CDN error</html>"),
        Fault("drop", method="GET", path=f"{LIST}$"),
    ],
    ids=["server-error", "html", "dropped"],
)
async def test_a_failed_page_makes_the_round_fall_back_to_gets(api: BatchAPIEmulator, failure: Fault) -> None:
    """The page fails after the hook's retries (none here): that round polls every due batch with its own GET,
    and no wait is charged with the page's failure; the next round walks again."""
    ids = cancelling(api, 4, cancel_after_polls=2)
    api.inject(failure)
    events = await wait_for_cancellations("openai_default", ids, INTERVAL, time.time() + 60)
    assert [event.status for event in events] == ["cancelled"] * 4
    assert all(len(event.status_history) == 2 for event in events), "cancelling, then cancelled"
    seen = paths(api)
    assert (seen[0], sorted(seen[1:5]), seen[5:]) == (LIST, sorted(f"{LIST}/{b}" for b in ids), [LIST])


async def test_waits_on_different_connections_never_share_a_walk(
    api: BatchAPIEmulator, set_connection: Callable[..., None]
) -> None:
    """Two connections, two APIs: each board walks its own API's list, and each batch is seen there."""
    with BatchAPIEmulator() as other:
        set_connection("openai_other", password=other.api_key, host=other.base_url)
        here, there = cancelling(api, 3, cancel_after_polls=2), cancelling(other, 3, cancel_after_polls=2)
        events = await asyncio.gather(each_alone("openai_default", here), each_alone("openai_other", there))
        assert [event["status"] for run in events for event in run] == ["cancelled"] * 6
        assert pages_and_gets(api) == pages_and_gets(other) == (2, 0)
        assert {request.headers["authorization"] for request in other.requests} == {f"Bearer {other.api_key}"}
    assert_board_gone()


@pytest.mark.parametrize("final", ["cancelled", "completed", "failed", "expired"])
async def test_a_walk_gives_each_wait_what_a_get_would_have(
    api: BatchAPIEmulator, monkeypatch: pytest.MonkeyPatch, final: str
) -> None:
    """The same waits, once served by list pages and once by GETs only: the same events, field for field (the
    batch, its status history, the outcome), but for the ids and the times."""

    async def waited(walks: bool) -> list[dict[str, Any]]:
        api.clear_requests()
        ids = cancelling(api, 3, cancel_after_polls=2, finish_as=final, metadata={"run": "r1"})
        with monkeypatch.context() as patch:
            patch.setattr(status_board.StatusBoard, "walk_pays", lambda self, due: walks)
            events = await wait_for_cancellations("openai_default", ids, INTERVAL, time.time() + 60)
        assert pages_and_gets(api) == ((2, 0) if walks else (0, 6))
        for event in events:
            assert event.batch == Batch.model_validate(api.batch(event.batch_id)).to_xcom()
        return [comparable(event.to_payload()) for event in events]

    assert await waited(walks=True) == await waited(walks=False)


def comparable(payload: dict[str, Any]) -> dict[str, Any]:
    """An event without what differs between two seeded batches: ids, file ids and times."""
    batch = {key: value for key, value in payload["batch"].items() if key != "id" and not key.endswith("_at")}
    batch = {key: value for key, value in batch.items() if not key.endswith("file_id")}
    history = [entry["status"] for entry in payload["status_history"]]
    return {
        "status": payload["status"],
        "request_counts": payload["request_counts"],
        "batch": batch,
        "history": history,
        "has_output": payload["output_file_id"] is not None,
    }


async def test_timeouts_and_errors_are_unchanged(api: BatchAPIEmulator) -> None:
    """A wait that reaches its deadline still ``cancelling`` ends with ``timeout`` and the batch as last seen,
    and a batch the API does not know ends with the 404's ``error``; the waits beside them are unaffected."""
    held, done = cancelling(api, 2, cancel_after_polls=10**9)[0], cancelling(api, 1, cancel_after_polls=2)[0]
    events = await wait_for_cancellations(
        "openai_default", [held, "batch_unknown", done], 0.3, time.time() + 1.5
    )
    assert [event.status for event in events] == ["timeout", "error", "cancelled"]
    assert events[0].batch == Batch.model_validate(api.batch(held)).to_xcom()
    assert "404" in events[1].message and events[1].batch is None


async def test_a_rebuilt_trigger_joins_the_board_like_any_other(api: BatchAPIEmulator) -> None:
    """A trigger stored as a row and built again (a triggerer restart) shares the round of the ones running."""
    first, second, rebuilt_id = cancelling(api, 3, cancel_after_polls=1)
    rebuilt = built_by_the_triggerer(
        stored_by_airflow(
            OpenAIBatchCancellationTrigger(rebuilt_id, "openai_default", INTERVAL, time.time() + 60)
        )
    )

    async def run(trigger: Any) -> dict[str, Any]:
        [event] = [event async for event in trigger.run()]
        return event.payload

    events = await asyncio.gather(run(rebuilt), each_alone("openai_default", [first, second]))
    assert events[0]["status"] == "cancelled" and [e["status"] for e in events[1]] == ["cancelled"] * 2
    assert pages_and_gets(api) == (1, 0)


async def test_a_cancelled_trigger_leaves_the_board_at_once(api: BatchAPIEmulator) -> None:
    """A trigger cancelled by Airflow (its task cleared) is not polled again and no longer counts as due: the
    round after it left serves the one wait left with a GET, where two due waits took a list page."""
    leaving, staying = cancelling(api, 2, cancel_after_polls=3)
    staying_run = asyncio.ensure_future(each_alone("openai_default", [staying]))
    leaving_run = asyncio.ensure_future(each_alone("openai_default", [leaving]))
    while not api.requests:
        await asyncio.sleep(0.01)
    leaving_run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving_run
    [board] = status_board._boards[asyncio.get_running_loop()].values()
    assert leaving not in board._queued and board.waits == 1
    [event] = await staying_run
    assert event["status"] == "cancelled"
    assert paths(api) == [LIST, f"{LIST}/{staying}", f"{LIST}/{staying}"]
    assert_board_gone()


async def test_a_cancelled_multi_batch_trigger_frees_everything(api: BatchAPIEmulator) -> None:
    """Cancelled mid-round (its walk in flight), the last wait closes the board: the round stops, nothing is
    queued, the shared client is closed."""
    ids = cancelling(api, 5, cancel_after_polls=10**9)
    api.inject(Fault("delay", method="GET", path=f"{LIST}$", delay=5.0))
    trigger = OpenAIMultiBatchCancellationTrigger(ids, "openai_default", 0.05, time.time() + 60)
    run = asyncio.ensure_future(anext(trigger.run()))
    while not api.requests:
        await asyncio.sleep(0.01)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert_board_gone()


async def test_rate_limited_pages_are_ridden_out_not_failed(api: BatchAPIEmulator) -> None:
    """A page refused with 429 is backpressure, not a failure, even with no retries allowed: the waits are told
    what their GETs would have been told, and poll again next round (the key's rate governor paces every
    request): no GET is sent, and every wait ends ``cancelled``."""
    ids = cancelling(api, 150, cancel_after_polls=2)
    api.inject(Fault.rate_limited(2, retry_after=0.1, method="GET", path=f"{LIST}$"))
    events = await wait_for_cancellations("openai_default", ids, INTERVAL, time.time() + 60)
    assert [event.status for event in events] == ["cancelled"] * 150
    assert [(request.path, request.status) for request in api.requests] == [
        (LIST, 429),
        (LIST, 429),
        *[(LIST, 200)] * 4,
    ]


async def test_a_walk_that_breaks_for_any_reason_falls_back_to_gets(
    api: BatchAPIEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A walk only saves requests: broken by something no error mapping foresaw, its round polls by GETs."""

    async def broken_pages(self: OpenAIBatchHook, **kwargs: Any) -> AsyncIterator[Any]:
        raise RuntimeError("a bug in the walk")
        yield  # an async generator, as the real one

    monkeypatch.setattr(OpenAIBatchHook, "alist_batch_pages", broken_pages)
    ids = cancelling(api, 3, cancel_after_polls=2)
    events = await wait_for_cancellations("openai_default", ids, INTERVAL / 4, time.time() + 60)
    assert [event.status for event in events] == ["cancelled"] * 3
    assert pages_and_gets(api) == (0, 6)


async def test_a_round_that_breaks_leaves_no_wait_hanging(
    api: BatchAPIEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken beyond the walk, a round still answers each of its waits: a transient failure, so a wait gives up
    only after several rounds in a row, with an ``error`` event that says so, long before its deadline."""

    async def broken_get(self: OpenAIBatchHook, batch_id: str) -> Batch:
        raise RuntimeError("a bug in a poll")

    monkeypatch.setattr(OpenAIBatchHook, "aget_batch", broken_get)
    [batch_id] = cancelling(api, 1)
    [event] = await wait_for_cancellations("openai_default", [batch_id], 0.05, time.time() + 60)
    assert event.status == "error"
    assert f"after {MAX_CONSECUTIVE_FAILURES} failed polls in a row" in event.message
    assert "A polling round failed (RuntimeError)" in event.message
