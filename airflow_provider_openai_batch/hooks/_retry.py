"""When to retry a Batch API request and how long to wait first.

The policy only decides; the sync and async hooks do the waiting. It follows the official OpenAI SDKs:
exponential backoff from 0.5 s doubling to 8 s with up to 25 % jitter, and the server's ``retry-after-ms`` or
``Retry-After`` when it gives one within a bound. Unlike the SDKs it never retries 409: for a batch, a
conflict means the batch already finished, and asking again cannot change that.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import time

import httpx

from airflow_provider_openai_batch.hooks._defaults import DEFAULT_MAX_RETRIES

RETRYABLE_STATUS_CODES = frozenset({408, 429})
#: The longest wait, in seconds, a server's header is read as. A longer one, infinite or not a number
#: (``NaN``) is no hint at all: every caller caps a hint far below this anyway (``max_retry_after``, the rate
#: governor's pause), and the arithmetic and sleeps then only ever see finite, bounded numbers.
MAX_HINT_SECONDS = 86_400.0

#: What stands in for an answer: the response, or the error raised instead of one. A body that cannot be
#: decoded (``Content-Encoding: gzip`` on a plain body, as a CDN may send) is no answer either: it is retried,
#: and mapped, like a connection lost mid-response.
Failure = httpx.TransportError | httpx.DecodingError
Outcome = httpx.Response | Failure
#: :data:`Failure` for an ``except`` clause.
FAILURES = (httpx.TransportError, httpx.DecodingError)


def is_retryable_status(status_code: int) -> bool:
    return status_code in RETRYABLE_STATUS_CODES or status_code >= 500


def is_rate_limited(outcome: Outcome) -> bool:
    """A 429, or a 503 with a retry hint: the API asks to slow down, it is not broken."""
    if not isinstance(outcome, httpx.Response):
        return False
    status = outcome.status_code
    return status == 429 or (status == 503 and retry_after_seconds(outcome.headers) is not None)


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter that honours the server's retry hints.

    :param max_retries: retries after the first attempt; 0 disables retrying.
    :param initial_delay: backoff before the first retry, in seconds.
    :param max_delay: upper bound of the computed backoff, in seconds.
    :param max_retry_after: a server hint longer than this is ignored in favour of the computed backoff, so a
        misbehaving proxy cannot park a task for an hour.
    :param rate_limit_patience: how long a request that may not give up lightly (a cancel: giving up leaves the
        batch billing) goes on being retried while the API rate limits it, without using up ``max_retries``.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_delay: float = 0.5
    max_delay: float = 8.0
    max_retry_after: float = 60.0
    rate_limit_patience: float = 300.0

    def delay_before_retry(self, retries_done: int, outcome: Outcome) -> float | None:
        """Seconds to wait before retrying after ``outcome``, or ``None`` if ``outcome`` is final."""
        if retries_done >= self.max_retries:
            return None
        if isinstance(outcome, httpx.Response):
            if not is_retryable_status(outcome.status_code):
                return None
            hint = retry_after_seconds(outcome.headers)
            if hint is not None and 0 <= hint <= self.max_retry_after:
                return hint
        return self.backoff(retries_done)

    def attempts(self, *, patient: bool, now: float) -> Attempts:
        """Track one request's retries from ``now``; a ``patient`` one rides out rate limiting for a while."""
        return Attempts(self, now + (self.rate_limit_patience if patient else 0.0))

    def backoff(self, retries_done: int) -> float:
        delay = min(self.initial_delay * 2**retries_done, self.max_delay)
        return delay * (1 - 0.25 * random.random())


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The server's retry hint in seconds: ``retry-after-ms``, else ``Retry-After`` as seconds or an HTTP date.

    ``None`` when neither is a usable duration (see :func:`hint_seconds`).
    """
    if (millis := headers.get("retry-after-ms")) is not None:
        try:
            if (hint := hint_seconds(float(millis) / 1000)) is not None:
                return hint
        except ValueError:
            pass
    if (value := headers.get("retry-after")) is None:
        return None
    try:
        return hint_seconds(float(value))
    except ValueError:
        pass
    try:
        return hint_seconds(parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError, OverflowError):
        return None


def hint_seconds(seconds: float) -> float | None:
    """``seconds`` read from a server's header, or ``None`` if it is no usable duration: not a number,
    infinite, or longer than :data:`MAX_HINT_SECONDS` either way (a ``NaN`` would make every comparison false
    and every sleep fail or spin)."""
    return seconds if math.isfinite(seconds) and abs(seconds) <= MAX_HINT_SECONDS else None


@dataclass(frozen=True)
class Retry:
    """The decision to send a request again, and how it reads in the log.

    :param delay: seconds to wait first.
    :param backpressure: the API is rate limiting within the request's patience: the request is paced, not
        failing, and the retry does not count against ``max_retries``.
    """

    delay: float
    backpressure: bool


@dataclass
class Attempts:
    """One request's retries so far.

    A rate-limited answer within the request's patience is retried without using up ``max_retries``: it is
    backpressure, and the shared rate governor (``_rate.py``) already holds every request until the API's hint,
    so the retry itself waits no longer. Past the patience, or for any other outcome, the policy decides.
    """

    policy: RetryPolicy
    patience_until: float
    retries_done: int = 0

    def next_retry(self, outcome: Outcome, now: float) -> Retry | None:
        """How to retry after ``outcome``, or ``None`` if ``outcome`` is final."""
        if now < self.patience_until and is_rate_limited(outcome):
            return Retry(delay=0.0, backpressure=True)
        delay = self.policy.delay_before_retry(self.retries_done, outcome)
        if delay is None:
            return None
        self.retries_done += 1
        return Retry(delay=delay, backpressure=False)
