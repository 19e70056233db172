"""Hook for the OpenAI Batch API: retrieve, list and cancel batches, and retrieve and download their files,
sync or async, over httpx."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator
from contextlib import aclosing, closing
from datetime import datetime
from functools import cached_property, partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import httpx
from airflow.providers.common.compat.connection import get_async_connection, get_async_extra_dejson
from airflow.providers.common.compat.sdk import BaseHook, mask_secret

from airflow_provider_openai_batch import storage
from airflow_provider_openai_batch._compat import amask_secret
from airflow_provider_openai_batch._time import unix_time
from airflow_provider_openai_batch.exceptions import BatchNotCancellableError, OpenAIBatchError
from airflow_provider_openai_batch.hooks import _async_clients, _connection_form, _download, _errors, _tokens
from airflow_provider_openai_batch.hooks._connection import ConnectionSettings
from airflow_provider_openai_batch.hooks._flights import Flights
from airflow_provider_openai_batch.hooks._rate import RateGovernor, governor_for
from airflow_provider_openai_batch.hooks._retry import FAILURES, Attempts, Outcome, RetryPolicy
from airflow_provider_openai_batch.hooks._transport import in_memory, read_whole
from airflow_provider_openai_batch.ids import DEFAULT_CONN_ID, validate_batch_id, validate_file_id
from airflow_provider_openai_batch.models import Batch, BatchList, File

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import ObjectStoragePath

MAX_PAGE_SIZE = 100
#: Asked of a file's content, which is then read as sent (``iter_raw``): the bytes ``File.bytes`` counts. A
#: ``Content-Encoding`` a CDN puts on a plain body is not taken at its word, and a body really encoded against
#: this request fails the size check, a typed error, instead of a decoding error in the middle of the stream.
_CONTENT = {"Accept-Encoding": "identity"}
#: The connection lookups in flight, by hook class (it may override the lookup) and connection id.
_settings_lookups: Flights[tuple[type[OpenAIBatchHook], str], ConnectionSettings] = Flights()


class OpenAIBatchHook(BaseHook):
    """Talk to the OpenAI Batch API (or Azure OpenAI, or the bundled emulator).

    The connection's password is the API key and its host the base URL (default ``https://api.openai.com/v1``).
    Extras: ``organization``, ``project``, ``api_type`` (``openai`` or ``azure``), ``api_version``, ``timeout``
    (seconds) and ``max_retries``. A connection made for the official OpenAI provider, with its
    ``openai_client_kwargs`` extra, works unchanged and is read as the official hook reads it (``base_url`` and
    ``api_key`` win over host and password; docs/connections.md), which is why the default connection is
    ``openai_default``.

    Sync methods share one ``httpx.Client``; ``a``-prefixed twins share one ``httpx.AsyncClient`` per event loop
    and never block the loop, connection lookup included. Use the hook as a context manager (``with`` or
    ``async with``) to release its clients.

    Files (a batch's input, output and error files) go through the same retries, error mapping and key hygiene.
    Their content is streamed, never held whole: :meth:`iter_file_content` and :meth:`aiter_file_content` yield
    chunks, and :meth:`download_file` writes them to a local path or an ``ObjectStoragePath``. An async stream
    uses a plain ``httpx.AsyncClient`` of its own rather than the loop's shared client: that client's lean
    transport (``_transport``) reads every response whole, which is what keeps a trigger's polls cheap, and a
    download is rare and long, so a client of its own costs nothing that matters (the TLS context is shared).

    :param conn_id: the Airflow connection to use.
    :param retry_policy: overrides the retry policy built from the connection's ``max_retries``.
    """

    conn_name_attr = "conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "openai_batch"
    hook_name = "OpenAI Batch"

    def __init__(self, conn_id: str = default_conn_name, *, retry_policy: RetryPolicy | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id
        self._retry_policy = retry_policy
        self._settings: ConnectionSettings | None = None
        self._shared_async_client: _async_clients.SharedAsyncClient | None = None
        self._async_requests: dict[tuple[str, str], httpx.Request] = {}

    # Airflow 3.0 and 3.1 build the connection form from these two; later versions read the provider info.
    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return _connection_form.FIELD_BEHAVIOUR

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        return _connection_form.wtforms_widgets()

    # -- connection -------------------------------------------------------------------------------------------

    @property
    def settings(self) -> ConnectionSettings:
        """Settings of the connection, looked up once (synchronously: not for use on an event loop)."""
        if self._settings is None:
            conn = self.get_connection(self.conn_id)
            settings = ConnectionSettings.from_connection(conn, conn.extra_dejson)
            if settings.api_key:  # none with workload identity: its tokens are masked as they come
                mask_secret(settings.api_key)
            self._settings = settings
        return self._settings

    async def asettings(self) -> ConnectionSettings:
        """Settings of the connection, looked up once without blocking the event loop.

        Hooks of one class on one loop that ask for the same connection at the same time (a triggerer starting
        thousands of waits) share the lookup in flight (``_flights``): the start of each wait then costs the
        loop no lookup, parse or masking of its own.
        """
        if self._settings is None:
            self._settings = await _settings_lookups.join((type(self), self.conn_id), self._alook_up)
        return self._settings

    async def _alook_up(self) -> ConnectionSettings:
        # common-compat picks, per Airflow line, a lookup that cannot block or deadlock the loop.
        conn = await get_async_connection(self.conn_id, hook=self)
        settings = ConnectionSettings.from_connection(conn, await get_async_extra_dejson(conn))
        if settings.api_key:
            await amask_secret(settings.api_key)
        return settings

    def sibling(self) -> OpenAIBatchHook:
        """A new hook on this hook's connection, with the settings this one already looked up: for a user that
        outlives this hook (the status board, serving every wait on the connection) without a second lookup."""
        sibling = type(self)(self.conn_id, retry_policy=self._retry_policy)
        sibling._settings = self._settings
        return sibling

    @property
    def retry_policy(self) -> RetryPolicy:
        if self._retry_policy is None:
            self._retry_policy = RetryPolicy(max_retries=self.settings.max_retries)
        return self._retry_policy

    # -- sync API ---------------------------------------------------------------------------------------------

    @cached_property
    def client(self) -> httpx.Client:
        return httpx.Client(**self.settings.client_kwargs())

    def get_conn(self) -> httpx.Client:
        return self.client

    def get_batch(self, batch_id: str) -> Batch:
        """Retrieve a batch."""
        path = _batch_path(batch_id)
        return _errors.parse(self._send("GET", path, batch_id=batch_id, patient=False), Batch, batch_id)

    def cancel_batch(self, batch_id: str) -> Batch:
        """Ask the API to cancel a batch and return it, usually in ``cancelling``.

        Idempotent: a batch already ``cancelling`` or ``cancelled`` is returned as it is, so task retries and
        concurrent cancels are safe. A batch that already completed, failed or expired raises
        :class:`BatchNotCancellableError` carrying its status. When the API refuses the cancel without naming
        a finished status (a gateway or Azure may word the 409 differently), the batch's real status decides.
        """
        path = _batch_path(batch_id, "cancel")
        try:
            return _errors.parse(self._send("POST", path, batch_id=batch_id), Batch, batch_id)
        except BatchNotCancellableError as error:
            conflict = _errors.unsettled(error)
        return _errors.settled(conflict, self.get_batch(batch_id))

    def get_finished_batch(self, batch_id: str, conflict: BatchNotCancellableError) -> Batch:
        """Retrieve a batch whose cancel ``conflict`` refused because it had finished, to report how it ended.

        Raises :class:`OpenAIBatchResponseError` if the API now reports a status that is not final (or one
        unknown to this provider): its two answers contradict each other.
        """
        return _errors.finished(conflict, self.get_batch(batch_id))

    def list_batches(
        self,
        *,
        after: str | None = None,
        limit: int = MAX_PAGE_SIZE,
        created_after: datetime | float | None = None,
    ) -> Iterator[Batch]:
        """Iterate over the organization's batches, newest first, fetching pages lazily as they are consumed.

        :param created_after: a datetime with a time zone, or UNIX seconds. The listing ends at the first
            batch created before it, without reading further pages: the list is newest first, so all the rest
            is older. Finding one run's batches then costs a page or two, not the organization's history.

        A next-page cursor that is not a batch id, or that this listing already sent (a server ignoring
        ``after``), raises :class:`OpenAIBatchResponseError` rather than reading the same pages for ever.
        """
        cutoff = _cutoff(created_after)
        with closing(self.list_batch_pages(after=after, limit=limit)) as pages:
            for page in pages:
                batches, older_follow = _created_since(page, cutoff)
                yield from batches
                if older_follow:
                    return

    def list_batch_pages(
        self, *, after: str | None = None, limit: int = MAX_PAGE_SIZE, patient: bool = True
    ) -> Generator[BatchList]:
        """Iterate over the pages of the organization's batches, one request each, fetched as consumed.

        A next-page cursor that is not a batch id, or that this listing already sent (a server ignoring
        ``after``), raises :class:`OpenAIBatchResponseError` rather than reading the same pages for ever.

        :param patient: ride out rate limiting for the retry policy's ``rate_limit_patience``. A poll is not
            patient: refused, it raises :class:`OpenAIBatchRateLimitError` at once, backpressure for its wait.
        """
        params = _list_params(after, limit)
        sent = _cursors(params)
        while True:
            response = self._send("GET", "/batches", params=params, patient=patient)
            page = _errors.parse(response, BatchList, None)
            yield page
            if (cursor := _next_cursor(page)) is None:
                return
            params = {**params, "after": _errors.advancing(cursor, sent)}

    def get_file(self, file_id: str) -> File:
        """Retrieve a file's metadata; its ``bytes`` is the size a download of it must have."""
        path = _file_path(file_id)
        return _errors.parse(self._send("GET", path, file_id=file_id), File, file_id=file_id)

    def iter_file_content(self, file_id: str) -> Generator[bytes]:
        """Stream a file's content in the chunks it arrives in, never holding it whole.

        The content is asked for unencoded (``Accept-Encoding: identity``) and yielded as sent: a
        ``Content-Encoding`` label is not trusted (a CDN may put ``gzip`` on a plain file), and the bytes are what
        the file's ``bytes`` counts.

        Retried like every request until the answer starts. A connection lost after that raises
        :class:`OpenAIFileDownloadError`: the chunks already yielded cannot be taken back, so restarting is the
        caller's choice (:meth:`download_file` makes it). The id is checked at once, before any request; the
        request is sent at the first ``next()``. Close the iterator if you stop early, to free its connection.
        """
        return self._content(_file_path(file_id, "content"), file_id)

    def download_file(self, file_id: str, destination: str | os.PathLike | ObjectStoragePath) -> int:
        """Stream a file's content to ``destination`` and return the bytes written.

        ``destination`` is the file to write: a local path, or an ``ObjectStoragePath`` or URL (any scheme
        Airflow has a filesystem for). Its directory is created if missing. The content goes to a temporary name
        next to it, renamed once complete, so an interrupted download never looks complete, and an older file
        there is replaced only by a whole new one. The size is checked against the file's ``bytes``; a download
        cut short starts again from the start, up to the connection's ``max_retries`` times. The id and the
        destination are checked before any request.
        """
        validate_file_id(file_id)
        target = storage.file(destination, "destination")
        return _download.transfer(self, self.get_file(file_id), target, _download.Copy).bytes_written

    def test_connection(self) -> tuple[bool, str]:
        """Back the UI's Test button: list a single batch."""
        try:
            next(self.list_batches(limit=1), None)
        except (OpenAIBatchError, ValueError) as error:
            return False, str(error)
        return True, "Connection successfully tested: the Batch API listed batches."

    def close(self) -> None:
        if "client" in self.__dict__:
            self.client.close()
            del self.client

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @cached_property
    def _governor(self) -> RateGovernor:
        return governor_for(self.settings.base_url, self.settings.rate_key)

    def _send(
        self,
        method: str,
        path: str,
        *,
        batch_id: str | None = None,
        file_id: str | None = None,
        params: dict | None = None,
        patient: bool = True,
        stream: bool = False,
    ) -> httpx.Response:
        """The 2xx response to ``method path`` after retries; with ``stream`` its body is left to be read.

        Cancels and list pages are ``patient``: rate limiting is ridden out for the policy's
        ``rate_limit_patience``. A poll is not: refused, it is backpressure for its wait, which polls again until
        its own deadline.
        """
        request = self.client.build_request(method, path, params=params, headers=_CONTENT if stream else None)
        send = partial(_sent, self.client, stream=stream)
        attempts = self.retry_policy.attempts(patient=patient, now=time.monotonic())
        tokens = _token_cache(self.settings)
        credential, renewed = self.settings.api_key, False
        while True:
            sent = request
            if tokens is not None:
                credential = tokens.get_sync(self.client.send, self.retry_policy)
                sent = _tokens.authorized(request, credential)
            ticket = self._governor.wait_turn_sync()
            try:
                outcome: Outcome = send(sent)
            except FAILURES as error:
                outcome = error
            if not renewed and (renewed := self._token_refused(tokens, credential, outcome)):
                continue
            if (delay := self._retry_delay(request, attempts, outcome, self._governor, ticket)) is None:
                return _errors.successful(outcome, credential, batch_id=batch_id, file_id=file_id)
            time.sleep(delay)

    def _content(self, path: str, file_id: str) -> Generator[bytes]:
        response = self._send("GET", path, file_id=file_id, stream=True)
        received = 0
        try:
            for chunk in response.iter_raw():
                received += len(chunk)
                yield chunk
        except httpx.TransportError as error:
            raise _errors.cut_short(error, file_id, received) from error
        finally:
            response.close()

    # -- async API --------------------------------------------------------------------------------------------

    async def aget_batch(self, batch_id: str) -> Batch:
        """Retrieve a batch without blocking the event loop."""
        path = _batch_path(batch_id)
        return _errors.parse(
            await self._asend("GET", path, batch_id=batch_id, patient=False), Batch, batch_id
        )

    async def acancel_batch(self, batch_id: str) -> Batch:
        """Async :meth:`cancel_batch`, with the same idempotency."""
        path = _batch_path(batch_id, "cancel")
        try:
            return _errors.parse(await self._asend("POST", path, batch_id=batch_id), Batch, batch_id)
        except BatchNotCancellableError as error:
            conflict = _errors.unsettled(error)
        return _errors.settled(conflict, await self.aget_batch(batch_id))

    async def alist_batches(
        self,
        *,
        after: str | None = None,
        limit: int = MAX_PAGE_SIZE,
        created_after: datetime | float | None = None,
    ) -> AsyncIterator[Batch]:
        """Async :meth:`list_batches`, with the same early stop at ``created_after``."""
        cutoff = _cutoff(created_after)
        async with aclosing(self.alist_batch_pages(after=after, limit=limit)) as pages:
            async for page in pages:
                batches, older_follow = _created_since(page, cutoff)
                for batch in batches:
                    yield batch
                if older_follow:
                    return

    async def alist_batch_pages(
        self, *, after: str | None = None, limit: int = MAX_PAGE_SIZE, patient: bool = True
    ) -> AsyncGenerator[BatchList]:
        """Async :meth:`list_batch_pages`."""
        params = _list_params(after, limit)
        sent = _cursors(params)
        while True:
            response = await self._asend("GET", "/batches", params=params, patient=patient)
            page = _errors.parse(response, BatchList, None)
            yield page
            if (cursor := _next_cursor(page)) is None:
                return
            params = {**params, "after": _errors.advancing(cursor, sent)}

    async def aget_file(self, file_id: str) -> File:
        """Async :meth:`get_file`."""
        path = _file_path(file_id)
        return _errors.parse(await self._asend("GET", path, file_id=file_id), File, file_id=file_id)

    def aiter_file_content(self, file_id: str) -> AsyncIterator[bytes]:
        """Async :meth:`iter_file_content`, through a client of its own (see the class docstring).

        Close it (``contextlib.aclosing``) if you stop early: an async generator left open keeps its connection.
        """
        return self._acontent(_file_path(file_id, "content"), file_id)

    async def aclose(self) -> None:
        """Release this hook's use of the shared async client."""
        if self._shared_async_client is not None:
            self._shared_async_client = None
            await _async_clients.release(self._settings)  # type: ignore[arg-type]

    async def __aenter__(self) -> Self:
        await self._ashared()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _ashared(self) -> _async_clients.SharedAsyncClient:
        if self._shared_async_client is None:
            self._shared_async_client = await _async_clients.acquire(await self.asettings())
        return self._shared_async_client

    async def _asend(
        self,
        method: str,
        path: str,
        *,
        batch_id: str | None = None,
        file_id: str | None = None,
        params: dict | None = None,
        patient: bool = True,
        streaming_client: httpx.AsyncClient | None = None,
    ) -> httpx.Response:
        """Async :meth:`_send`: through the loop's shared client, or streamed through ``streaming_client``; both
        take their turn from the key's rate governor, inside the shared client's gate."""
        shared = await self._ashared()
        send: Callable[[httpx.Request], Awaitable[httpx.Response]]
        if streaming_client is None:
            request, send = self._reusable_request(shared.client, method, path, params), shared.send
        else:
            request = streaming_client.build_request(method, path, params=params, headers=_CONTENT)
            send = partial(_astreamed, streaming_client)
        attempts = self.retry_policy.attempts(patient=patient, now=time.monotonic())
        settings = await self.asettings()
        tokens = _token_cache(settings)
        credential, renewed = settings.api_key, False
        while True:
            sent = request
            if tokens is not None:  # outside the gate: the exchange does not hold back the API's requests
                credential = await tokens.get_async(shared.send, self.retry_policy)
                sent = _tokens.authorized(request, credential)
            # The turn is taken inside the gate: requests queued behind it have not reserved a start yet, so
            # what the governor learns from the first answers applies to them (a cold burst stays small).
            async with shared.gate:
                ticket = await shared.governor.wait_turn()
                try:
                    outcome: Outcome = await send(sent)
                except FAILURES as error:
                    outcome = error
            if not renewed and (renewed := self._token_refused(tokens, credential, outcome)):
                continue
            if (delay := self._retry_delay(request, attempts, outcome, shared.governor, ticket)) is None:
                return _errors.successful(outcome, credential, batch_id=batch_id, file_id=file_id)
            await asyncio.sleep(delay)

    async def _acontent(self, path: str, file_id: str) -> AsyncIterator[bytes]:
        async with _async_clients.streaming_client(await self.asettings()) as client:
            response = await self._asend("GET", path, file_id=file_id, streaming_client=client)
            received = 0
            try:
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    yield chunk
            except httpx.TransportError as error:
                raise _errors.cut_short(error, file_id, received) from error
            finally:
                await response.aclose()

    def _reusable_request(
        self, client: httpx.AsyncClient, method: str, path: str, params: dict | None
    ) -> httpx.Request:
        """The request for ``method path``, built once per hook when it has no query of its own.

        A trigger sends the same GET every poll; building it (merging and parsing URLs) is a tenth of a poll's
        CPU, and an ``httpx.Request`` with an empty body can be sent any number of times.
        """
        if params is not None:
            return client.build_request(method, path, params=params)
        key = (method, path)
        if (request := self._async_requests.get(key)) is None:
            request = self._async_requests[key] = client.build_request(method, path)
        return request

    # -- shared by both paths ---------------------------------------------------------------------------------

    def _token_refused(
        self,
        tokens: _tokens.TokenCache | None,
        token: str,
        outcome: httpx.Response | Exception,
    ) -> bool:
        """Whether the API refused (401) a workload identity token that was valid when sent: then it is
        dropped, and the request is sent again, once, with a new one (the token may have been revoked, or the
        clocks disagree on its expiry)."""
        if tokens is None or not isinstance(outcome, httpx.Response) or outcome.status_code != 401:
            return False
        self.log.info("The API refused the workload identity token (HTTP 401); exchanging a new one.")
        tokens.drop(token)
        return True

    def _retry_delay(
        self,
        request: httpx.Request,
        attempts: Attempts,
        outcome: Outcome,
        governor: RateGovernor,
        ticket: int,
    ) -> float | None:
        """Tell the governor what came back, then decide (and log) whether and when to retry."""
        now = time.monotonic()
        if isinstance(outcome, httpx.Response):
            governor.observe(outcome, ticket, now, self.retry_policy.max_retry_after)
        retry = attempts.next_retry(outcome, now)
        if retry is None:
            return None
        if retry.backpressure:
            self.log.info(
                "%s %s got %s; the API is rate limiting, retrying when it allows.",
                request.method,
                request.url.path,
                _errors.describe(outcome),
            )
        else:
            self.log.warning(
                "%s %s got %s; retry %d of %d in %.2f s.",
                request.method,
                request.url.path,
                _errors.describe(outcome),
                attempts.retries_done,
                self.retry_policy.max_retries,
                retry.delay,
            )
        return retry.delay


def _batch_path(batch_id: str, action: str | None = None) -> str:
    return _path("batches", validate_batch_id(batch_id), action)


def _file_path(file_id: str, action: str | None = None) -> str:
    return _path("files", validate_file_id(file_id), action)


def _token_cache(settings: ConnectionSettings) -> _tokens.TokenCache | None:
    """The process's tokens of the connection's workload identity; ``None`` with an API key."""
    identity = settings.workload_identity
    return None if identity is None else _tokens.cache_for(identity)


def _path(collection: str, resource_id: str, action: str | None) -> str:
    path = f"/{collection}/{quote(resource_id, safe='')}"
    return f"{path}/{action}" if action else path


def _sent(client: httpx.Client, request: httpx.Request, *, stream: bool) -> httpx.Response:
    """Send ``request`` and read its response whole within the read timeout; with ``stream``, leave a 2xx body
    (a file's content) to be read as it arrives, each read within the timeout.

    Whole, because httpx's sync transport applies the read timeout to each read from the socket: a server (or a
    proxy) dripping a byte just within it held a request for as long as it dripped. The async path's transport
    bounds the whole response (``_transport``); this bounds it the same way, with a deadline checked as each
    piece of the response arrives. An error's body is read whole too, to be mapped to an exception.
    """
    timeout = request.extensions.get("timeout", {}).get("read")
    deadline = None if timeout is None else time.monotonic() + timeout
    response = client.send(request, stream=True)
    if stream and response.is_success:
        return response
    try:
        raw = []
        for chunk in response.iter_raw():
            _within(deadline, request)
            raw.append(chunk)
        _within(deadline, request)  # the head alone may have taken too long
    finally:
        response.close()
    return in_memory(response, b"".join(raw))


def _within(deadline: float | None, request: httpx.Request) -> None:
    """Raise ``httpx.ReadTimeout`` (retried like any timeout) once ``deadline`` (monotonic) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise httpx.ReadTimeout("Timed out before the whole response arrived.", request=request)


async def _astreamed(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    """Send ``request`` leaving a 2xx body to stream; an error's body (a small JSON document) is read whole, to be
    mapped to an exception, and its connection released."""
    response = await client.send(request, stream=True)
    return response if response.is_success else await read_whole(response)


def _list_params(after: str | None, limit: int) -> dict[str, Any]:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}, got {limit!r}.")
    params: dict[str, Any] = {"limit": limit}
    if after is not None:
        params["after"] = validate_batch_id(after)
    return params


def _cursors(params: dict[str, Any]) -> set[str]:
    """The cursors a listing has sent, starting with its first query's: none may come back as the next page's."""
    return {params["after"]} if "after" in params else set()


def _cutoff(created_after: datetime | float | None) -> float | None:
    return None if created_after is None else unix_time(created_after, "created_after")


def _created_since(page: BatchList, cutoff: float | None) -> tuple[list[Batch], bool]:
    """The page's batches created at or after ``cutoff`` (UNIX seconds), and whether a batch older than
    ``cutoff`` showed that the rest of the list is older too."""
    if cutoff is not None:
        for index, batch in enumerate(page.data):
            if batch.created_at < cutoff:
                return page.data[:index], True
    return page.data, False


def _next_cursor(page: BatchList) -> str | None:
    if not page.has_more or not page.data:
        return None
    return page.last_id or page.data[-1].id
