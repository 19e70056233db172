"""Fuzz surface 3: what the API sends back, over real loopback HTTP.

The module's emulator turns hostile: every request gets a generated answer (one for POSTs, one for GETs), with
a status, rate-limit, retry and encoding headers, and a body drawn from valid and mutated Batch, File, list and
error objects, random JSON, deep nesting, non-UTF-8 bytes and list pages whose cursor never advances. The
connection allows no retry (``max_retries: 0``) and a short timeout. The promise, for every hook call, sync and
async, and for a trigger's ``run()``:

* a call returns a valid model, or raises a documented :class:`OpenAIBatchError` subclass (never a
  ``ValueError``: the arguments were valid), in bounded time; a listing ends;
* one hostile answer does not break the next request on the same key (a poisoned rate governor would);
* a trigger's ``run()`` yields exactly one event, a valid ``CancellationEvent``;
* the key is in no exception, log record or event.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import AirflowException
from hypothesis import given
from hypothesis import strategies as st

from airflow_provider_openai_batch.cancellation import (
    CancellationEvent,
    MultiCancellationEvent,
    validated_event,
)
from airflow_provider_openai_batch.hooks import _rate
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.models import Batch, File
from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from airflow_provider_openai_batch.triggers.openai_batch import (
    OpenAIBatchCancellationTrigger,
    OpenAIMultiBatchCancellationTrigger,
)
from tests._guards import (  # noqa: F401 - fixtures: guard, and fast_backoff are autouse
    FAKE_API_KEY,
    Guard,
    TaskContext,
    fast_backoff,
    first_event,
    guard,
    rebuild,
    run_async,
    run_operator,
    shared_emulator,
)
from tests.fuzz._hostile import (
    assert_documented,
    bounded,
    budget,
    deeply_nested,
    json_values,
)

pytestmark = pytest.mark.timeout(300)

CONN_ID = "fuzz_api"
#: More batches than any hostile listing may yield: a listing that reaches it does not end.
ENDLESS = 300

RATE_HEADERS = {
    "x-ratelimit-remaining-requests": ["0", "1", "-1", "NaN", "inf", "1e309", "abc", ""],
    "x-ratelimit-limit-requests": ["0", "10", "NaN", "-5"],
    "x-ratelimit-reset-requests": [
        "NaN",
        "inf",
        "-inf",
        "1ms",
        "0s",
        "-5s",
        "1000000h",
        "1e309s",
        "6m0s",
        "x",
    ],
    "retry-after": ["NaN", "inf", "-1", "0", "0.01", "1e309", "Wed, 21 Oct 2015 07:28:00 GMT", "soon"],
    "retry-after-ms": ["NaN", "inf", "-1", "1", "1e309"],
    "content-encoding": ["gzip", "deflate", "br", "zstd", "identity", "bogus", "gzip, gzip"],
}
STATUSES = [200, 200, 200, 201, 204, 301, 400, 401, 403, 404, 409, 410, 422, 429, 500, 502, 503, 504]
#: The statuses an answer of a preferred kind mostly comes with.
PREFERRED_STATUSES = {"page": [200], "batch": [200], "error": [409, 409, 400, 404, 429]}
HOSTILE_IDS = ["../escaped", "/tmp/abs", "", "b" * 300, "batch_é", "batch_1\n", "batch_1/cancel"]


def ids() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.from_regex(r"batch_[a-z0-9]{1,12}", fullmatch=True), st.sampled_from(HOSTILE_IDS), json_values
    )


@st.composite
def batch_objects(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """A Batch as the API would send it, with a few fields replaced by anything."""
    batch = dict(base)
    batch["status"] = draw(
        st.sampled_from(["cancelling", "cancelled", "completed", "in_progress", "weird", ""])
    )
    for name in draw(st.lists(st.sampled_from(sorted(base)), max_size=3)):
        batch[name] = draw(ids() if name.endswith("id") else json_values)
    return batch


@st.composite
def bodies(draw: st.DrawFn, batch: dict[str, Any], file: dict[str, Any], prefer: str | None = None) -> bytes:
    kinds = ["batch", "file", "page", "error", "json", "nested", "bytes"]
    kind = draw(st.sampled_from(kinds if prefer is None else [prefer] * len(kinds) + kinds))
    if kind == "batch":
        return json.dumps(draw(batch_objects(batch))).encode()
    if kind == "file":
        mutated = {**file, **draw(st.dictionaries(st.sampled_from(sorted(file)), json_values, max_size=2))}
        return json.dumps(mutated).encode()
    if kind == "page":
        data = draw(st.lists(batch_objects(batch), min_size=draw(st.sampled_from([0, 1, 1])), max_size=3))
        page = {
            "object": "list",
            "data": data,
            "has_more": draw(st.sampled_from([True, True, False]) | json_values),
        }
        last_ids = [item.get("id") for item in data] or [None]
        page["last_id"] = draw(st.sampled_from(last_ids) | st.none() | ids())
        return json.dumps(page).encode()
    if kind == "error":
        message = draw(
            st.sampled_from(
                [
                    "Cannot cancel a batch with status 'completed'.",
                    "Cannot cancel a batch with status 'weird_status'.",
                    "Rate limit reached for requests.",
                ]
            )
            | json_values
        )
        envelope = {"message": message, "type": draw(json_values), "code": draw(json_values)}
        return json.dumps({"error": draw(st.just(envelope) | json_values)}).encode()
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "nested":
        return deeply_nested(draw(st.sampled_from([100, 1_000, 100_000]))).encode()
    return draw(
        st.sampled_from([b"\xff\xfe{", b'{"id": "\xff"}', "<html>é</html>".encode("latin-1")]) | st.binary()
    )


@st.composite
def answers(draw: st.DrawFn, batch: dict[str, Any], file: dict[str, Any], prefer: str | None = None) -> Fault:
    """One hostile answer, given to every request of one method."""
    headers = {
        name: draw(st.sampled_from(RATE_HEADERS[name]))
        for name in draw(st.lists(st.sampled_from(sorted(RATE_HEADERS)), unique=True, max_size=3))
    }
    if draw(st.integers(0, 3)) == 0:  # an exhausted window, and when it resets (or what passes for it)
        headers["x-ratelimit-remaining-requests"] = "0"
        headers["x-ratelimit-reset-requests"] = draw(
            st.sampled_from(RATE_HEADERS["x-ratelimit-reset-requests"])
        )
    return Fault(
        "body",
        times=10**6,
        status=draw(st.sampled_from(PREFERRED_STATUSES.get(prefer, STATUSES)) | st.integers(200, 599)),
        headers=headers,
        body=draw(bodies(batch, file, prefer)),
        content_type=draw(st.sampled_from(["application/json", "text/html", "application/octet-stream"])),
    )


@pytest.fixture(scope="module")
def api(shared_emulator: BatchAPIEmulator) -> Iterator[dict[str, Any]]:
    batch = shared_emulator.add_batch(status="cancelling", cancel_after_polls=10**9)
    other_batch = shared_emulator.add_batch(status="cancelling", cancel_after_polls=10**9)
    file = shared_emulator.add_file('{"custom_id": "a"}\n')
    yield {"emulator": shared_emulator, "batch": batch, "other_batch": other_batch, "file": file}
    shared_emulator.clear_faults()


@pytest.fixture
def connection(api: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    extra = {"max_retries": 0, "timeout": 2}
    conn = {
        "conn_type": "openai_batch",
        "password": FAKE_API_KEY,
        "host": api["emulator"].base_url,
        "extra": extra,
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    return api


def serve(emulator: BatchAPIEmulator, post: Fault, get: Fault) -> None:
    emulator.clear_faults()
    emulator.clear_requests()
    _rate._governors.clear()  # each example starts with no limit learnt: the next example is not this one's
    emulator.inject(Fault(**{**vars(post), "method": "POST"}))
    emulator.inject(Fault(**{**vars(get), "method": "GET"}))


#: Each call and the check of what it returns. Listing yields at most ENDLESS batches.
SYNC_CALLS: dict[str, Callable[[OpenAIBatchHook, dict[str, Any]], Any]] = {
    "get_batch": lambda hook, api: hook.get_batch(api["batch"]["id"]),
    "cancel_batch": lambda hook, api: hook.cancel_batch(api["batch"]["id"]),
    "list_batches": lambda hook, api: list(islice(hook.list_batches(), ENDLESS)),
    "get_file": lambda hook, api: hook.get_file(api["file"]["id"]),
    "iter_file_content": lambda hook, api: b"".join(hook.iter_file_content(api["file"]["id"])),
}


async def _acollect(iterator: Any, limit: int | None = None) -> list[Any]:
    items = []
    async for item in iterator:
        items.append(item)
        if limit is not None and len(items) >= limit:
            await iterator.aclose()
            break
    return items


ASYNC_CALLS: dict[str, Callable[[OpenAIBatchHook, dict[str, Any]], Any]] = {
    "aget_batch": lambda hook, api: hook.aget_batch(api["batch"]["id"]),
    "acancel_batch": lambda hook, api: hook.acancel_batch(api["batch"]["id"]),
    "alist_batches": lambda hook, api: _acollect(hook.alist_batches(), ENDLESS),
    "aget_file": lambda hook, api: hook.aget_file(api["file"]["id"]),
    "aiter_file_content": lambda hook, api: _acollect(hook.aiter_file_content(api["file"]["id"])),
}


def check_result(name: str, result: Any) -> None:
    if name.endswith("list_batches"):
        assert len(result) < ENDLESS, f"{name} does not end: {ENDLESS} batches and counting"
        assert all(isinstance(batch, Batch) for batch in result)
    elif name.endswith("_batch"):
        assert isinstance(result, Batch), result
    elif name.endswith("get_file"):
        assert isinstance(result, File), result


def call(name: str, api: dict[str, Any]) -> tuple[Any, BaseException | None]:
    if name in SYNC_CALLS:

        def sync() -> Any:
            with OpenAIBatchHook(CONN_ID) as hook:
                return SYNC_CALLS[name](hook, api)

        return bounded(sync)

    async def run() -> Any:
        async with OpenAIBatchHook(CONN_ID) as hook:
            return await ASYNC_CALLS[name](hook, api)

    return bounded(lambda: run_async(run(), timeout=8))


@st.composite
def exchanges(draw: st.DrawFn, api: dict[str, Any]) -> tuple[str, Fault, Fault]:
    name = draw(st.sampled_from([*SYNC_CALLS, *ASYNC_CALLS]))
    prefer = "page" if name.endswith("list_batches") else "batch" if name.endswith("_batch") else None
    return name, draw(answers(api["batch"], api["file"])), draw(answers(api["batch"], api["file"], prefer))


@budget(150)
@given(data=st.data())
def test_hook_calls_survive_hostile_answers(
    data: st.DataObject, connection: dict[str, Any], guard: Guard
) -> None:
    api = connection
    name, post, get = data.draw(exchanges(api), label="call, POST answer, GET answer")
    serve(api["emulator"], post, get)
    result, error = call(name, api)
    if error is None:
        check_result(name, result)
    else:
        guard.check_exception(error)
        assert_documented(error, arguments=False)

    # The same key, with the API healthy again: one hostile answer must not break the next request.
    api["emulator"].clear_faults()
    follow = "get_batch" if name in SYNC_CALLS else "aget_batch"
    result, error = call(follow, api)
    assert error is None, f"after a hostile answer, {follow} on a healthy API fails: {error!r}"
    check_result(follow, result)


@budget(20)
@given(data=st.data())
def test_listing_ends_whatever_the_cursor(
    data: st.DataObject, connection: dict[str, Any], guard: Guard
) -> None:
    """A server that answers every page alike (it ignores ``after``): the listing ends, with its batches or an
    :class:`OpenAIBatchResponseError` once the cursor repeats or does not advance."""
    api = connection
    batch = api["batch"]
    data_ = data.draw(st.lists(st.just(batch) | batch_objects(batch), min_size=1, max_size=3), label="data")
    last_id = data.draw(st.sampled_from([data_[-1].get("id"), None, batch["id"]]) | ids(), label="last_id")
    page = json.dumps({"object": "list", "data": data_, "has_more": True, "last_id": last_id})
    serve(
        api["emulator"],
        Fault("body", times=10**6, status=500),
        Fault("body", times=10**6, status=200, body=page),
    )
    name = data.draw(st.sampled_from(["list_batches", "alist_batches"]), label="call")
    result, error = call(name, api)
    if error is None:
        check_result(name, result)
    else:
        guard.check_exception(error)
        assert_documented(error, arguments=False)


@budget(30)
@given(data=st.data())
def test_cancel_operator_reports_or_fails_cleanly(
    data: st.DataObject, connection: dict[str, Any], guard: Guard
) -> None:
    """The operator (not waiting) over hostile answers: it returns the batch, or fails the task with an Airflow
    exception (a documented :class:`OpenAIBatchError` among them), never with a parsing error of its own."""
    api = connection
    post = data.draw(answers(api["batch"], api["file"], "error"), label="POST answer")
    get = data.draw(answers(api["batch"], api["file"], "batch"), label="GET answer")
    serve(api["emulator"], post, get)
    operator = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=api["batch"]["id"], conn_id=CONN_ID, wait_for_cancellation=False
    )
    result, error = bounded(lambda: run_operator(operator, TaskContext(), guard))
    if error is None:
        assert isinstance(result, dict) and result.get("id") is not None, result
        return
    assert isinstance(error, AirflowException) and type(error).__module__.split(".")[0] in (
        "airflow",
        "airflow_provider_openai_batch",
    ), f"undocumented {type(error).__module__}.{type(error).__qualname__} escaped: {error!r:.500}"


@budget(12)
@given(data=st.data())
def test_trigger_yields_its_event_whatever_the_answers(
    data: st.DataObject, connection: dict[str, Any], guard: Guard
) -> None:
    api = connection
    _, post, get = data.draw(exchanges(api), label="POST answer, GET answer")
    serve(api["emulator"], post, get)
    trigger = OpenAIBatchCancellationTrigger(
        batch_id=api["batch"]["id"], conn_id=CONN_ID, poll_interval=0.05, deadline=time.time() + 1.5
    )
    payload, error = bounded(lambda: run_async(first_event(rebuild(trigger, guard)), timeout=8))
    if error is not None:
        guard.check_exception(error)
        raise AssertionError(
            f"the trigger's run() raised instead of yielding its event: {error!r}"
        ) from error
    guard.check(payload, "the trigger event")
    validated_event(CancellationEvent, payload)


@budget(12)
@given(data=st.data())
def test_a_hostile_list_page_never_fails_a_wait(
    data: st.DataObject, connection: dict[str, Any], guard: Guard
) -> None:
    """Two waits in one multi-batch trigger: the status board walks the list, whose pages get the hostile answer,
    while the batches' own GETs are healthy (both batches held ``cancelling``). Whatever a page says, the trigger
    yields one valid event, and no wait ends with ``error``: a page that fails falls back to the GETs, a refused
    one is backpressure, and a page that parses is taken at its word (a timeout, or the status it claims)."""
    api = connection
    page = data.draw(answers(api["batch"], api["file"], "page"), label="list page answer")
    emulator: BatchAPIEmulator = api["emulator"]
    emulator.clear_faults()
    emulator.clear_requests()
    _rate._governors.clear()
    emulator.inject(Fault(**{**vars(page), "method": "GET", "path": r"/batches$"}))
    ids = [api["batch"]["id"], api["other_batch"]["id"]]
    trigger = OpenAIMultiBatchCancellationTrigger(
        ids, CONN_ID, poll_interval=0.05, deadline=time.time() + 1.5
    )
    payload, error = bounded(lambda: run_async(first_event(rebuild(trigger, guard)), timeout=8))
    if error is not None:
        guard.check_exception(error)
        raise AssertionError(
            f"the trigger's run() raised instead of yielding its event: {error!r}"
        ) from error
    guard.check(payload, "the trigger event")
    events = validated_event(MultiCancellationEvent, payload).events
    assert [event.batch_id for event in events] == ids
    assert [event.status for event in events if event.status == "error"] == [], [e.message for e in events]
    assert "/v1/batches" in [request.path for request in emulator.requests], "the round walked the list"
