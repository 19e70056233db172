"""Fuzz surface 2: operator and trigger arguments, the trigger's as the triggerer reads them back.

The cancel operator gets hostile ``batch_id``, ``poll_interval``, ``timeout`` and flags; the triggers get hostile
ids, intervals and deadlines, and run as the triggerer builds them from their stored row (Airflow's serializer
in between: Airflow 3.0 turns NaN and infinity into strings there). The promise:

* an argument that cannot be right (not a number, not finite, not positive; a malformed id) is refused with a
  ``ValueError`` or ``TypeError`` before any request, when the operator is built or at the start of ``execute``;
* otherwise the task returns the batch, or fails or skips with an Airflow exception; nothing else escapes;
* a trigger's ``run()`` yields exactly one valid event, in bounded time, whatever its kwargs, and polls no batch
  it was not given; with arguments that cannot be right, that event is an ``error`` and nothing was sent;
* the key is in no exception, event, XCom or log record (``tests._guards.guard``).
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import AirflowException
from hypothesis import assume, given, reject
from hypothesis import strategies as st

from airflow_provider_openai_batch.cancellation import (
    CancellationEvent,
    MultiCancellationEvent,
    validated_event,
)
from airflow_provider_openai_batch.ids import validate_batch_id
from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator
from airflow_provider_openai_batch.testing import BatchAPIEmulator
from airflow_provider_openai_batch.triggers.openai_batch import (
    OpenAIBatchCancellationTrigger,
    OpenAIMultiBatchCancellationTrigger,
)
from tests._guards import (  # noqa: F401 - fixtures: guard, and fast_backoff are autouse
    FAKE_API_KEY,
    Guard,
    TaskContext,
    built_by_the_triggerer,
    fast_backoff,
    first_event,
    guard,
    run_async,
    run_operator,
    shared_emulator,
    stored_by_airflow,
)
from tests.fuzz._hostile import NASTY_NUMBERS, bounded, budget, json_values

pytestmark = pytest.mark.timeout(300)

CONN_ID = "fuzz_args"
BAD_IDS = [
    "../files",
    "batch_1/cancel",
    "batch_é",
    "b" * 300,
    "batch_1\n",
    "",
    " ",
    42,
    1.5,
    b"batch_1",
    ["x"],
]
#: Seconds values that are not numbers at all.
NOT_NUMBERS = [None, "1", "x", "nan", [], {}, b"1"]


def must_refuse_seconds(value: Any) -> bool:
    """Whether ``value`` cannot be a number of seconds: not a real number, not finite, or not positive."""
    if isinstance(value, timedelta):
        return value.total_seconds() <= 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        return not isinstance(value, bool)  # a bool may be read as 0/1 or refused: either is fine
    return not math.isfinite(value) or value <= 0


def is_big(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > 1e6


seconds = st.one_of(
    st.sampled_from([0.05, 0.1]),
    st.sampled_from(NASTY_NUMBERS),
    st.sampled_from(NOT_NUMBERS),
    st.floats(),
)
timeouts = st.one_of(
    st.sampled_from([1, 2.0, timedelta(seconds=2)]),
    st.sampled_from([*NASTY_NUMBERS, timedelta(0), timedelta(seconds=-1)]),
    st.sampled_from(NOT_NUMBERS),
    st.floats(),
)


@pytest.fixture(scope="module")
def api(shared_emulator: BatchAPIEmulator) -> Iterator[BatchAPIEmulator]:
    yield shared_emulator
    shared_emulator.clear_faults()


@pytest.fixture
def connection(api: BatchAPIEmulator, monkeypatch: pytest.MonkeyPatch) -> BatchAPIEmulator:
    conn = {
        "conn_type": "openai_batch",
        "password": FAKE_API_KEY,
        "host": api.base_url,
        "extra": {"timeout": 2},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONN_ID.upper()}", json.dumps(conn))
    return api


def fresh_batch(emulator: BatchAPIEmulator, status: str) -> str:
    """A batch of the example's own, cancelled at its first poll; nothing recorded yet."""
    emulator.clear_requests()
    return emulator.add_batch(status=status, cancel_after_polls=1)["id"]


@budget(25)
@given(
    batch_id=st.sampled_from(["<good>"] * 4 + BAD_IDS),
    poll_interval=seconds,
    timeout=timeouts,
    deferrable=st.booleans(),
    wait=st.booleans(),
)
def test_cancel_operator_arguments(
    connection: BatchAPIEmulator,
    guard: Guard,
    batch_id: Any,
    poll_interval: Any,
    timeout: Any,
    deferrable: bool,
    wait: bool,
) -> None:
    assume(not (is_big(poll_interval) and is_big(timeout)))  # a long wait, rightly
    emulator = connection
    good = fresh_batch(emulator, "in_progress")
    batch_id = good if batch_id == "<good>" else batch_id
    missing = batch_id in ("", None, "None")  # skipped, as documented (if_missing)
    refuse = not missing and (
        must_refuse_seconds(poll_interval) or must_refuse_seconds(timeout) or batch_id != good
    )
    try:
        operator = OpenAICancelBatchOperator(
            task_id="cancel",
            batch_id=batch_id,
            conn_id=CONN_ID,
            poll_interval=poll_interval,
            timeout=timeout,
            deferrable=deferrable,
            wait_for_cancellation=wait,
        )
    except (ValueError, TypeError) as error:
        guard.check_exception(error)
        return
    result, error = bounded(lambda: run_operator(operator, TaskContext(), guard))
    sent = len(emulator.requests)
    if refuse:
        assert isinstance(error, ValueError | TypeError), f"must be refused, got {result or error!r}"
    if error is None:
        assert isinstance(result, dict) and result["id"] == good, result
        return
    if type(error) in (ValueError, TypeError):
        assert sent == 0, f"refused after {sent} request(s): {error}"
        return
    assert isinstance(error, AirflowException) and type(error).__module__.split(".")[0] in (
        "airflow",
        "airflow_provider_openai_batch",
    ), f"undocumented {type(error).__module__}.{type(error).__qualname__} escaped: {error!r:.500}"


deadlines = st.one_of(
    st.sampled_from(["<soon>"] * 3 + ["<past>"]),
    st.sampled_from([*NASTY_NUMBERS, *NOT_NUMBERS]),
    st.floats(),
)


def must_refuse_deadline(value: Any) -> bool:
    return not isinstance(value, int | float) or math.isnan(value)


def is_batch_id(value: Any) -> bool:
    """Whether ``value`` is a well-formed batch id, which a trigger polls (a 404 then ends its wait)."""
    try:
        validate_batch_id(value)
    except ValueError:
        return False
    return True


def not_a_number(value: Any) -> bool:
    """A trigger's interval may be floored rather than refused; one that is no number cannot be."""
    return not isinstance(value, int | float) or not math.isfinite(value)


@budget(15)
@given(
    batch_id=st.sampled_from(["<good>"] * 3 + BAD_IDS) | json_values,
    poll_interval=seconds,
    deadline=deadlines,
    multi=st.sampled_from([None, "list", "string", "tuple"]),
)
def test_triggers_yield_their_event_whatever_their_kwargs(
    connection: BatchAPIEmulator,
    guard: Guard,
    batch_id: Any,
    poll_interval: Any,
    deadline: Any,
    multi: str | None,
) -> None:
    emulator = connection
    good = fresh_batch(emulator, "cancelling")
    batch_id = good if batch_id == "<good>" else batch_id
    if deadline in ("<soon>", "<past>"):
        deadline = time.time() + (1.5 if deadline == "<soon>" else -10)
    assume(not (is_big(poll_interval) and isinstance(deadline, float) and deadline > time.time() + 5))
    well_formed = is_batch_id(batch_id)
    refuse = (
        must_refuse_seconds(poll_interval)
        or must_refuse_deadline(deadline)
        or (multi is None and not well_formed)
    )
    if multi is None:
        trigger: Any = OpenAIBatchCancellationTrigger(
            batch_id=batch_id, conn_id=CONN_ID, poll_interval=poll_interval, deadline=deadline
        )
    else:
        ids: Any = {"list": [good, batch_id], "tuple": (batch_id,), "string": good}[multi]
        trigger = OpenAIMultiBatchCancellationTrigger(
            batch_ids=ids, conn_id=CONN_ID, poll_interval=poll_interval, deadline=deadline
        )
    guard.check(list(trigger.serialize()), "the trigger's serialize() output")
    try:
        row = stored_by_airflow(trigger)
    except TypeError:
        reject()  # Airflow itself cannot store these kwargs (bytes, say): no triggerer is ever given them
    payload, error = bounded(
        lambda: run_async(first_event(built_by_the_triggerer(row)), timeout=5), seconds=6
    )
    if error is not None:
        guard.check_exception(error)
        raise AssertionError(
            f"the trigger's run() raised instead of yielding its event: {error!r}"
        ) from error
    guard.check(payload, "the trigger event")
    polled = {request.path.rsplit("/", 1)[-1] for request in emulator.requests}
    given_ids = {good, batch_id} if well_formed and multi != "string" else {good}
    assert polled <= given_ids, f"polled batches it was not given: {polled - given_ids}"
    events = (
        [validated_event(CancellationEvent, payload)]
        if multi is None
        else validated_event(MultiCancellationEvent, payload).events
    )
    assert events
    if refuse:
        assert [event.status for event in events] == ["error"] * len(events), payload
        assert not emulator.requests, "refused after requests"
