"""The rate governor: pacing to the API's announced rate, pausing on a refusal's hint, learning a rate from
refusals when the API announces none, and recovering; then over real HTTP, one governor per key and base URL."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from airflow_provider_openai_batch.hooks._rate import RateGovernor, governor_for
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault

CAP = 60.0  #: the default retry policy's max_retry_after


def answer(status: int = 200, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers={name.replace("_", "-"): value for name, value in headers.items()})


def starts(governor: RateGovernor, count: int, now: float = 100.0) -> list[float]:
    """When ``count`` requests asking at ``now`` may start, relative to ``now``."""
    return [round(governor.reserve(now)[0], 6) for _ in range(count)]


def test_unknown_limit_sends_at_once() -> None:
    assert starts(RateGovernor(), 50) == [0.0] * 50


def test_lets_go_what_the_api_says_remains_then_waits_for_the_reset() -> None:
    governor = RateGovernor()
    governor.observe(
        answer(x_ratelimit_remaining_requests="3", x_ratelimit_reset_requests="1.5s"), 0, 100.0, CAP
    )
    assert starts(governor, 5) == [0.0, 0.0, 0.0, 1.5, 1.5]
    assert starts(governor, 1, now=101.5) == [0.0], "the window reset: the next answer tells its budget"


def test_a_late_answer_does_not_give_back_what_was_already_let_go() -> None:
    governor = RateGovernor()
    governor.observe(
        answer(x_ratelimit_remaining_requests="10", x_ratelimit_reset_requests="1s"), 0, 100.0, CAP
    )
    starts(governor, 8)  # tickets 1 to 8 let go: 2 left
    # The answer to ticket 1 arrives: the server had counted only it, so it says 9 remain.
    governor.observe(
        answer(x_ratelimit_remaining_requests="9", x_ratelimit_reset_requests="990ms"), 1, 100.01, CAP
    )
    assert governor.budget == 2
    # Had the server's window reset meanwhile, the same count would leave 9 - 7 for the new window.
    governor.observe(
        answer(x_ratelimit_remaining_requests="9", x_ratelimit_reset_requests="1s"), 1, 100.5, CAP
    )
    assert governor.budget == 2 and governor.window_ends == pytest.approx(101.5)


def test_openai_reset_durations_are_understood() -> None:
    governor = RateGovernor()
    governor.observe(
        answer(x_ratelimit_remaining_requests="0", x_ratelimit_reset_requests="1.5s"), 0, 100.0, CAP
    )
    assert governor.paused_until == pytest.approx(101.5)
    governor.observe(
        answer(x_ratelimit_remaining_requests="0", x_ratelimit_reset_requests="20ms"), 0, 102.0, CAP
    )
    assert governor.paused_until == pytest.approx(102.02)
    governor.observe(
        answer(x_ratelimit_remaining_requests="0", x_ratelimit_reset_requests="1h2m0s"), 0, 103.0, CAP
    )
    assert governor.paused_until == pytest.approx(103.0 + CAP), "an exhausted daily window pauses for the cap"
    governor.observe(
        answer(x_ratelimit_remaining_requests="3000", x_ratelimit_reset_requests="6m0s"), 0, 200.0, CAP
    )
    assert (governor.budget, governor.window_ends) == (3000, pytest.approx(200.0 + CAP))


def test_a_refusal_with_a_hint_pauses_every_request_until_then() -> None:
    governor = RateGovernor()
    governor.observe(answer(429, retry_after_ms="1500"), 0, 100.0, CAP)
    assert all(delay >= 1.5 for delay in starts(governor, 10))


def test_a_hint_beyond_the_cap_is_ignored() -> None:
    governor = RateGovernor()
    governor.observe(answer(429, retry_after="3600"), 0, 100.0, CAP)
    assert governor.paused_until == 0.0 and governor.rate is None


def test_a_503_is_a_refusal_only_with_a_hint() -> None:
    plain, hinted = RateGovernor(), RateGovernor()
    plain.observe(answer(503), 0, 100.0, CAP)
    hinted.observe(answer(503, retry_after="2"), 0, 100.0, CAP)
    assert (plain.paused_until, plain.rate) == (0.0, None)
    assert hinted.paused_until == 102.0


def test_refusals_without_headers_halve_the_rate_and_successes_bring_it_back() -> None:
    governor = RateGovernor()
    for _ in range(40):  # 40 requests started in the second before the refusal
        governor.reserve(99.5)[0]
    governor.observe(answer(429), 0, 100.0, CAP)
    assert governor.rate == pytest.approx(20.0)
    governor.observe(answer(429), 0, 100.1, CAP)
    assert governor.rate == pytest.approx(10.0)
    for _ in range(200):
        governor.observe(answer(200), 0, 101.0, CAP)
    assert governor.rate is None, "the limit lifted: the governor stops pacing"


def test_paced_requests_start_in_the_order_they_asked() -> None:
    governor = RateGovernor()
    starts(governor, 40, now=99.5)
    governor.observe(
        answer(429), 0, 100.0, CAP
    )  # no headers: paced at half of the 40 a second that was too much
    delays = starts(governor, 20)
    assert delays == sorted(delays) and len(set(delays)) == 20, "each request gets its own, later, start"


async def test_waiting_for_a_turn_sleeps_and_blocks_no_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """100 requests wait out a 0.3 s pause: each sleeps once, never spinning, and the loop runs other work
    meanwhile. Counted, not timed: bench/rate_limit_storm.py measures CPU per poll under a rate limit."""
    governor = RateGovernor()
    loop = asyncio.get_running_loop()
    governor.observe(answer(429, retry_after_ms="300"), 0, loop.time(), CAP)
    real_sleep = asyncio.sleep
    sleeps: list[float] = []

    async def counted_sleep(delay: float, *args: object) -> object:
        sleeps.append(delay)
        return await real_sleep(delay, *args)

    waiters: asyncio.Future | None = None
    ticks_while_waiting = 0

    async def ticker() -> None:
        nonlocal ticks_while_waiting
        while True:
            await real_sleep(0.01)
            ticks_while_waiting += waiters is not None and not waiters.done()

    task = asyncio.create_task(ticker())
    monkeypatch.setattr(asyncio, "sleep", counted_sleep)
    waiters = asyncio.gather(*(governor.wait_turn() for _ in range(100)))
    await waiters
    task.cancel()
    assert loop.time() >= governor.paused_until
    assert ticks_while_waiting > 0, "the loop kept running other work while 100 requests waited"
    assert len(sleeps) <= 200 and min(sleeps) > 0, "waiting is sleeping until the turn, not spinning"


def test_one_governor_per_key_and_base_url() -> None:
    assert governor_for("https://a/v1", "sk-1") is governor_for("https://a/v1", "sk-1")
    assert governor_for("https://a/v1", "sk-1") is not governor_for("https://a/v1", "sk-2")
    assert governor_for("https://a/v1", "sk-1") is not governor_for("https://b/v1", "sk-1")


def test_a_refusal_seen_by_one_hook_holds_the_requests_of_every_hook(
    emulator_connection: BatchAPIEmulator,
) -> None:
    """Over real HTTP: the sync hook's 429 pauses the async hooks on the same key until its hint."""
    ids = [emulator_connection.add_batch()["id"] for _ in range(3)]
    emulator_connection.inject(Fault("status", status=429, method="GET", headers={"retry-after-ms": "400"}))
    with OpenAIBatchHook() as hook:
        hook.get_batch(ids[0])  # refused once, then retried after the pause
    refused_at = emulator_connection.requests[0].at

    async def others() -> None:
        async with OpenAIBatchHook() as first, OpenAIBatchHook() as second:
            await asyncio.gather(first.aget_batch(ids[1]), second.aget_batch(ids[2]))

    asyncio.run(others())
    later = [request.at for request in emulator_connection.requests[1:]]
    assert [request.status for request in emulator_connection.requests] == [429, 200, 200, 200]
    assert all(at - refused_at >= 0.39 for at in later), "no request on the key went before the hint"


def test_the_emulator_limits_the_rate_with_openai_headers(emulator: BatchAPIEmulator) -> None:
    batch_id = emulator.add_batch()["id"]
    emulator.limit_rate(2, per=30.0)
    answers = [
        httpx.get(
            f"{emulator.base_url}/batches/{batch_id}", headers={"Authorization": f"Bearer {emulator.api_key}"}
        )
        for _ in range(3)
    ]
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert [answer.headers["x-ratelimit-remaining-requests"] for answer in answers] == ["1", "0", "0"]
    assert all(answer.headers["x-ratelimit-limit-requests"] == "2" for answer in answers)
    assert answers[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert 25_000 <= int(answers[2].headers["retry-after-ms"]) <= 30_000
    emulator.limit_rate(None)
    assert httpx.get(answers[0].request.url, headers=answers[0].request.headers).status_code == 200


def test_a_storm_of_waits_on_one_key_slows_down_instead_of_failing(
    emulator_connection: BatchAPIEmulator,
) -> None:
    """60 waits in one loop, polling together, against an API serving 30 requests a second: every wait ends
    ``cancelled``, and the governor keeps what is sent within what is served (no 429 storm)."""
    from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchCancellationTrigger

    ids = [emulator_connection.add_batch(cancel_after_polls=2)["id"] for _ in range(60)]
    for batch_id in ids:
        emulator_connection.set_status(batch_id, "cancelling")
    emulator_connection.limit_rate(30, per=1.0)

    async def wait(batch_id: str) -> dict:
        trigger = OpenAIBatchCancellationTrigger(batch_id, "openai_default", 0.05, time.time() + 60)
        async for event in trigger.run():
            return event.payload
        raise AssertionError("no event")

    async def storm() -> list[dict]:
        return await asyncio.gather(*map(wait, ids))

    events = asyncio.run(storm())
    assert [event["status"] for event in events] == ["cancelled"] * 60
    statuses = [request.status for request in emulator_connection.requests]
    assert statuses.count(200) >= 0.9 * len(statuses), f"{statuses.count(429)} of {len(statuses)} refused"
