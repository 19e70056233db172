from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from airflow_provider_openai_batch.hooks._retry import Retry, RetryPolicy, retry_after_seconds


def response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried(status: int) -> None:
    assert RetryPolicy().delay_before_retry(0, response(status)) is not None


@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 409, 422])
def test_final_statuses_are_not_retried(status: int) -> None:
    assert RetryPolicy().delay_before_retry(0, response(status)) is None


def test_transport_errors_are_retried() -> None:
    assert RetryPolicy().delay_before_retry(0, httpx.ConnectError("refused")) is not None
    assert RetryPolicy().delay_before_retry(0, httpx.ReadTimeout("slow")) is not None


def test_gives_up_after_max_retries() -> None:
    policy = RetryPolicy(max_retries=2)
    assert policy.delay_before_retry(1, response(503)) is not None
    assert policy.delay_before_retry(2, response(503)) is None
    assert RetryPolicy(max_retries=0).delay_before_retry(0, response(503)) is None


def test_backoff_doubles_from_half_a_second_to_eight_with_jitter() -> None:
    policy = RetryPolicy(max_retries=10)
    for retries_done, nominal in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (9, 8.0)]:
        delays = [policy.backoff(retries_done) for _ in range(200)]
        assert all(0.75 * nominal <= d <= nominal for d in delays)
        assert len(set(delays)) > 1, "jitter spreads the retries of many clients"


def test_retry_after_seconds_is_honoured() -> None:
    assert RetryPolicy().delay_before_retry(0, response(429, **{"Retry-After": "3"})) == 3.0


def test_retry_after_ms_wins_over_retry_after() -> None:
    delay = RetryPolicy().delay_before_retry(
        0, response(429, **{"retry-after-ms": "250", "Retry-After": "3"})
    )
    assert delay == 0.25


def test_retry_after_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=5)
    seconds = retry_after_seconds(httpx.Headers({"Retry-After": format_datetime(when, usegmt=True)}))
    assert seconds is not None and 3.5 < seconds <= 5


def test_retry_after_beyond_the_cap_falls_back_to_backoff() -> None:
    policy = RetryPolicy(max_retry_after=60)
    delay = policy.delay_before_retry(0, response(429, **{"Retry-After": "3600"}))
    assert delay is not None and delay <= 0.5


def test_unparseable_retry_after_falls_back_to_backoff() -> None:
    delay = RetryPolicy().delay_before_retry(1, response(503, **{"Retry-After": "soon"}))
    assert delay is not None and 0.75 <= delay <= 1.0


def test_retry_after_on_a_final_status_is_ignored() -> None:
    assert RetryPolicy().delay_before_retry(0, response(400, **{"Retry-After": "1"})) is None


def test_rate_limiting_within_the_patience_is_backpressure_and_not_counted() -> None:
    attempts = RetryPolicy(max_retries=1, rate_limit_patience=10).attempts(patient=True, now=0)
    limited = response(429, **{"retry-after": "2"})
    for _ in range(3):
        assert attempts.next_retry(limited, now=5) == Retry(0.0, backpressure=True)
    assert attempts.retries_done == 0
    assert attempts.next_retry(limited, now=10) == Retry(2.0, backpressure=False)
    assert attempts.retries_done == 1
    assert attempts.next_retry(limited, now=11) is None


def test_an_impatient_request_counts_every_retry() -> None:
    attempts = RetryPolicy(max_retries=2).attempts(patient=False, now=0)
    assert attempts.next_retry(response(429, **{"retry-after": "1"}), now=0) == Retry(1.0, backpressure=False)
    assert attempts.retries_done == 1
    assert attempts.next_retry(response(400), now=0) is None
    assert attempts.retries_done == 1
