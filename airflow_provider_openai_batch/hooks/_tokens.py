"""Access tokens of workload identities: one per identity per process, exchanged once however many need it.

The exchange is RFC 8693 as the ``openai`` SDK does it (``openai/auth/_workload.py``): the platform's subject
token is POSTed as JSON to the token exchange URL, which answers ``{"access_token", "expires_in"}``; the token is
refreshed ``min(refresh_buffer_seconds, expires_in / 2)`` seconds before it expires; a 400, 401 or 403 means the
identity was refused.

Like the rate governor (``_rate.py``), the token is shared by every hook and trigger of the process that uses
the identity, and at most one exchange runs at a time: among the sync hooks' threads (a lock), and among the
coroutines of each event loop (one shielded task they all await). A triggerer with a thousand waits exchanges
once per refresh, not a thousand times. While a refresh runs, a token that has not expired is still handed out.

The exchange is a sans-I/O generator (:func:`exchange_flow`) that yields what it needs done: a request to send,
a pause before a retry, or a blocking call (reading the token file, a custom token provider). The sync and async
hooks drive it (:func:`run_sync`, :func:`run_async`) through their own httpx clients; the async driver runs the
blocking calls in a thread, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import httpx
from airflow.providers.common.compat.sdk import mask_secret

from airflow_provider_openai_batch._compat import amask_secret
from airflow_provider_openai_batch.exceptions import (
    OpenAIBatchAPIError,
    OpenAIBatchAuthenticationError,
    OpenAIBatchConnectionError,
)
from airflow_provider_openai_batch.hooks._retry import FAILURES, RetryPolicy
from airflow_provider_openai_batch.hooks._workload_identity import WorkloadIdentity

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
#: As the SDK: the exchange and the metadata requests time out after 10 s.
REQUEST_TIMEOUT = httpx.Timeout(10.0).as_dict()
#: Refused exchanges quote the server's error text up to this length.
MAX_ERROR_TEXT = 500


class Sleep(NamedTuple):
    """A step of a flow: wait this long (before a retry)."""

    seconds: float


class Call(NamedTuple):
    """A step of a flow: run this blocking function (off the event loop on the async path)."""

    function: Callable[[], Any]


Step = httpx.Request | Sleep | Call
#: A flow returns the access token and the subject token it was exchanged for (both to be masked).
Flow = Generator[Step, Any, tuple["Token", str]]


class Token(NamedTuple):
    """An access token and when (``time.monotonic()``) to refresh it and when it expires."""

    value: str
    refresh_at: float
    expires_at: float

    def __repr__(self) -> str:
        return f"Token(value='***', refresh_at={self.refresh_at}, expires_at={self.expires_at})"

    def usable(self, now: float, *, refreshing: bool) -> bool:
        """Unexpired, and not due for a refresh unless one is already running."""
        return now < self.expires_at and (refreshing or now < self.refresh_at)


# -- sans-I/O: the exchange --------------------------------------------------------------------------------------


def exchange_flow(identity: WorkloadIdentity, policy: RetryPolicy) -> Flow:
    """Get a subject token, exchange it, and return the access token (transient failures retried by ``policy``)."""
    started = time.monotonic()
    subject = yield from _subject_token(identity, policy)
    request = httpx.Request(
        "POST",
        identity.token_exchange_url,
        json={
            "grant_type": GRANT_TYPE,
            "subject_token": subject,
            "subject_token_type": identity.subject_token_type,
            "identity_provider_id": identity.identity_provider_id,
            "service_account_id": identity.service_account_id,
        },
        extensions={"timeout": REQUEST_TIMEOUT},
    )
    response = yield from _fetch(request, policy, "the token exchange")
    value, expires_in = parse_exchange(response, identity, subject)
    refresh_in = max(expires_in - min(identity.refresh_buffer_seconds, expires_in / 2), 0.0)
    return Token(value, started + refresh_in, started + expires_in), subject


def parse_exchange(response: httpx.Response, identity: WorkloadIdentity, subject: str) -> tuple[str, float]:
    """The access token and its lifetime, or the error the answer means; the subject token is never quoted."""
    where = f"The token exchange at {_shown(response.request.url)}"
    status = response.status_code
    if status in (400, 401, 403):
        text = _error_text(response).replace(subject, "***")
        raise OpenAIBatchAuthenticationError(
            f"{where} refused workload identity {identity.name} (HTTP {status}): {text}",
            status_code=status,
            api_message=text,
        )
    if not response.is_success:
        raise OpenAIBatchAPIError(f"{where} failed with HTTP {status}.", status_code=status)
    try:
        body = response.json()
    except ValueError:
        body = None
    token = body.get("access_token") if isinstance(body, dict) else None
    expires_in = body.get("expires_in") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token or not all("!" <= char <= "~" for char in token):
        raise OpenAIBatchAPIError(f"{where} answered without a valid access_token.", status_code=status)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or not 0 < expires_in < 1e9:
        raise OpenAIBatchAPIError(f"{where} answered without a valid expires_in.", status_code=status)
    return token, float(expires_in)


def authorized(request: httpx.Request, token: str) -> httpx.Request:
    """A copy of ``request`` carrying ``token``: the original, which a hook may reuse, is left as it is."""
    headers = request.headers.copy()
    headers["Authorization"] = f"Bearer {token}"
    return httpx.Request(
        request.method, request.url, headers=headers, stream=request.stream, extensions=request.extensions
    )


def _subject_token(identity: WorkloadIdentity, policy: RetryPolicy) -> Generator[Step, Any, str]:
    """The platform's identity token, from the identity's source, as the SDK's providers get it."""
    if identity.source == "kubernetes":
        return (yield Call(lambda: read_token_file(identity.token_file_path)))
    if identity.source == "custom":
        return (yield Call(lambda: call_token_provider(identity)))
    assert identity.metadata_url is not None
    azure = identity.source == "azure"
    what = "Azure IMDS" if azure else "the GCP metadata server"
    request = httpx.Request(
        "GET",
        identity.metadata_url,
        params=dict(identity.metadata_params),
        headers={"Metadata": "true"} if azure else {"Metadata-Flavor": "Google"},
        extensions={"timeout": REQUEST_TIMEOUT},
    )
    response = yield from _fetch(request, policy, what)
    if not response.is_success:
        raise OpenAIBatchAuthenticationError(
            f"Cannot get the subject token of workload identity {identity.name}: {what} answered HTTP "
            f"{response.status_code}.",
            status_code=response.status_code,
        )
    token: Any = None
    if azure:
        with contextlib.suppress(ValueError, AttributeError):
            token = response.json().get("access_token")
    else:
        token = response.text.strip()
    if not isinstance(token, str) or not token:
        raise OpenAIBatchAuthenticationError(
            f"Cannot get the subject token of workload identity {identity.name}: {what} returned no token."
        )
    return token


def _fetch(request: httpx.Request, policy: RetryPolicy, what: str) -> Generator[Step, Any, httpx.Response]:
    """Send ``request`` until it gets a final answer, retrying as any request of the hook is retried."""
    attempts = policy.attempts(patient=False, now=time.monotonic())
    while True:
        outcome: httpx.Response | httpx.TransportError | httpx.DecodingError = yield request
        # A DecodingError (an answer that cannot be read) is retried as a dropped connection is.
        retry = attempts.next_retry(outcome, time.monotonic())  # type: ignore[arg-type]
        if retry is None:
            break
        yield Sleep(retry.delay)
    if not isinstance(outcome, httpx.Response):
        detail = f"{type(outcome).__name__} ({outcome})" if str(outcome) else type(outcome).__name__
        raise OpenAIBatchConnectionError(f"No response from {what} at {_shown(request.url)}: {detail}.")
    return outcome


def read_token_file(path: str) -> str:
    """The Kubernetes service account token in ``path`` (re-read at each exchange: the kubelet rotates it)."""
    try:
        with open(path, encoding="utf-8") as file:
            token = file.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else type(error).__name__
        raise OpenAIBatchAuthenticationError(
            f"Cannot read the workload identity token file {path!r}: {reason}."
        ) from None
    if not token:
        raise OpenAIBatchAuthenticationError(f"The workload identity token file {path!r} is empty.")
    return token


def call_token_provider(identity: WorkloadIdentity) -> str:
    """Import and call the custom source's ``token_provider``; its failures say which provider failed."""
    path = identity.token_provider or ""
    module_name, _, attribute = path.rpartition(".")
    try:
        provider = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise OpenAIBatchAuthenticationError(f"Cannot import token_provider {path!r}: {error}.") from None
    try:
        token = provider()
    except Exception as error:  # noqa: BLE001 - whatever a user's callable raises, said without its message
        raise OpenAIBatchAuthenticationError(
            f"token_provider {path!r} failed: {type(error).__name__}."
        ) from None
    if not isinstance(token, str) or not token.strip():
        raise OpenAIBatchAuthenticationError(f"token_provider {path!r} returned no token.")
    return token.strip()


def _error_text(response: httpx.Response) -> str:
    """The refusal's reason: an OAuth error (``error``, ``error_description``) or OpenAI's error envelope."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:MAX_ERROR_TEXT] or "no reason given."
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        text = str(error.get("message") or error.get("code") or "")
    else:
        description = body.get("error_description") if isinstance(body, dict) else None
        text = ": ".join(str(part) for part in (error, description) if part)
    return text[:MAX_ERROR_TEXT] or "no reason given."


def _shown(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode()}{url.path}"


# -- drivers -----------------------------------------------------------------------------------------------------


def run_sync(flow: Flow, send: Callable[[httpx.Request], httpx.Response]) -> tuple[Token, str]:
    """Drive ``flow`` on this thread."""
    with contextlib.closing(flow):
        reply: Any = None
        while True:
            try:
                step = flow.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                reply = None
            elif isinstance(step, Call):
                reply = step.function()
            else:
                try:
                    reply = send(step)
                except FAILURES as error:
                    reply = error


async def run_async(
    flow: Flow, send: Callable[[httpx.Request], Awaitable[httpx.Response]]
) -> tuple[Token, str]:
    """Drive ``flow`` on the event loop; its blocking calls run in a thread."""
    with contextlib.closing(flow):
        reply: Any = None
        while True:
            try:
                step = flow.send(reply)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                reply = None
            elif isinstance(step, Call):
                reply = await asyncio.to_thread(step.function)
            else:
                try:
                    reply = await send(step)
                except FAILURES as error:
                    reply = error


# -- the process's tokens ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class TokenCache:
    """The access token of one identity in this process, and the refresh in flight, per path."""

    identity: WorkloadIdentity
    token: Token | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._sync_refresh = threading.Lock()
        self._async_refreshes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[Token]] = (
            weakref.WeakKeyDictionary()
        )

    def current(self, *, refreshing: bool) -> str | None:
        token = self.token
        return (
            token.value
            if token is not None and token.usable(time.monotonic(), refreshing=refreshing)
            else None
        )

    def get_sync(self, send: Callable[[httpx.Request], httpx.Response], policy: RetryPolicy) -> str:
        """A usable token, exchanging one if needed; one thread exchanges while the others wait (or use the
        unexpired token)."""
        if (value := self.current(refreshing=False)) is not None:
            return value
        if not self._sync_refresh.acquire(blocking=False):
            if (value := self.current(refreshing=True)) is not None:
                return value
            self._sync_refresh.acquire()
        try:
            if (value := self.current(refreshing=False)) is not None:
                return value  # another thread refreshed it meanwhile
            token, subject = run_sync(exchange_flow(self.identity, policy), send)
            mask_secret(subject)
            mask_secret(token.value)
            self.token = token
            return token.value
        finally:
            self._sync_refresh.release()

    async def get_async(
        self, send: Callable[[httpx.Request], Awaitable[httpx.Response]], policy: RetryPolicy
    ) -> str:
        """Async :meth:`get_sync`: every coroutine of the loop awaits the same refresh, shielded, so a waiter
        cancelled meanwhile (a trigger ending) does not cancel it for the others."""
        if (value := self.current(refreshing=False)) is not None:
            return value
        loop = asyncio.get_running_loop()
        refresh = self._async_refreshes.get(loop)
        if refresh is None:
            refresh = self._async_refreshes[loop] = loop.create_task(self._arefresh(send, policy))
            refresh.add_done_callback(self._refresh_done)
        elif (value := self.current(refreshing=True)) is not None:
            return value
        return (await asyncio.shield(refresh)).value

    async def _arefresh(
        self, send: Callable[[httpx.Request], Awaitable[httpx.Response]], policy: RetryPolicy
    ) -> Token:
        try:
            token, subject = await run_async(exchange_flow(self.identity, policy), send)
        except RuntimeError as error:
            # The client it went through was closed meanwhile (its last hook left): for the waiters of other
            # hooks, a transient failure like a dropped connection, and the next request exchanges anew.
            raise OpenAIBatchConnectionError(f"The token exchange was interrupted: {error}") from error
        await amask_secret(subject)
        await amask_secret(token.value)
        self.token = token
        return token

    def _refresh_done(self, refresh: asyncio.Task[Token]) -> None:
        with contextlib.suppress(KeyError):
            del self._async_refreshes[refresh.get_loop()]
        if not refresh.cancelled():
            refresh.exception()  # retrieved here too: every waiter may have left

    def drop(self, value: str) -> None:
        """Forget ``value`` (the API refused it): the next request exchanges a new one."""
        token = self.token
        if token is not None and token.value == value:
            self.token = None


_caches: dict[WorkloadIdentity, TokenCache] = {}
_caches_lock = threading.Lock()


def cache_for(identity: WorkloadIdentity) -> TokenCache:
    """The process's token cache of ``identity``."""
    with _caches_lock:
        if (cache := _caches.get(identity)) is None:
            cache = _caches[identity] = TokenCache(identity)
        return cache
