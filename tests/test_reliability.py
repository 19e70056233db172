"""Faults, injected over real HTTP by the emulator on loopback, against every component that calls the API.

Each fault is run against the hook (sync and async), the cancel operator (blocking, and deferrable: ``execute``
raises ``TaskDeferred``, its trigger is rebuilt from ``serialize()`` and run on an event loop, then
``execute_complete`` gets the event), the single-batch trigger and the multi-batch trigger, and the outcome is
asserted for each. A *case* is a component plus the request the fault hits: the ``cancel`` (POST) or the
``poll`` (GET) that follows it.

Every test runs under ``tests._guards.guard``: once it ends no socket it opened is still open, no emulator
thread is alive, no asyncio task is pending and no shared client is open (``run_async``), and the fake API key
appears in no log record, stdout/stderr, exception, XCom, trigger event, ``serialize()`` output or request.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from airflow.providers.common.compat.sdk import AirflowException, AirflowSkipException, TaskDeferred

from airflow_provider_openai_batch.exceptions import (
    OpenAIBatchAPIError,
    OpenAIBatchConnectionError,
    OpenAIBatchRateLimitError,
    OpenAIBatchResponseError,
)
from airflow_provider_openai_batch.hooks import _async_clients
from airflow_provider_openai_batch.hooks._connection import ConnectionSettings
from airflow_provider_openai_batch.hooks._retry import RetryPolicy
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator
from airflow_provider_openai_batch.status_board import StatusBoard
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from airflow_provider_openai_batch.triggers.openai_batch import (
    OpenAIBatchCancellationTrigger,
    OpenAIMultiBatchCancellationTrigger,
)
from tests._guards import (  # noqa: F401 - fixtures: guard and fast_backoff are autouse, emulator overrides conftest's
    FAKE_API_KEY,
    Guard,
    Outcome,
    TaskContext,
    assert_no_key,
    assert_no_new_sockets,
    built_by_the_triggerer,
    capture,
    emulator,
    fast_backoff,
    first_event,
    guard,
    private_emulator,
    rebuild,
    run_async,
    run_operator,
    run_trigger,
    shared_emulator,
    stored_by_airflow,
)

pytestmark = pytest.mark.timeout(60)

#: Retries per request: the connection's default, used by every component here.
RETRIES = 3
#: Failed polls in a row after which a wait gives up (cancellation.MAX_CONSECUTIVE_FAILURES).
TOLERATED_POLLS = 5


@dataclass(frozen=True)
class Case:
    surface: str  #: hook_sync, hook_async, operator, deferrable, trigger, multi_trigger
    phase: str  #: cancel (the fault hits POST .../cancel) or poll (it hits GET /batches/{id})

    def __str__(self) -> str:
        return f"{self.surface}-{self.phase}"

    @property
    def is_hook(self) -> bool:
        return self.surface.startswith("hook")

    @property
    def is_operator(self) -> bool:
        return self.surface in ("operator", "deferrable")

    @property
    def method(self) -> str:
        return "POST" if self.phase == "cancel" else "GET"


CANCEL_CASES = [Case(surface, "cancel") for surface in ("hook_sync", "hook_async", "operator", "deferrable")]
POLL_CASES = [
    Case(surface, "poll")
    for surface in ("hook_sync", "hook_async", "operator", "deferrable", "trigger", "multi_trigger")
]
ALL_CASES = CANCEL_CASES + POLL_CASES
#: The cases that wait for ``cancelled`` by polling, and so must ride out failed polls.
WAITERS = [case for case in POLL_CASES if not case.is_hook]
OPERATORS = ["operator", "deferrable"]


class Api:
    """The emulator, a connection to it, and the components driven against it."""

    def __init__(self, emulator: BatchAPIEmulator, set_connection: Any, guard: Guard) -> None:
        self.emulator = emulator
        self._set_connection = set_connection
        self.guard = guard
        self.connect()

    def connect(self, host: str | None = None, **extra: Any) -> None:
        self._set_connection(password=FAKE_API_KEY, host=host or self.emulator.base_url, extra=extra)

    def seed(self, case: Case, **kwargs: Any) -> str:
        """A batch for ``case``: running for the cancellers, already ``cancelling`` for the pollers.

        By default it becomes ``cancelled`` at the first poll after the cancel.
        """
        kwargs.setdefault("cancel_after_polls", 1)
        batch_id = self.emulator.add_batch(**kwargs)["id"]
        if case.phase == "poll" and not case.is_operator:
            self.emulator.set_status(batch_id, "cancelling")
        return batch_id

    def inject(self, case: Case, batch_id: str, kind: str = "status", **fault: Any) -> None:
        """A fault on the requests of ``case`` for this batch only."""
        path = f"/{re.escape(batch_id)}/cancel$" if case.phase == "cancel" else f"/{re.escape(batch_id)}$"
        self.emulator.inject(Fault(kind, method=case.method, path=path, **fault))  # type: ignore[arg-type]

    def requests(self, batch_id: str, method: str | None = None) -> list:
        prefix = f"/v1/batches/{batch_id}"
        return [
            r
            for r in self.emulator.requests
            if r.path in (prefix, f"{prefix}/cancel") and (method is None or r.method == method)
        ]

    def statuses(self, batch_id: str, method: str) -> list[int]:
        return [r.status for r in self.requests(batch_id, method)]

    def act(
        self, case: Case, batch_id: str, *, timeout: float = 10.0, poll_interval: float = 0.01, **kwargs: Any
    ) -> Outcome:
        """Have ``case``'s component cancel (or poll) the batch and report what it reported."""
        if case.is_hook:
            return self._hook(case, batch_id)
        if case.is_operator:
            return self._operator(case, batch_id, timeout, poll_interval, **kwargs)
        deadline = time.time() + timeout
        if case.surface == "trigger":
            payload = run_trigger(
                OpenAIBatchCancellationTrigger(batch_id, "openai_default", poll_interval, deadline),
                self.guard,
            )
            return Outcome(status=payload["status"], event=payload)
        other = self.emulator.add_batch(cancel_after_polls=1)["id"]
        self.emulator.set_status(other, "cancelling")
        trigger = OpenAIMultiBatchCancellationTrigger(
            [batch_id, other], "openai_default", poll_interval, deadline
        )
        # The faults here hit one batch's GET, which a walk of the list would not send: this surface polls by
        # GETs. A failing list page falls back to them (tests/test_status_board.py).
        with mock.patch.object(StatusBoard, "walk_pays", return_value=False):
            payload = run_trigger(trigger, self.guard)
        events = payload["events"]
        assert [event["batch_id"] for event in events] == [batch_id, other]
        return Outcome(status=events[0]["status"], event=events[0], others=events[1:])

    def _hook(self, case: Case, batch_id: str) -> Outcome:
        if case.surface == "hook_sync":

            def call() -> Any:
                with OpenAIBatchHook() as hook:
                    return hook.cancel_batch(batch_id) if case.phase == "cancel" else hook.get_batch(batch_id)

        else:

            async def go() -> Any:
                async with OpenAIBatchHook() as hook:
                    return await (
                        hook.acancel_batch(batch_id) if case.phase == "cancel" else hook.aget_batch(batch_id)
                    )

            def call() -> Any:
                return run_async(go())

        batch, error = capture(call, self.guard)
        return Outcome(status=None if batch is None else str(batch.status), error=error)

    def _operator(
        self, case: Case, batch_id: str, timeout: float, poll_interval: float, **kwargs: Any
    ) -> Outcome:
        context = TaskContext()
        deferrals: list[TaskDeferred] = []
        operator = OpenAICancelBatchOperator(
            task_id="cancel",
            batch_id=batch_id,
            deferrable=case.surface == "deferrable",
            poll_interval=poll_interval,
            timeout=timeout,
            **kwargs,
        )
        result, error = capture(
            lambda: run_operator(operator, context, self.guard, deferred=deferrals), self.guard
        )
        assert context.xcoms.get("batch_id") == batch_id, (
            "the batch id is pushed (for the link) before any request"
        )
        if result is not None:
            assert {key: context.xcoms[key] for key in ("status", "output_file_id", "error_file_id")} == {
                key: result[key] for key in ("status", "output_file_id", "error_file_id")
            }
        return Outcome(status=None if result is None else result["status"], error=error, deferrals=deferrals)


@pytest.fixture
def api(emulator: BatchAPIEmulator, set_connection: Any, guard: Guard) -> Api:
    """The module's emulator: for faults that end with the request."""
    return Api(emulator, set_connection, guard)


@pytest.fixture
def fresh_api(private_emulator: BatchAPIEmulator, set_connection: Any, guard: Guard) -> Api:
    """An emulator of the test's own: for ``delay`` faults, which hold a server thread after the client left."""
    return Api(private_emulator, set_connection, guard)


def expect_success(outcome: Outcome, case: Case, status: str | None = None) -> None:
    """The component got through: hooks see the batch's state, waiters its final ``cancelled``."""
    expected = status or ("cancelling" if case.is_hook and case.phase == "cancel" else "cancelled")
    assert outcome.ok() == expected
    for other in outcome.others:
        assert other["status"] == "cancelled", "a fault on one batch does not affect the others"


def expect_gave_up(outcome: Outcome, case: Case, error_type: type[Exception], fragment: str) -> None:
    """The component stopped with a clear error naming the cause.

    A hook, or an operator whose cancel failed, raises the hook's error; a wait whose polls kept failing ends
    after TOLERATED_POLLS failed polls: the operator raises, the trigger fires an ``error`` event.
    """
    if case.is_hook or case.phase == "cancel":
        assert isinstance(outcome.error, error_type), repr(outcome.error)
        assert fragment in str(outcome.error)
        return
    if case.is_operator:
        assert isinstance(outcome.error, AirflowException), repr(outcome.error)
        message = str(outcome.error)
    else:
        assert outcome.event is not None and outcome.event["status"] == "error", outcome.event
        message = outcome.event["message"]
    assert f"after {TOLERATED_POLLS} failed polls in a row" in message
    assert fragment in message


def gaps(requests: list) -> list[float]:
    return [later.at - earlier.at for earlier, later in itertools.pairwise(requests)]


# -- 429: rate limits -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_429_burst_with_retry_after_is_waited_out(api: Api, case: Case) -> None:
    batch_id = api.seed(case)
    api.inject(case, batch_id, status=429, times=2, headers={"Retry-After": "0.06"})
    expect_success(api.act(case, batch_id), case)
    assert api.statuses(batch_id, case.method)[:3] == [429, 429, 200]
    # The backoff here is at most 20 ms: waits of 60 ms are the server's.
    assert all(gap >= 0.055 for gap in gaps(api.requests(batch_id, case.method)[:3])), "the hint is honoured"


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_429_burst_with_retry_after_ms_is_waited_out(api: Api, case: Case) -> None:
    batch_id = api.seed(case)
    api.inject(case, batch_id, status=429, times=2, headers={"retry-after-ms": "40"})
    expect_success(api.act(case, batch_id), case)
    assert api.statuses(batch_id, case.method)[:3] == [429, 429, 200]
    assert all(gap >= 0.035 for gap in gaps(api.requests(batch_id, case.method)[:3])), "the hint is honoured"


def get_batch_with_policy(surface: str, policy: RetryPolicy, batch_id: str) -> None:
    """Retrieve ``batch_id`` through the ``sync`` or ``async`` hook, retrying by ``policy``."""

    async def aget() -> None:
        async with OpenAIBatchHook(retry_policy=policy) as hook:
            await hook.aget_batch(batch_id)

    if surface == "sync":
        with OpenAIBatchHook(retry_policy=policy) as hook:
            hook.get_batch(batch_id)
    else:
        run_async(aget())


@pytest.mark.parametrize("surface", ["sync", "async"])
def test_retry_after_ms_wins_over_retry_after(emulator_connection: BatchAPIEmulator, surface: str) -> None:
    """As in the official SDKs: with both headers, the millisecond one is waited, not the 3 s one."""
    policy = RetryPolicy(max_retries=1, initial_delay=0.01, max_delay=0.01, max_retry_after=10)
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(
        Fault("status", status=429, headers={"retry-after-ms": "40", "Retry-After": "3"})
    )
    get_batch_with_policy(surface, policy, batch_id)
    [gap] = gaps(emulator_connection.requests)
    assert 0.035 <= gap < 2.5


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_retry_after_beyond_the_cap_falls_back_to_backoff(api: Api, case: Case) -> None:
    """A proxy asking for an hour's wait must not park the task: above the cap (1 s here) the hint is ignored.

    The hour comes once in seconds, once as an HTTP date.
    """
    batch_id = api.seed(case)
    api.inject(case, batch_id, status=429, headers={"Retry-After": "3600"})
    api.inject(
        case, batch_id, status=429, headers={"Retry-After": formatdate(time.time() + 3600, usegmt=True)}
    )
    started = time.monotonic()
    expect_success(api.act(case, batch_id), case)
    assert time.monotonic() - started < 5
    assert api.statuses(batch_id, case.method)[:3] == [429, 429, 200]
    # Neither the hint nor the cap (1 s) is waited: the backoff (at most 20 ms here) is.
    assert all(gap < 0.9 for gap in gaps(api.requests(batch_id, case.method)[:3])), "backoff, not the hint"


@pytest.mark.parametrize("surface", ["sync", "async"])
def test_retry_policy_cap_is_the_boundary(emulator_connection: BatchAPIEmulator, surface: str) -> None:
    """With ``max_retry_after=0.1``: a 0.08 s hint is waited, a 3 s hint is replaced by the 10 ms backoff."""
    policy = RetryPolicy(max_retries=2, initial_delay=0.01, max_delay=0.01, max_retry_after=0.1)
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault("status", status=429, headers={"Retry-After": "0.08"}))
    emulator_connection.inject(Fault("status", status=429, headers={"Retry-After": "3"}))
    get_batch_with_policy(surface, policy, batch_id)
    requests = emulator_connection.requests
    assert [r.status for r in requests] == [429, 429, 200]
    honoured, capped = gaps(requests)
    assert 0.075 <= honoured < 2
    assert capped < 2


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_429_burst_longer_than_the_retry_budget(api: Api, case: Case) -> None:
    """Rate limiting that outlasts every retry: backpressure, never a failed poll.

    A hook's poll gives up after its retries, with the rate-limit error. A cancel rides it out for the policy's
    rate-limit patience (0.5 s here, without using up its retries), then gives up with the same error: the
    batch is still running, nothing was cancelled. A wait polls on past the failure budget, and only its deadline
    ends it, with a message that says the API was rate limiting.
    """
    batch_id = api.seed(case)
    # OpenAI's own 429: the window is spent, and resets (here) at once; the governor pauses until then.
    limit = {"Retry-After": "0", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1ms"}
    api.inject(case, batch_id, status=429, times=10_000, headers=limit)
    outcome = api.act(case, batch_id, timeout=1.0)
    refused = api.requests(batch_id, case.method)
    if case.is_hook and case.phase == "poll":
        expect_gave_up(outcome, case, OpenAIBatchRateLimitError, "HTTP 429")
        assert len(refused) == RETRIES + 1
    elif case.phase == "cancel":
        expect_gave_up(outcome, case, OpenAIBatchRateLimitError, "rate limiting")
        assert outcome.error.transient and outcome.error.status_code == 429
        assert len(refused) > RETRIES + 1, "a rate-limited cancel is retried beyond the retry budget"
        assert api.emulator.batch(batch_id)["status"] == "in_progress"
    else:
        message = str(outcome.error) if case.is_operator else outcome.event["message"]
        assert case.is_operator or outcome.event["status"] == "timeout", outcome.event
        assert "at the deadline" in message and "rate limiting" in message
        assert "failed polls" not in message
        assert len(refused) > TOLERATED_POLLS * (RETRIES + 1), (
            "the failure budget was not what ended the wait"
        )


# -- 5xx: server errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_5xx_burst_shorter_than_the_retry_budget_is_absorbed(api: Api, case: Case) -> None:
    """500, 502 then 503: as many failures as there are retries, and the last try gets through."""
    batch_id = api.seed(case)
    for status in (500, 502, 503):
        api.inject(case, batch_id, status=status)
    expect_success(api.act(case, batch_id), case)
    assert api.statuses(batch_id, case.method)[: RETRIES + 1] == [500, 502, 503, 200]


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_5xx_burst_longer_than_the_retry_budget(api: Api, case: Case) -> None:
    """The server answers 500, 502, 503, 500, ... until every retry (and, for a wait, every tolerated poll) is spent."""
    batch_id = api.seed(case)
    cycle = [500, 502, 503]
    for index in range(TOLERATED_POLLS * (RETRIES + 1) + 5):
        api.inject(case, batch_id, status=cycle[index % 3])
    outcome = api.act(case, batch_id)
    sent = RETRIES + 1 if case.is_hook or case.phase == "cancel" else TOLERATED_POLLS * (RETRIES + 1)
    last = cycle[(sent - 1) % 3]
    expect_gave_up(outcome, case, OpenAIBatchAPIError, f"HTTP {last}")
    assert api.statuses(batch_id, case.method) == [cycle[index % 3] for index in range(sent)]
    if case.is_hook or case.phase == "cancel":
        assert outcome.error.status_code == last and outcome.error.transient
    if case.phase == "cancel":
        assert api.emulator.batch(batch_id)["status"] == "in_progress", "nothing was cancelled"


@pytest.mark.parametrize("case", WAITERS, ids=str)
def test_outage_spanning_several_polls_is_ridden_out(api: Api, case: Case) -> None:
    """Two whole polls fail (each after its retries); the wait goes on and still ends ``cancelled``."""
    batch_id = api.seed(case)
    api.inject(case, batch_id, status=503, times=2 * (RETRIES + 1))
    expect_success(api.act(case, batch_id), case)
    assert api.statuses(batch_id, "GET") == [503] * 2 * (RETRIES + 1) + [200]
    assert "will poll again" in api.guard.output()


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_html_error_page_from_a_proxy_is_retried(api: Api, case: Case) -> None:
    batch_id = api.seed(case)
    page = b"<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>"
    api.inject(case, batch_id, "body", status=502, body=page, content_type="text/html", times=2)
    expect_success(api.act(case, batch_id), case)
    assert api.statuses(batch_id, case.method)[:3] == [502, 502, 200]


# -- the connection itself --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dead_url() -> str:
    """A loopback URL whose port was just closed: connecting to it is refused."""
    with BatchAPIEmulator(api_key=FAKE_API_KEY) as server:
        return server.base_url


@pytest.mark.parametrize("case", [*CANCEL_CASES, *(c for c in POLL_CASES if not c.is_operator)], ids=str)
def test_connection_refused(api: Api, dead_url: str, case: Case) -> None:
    batch_id = api.seed(case)
    api.connect(host=dead_url)
    outcome = api.act(case, batch_id)
    expect_gave_up(outcome, case, OpenAIBatchConnectionError, "ConnectError")
    if case.is_hook or case.phase == "cancel":
        assert f"No response from the OpenAI Batch API for batch '{batch_id}'" in str(outcome.error)
        assert outcome.error.transient and outcome.error.status_code is None
    for other in outcome.others:
        assert other["status"] == "error"
    assert api.emulator.requests == []


@pytest.mark.parametrize("surface", OPERATORS)
def test_api_goes_down_after_the_cancel(
    fresh_api: Api, monkeypatch: pytest.MonkeyPatch, surface: str
) -> None:
    """The cancel lands, then every poll is refused: the task fails after the tolerated polls, naming why."""
    api = fresh_api
    case = Case(surface, "poll")
    batch_id = api.seed(case)
    real_cancel = OpenAIBatchHook.cancel_batch

    def cancel_then_outage(self: OpenAIBatchHook, batch: str) -> Any:
        answer = real_cancel(self, batch)
        api.emulator.stop()
        return answer

    monkeypatch.setattr(OpenAIBatchHook, "cancel_batch", cancel_then_outage)
    outcome = api.act(case, batch_id)
    expect_gave_up(outcome, case, OpenAIBatchConnectionError, "ConnectError")
    assert api.emulator.batch(batch_id)["status"] == "cancelling"


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_connection_dropped_mid_response_is_retried(api: Api, case: Case) -> None:
    batch_id = api.seed(case)
    api.inject(case, batch_id, "drop", times=2)
    expect_success(api.act(case, batch_id), case)
    assert api.statuses(batch_id, case.method)[:3] == [0, 0, 200]


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_connection_dropped_every_time(api: Api, case: Case) -> None:
    batch_id = api.seed(case)
    api.inject(case, batch_id, "drop", times=1000)
    outcome = api.act(case, batch_id)
    expect_gave_up(outcome, case, OpenAIBatchConnectionError, "No response from the OpenAI Batch API")
    if case.is_hook or case.phase == "cancel":
        assert api.statuses(batch_id, case.method) == [0] * (RETRIES + 1)


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_read_timeout_is_retried(fresh_api: Api, case: Case) -> None:
    """The first answer would come after 3 s, past the connection's 0.1 s timeout: the request is sent again."""
    api = fresh_api
    batch_id = api.seed(case)
    api.connect(timeout=0.1)
    api.inject(case, batch_id, "delay", delay=3.0, times=1)
    started = time.monotonic()
    expect_success(api.act(case, batch_id), case)
    assert 0.1 <= time.monotonic() - started < 2.5, "the slow answer was not waited for"
    api.emulator.stop()  # the slow request is recorded when the server gives up on it: unanswered (0)
    assert sorted(api.statuses(batch_id, case.method))[:2] == [0, 200]


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_read_timeout_every_time(fresh_api: Api, case: Case) -> None:
    api = fresh_api
    batch_id = api.seed(case)
    single = case.is_hook or case.phase == "cancel"
    # One request retried once; a wait's five polls without retries (to keep the test short).
    api.connect(timeout=0.06, max_retries=1 if single else 0)
    api.inject(case, batch_id, "delay", delay=5.0, times=1000)
    started = time.monotonic()
    outcome = api.act(case, batch_id)
    expect_gave_up(outcome, case, OpenAIBatchConnectionError, "ReadTimeout")
    assert time.monotonic() - started < 4, "bounded by the timeout, not by the 5 s server"
    api.emulator.stop()  # the slow answers are recorded once they are given up on
    assert len(api.requests(batch_id, case.method)) == (2 if single else TOLERATED_POLLS)


# -- malformed bodies -------------------------------------------------------------------------------------------

MALFORMED = {
    "invalid_json": ('{"id": "batch_', "application/json", "Invalid JSON"),
    "html_page": ("<html><body><h1>Welcome to nginx!</h1></body></html>", "text/html", "Invalid JSON"),
    "missing_fields": ('{"id": "batch_1", "object": "batch"}', "application/json", "Field required"),
}


@pytest.mark.parametrize("kind", MALFORMED)
@pytest.mark.parametrize("case", [*CANCEL_CASES, *(c for c in POLL_CASES if c.is_hook)], ids=str)
def test_malformed_body_is_a_clear_error(api: Api, case: Case, kind: str) -> None:
    """A 200 whose body is not a Batch: one request (not retried), an error saying what was wrong."""
    body, content_type, detail = MALFORMED[kind]
    batch_id = api.seed(case)
    api.inject(case, batch_id, "body", status=200, body=body, content_type=content_type)
    outcome = api.act(case, batch_id)
    assert isinstance(outcome.error, OpenAIBatchResponseError), repr(outcome.error)
    message = str(outcome.error)
    assert (
        f"HTTP 200 for batch '{batch_id}' with a body that is not a valid Batch ({content_type};" in message
    )
    assert detail in message
    assert outcome.error.transient
    assert len(api.requests(batch_id, case.method)) == 1


@pytest.mark.parametrize("kind", MALFORMED)
@pytest.mark.parametrize("case", WAITERS, ids=str)
def test_malformed_poll_answers_are_polled_through(api: Api, case: Case, kind: str) -> None:
    body, content_type, _ = MALFORMED[kind]
    batch_id = api.seed(case)
    api.inject(case, batch_id, "body", status=200, body=body, content_type=content_type, times=2)
    expect_success(api.act(case, batch_id), case)
    assert len(api.requests(batch_id, "GET")) == 3


@pytest.mark.parametrize("case", WAITERS, ids=str)
def test_persistently_malformed_poll_answers_end_the_wait(api: Api, case: Case) -> None:
    body, content_type, _ = MALFORMED["html_page"]
    batch_id = api.seed(case)
    api.inject(case, batch_id, "body", status=200, body=body, content_type=content_type, times=1000)
    expect_gave_up(api.act(case, batch_id), case, OpenAIBatchResponseError, "not a valid Batch (text/html")
    assert len(api.requests(batch_id, "GET")) == TOLERATED_POLLS


def with_status(api: Api, batch_id: str, status: str) -> str:
    return json.dumps({**api.emulator.batch(batch_id), "status": status})


@pytest.mark.parametrize("case", [c for c in ALL_CASES if c.is_hook], ids=str)
def test_unknown_status_reaches_the_caller_unchanged(api: Api, case: Case) -> None:
    batch_id = api.seed(case)
    api.inject(case, batch_id, "body", status=200, body=with_status(api, batch_id, "paused"))
    assert api.act(case, batch_id).ok() == "paused"


@pytest.mark.parametrize("case", [Case(surface, "cancel") for surface in OPERATORS] + WAITERS, ids=str)
def test_unknown_status_is_waited_through_until_known(api: Api, case: Case) -> None:
    """An unknown status is never taken as final: the wait goes on and ends when a known one arrives."""
    batch_id = api.seed(case)
    if case.phase == "cancel":  # the cancel is answered "paused"; the batch really is cancelling
        api.emulator.set_status(batch_id, "cancelling")
    api.inject(case, batch_id, "body", status=200, body=with_status(api, batch_id, "paused"), times=2)
    expect_success(api.act(case, batch_id), case)
    if case.phase == "poll":
        assert len(api.requests(batch_id, "GET")) == 3
        assert f"Batch '{batch_id}' reports unknown status 'paused'; still waiting" in api.guard.output()


@pytest.mark.parametrize("case", WAITERS, ids=str)
def test_unknown_status_until_the_deadline_times_out(api: Api, case: Case) -> None:
    batch_id = api.seed(case)
    api.inject(case, batch_id, "body", status=200, body=with_status(api, batch_id, "paused"), times=10**6)
    started = time.monotonic()
    outcome = api.act(case, batch_id, timeout=0.25, poll_interval=0.05)
    assert 0.24 <= time.monotonic() - started < 4
    message = f"Batch '{batch_id}' is still 'paused' at the deadline"
    if case.is_operator:
        assert isinstance(outcome.error, AirflowException) and message in str(outcome.error)
    else:
        assert outcome.event["status"] == "timeout" and message in outcome.event["message"]
        assert outcome.event["batch"]["status"] == "paused"
        assert [other["status"] for other in outcome.others] in ([], ["cancelled"])


# -- the batch's lifecycle races the cancel ---------------------------------------------------------------------


@pytest.mark.parametrize("finish_as", ["completed", "failed", "expired"])
@pytest.mark.parametrize("case", WAITERS, ids=str)
def test_batch_finishes_between_the_cancel_and_the_first_poll(api: Api, case: Case, finish_as: str) -> None:
    batch_id = api.seed(case, finish_as=finish_as)
    outcome = api.act(case, batch_id)
    final = api.emulator.batch(batch_id)
    assert outcome.ok() == finish_as == final["status"]
    if case.is_operator:
        assert api.statuses(batch_id, "POST") == [200], "the cancel was accepted"
    else:
        assert outcome.event["output_file_id"] == final["output_file_id"]
        assert "before the cancellation took effect" in outcome.event["message"]
    assert len(api.requests(batch_id, "GET")) == 1


@pytest.mark.parametrize(
    ("if_finished", "raised"), [("skip", AirflowSkipException), ("fail", AirflowException)]
)
@pytest.mark.parametrize("surface", OPERATORS)
def test_batch_finishing_first_honours_if_finished(
    api: Api, surface: str, if_finished: str, raised: type
) -> None:
    case = Case(surface, "poll")
    batch_id = api.seed(case, finish_as="completed")
    outcome = api.act(case, batch_id, if_finished=if_finished)
    assert type(outcome.error) is raised
    assert f"Batch '{batch_id}' had already completed and could not be cancelled." in str(outcome.error)


@pytest.mark.parametrize("case", WAITERS, ids=str)
def test_batch_stuck_in_cancelling_times_out_at_the_deadline(api: Api, case: Case) -> None:
    batch_id = api.seed(case, cancel_after_polls=10**9)
    started = time.monotonic()
    outcome = api.act(case, batch_id, timeout=0.25, poll_interval=0.05)
    assert 0.24 <= time.monotonic() - started < 4, "it ends at the deadline: nothing hangs"
    message = f"Batch '{batch_id}' is still 'cancelling' at the deadline; it may yet be cancelled by OpenAI."
    if case.is_operator:
        assert isinstance(outcome.error, AirflowException) and message in str(outcome.error)
    else:
        assert outcome.event["status"] == "timeout" and message in outcome.event["message"]
        assert outcome.event["batch"]["status"] == "cancelling" and outcome.event["output_file_id"] is None
        assert [other["status"] for other in outcome.others] in ([], ["cancelled"])
    assert api.emulator.batch(batch_id)["status"] == "cancelling"


# -- triggerer restart ------------------------------------------------------------------------------------------


def make_trigger(kind: str, batch_ids: list[str], deadline: float, poll_interval: float) -> Any:
    if kind == "single":
        return OpenAIBatchCancellationTrigger(batch_ids[0], "openai_default", poll_interval, deadline)
    return OpenAIMultiBatchCancellationTrigger(batch_ids, "openai_default", poll_interval, deadline)


def statuses_of(kind: str, payload: dict[str, Any]) -> list[str]:
    return [payload["status"]] if kind == "single" else [event["status"] for event in payload["events"]]


@pytest.mark.parametrize("stopped", ["while_sleeping", "mid_request"])
@pytest.mark.parametrize("kind", ["single", "multi"])
def test_triggerer_restart_resumes_with_the_same_deadline(
    fresh_api: Api, guard: Guard, kind: str, stopped: str
) -> None:
    api = fresh_api
    count = 1 if kind == "single" else 3
    ids = [
        api.emulator.add_batch(cancel_after_polls=10**9, cancel_after_seconds=0.6)["id"] for _ in range(count)
    ]
    for batch_id in ids:
        api.emulator.set_status(batch_id, "cancelling")
    if stopped == "mid_request":  # the first poll is still waiting for its answer when the triggerer stops
        api.emulator.inject(Fault("delay", delay=3.0, times=count, method="GET"))
    first = make_trigger(kind, ids, time.time() + 20, poll_interval=0.05)
    before = first.serialize()

    async def restart() -> dict[str, Any]:
        running = asyncio.create_task(first_event(first))
        await asyncio.sleep(0.15)
        assert not running.done()
        running.cancel()  # the triggerer stops: the wait is abandoned wherever it is
        with pytest.raises(asyncio.CancelledError):
            await running
        assert _async_clients._clients.get(asyncio.get_running_loop(), {}) == {}, (
            "the client is released at once"
        )
        second = rebuild(first, guard)
        assert second.serialize() == before
        assert second.deadline == first.deadline
        return await first_event(second)

    payload = run_async(restart())
    guard.check(payload, "the trigger event")
    assert statuses_of(kind, payload) == ["cancelled"] * count
    assert all(api.emulator.cancel_count(batch_id) == 0 for batch_id in ids), "a trigger never sends a cancel"


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_triggerer_restart_after_the_deadline_times_out_at_once(api: Api, guard: Guard, kind: str) -> None:
    ids = [
        api.emulator.add_batch(cancel_after_polls=10**9)["id"] for _ in range(1 if kind == "single" else 2)
    ]
    for batch_id in ids:
        api.emulator.set_status(batch_id, "cancelling")
    first = make_trigger(kind, ids, time.time() + 0.3, poll_interval=0.05)
    guard.check(list(first.serialize()), "the trigger's serialize() output")
    row = stored_by_airflow(first)  # stored when the task deferred, before the triggerer went down

    async def restart() -> dict[str, Any]:
        running = asyncio.create_task(first_event(first))
        await asyncio.sleep(0.1)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await asyncio.sleep(0.4)  # the triggerer was down past the deadline
        api.emulator.clear_requests()
        return await first_event(built_by_the_triggerer(row))

    started = time.monotonic()
    payload = run_async(restart())
    assert time.monotonic() - started < 4
    assert statuses_of(kind, payload) == ["timeout"] * len(ids)
    last_poll = [f"/v1/batches/{ids[0]}"] if len(ids) == 1 else ["/v1/batches"]  # several: one list page
    assert [r.path for r in api.emulator.requests] == last_poll, "one last poll"


# -- idempotency ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", OPERATORS)
def test_task_retried_after_it_already_cancelled(api: Api, surface: str) -> None:
    case = Case(surface, "poll")
    batch_id = api.seed(case)
    first = api.act(case, batch_id)
    second = api.act(case, batch_id)
    assert first.ok() == second.ok() == "cancelled"
    assert len(first.deferrals) == (1 if surface == "deferrable" else 0)
    assert second.deferrals == [], "already cancelled: the retry reports it without waiting"
    assert api.statuses(batch_id, "POST") == [200, 409], "the API refuses to cancel a cancelled batch again"
    assert api.emulator.cancel_count(batch_id) == 2
    assert api.emulator.batch(batch_id)["status"] == "cancelled"


@pytest.mark.parametrize("surface", OPERATORS)
def test_task_retried_while_the_batch_is_still_cancelling(api: Api, guard: Guard, surface: str) -> None:
    """The first try cancelled and deferred, then died before resuming; the retry cancels again and waits."""
    case = Case(surface, "poll")
    batch_id = api.seed(case)
    first_try = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=batch_id, deferrable=True, poll_interval=0.02
    )
    with guard.raises(TaskDeferred):
        first_try.execute(TaskContext())
    assert api.emulator.batch(batch_id)["status"] == "cancelling"
    expect_success(api.act(case, batch_id), case)
    assert api.statuses(batch_id, "POST") == [200, 200], "cancelling a cancelling batch is accepted again"


@pytest.mark.parametrize("surface", ["hook_sync", "hook_async", *OPERATORS])
def test_two_tasks_cancel_the_same_batch_at_once(fresh_api: Api, surface: str) -> None:
    api = fresh_api
    case = Case(surface, "cancel")
    # Cancelling for 0.6 s whatever the polls: both cancels are answered 200 before it is cancelled.
    batch_id = api.seed(case, cancel_after_polls=10**9, cancel_after_seconds=0.6)
    # Each cancel is held 0.4 s by the server, so both are in flight at the same time.
    api.emulator.inject(Fault("delay", delay=0.4, times=2, method="POST"))
    if surface == "hook_async":

        async def both() -> list[Any]:
            async with OpenAIBatchHook() as one, OpenAIBatchHook() as two:
                return await asyncio.gather(one.acancel_batch(batch_id), two.acancel_batch(batch_id))

        outcomes = [Outcome(status=str(batch.status)) for batch in run_async(both())]
    else:
        start = threading.Barrier(2)
        outcomes = [Outcome(), Outcome()]

        def worker(index: int) -> None:
            start.wait()
            outcomes[index] = api.act(case, batch_id)

        threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    for outcome in outcomes:
        expect_success(outcome, case)
    posts = api.requests(batch_id, "POST")
    assert [r.status for r in posts] == [200, 200] and abs(posts[0].at - posts[1].at) < 0.4, "they overlapped"
    assert api.emulator.cancel_count(batch_id) == 2
    assert api.emulator.batch(batch_id)["status"] == ("cancelling" if case.is_hook else "cancelled")


# -- saving results: faults on the downloads ---------------------------------------------------------------------


def saved(api: Api, surface: str, root: Path, batch_id: str) -> Outcome:
    """Cancel ``batch_id`` through the operator in ``surface`` mode, saving its results under ``root``."""
    return api.act(Case(surface, "poll"), batch_id, save_results_to=str(root))


def assert_whole(api: Api, root: Path, batch_id: str) -> None:
    batch = api.emulator.batch(batch_id)
    for name, file_id in (("output", batch["output_file_id"]), ("errors", batch["error_file_id"])):
        assert (root / batch_id / f"{name}.jsonl").read_bytes() == api.emulator.file_content(file_id)
    remaining = (root / batch_id / "remaining.jsonl").read_bytes().splitlines()
    assert len(remaining) == batch["request_counts"]["total"] - 34


@pytest.mark.parametrize("surface", OPERATORS)
def test_downloads_cut_short_start_again_and_the_results_are_whole(
    api: Api, guard: Guard, tmp_path: Path, surface: str
) -> None:
    """The first two downloads of every file (output, errors, input) are dropped halfway through."""
    batch = api.emulator.add_batch(status="cancelled")
    for file_id in (batch["output_file_id"], batch["error_file_id"], batch["input_file_id"]):
        api.emulator.inject(Fault("drop", times=2, path=f"/{file_id}/content$"))

    assert saved(api, surface, tmp_path, batch["id"]).ok() == "cancelled"

    batch_id = batch["id"]
    assert_whole(api, tmp_path, batch_id)
    content = [r.status for r in api.emulator.requests if r.path.endswith("/content")]
    assert content == [0, 0, 200] * 3, "each file dropped twice, then downloaded whole"
    assert sorted(os.listdir(tmp_path / batch_id)) == ["errors.jsonl", "output.jsonl", "remaining.jsonl"]


@pytest.mark.parametrize("surface", OPERATORS)
def test_5xx_bursts_on_the_files_api_are_absorbed(api: Api, tmp_path: Path, surface: str) -> None:
    batch_id = api.emulator.add_batch(cancel_after_polls=1)["id"]
    api.emulator.inject(Fault("status", status=502, times=RETRIES, path="^/v1/files/"))

    assert saved(api, surface, tmp_path, batch_id).ok() == "cancelled"

    assert_whole(api, tmp_path, batch_id)
    assert [r.status for r in api.emulator.requests if r.path.startswith("/v1/files/")][: RETRIES + 1] == [
        502
    ] * RETRIES + [200]


@pytest.mark.parametrize("surface", OPERATORS)
def test_5xx_on_the_files_api_beyond_the_retries_fails_the_task(
    api: Api, tmp_path: Path, surface: str
) -> None:
    batch_id = api.emulator.add_batch(cancel_after_polls=1)["id"]
    api.emulator.inject(Fault("status", status=503, times=100, path="/content$"))

    outcome = saved(api, surface, tmp_path, batch_id)

    assert isinstance(outcome.error, OpenAIBatchAPIError) and "HTTP 503" in str(outcome.error)
    assert "file 'file-out-" in str(outcome.error)
    assert list((tmp_path / batch_id).iterdir()) == [], "no partial file"


@pytest.mark.parametrize("surface", OPERATORS)
def test_a_slow_download_times_out_and_is_retried(fresh_api: Api, tmp_path: Path, surface: str) -> None:
    api = fresh_api
    api.connect(timeout=0.3)
    batch_id = api.emulator.add_batch(cancel_after_polls=1)["id"]
    api.emulator.inject(Fault("delay", delay=2.0, path="/content$"))

    assert saved(api, surface, tmp_path, batch_id).ok() == "cancelled"

    assert_whole(api, tmp_path, batch_id)


# -- the checks themselves: each would catch what it looks for --------------------------------------------------


def test_guard_catches_a_leaked_socket(guard: Guard) -> None:
    leaked = socket.socket()
    try:
        with pytest.raises(AssertionError, match="1 socket.* still open"):
            assert_no_new_sockets(guard.baseline, wait=0.1)
    finally:
        leaked.close()


def test_guard_catches_a_pending_task() -> None:
    async def leaves_a_task_behind() -> None:
        asyncio.get_running_loop().create_task(asyncio.sleep(10))

    with pytest.raises(AssertionError, match="asyncio tasks still pending"):
        run_async(leaves_a_task_behind())


def test_guard_catches_an_unreleased_shared_client() -> None:
    settings = ConnectionSettings(conn_id="c", api_key=FAKE_API_KEY, base_url="http://127.0.0.1:9/v1")

    async def acquires_without_release() -> None:
        await _async_clients.acquire(settings)  # opens no socket until a request is sent

    with pytest.raises(AssertionError, match="shared HTTP clients still open"):
        run_async(acquires_without_release())


def test_guard_catches_a_hang() -> None:
    with pytest.raises(AssertionError, match="it hangs"):
        run_async(asyncio.sleep(5), timeout=0.1)


def test_guard_catches_the_key(guard: Guard) -> None:
    import logging

    logging.getLogger("some.library").debug("headers: %s", {"Authorization": f"Bearer {FAKE_API_KEY}"})
    with pytest.raises(AssertionError, match="leaked into the logs"):
        assert_no_key(guard.output(), "the logs")
    print(f"token={FAKE_API_KEY}")
    with pytest.raises(AssertionError, match="leaked into stdout"):
        assert_no_key(guard.output(), "stdout")
    guard.forget_output()
    caused = RuntimeError("outer")
    caused.__cause__ = ValueError(f"inner {FAKE_API_KEY[:-1]}x")  # even cut short, the key is recognised
    with pytest.raises(AssertionError, match=r"leaked into str\(\) of a raised ValueError"):
        guard.check_exception(caused)
    during = RuntimeError("outer")
    during.__context__ = KeyError(FAKE_API_KEY[3:])
    with pytest.raises(AssertionError, match=r"leaked into str\(\) of a raised KeyError"):
        guard.check_exception(during)
    with pytest.raises(AssertionError, match="leaked"):
        guard.check({"nested": [FAKE_API_KEY]}, "an XCom")
