"""A local HTTP emulator of the OpenAI Batch API (create, list, retrieve and cancel batches; upload, list,
retrieve and download files), built on the standard library.

It speaks real HTTP/1.1 with keep-alive over loopback, so the provider's actual HTTP clients, retry logic and
timeouts are exercised exactly as against api.openai.com, in-process (unit tests) or out of process (Airflow
workers, triggerers, benchmarks). Tests steer it through Python methods or, from another process, through the
unauthenticated ``/_emulator`` control endpoints (see :class:`EmulatorControl`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.client import responses
from typing import Any, Literal, Self
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import httpx

from airflow_provider_openai_batch.testing._files import (
    INPUT_PURPOSE,
    OUTPUT_PURPOSE,
    StoredFile,
    batch_requests,
    custom_ids,
    input_content,
    result_contents,
    stored_file,
)
from airflow_provider_openai_batch.testing._http import THREAD_NAME, Response, Server
from airflow_provider_openai_batch.testing._token_exchange import PATHS, TOKEN_PATH, TokenExchange
from airflow_provider_openai_batch.testing._wire import (
    TERMINAL,
    Entry,
    Reply,
    authenticate,
    create_request,
    error,
    invalid_url,
    json_response,
    new_batch,
    page_limit,
    upload_request,
)

DEFAULT_API_KEY = "sk-emulator-key"

_SECRET_HEADERS = frozenset({"authorization", "api-key"})


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator received it, so tests can assert on what a client really sent."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  #: names lower-cased; values as received (the API key included)
    body: bytes
    status: int  #: the status the emulator answered with; 0 when it dropped the connection
    at: float  #: ``time.monotonic()`` at arrival
    #: The ``status`` of the batch in a 200 answer to a GET or cancel of one batch; None for other answers.
    #: Recorded because a GET can change a batch (see :class:`BatchAPIEmulator`), so its state afterwards does
    #: not tell what a client was told.
    batch_status: str | None = None
    #: The ``x-request-id`` the answer carried (what OpenAI support asks for); None for a proxy's (``body``
    #: fault) or a dropped connection.
    request_id: str | None = None


@dataclass
class Fault:
    """A misbehaviour to inject: the next ``times`` requests matching ``method`` and ``path`` suffer it.

    ``status`` answers ``status`` with ``body`` (default: OpenAI's error envelope); ``body`` answers
    ``status`` with the raw ``body`` (broken JSON, a proxy's HTML page...); ``delay`` waits ``delay`` seconds,
    then answers normally; ``drop`` sends headers announcing more body than it sends, then closes the
    connection (a download, ``GET /files/{id}/content``, is cut halfway through the file's real content).
    ``headers`` are added to the answer, e.g. ``{"Retry-After": "1"}``. A ``str`` body is sent UTF-8 encoded.
    """

    kind: Literal["status", "delay", "drop", "body"]
    times: int = 1
    method: str | None = None
    path: str | None = None  #: a regex searched in the request path, e.g. ``r"/cancel$"``
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | str | None = None
    content_type: str = "application/json"
    delay: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("status", "delay", "drop", "body"):
            raise ValueError(f"Unknown fault kind {self.kind!r}.")
        if self.times < 1:
            raise ValueError("A fault must affect at least one request (times >= 1).")

    @classmethod
    def rate_limited(
        cls,
        times: int = 1,
        *,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        **match: Any,
    ) -> Fault:
        """A 429 like OpenAI's, with a ``Retry-After`` header (seconds) when ``retry_after`` is given."""
        hint = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
        return cls("status", times=times, status=429, headers={**hint, **(headers or {})}, **match)

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault applies to a request, by method and by regex search in the path."""
        return (self.method is None or self.method.upper() == method) and (
            self.path is None or re.search(self.path, path) is not None
        )


@dataclass
class _RateWindow:
    """A fixed-window request limit, and the OpenAI headers that describe it."""

    limit: int
    per: float
    started: float = float("-inf")
    used: int = 0

    def admit(self, now: float) -> tuple[bool, dict[str, str]]:
        """Whether a request arriving ``now`` is refused, and the rate headers of its answer."""
        if now - self.started >= self.per:
            self.started, self.used = now, 0
        refused = self.used >= self.limit
        self.used += 0 if refused else 1
        reset_ms = max(1, math.ceil((self.started + self.per - now) * 1000))
        headers = {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.limit - self.used),
            "x-ratelimit-reset-requests": f"{reset_ms}ms",
        }
        return refused, {**headers, "retry-after-ms": str(reset_ms)} if refused else headers


_REQUEST_ID = "x-request-id"


def _stamped(response: Response) -> Response:
    """``response`` with an ``x-request-id`` like OpenAI's, unless it has one (a fault's ``headers`` may set it)."""
    if _REQUEST_ID in {name.lower() for name in response.headers}:
        return response
    return response._replace(headers={**response.headers, _REQUEST_ID: f"req_{secrets.token_hex(16)}"})


def _fault_response(fault: Fault) -> Response:
    if fault.kind == "status" and fault.body is None:
        if fault.status == 429:
            message, kind, code = "Rate limit reached for requests.", "requests", "rate_limit_exceeded"
        else:
            kind = "server_error" if fault.status >= 500 else "invalid_request_error"
            message, code = f"Emulated {fault.status} {responses.get(fault.status, 'error')}.", None
        return error(fault.status, message, code=code, kind=kind, headers=fault.headers)
    body = fault.body.encode() if isinstance(fault.body, str) else fault.body or b""
    return Response(fault.status, body, fault.content_type, fault.headers)


class BatchAPIEmulator:
    """An OpenAI Batch API server on loopback; use it as a context manager or with :meth:`start`/:meth:`stop`.

    A batch moves on when it is *looked at*: a GET of it, or a list page that shows it, which is how a client
    learns its status (the real API moves it with time; ``*_after_seconds`` emulate that too). Below, "look"
    means either.

    Cancellation: ``POST .../cancel`` makes a batch ``cancelling``; it becomes its ``finish_as`` status
    (normally ``cancelled``) at the first look at that batch where either ``cancel_after_polls`` looks have been
    taken since the cancel (so 0 and 1 both mean the first look, 2 the second), or ``cancel_after_seconds`` (if
    not None) have passed since it. Pass ``cancel_after_polls=10**9`` to hold a batch in ``cancelling``, or to
    make it purely time-based.

    Finishing without a cancel: a batch seeded with ``finish_after_polls=K`` becomes its ``finish_as`` status
    (then ``completed`` by default) on its K-th look since seeding (so 1 means the first look), with the
    timestamps and results :meth:`set_status` gives that status. A cancellation ends it too, as the same
    ``finish_as``, if it takes effect first. Only the K-th look counts: a batch already final by then stays as
    it is, and so does one that :meth:`set_status` puts back to running later.

    Running: a batch created with ``POST /v1/batches`` runs by itself, from ``validating`` to ``in_progress``,
    ``finalizing`` and ``completed``, one step at the first look at that batch where either ``step_after_polls``
    looks have been taken since the previous step, or ``step_after_seconds`` (if not None) have passed since it.
    Pass ``step_after_polls=10**9`` to hold created batches in ``validating``. Completed, its output file holds
    an answer for each request line of its input file, with the same ``custom_id``; cancelled on the way, its
    output and error files hold the requests that ran, and the others are in neither. Seeded batches
    (:meth:`add_batch`) stay where they are put.

    Files: ``POST /v1/files`` uploads one (multipart, as the SDKs send it). A ``purpose=batch`` file is checked
    as the API checks it: a ``.jsonl`` file whose every line is a request with a unique ``custom_id``, ``method``
    ``POST``, a batch endpoint as ``url`` (the same on every line) and a ``body``; a bad line gets a 400 naming it.
    ``POST /v1/batches`` refuses an ``input_file_id`` that does not exist or is not such a file, or whose ``url``
    is not the ``endpoint`` asked for, and takes ``request_counts.total`` from it. ``GET /v1/files`` lists the
    uploaded and seeded files and the batches' own, newest first, with ``purpose``, ``limit``, ``order`` and
    ``after`` as the API has them.

    Request ids: every answer of the API, errors and injected ``status`` faults included, carries an
    ``x-request-id`` header (recorded as :attr:`RecordedRequest.request_id`); a ``body`` fault, which stands for
    a proxy's page, carries only the headers it is given.

    Files: every batch has an input file (``input_file_id``) with ``request_counts.total`` request lines, and a
    batch that ends with results has an output file of ``completed`` lines and an error file of ``failed`` ones
    (an id is null when its file would be empty), made when first asked for (see ``_files``). ``GET
    /v1/files/{id}`` and ``GET /v1/files/{id}/content`` serve them, faults included. :meth:`add_file` seeds a
    file of your own, also under the id of a batch's file to replace it; :meth:`remove_file` makes one a 404.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str = DEFAULT_API_KEY,
        cancel_after_polls: int = 2,
        cancel_after_seconds: float | None = None,
        step_after_polls: int = 1,
        step_after_seconds: float | None = None,
    ) -> None:
        self.api_key = api_key
        self._address = (host, port)
        self._cancel_after = (cancel_after_polls, cancel_after_seconds)
        self._step_after = (step_after_polls, step_after_seconds)
        self._lock = threading.Lock()  # guards every attribute below it
        self._entries: dict[str, Entry] = {}
        self._order: list[str] | None = None  # list order, rebuilt lazily after batches change
        self._positions: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._faults: list[Fault] = []
        self._requests: list[RecordedRequest] = []
        self._cancels: dict[str, int] = {}
        self._finish_on_poll: dict[
            str, int
        ] = {}  # batch id -> the look that ends it (``finish_after_polls``)
        self._rate_limit: _RateWindow | None = None
        self._files: dict[str, StoredFile] = {}  # seeded with add_file; they win over a batch's own
        self._removed_files: set[str] = set()
        self._made_files: dict[str, tuple[Any, StoredFile]] = {}  # file id -> (what it was made from, file)
        self._stopping = threading.Event()  # cuts "delay" faults short when the server stops
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        #: Workload identity's token exchange, served at :attr:`token_exchange_url` (``_token_exchange``).
        self.token_exchange = TokenExchange()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Self:
        """Bind the port and serve in a daemon thread; returns ``self``."""
        if self._server is not None:
            raise RuntimeError("The emulator is already running.")
        self._stopping.clear()
        self._server = Server(self._address, self._respond)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=THREAD_NAME, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close every connection (idle keep-alive ones too) and join every thread."""
        if self._server is None or self._thread is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.close_connections(timeout=2.0)
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("The emulator is not running: call start() first.")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._address[0]}:{self.port}/v1"

    @property
    def token_exchange_url(self) -> str:
        return f"http://{self._address[0]}:{self.port}{TOKEN_PATH}"

    def add_batch(
        self,
        batch_id: str | None = None,
        *,
        status: str = "in_progress",
        created_at: int | None = None,
        metadata: dict[str, str] | None = None,
        endpoint: str = "/v1/chat/completions",
        cancel_after_polls: int | None = None,
        cancel_after_seconds: float | None = None,
        finish_after_polls: int | None = None,
        finish_as: str | None = None,
        total_requests: int = 100,
        completed_requests: int | None = None,
        failed_requests: int | None = None,
        request_bytes: int | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Seed a batch, its timestamps consistent with ``status``; ``fields`` then override any field.

        ``created_at`` defaults to now; ``cancel_after_*`` default to the emulator's. ``finish_after_polls``
        (at least 1) makes a running batch final by itself on its ``finish_after_polls``-th look (GET or list).
        ``finish_as`` is the final status it ends in, by a cancellation or by ``finish_after_polls``: by
        default ``cancelled`` without ``finish_after_polls``, ``completed`` with it;
        ``completed``/``failed``/``expired`` after a cancel emulate a batch that finished before the cancel
        took effect.

        ``completed_requests`` and ``failed_requests`` (both or neither) are the request counts, hence the result
        files' line counts, it ends with when it completes, is cancelled or expires (defaults: 95 % and 5 % when
        it completes, a third and one failure otherwise). ``request_bytes`` pads each line of its input file to
        about that many bytes (``total_requests`` of 50,000 and 4,000 make a 200 MB input file).
        """
        results = _results(total_requests, completed_requests, failed_requests)
        if finish_after_polls is not None:
            if finish_after_polls < 1:
                raise ValueError(
                    f"finish_after_polls must be at least 1 (1: the first look), not {finish_after_polls!r}."
                )
            if status in TERMINAL:
                raise ValueError(f"finish_after_polls needs a running batch, but status {status!r} is final.")
        if finish_as is None:
            finish_as = "cancelled" if finish_after_polls is None else "completed"
        created = int(time.time()) if created_at is None else created_at
        default_polls, default_seconds = self._cancel_after
        with self._lock:
            seq = next(self._seq)
            batch_id = batch_id or f"batch_{secrets.token_hex(12)}"
            if batch_id in self._entries:
                raise ValueError(f"A batch with id {batch_id!r} already exists.")
            batch = new_batch(
                batch_id, seq, created_at=created, endpoint=endpoint, metadata=metadata, total=total_requests
            )
            entry = Entry(
                batch,
                seq,
                default_polls if cancel_after_polls is None else cancel_after_polls,
                default_seconds if cancel_after_seconds is None else cancel_after_seconds,
                finish_as,
                results,
                request_bytes,
            )
            entry.move_to(status, created)
            batch.update(fields)
            self._entries[batch_id] = entry
            if finish_after_polls is not None:
                self._finish_on_poll[batch_id] = finish_after_polls
            self._order = None
            return copy.deepcopy(batch)

    def add_batches(self, count: int, **kwargs: Any) -> list[dict[str, Any]]:
        """Seed ``count`` batches with random ids, all with the same :meth:`add_batch` arguments."""
        return [self.add_batch(**kwargs) for _ in range(count)]

    def batch(self, batch_id: str) -> dict[str, Any]:
        """A copy of the batch's current state (``KeyError`` if unknown). Not a poll: it advances nothing."""
        with self._lock:
            return copy.deepcopy(self._entries[batch_id].batch)

    def set_status(self, batch_id: str, status: str, **fields: Any) -> dict[str, Any]:
        """Force ``status`` now, with its timestamp and outcome as the API shows them, then ``fields``."""
        with self._lock:
            entry = self._entries[batch_id]
            entry.move_to(status, int(time.time()))
            entry.batch.update(fields)
            self._order = None
            return copy.deepcopy(entry.batch)

    def add_file(
        self,
        content: bytes | str,
        file_id: str | None = None,
        *,
        filename: str = "input.jsonl",
        purpose: str = INPUT_PURPOSE,
        **fields: Any,
    ) -> dict[str, Any]:
        """Seed a file (a ``str`` is UTF-8 encoded) and return its ``File`` object; ``fields`` override it.

        Under the id of a batch's input, output or error file it replaces that file, and a batch whose input is
        replaced draws its results from the seeded requests. ``bytes=...`` makes the announced size lie.
        """
        data = content.encode() if isinstance(content, str) else bytes(content)
        with self._lock:
            file_id = file_id or f"file-{secrets.token_hex(12)}"
            stored = stored_file(
                file_id, data, filename=filename, purpose=purpose, created_at=int(time.time()), **fields
            )
            self._files[file_id] = stored
            self._removed_files.discard(file_id)
            return copy.deepcopy(stored.object)

    def remove_file(self, file_id: str) -> None:
        """Make a file (seeded, or a batch's) a 404, as if it had been deleted or had expired."""
        with self._lock:
            self._files.pop(file_id, None)
            self._removed_files.add(file_id)

    def file(self, file_id: str) -> dict[str, Any]:
        """A copy of a file's ``File`` object (``KeyError`` if there is none)."""
        with self._lock:
            return copy.deepcopy(self._stored_file_or_raise(file_id).object)

    def file_content(self, file_id: str) -> bytes:
        """A file's content, as a download would get it (``KeyError`` if there is none)."""
        with self._lock:
            return self._stored_file_or_raise(file_id).content

    def inject(self, fault: Fault) -> None:
        """Queue a copy of ``fault``; each request gets the first queued fault that matches it, if any."""
        with self._lock:
            self._faults.append(dataclasses.replace(fault))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def limit_rate(self, requests: int | None, per: float = 1.0) -> None:
        """Serve at most ``requests`` API requests every ``per`` seconds, like an organisation's rate limit.

        Beyond it, requests get OpenAI's 429 ("Rate limit reached for requests") with ``retry-after-ms`` set to
        the end of the window. Every answer carries OpenAI's ``x-ratelimit-limit-requests``,
        ``x-ratelimit-remaining-requests`` and ``x-ratelimit-reset-requests`` headers. ``None`` lifts the limit.
        The window is fixed: it starts at the first request after the previous one ended.
        """
        with self._lock:
            self._rate_limit = None if requests is None else _RateWindow(requests, per)

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, control endpoints excluded; recorded before its answer is sent."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def cancel_count(self, batch_id: str) -> int:
        """``POST .../cancel`` requests received for ``batch_id``, even those answered by a fault or a 401."""
        with self._lock:
            return self._cancels.get(batch_id, 0)

    def look_count(self, batch_id: str) -> int:
        """Looks at ``batch_id`` so far: GETs of it and list pages showing it (0 for an unknown batch)."""
        with self._lock:
            entry = self._entries.get(batch_id)
            return entry.polls if entry else 0

    def _respond(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Response | None:
        """Answer one HTTP request, on its connection's thread; None drops the connection."""
        url = urlsplit(target)
        segments = [unquote(part) for part in url.path.split("/")[1:]]
        if url.path in PATHS:
            return self.token_exchange.respond(method, url.path, body)
        if segments[:1] == ["_emulator"]:
            return self._control(method, segments[1:], body)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        request = RecordedRequest(method, url.path, query, headers, body, 0, time.monotonic())
        response, batch_status = self._answer(request, segments)
        status = response.status if response and response.drop_after is None else 0
        request_id = response.headers.get(_REQUEST_ID) if response else None
        recorded = dataclasses.replace(
            request, status=status, batch_status=batch_status, request_id=request_id
        )
        with self._lock:
            self._requests.append(recorded)
        return response

    def _answer(self, request: RecordedRequest, segments: list[str]) -> tuple[Response | None, str | None]:
        """The response (None drops the connection) and the status of the batch it carries, if one."""
        with self._lock:
            window = self._rate_limit
            refused, limit_headers = window.admit(request.at) if window else (False, {})
        if refused:
            return _stamped(_fault_response(Fault.rate_limited(headers=limit_headers))), None
        response, batch_status = self._faulted_or_served(request, segments)
        if response is not None and limit_headers:
            response = response._replace(headers={**response.headers, **limit_headers})
        return response, batch_status

    def _faulted_or_served(
        self, request: RecordedRequest, segments: list[str]
    ) -> tuple[Response | None, str | None]:
        """The answer, stamped with a request id unless it stands for a proxy's (a ``body`` fault)."""
        fault = self._admit(request.method, request.path, segments)
        if fault is None:
            response, batch_status = self._api(request, segments)
            return _stamped(response), batch_status
        if fault.kind == "drop" and segments[-1:] == ["content"]:
            response, _ = self._api(request, segments)
            return _stamped(response._replace(drop_after=len(response.body) // 2)), None
        if fault.kind == "drop" or (fault.kind == "delay" and self._stopping.wait(fault.delay)):
            return None, None
        if fault.kind == "delay":
            response, batch_status = self._api(request, segments)
            return _stamped(response._replace(headers={**response.headers, **fault.headers})), batch_status
        if fault.kind == "body":
            return _fault_response(fault), None
        return _stamped(_fault_response(fault)), None

    def _admit(self, method: str, path: str, segments: list[str]) -> Fault | None:
        """Count a cancel request and take the fault it triggers, if any, spending one of its ``times``."""
        with self._lock:
            match (method, segments):
                case ("POST", ["v1", "batches", batch_id, "cancel"]):
                    self._cancels[batch_id] = self._cancels.get(batch_id, 0) + 1
            for index, fault in enumerate(self._faults):
                if fault.matches(method, path):
                    fault.times -= 1
                    if fault.times == 0:
                        del self._faults[index]
                    return fault
        return None

    def _api(self, request: RecordedRequest, segments: list[str]) -> tuple[Response, str | None]:
        """Authenticate and route a request that no fault intercepted; see :meth:`_answer`."""
        if segments[:1] != ["v1"]:
            return invalid_url(request.method, request.path), None
        denied = authenticate(self.api_key, request.headers)
        if denied is not None:
            denied = self.token_exchange.authenticate(request.headers, denied)
        if denied is not None:
            return denied, None
        try:
            match (request.method, segments[1:]):
                case ("GET", ["batches"]):
                    return self._list(request.query), None
                case ("POST", ["batches"]):
                    return self._create(request.body)
                case ("POST", ["files"]):
                    return self._upload(request.headers.get("content-type", ""), request.body), None
                case ("GET", ["files"]):
                    return self._list_files(request.query), None
                case ("GET", ["batches", batch_id]) if batch_id:
                    return self._retrieve(batch_id)
                case ("POST", ["batches", batch_id, "cancel"]) if batch_id:
                    return self._cancel(batch_id)
                case ("GET", ["files", file_id]) if file_id:
                    return json_response(200, self._file_or_404(file_id).object), None
                case ("GET", ["files", file_id, "content"]) if file_id:
                    content = self._file_or_404(file_id).content
                    return Response(200, content, "application/octet-stream"), None
        except Reply as reply:
            return reply.response, None
        return invalid_url(request.method, request.path), None

    def _list(self, query: dict[str, str]) -> Response:
        limit = page_limit(query, default=20, maximum=100)
        after = query.get("after")
        with self._lock:
            order = self._sorted_ids()
            start = self._positions.get(after, len(order)) + 1 if after else 0  # unknown cursor: empty page
            page = order[start : start + limit]
            for batch_id in page:
                self._look_at(batch_id, self._entries[batch_id])
            body = {
                "object": "list",
                "data": [self._entries[batch_id].batch for batch_id in page],
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
                "has_more": start + limit < len(order),
            }
            return json_response(200, body)

    def _create(self, body: bytes) -> tuple[Response, str]:
        """Answer ``POST /v1/batches`` as the API does: refuse a bad request, or add a validating batch that
        runs by itself (see the class doc), with as many requests as its input file holds."""
        request = create_request(body)
        file_id, endpoint = request["input_file_id"], request["endpoint"]
        requests = self._input_requests(file_id)
        if requests[0][1] != endpoint:
            message = (
                f"Line 1 of input file '{file_id}' has 'url' '{requests[0][1]}', but the batch's endpoint is "
                f"'{endpoint}': every request's url must be the endpoint."
            )
            raise Reply(error(400, message, param="endpoint", code="invalid_value"))
        batch = self.add_batch(status="validating", total_requests=len(requests), **request)
        with self._lock:
            self._entries[batch["id"]].step_after = self._step_after
        return json_response(200, batch), batch["status"]

    def _input_requests(self, file_id: str) -> list[tuple[str, str]]:
        """The requests of the batch input file ``file_id``, or :class:`Reply` with the 400 the API answers."""
        try:
            with self._lock:
                stored = self._stored_file_or_raise(file_id)
        except KeyError:
            message = f"Invalid 'input_file_id': no file with id '{file_id}'."
            raise Reply(error(400, message, param="input_file_id", code="invalid_value")) from None
        if stored.object["purpose"] != INPUT_PURPOSE:
            message = (
                f"Invalid 'input_file_id': file '{file_id}' has purpose '{stored.object['purpose']}', "
                f"not '{INPUT_PURPOSE}'."
            )
            raise Reply(error(400, message, param="input_file_id", code="invalid_value"))
        try:
            return batch_requests(stored.content)
        except ValueError as problem:
            message = f"Invalid batch input file '{file_id}': {problem}"
            raise Reply(error(400, message, param="input_file_id", code="invalid_file_format")) from None

    def _upload(self, content_type: str, body: bytes) -> Response:
        """Answer ``POST /v1/files``: store the file, a batch input file only if every line is a request."""
        filename, purpose, content = upload_request(content_type, body)
        if purpose == INPUT_PURPOSE:
            try:
                batch_requests(content)
            except ValueError as problem:
                message = f"Invalid batch input file '{filename}': {problem}"
                raise Reply(error(400, message, param="file", code="invalid_file_format")) from None
        return json_response(200, self.add_file(content, filename=filename, purpose=purpose))

    def _list_files(self, query: dict[str, str]) -> Response:
        """Answer ``GET /v1/files``: every file, newest first (``order=asc``: oldest first), ``after`` a cursor."""
        limit, order = page_limit(query, default=10_000, maximum=10_000), query.get("order", "desc")
        if order not in ("asc", "desc"):
            message = f"Invalid value: '{order}'. Supported values are: 'asc' and 'desc'."
            return error(400, message, param="order", code="invalid_value")
        with self._lock:
            files = [
                stored.object
                for stored in map(self._stored_file_or_none, self._file_ids())
                if stored is not None
                and query.get("purpose", stored.object["purpose"]) == stored.object["purpose"]
            ]
            files.sort(key=lambda file: file["created_at"])  # stable: ties in the order the files came
            if order == "desc":
                files.reverse()  # the exact reverse: the last of equal timestamps first, as batch lists do
            ids = [file["id"] for file in files]
            after = query.get("after")
            start = ids.index(after) + 1 if after in ids else (len(ids) if after else 0)
            page = files[start : start + limit]
            body = {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": start + limit < len(files),
            }
            return json_response(200, body)

    def _file_ids(self) -> list[str]:
        """Every file id there is or was: seeded and uploaded ones, in order, then each batch's; callers hold
        the lock."""
        ids = dict.fromkeys(self._files)
        for entry in self._entries.values():
            batch = entry.batch
            ids.update(
                dict.fromkeys(
                    i for i in (batch["input_file_id"], batch["output_file_id"], batch["error_file_id"]) if i
                )
            )
        return list(ids)

    def _stored_file_or_none(self, file_id: str) -> StoredFile | None:
        try:
            return self._stored_file_or_raise(file_id)
        except KeyError:
            return None

    def _sorted_ids(self) -> list[str]:
        """Ids newest first (then last inserted first), cached because thousands of pollers may list."""
        if self._order is None:
            entries = self._entries
            self._order = sorted(entries, key=lambda i: (entries[i].batch["created_at"], entries[i].seq))
            self._order.reverse()
            self._positions = {batch_id: index for index, batch_id in enumerate(self._order)}
        return self._order

    def _entry_or_404(self, batch_id: str) -> Entry:
        entry = self._entries.get(batch_id)
        if entry is None:
            raise Reply(error(404, f"No batch found with id '{batch_id}'."))
        return entry

    def _retrieve(self, batch_id: str) -> tuple[Response, str]:
        """Answer a GET, which first advances the batch: a cancel or ``finish_after_polls`` may end it."""
        with self._lock:
            entry = self._entry_or_404(batch_id)
            self._look_at(batch_id, entry)
            return json_response(200, entry.batch), entry.batch["status"]

    def _look_at(self, batch_id: str, entry: Entry) -> None:
        """Count a look at the batch (a GET, or a list page showing it), which may move it on. Holds the lock."""
        entry.poll()
        if self._finish_on_poll.get(batch_id) == entry.polls:
            del self._finish_on_poll[batch_id]
            if entry.batch["status"] not in TERMINAL:
                entry.move_to(entry.finish_as, int(time.time()))

    def _cancel(self, batch_id: str) -> tuple[Response, str]:
        with self._lock:
            entry = self._entry_or_404(batch_id)
            status = entry.batch["status"]
            if status in TERMINAL:
                raise Reply(error(409, f"Cannot cancel a batch with status '{status}'."))
            if status != "cancelling":
                entry.move_to("cancelling", int(time.time()))
            return json_response(200, entry.batch), entry.batch["status"]

    def _file_or_404(self, file_id: str) -> StoredFile:
        with self._lock:
            try:
                return self._stored_file_or_raise(file_id)
            except KeyError:
                raise Reply(error(404, f"No such File object: {file_id}", param="id")) from None

    def _stored_file_or_raise(self, file_id: str) -> StoredFile:
        """The file with that id, made from its batch if it is one's; callers hold the lock."""
        if file_id in self._removed_files:
            raise KeyError(file_id)
        if (seeded := self._files.get(file_id)) is not None:
            return seeded
        for entry in self._entries.values():
            batch = entry.batch
            if file_id == batch["input_file_id"]:
                return self._made(file_id, (batch["request_counts"]["total"], entry.request_bytes), entry)
            if file_id in (batch["output_file_id"], batch["error_file_id"]):
                return self._made(file_id, (batch["status"], dict(batch["request_counts"])), entry)
        raise KeyError(file_id)

    def _made(self, file_id: str, recipe: Any, entry: Entry) -> StoredFile:
        """A batch's own file, made again only when what it is made from (``recipe``) has changed."""
        made = self._made_files.get(file_id)
        if made is not None and made[0] == recipe:
            return made[1]
        batch = entry.batch
        if file_id == batch["input_file_id"]:
            content = input_content(batch, entry.request_bytes)
            stored = stored_file(
                file_id,
                content,
                filename="batch_input.jsonl",
                purpose=INPUT_PURPOSE,
                created_at=batch["created_at"],
            )
        else:
            requests = custom_ids(self._stored_file_or_raise(batch["input_file_id"]).content)
            output, errors = result_contents(batch, requests)
            kind, content = ("output", output) if file_id == batch["output_file_id"] else ("error", errors)
            ended = batch[f"{batch['status']}_at"] or batch["created_at"]
            stored = stored_file(
                file_id,
                content,
                filename=f"{batch['id']}_{kind}.jsonl",
                purpose=OUTPUT_PURPOSE,
                created_at=ended,
            )
        self._made_files[file_id] = (recipe, stored)
        return stored

    def _control(self, method: str, segments: list[str], body: bytes) -> Response:
        """Serve ``/_emulator/...``: the Python API for tests whose client runs in another process."""
        try:
            match (method, segments):
                case ("POST", ["batches"]):
                    return json_response(200, self.add_batch(**_json_object(body)))
                case ("GET", ["batches", batch_id]):
                    return json_response(200, self._inspect(batch_id))
                case ("POST", ["faults"]):
                    self.inject(Fault(**_json_object(body)))
                    return Response(204, b"")
                case ("GET", ["requests"]):
                    return json_response(200, [_describe(request) for request in self.requests])
                case ("POST", ["files"]):
                    return json_response(200, self.add_file(**_json_object(body)))
                case ("DELETE", ["files", file_id]):
                    self.remove_file(file_id)
                    return Response(204, b"")
        except Reply as reply:
            return reply.response
        except (TypeError, ValueError) as exc:
            return error(400, str(exc))
        return invalid_url(method, "/_emulator/" + "/".join(segments))

    def _inspect(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            entry = self._entry_or_404(batch_id)
            counters = {"cancel_requests": self._cancels.get(batch_id, 0), "polls": entry.polls}
            return copy.deepcopy(entry.batch) | counters


def _results(total: int, completed: int | None, failed: int | None) -> tuple[int, int] | None:
    """Validated (completed, failed) end counts, or None for the defaults."""
    if completed is None and failed is None:
        return None
    if completed is None or failed is None or min(completed, failed) < 0 or completed + failed > total:
        raise ValueError(
            f"completed_requests and failed_requests must be given together, non-negative and at most "
            f"total_requests ({total}) in all, not {completed!r} and {failed!r}."
        )
    return completed, failed


def _json_object(body: bytes) -> dict[str, Any]:
    payload = json.loads(body or b"{}")
    if not isinstance(payload, dict):
        raise TypeError("The request body must be a JSON object.")
    return payload


def _describe(request: RecordedRequest) -> dict[str, Any]:
    """A recorded request as JSON for the control endpoint, with credentials masked."""
    headers = {name: "***" if name in _SECRET_HEADERS else value for name, value in request.headers.items()}
    return dataclasses.asdict(request) | {"headers": headers, "body": request.body.decode("latin-1")}


class EmulatorControl:
    """Drive an emulator running in another process through its ``/_emulator`` endpoints.

    ``base_url`` may be the emulator's API URL (``.../v1``) or its root.
    """

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.root = base_url.rstrip("/").removesuffix("/v1") + "/_emulator"
        self.timeout = timeout

    def add_batch(self, **kwargs: Any) -> dict[str, Any]:
        """Same arguments as :meth:`BatchAPIEmulator.add_batch` (JSON-serialisable values only)."""
        return self._call("POST", "/batches", kwargs)

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The batch's state plus ``cancel_requests`` and ``polls`` counters."""
        return self._call("GET", f"/batches/{quote(batch_id, safe='')}")

    def inject(self, fault: Fault) -> None:
        """Queue ``fault`` in the emulator; a bytes body must be UTF-8 to travel as JSON."""
        payload = dataclasses.asdict(fault)
        if isinstance(fault.body, bytes):
            payload["body"] = fault.body.decode()
        self._call("POST", "/faults", payload)

    def requests(self) -> list[dict[str, Any]]:
        """Recorded requests as JSON: body as latin-1 text, credential headers masked as ``***``."""
        return self._call("GET", "/requests")

    def add_file(self, content: str, file_id: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Same arguments as :meth:`BatchAPIEmulator.add_file`, with text content."""
        return self._call("POST", "/files", {"content": content, "file_id": file_id, **kwargs})

    def remove_file(self, file_id: str) -> None:
        self._call("DELETE", f"/files/{quote(file_id, safe='')}")

    def token_exchanges(self) -> list[dict[str, Any]]:
        """Recorded token exchanges as JSON, without their subject tokens."""
        return self._call("GET", "/token_exchanges")

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        # Plain http on loopback: verify=False spares loading the CA bundle on every call.
        response = httpx.request(method, self.root + path, json=payload, timeout=self.timeout, verify=False)
        response.raise_for_status()
        return response.json() if response.content else None


def seed_demo(emulator: BatchAPIEmulator) -> list[dict[str, Any]]:
    """Seed the demo set: fresh and stale ``search`` batches, a finished one, and another team's."""
    day, now = 86400, int(time.time())
    search = {"team": "search"}
    return [
        *(emulator.add_batch(f"batch_demo_search_{n}", metadata=dict(search)) for n in (1, 2, 3)),
        emulator.add_batch("batch_demo_completed", status="completed", metadata=dict(search)),
        emulator.add_batch(
            "batch_demo_stale", created_at=now - 3 * day, metadata={**search, "purpose": "nightly-eval"}
        ),
        emulator.add_batch("batch_demo_other_team", created_at=now - 2 * day, metadata={"team": "ads"}),
    ]
