"""One rate governor per API key and base URL in each process: the waits that share an organisation's rate
limit slow down together instead of failing.

A triggerer holds hundreds of waits on one key, and that key's limit is shared with the rest of the
organisation. Retrying each request on its own makes them hammer a limited API at many times its rate, and
most of what they send is refused. The governor is one shared view of the limit:

* a 429 (or a 503) with a retry hint pauses every request on the key until then, not only the one refused (a
  hint longer than the caller's retry policy accepts is a misbehaving proxy's, and is ignored here too);
* it lets go no more requests than the API says remain (``x-ratelimit-remaining-requests``) before its window
  resets (``x-ratelimit-reset-requests``), then waits for the reset; without those headers, it halves its rate
  at each refusal and raises it again, step by step, while requests go through, until it limits nothing;
* requests start in the order they asked (each takes the next free start time), so none is starved, and a
  waiting request sleeps: no polling, no CPU.

:class:`RateGovernor` only decides (sans I/O); the async client and the sync hook do the sleeping. It is
thread-safe, so the sync hooks of a worker's threads and the event loop of a triggerer can share one.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time

import httpx

from airflow_provider_openai_batch.hooks._retry import hint_seconds, is_rate_limited, retry_after_seconds

#: Reset times of one window, as seen from answers that took different times to arrive, differ by this much.
WINDOW_SLACK = 0.05
#: A refusal without rate headers halves the rate; each request that goes through adds this share back.
DECREASE, INCREASE = 0.5, 0.05
#: Above this many requests per second the governor stops pacing: the API is not what limits us.
UNLIMITED = 1_000.0
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class RateGovernor:
    """When the next request on one API key may start, learnt from the responses to the previous ones.

    With the API's rate headers it keeps a budget: the requests it may still start before the window resets
    (``remaining``, counting down as it lets requests go), then waits for the reset. Without them it paces to a
    rate it learns from refusals (halved at each refusal, raised step by step while requests go through).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Requests per second to pace to (learnt without rate headers), or ``None``: no pacing.
        self.rate: float | None = None
        #: Monotonic time before which no request starts (a refusal's retry hint, or an exhausted window).
        self.paused_until = 0.0
        #: Requests that may still start before :attr:`window_ends`, by the rate headers; ``None``: unknown.
        self.budget: int | None = None
        self.window_ends = 0.0
        self._next_start = 0.0
        #: Requests let go so far: a request's ticket is this count when it went.
        self._issued = 0
        self._sent_in_second = 0
        self._second = 0.0
        self._last_second_sent = 0

    def reserve(self, now: float) -> tuple[float, int | None]:
        """Take the next start time: the seconds to wait until it (0.0: go now), and the request's ticket.

        A ``None`` ticket means no start was given (the window's budget is spent): wait, then ask again.
        """
        with self._lock:
            start = max(now, self.paused_until)
            if self.budget is not None and start >= self.window_ends:
                self.budget = None  # a new window: the next answer tells its budget
            if self.budget is not None:
                if self.budget <= 0:
                    return self.window_ends - now, None
                self.budget -= 1
            if self.rate is not None:
                start = max(start, self._next_start)
                self._next_start = start + 1.0 / self.rate
            self._count(start)
            self._issued += 1
            return start - now, self._issued

    def observe(self, response: httpx.Response, ticket: int, now: float, max_pause: float) -> None:
        """Learn from the response to the request of ``ticket`` (what :meth:`wait_turn` returned): its rate
        headers, or the refusal it is; pause at most ``max_pause`` seconds."""
        headers = response.headers
        remaining = _int(headers.get("x-ratelimit-remaining-requests"))
        reset = _duration(headers.get("x-ratelimit-reset-requests"))
        refused = is_rate_limited(response)
        hint = retry_after_seconds(headers) if refused else None
        if hint is not None and hint > max_pause:
            return
        with self._lock:
            if remaining is not None and reset is not None:
                # The requests let go after this one are not in its count yet.
                self._follow_headers(remaining - (self._issued - ticket), min(reset, max_pause), now)
            if refused:
                if hint is not None and hint > 0:
                    self.paused_until = max(self.paused_until, now + hint)
                if remaining is None and (base := self.rate or self._observed_rate()) >= 2:
                    self.rate = max(1.0, base * DECREASE)
            elif remaining is None and self.rate is not None:
                self.rate *= 1 + INCREASE
                self._next_start = min(self._next_start, now + 1.0 / self.rate)
                if self.rate > UNLIMITED:
                    self.rate = None

    def _follow_headers(self, remaining: int, reset: float, now: float) -> None:
        """Take the window the answer describes; within the same window, trust the lower count (answers to
        requests sent earlier may arrive later)."""
        window_ends = now + reset
        if self.budget is None or window_ends > self.window_ends + WINDOW_SLACK:
            self.budget, self.window_ends = remaining, window_ends
        else:
            self.budget = min(self.budget, remaining)
        self.rate = None  # the headers are the better guide
        if remaining <= 0:
            self.paused_until = max(self.paused_until, window_ends)

    def _count(self, start: float) -> None:
        second = float(int(start))
        if second != self._second:
            self._last_second_sent = self._sent_in_second if second == self._second + 1 else 0
            self._second, self._sent_in_second = second, 0
        self._sent_in_second += 1

    def _observed_rate(self) -> float:
        """Requests started in the last whole second: the rate that was too much, when no rate was set. Under 2,
        there is no rate to halve: the refusal came from other traffic on the key, and its hint is the signal."""
        return float(max(self._last_second_sent, self._sent_in_second))

    async def wait_turn(self) -> int:
        """Sleep until this request may start, without blocking the loop; return its ticket for :meth:`observe`.

        If a new pause began while it slept (compared as values: the loop may wake a sleeper a clock tick
        early), or it was waiting for a window to reset, it asks again.
        """
        loop = asyncio.get_running_loop()
        while True:
            delay, ticket = self.reserve(loop.time())
            if delay <= 0 and ticket is not None:
                return ticket
            pause = self.paused_until
            await asyncio.sleep(delay)
            if ticket is not None and self.paused_until <= pause:
                return ticket

    def wait_turn_sync(self) -> int:
        """:meth:`wait_turn` for the synchronous hook."""
        while True:
            delay, ticket = self.reserve(time.monotonic())
            if delay <= 0 and ticket is not None:
                return ticket
            pause = self.paused_until
            time.sleep(delay)
            if ticket is not None and self.paused_until <= pause:
                return ticket


_governors: dict[tuple[str, str], RateGovernor] = {}
_governors_lock = threading.Lock()


def governor_for(base_url: str, api_key: str) -> RateGovernor:
    """The process's governor for this key on this API; the key is held only as a digest."""
    key = (base_url, hashlib.sha256(api_key.encode()).hexdigest())
    with _governors_lock:
        if (governor := _governors.get(key)) is None:
            governor = _governors[key] = RateGovernor()
        return governor


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _duration(value: str | None) -> float | None:
    """OpenAI's reset durations: ``"1s"``, ``"20ms"``, ``"6m0s"``, ``"1h2m3.5s"``; a bare number is seconds.

    ``None`` for anything else, ``NaN``, ``inf`` and absurd lengths included (:func:`hint_seconds`).
    """
    if value is None:
        return None
    try:
        return hint_seconds(float(value))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value.strip():
        return None
    return hint_seconds(sum(float(number) * _SECONDS[unit] for number, unit in parts))
