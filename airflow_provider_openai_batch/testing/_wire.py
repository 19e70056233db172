"""OpenAI's wire format: authentication, the error envelope, and the Batch object with its lifecycle.

A batch is kept as the exact JSON dict the API returns (all 22 fields, unset ones null), so answering is a
single ``json.dumps`` and tests compare against what a client really receives.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from airflow_provider_openai_batch.models import check_metadata
from airflow_provider_openai_batch.testing._http import Response

FIELDS = (
    "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "usage",
    "metadata",
)  # fmt: skip
#: Per status, the timestamps a batch in it has passed through; the last one is the status's own.
TIMESTAMPS: dict[str, tuple[str, ...]] = {
    "validating": (),
    "in_progress": ("in_progress_at",),
    "finalizing": ("in_progress_at", "finalizing_at"),
    "completed": ("in_progress_at", "finalizing_at", "completed_at"),
    "failed": ("failed_at",),
    "expired": ("in_progress_at", "expired_at"),
    "cancelling": ("in_progress_at", "cancelling_at"),
    "cancelled": ("in_progress_at", "cancelling_at", "cancelled_at"),
}
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
#: The way a created batch runs by itself: each status, then the one it advances to.
NEXT_STEP = {"validating": "in_progress", "in_progress": "finalizing", "finalizing": "completed"}
#: The ``purpose`` values ``POST /v1/files`` accepts (the spec's enum).
UPLOAD_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
_MAX_ID = 256  # the longest id the API hands out, and the provider accepts
_NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer "
    "auth (i.e. Authorization: Bearer YOUR_KEY). You can obtain an API key from "
    "https://platform.openai.com/account/api-keys."
)


class Reply(Exception):
    """Raised inside a route to answer at once with ``response`` (an error, usually)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def page_limit(query: Mapping[str, str], *, default: int, maximum: int) -> int:
    """A list route's ``limit`` parameter; a :class:`Reply` with the API's 400 if it is not 1 to ``maximum``."""
    raw_limit = query.get("limit", str(default))
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= maximum:
        message = f"Invalid 'limit': expected an integer between 1 and {maximum}, but got '{raw_limit}'."
        raise Reply(error(400, message, param="limit"))
    return limit


def json_response(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, json.dumps(payload).encode(), headers=headers or {})


def error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    kind: str = "invalid_request_error",
    headers: Mapping[str, str] | None = None,
) -> Response:
    """OpenAI's error envelope, which clients parse to build their exception messages."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json_response(status, body, headers)


def invalid_url(method: str, path: str) -> Response:
    return error(404, f"Invalid URL ({method} {path})")


def _mask(key: str) -> str:
    """Mask a rejected key the way OpenAI does, so even a wrong key never travels back whole."""
    return "***" if len(key) < 12 else f"{key[:3]}{'*' * (len(key) - 7)}{key[-4:]}"


def authenticate(api_key: str, headers: dict[str, str]) -> Response | None:
    """Accept ``Authorization: Bearer <key>`` or Azure's ``api-key: <key>``; otherwise OpenAI's 401."""
    authorization = headers.get("authorization", "").strip()
    scheme, _, token = authorization.partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else authorization
    azure = headers.get("api-key")
    if api_key in (bearer, azure):
        return None
    offered = azure or bearer
    if not offered:
        return error(401, _NO_KEY_MESSAGE)
    message = (
        f"Incorrect API key provided: {_mask(offered)}. "
        "You can find your API key at https://platform.openai.com/account/api-keys."
    )
    return error(401, message, code="invalid_api_key")


#: The ``endpoint`` values ``POST /v1/batches`` accepts (the spec's enum).
ENDPOINTS = frozenset(
    {"/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/moderations",
     "/v1/images/generations", "/v1/images/edits", "/v1/videos"}
)  # fmt: skip


def create_request(body: bytes) -> dict[str, Any]:
    """The batch a ``POST /v1/batches`` body asks for, as :meth:`BatchAPIEmulator.add_batch` arguments; or
    :class:`Reply` with the 400 the API answers a request it refuses."""
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise Reply(error(400, "We could not parse the JSON body of your request: expected a JSON object."))
    for name in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(payload.get(name), str) or not payload[name]:
            message = f"Missing required parameter: '{name}'."
            raise Reply(error(400, message, param=name, code="missing_required_parameter"))
    if payload["endpoint"] not in ENDPOINTS:
        supported = ", ".join(f"'{endpoint}'" for endpoint in sorted(ENDPOINTS))
        message = f"Invalid value: '{payload['endpoint']}'. Supported values are: {supported}."
        raise Reply(error(400, message, param="endpoint", code="invalid_value"))
    if payload["completion_window"] != "24h":
        message = f"Invalid value: '{payload['completion_window']}'. Supported values are: '24h'."
        raise Reply(error(400, message, param="completion_window", code="invalid_value"))
    metadata = payload.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        message = f"Invalid type for 'metadata': expected an object, but got {type(metadata).__name__}."
        raise Reply(error(400, message, param="metadata", code="invalid_type"))
    try:
        check_metadata(metadata or {})
    except ValueError as problem:
        raise Reply(error(400, f"Invalid 'metadata': {problem}", param="metadata")) from None
    return {"input_file_id": payload["input_file_id"], "endpoint": payload["endpoint"], "metadata": metadata}


def upload_request(content_type: str, body: bytes) -> tuple[str, str, bytes]:
    """The ``(filename, purpose, content)`` of a ``POST /v1/files`` multipart body; or :class:`Reply` with the
    400 the API answers an upload it refuses."""
    if not content_type.startswith("multipart/form-data"):
        message = f"Invalid Content-Type header ({content_type or 'none'}), expected multipart/form-data."
        raise Reply(error(400, message))
    head = b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n"
    form = BytesParser(policy=HTTP).parsebytes(head + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    if form.is_multipart():
        for part in form.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                fields[name] = (part.get_filename(), payload)
    for name in ("purpose", "file"):
        if name not in fields:
            message = f"Missing required parameter: '{name}'."
            raise Reply(error(400, message, param=name, code="missing_required_parameter"))
    filename, content = fields["file"]
    purpose = fields["purpose"][1].decode("utf-8", "replace")
    if purpose not in UPLOAD_PURPOSES:
        supported = ", ".join(f"'{value}'" for value in sorted(UPLOAD_PURPOSES))
        message = f"Invalid value: '{purpose}'. Supported values are: {supported}."
        raise Reply(error(400, message, param="purpose", code="invalid_value"))
    if purpose == "batch" and not (filename or "").endswith(".jsonl"):
        message = f"Invalid file format for Batch API. Must be .jsonl, got '{filename}'."
        raise Reply(error(400, message, param="file", code="invalid_file_format"))
    return filename or "upload", purpose, content


def result_file_id(kind: str, batch_id: str) -> str:
    """The id of a batch's output (``kind`` "out") or error ("err") file: ``file-out-<batch id less its
    ``batch_`` prefix>``, or a digest of the batch id when that would be longer than an id may be."""
    file_id = f"file-{kind}-{batch_id.removeprefix('batch_')}"
    if len(file_id) <= _MAX_ID:
        return file_id
    return f"file-{kind}-{hashlib.sha256(batch_id.encode()).hexdigest()[:32]}"


def new_batch(
    batch_id: str, seq: int, *, created_at: int, endpoint: str, metadata: dict[str, str] | None, total: int
) -> dict[str, Any]:
    """A fresh batch dict; ``seq`` numbers its input file. Its status is set by :meth:`Entry.move_to`."""
    batch: dict[str, Any] = dict.fromkeys(FIELDS)
    batch.update(
        id=batch_id, object="batch", endpoint=endpoint, model="gpt-4o-mini", input_file_id=f"file-in-{seq}",
        completion_window="24h", created_at=created_at, expires_at=created_at + 86400, metadata=metadata,
        request_counts={"total": total, "completed": 0, "failed": 0},
    )  # fmt: skip
    return batch


def _settle(batch: dict[str, Any], status: str, results: tuple[int, int] | None) -> None:
    """Fill in what a batch reaching ``status`` carries: final counts and result files, or errors.

    ``results`` are the (completed, failed) counts it ends with; by default 95 % and 5 % when it completes, and
    about a third and one failure when it is cancelled or expires. A result file exists only if it has lines.
    """
    counts = batch["request_counts"]
    total = counts["total"]
    if status in ("completed", "cancelled", "expired"):
        if results is None:
            done = status == "completed"
            results = (total - total // 20, total // 20) if done else (total // 3, min(total, 1))
        completed, failed = results
        counts.update(completed=completed, failed=failed)
        batch["output_file_id"] = result_file_id("out", batch["id"]) if completed else None
        batch["error_file_id"] = result_file_id("err", batch["id"]) if failed else None
    elif status == "failed":
        error = {"code": "emulated_failure", "message": "The batch failed.", "param": None, "line": None}
        batch["errors"] = {"object": "list", "data": [error]}


@dataclass(slots=True)
class Entry:
    """A stored batch plus the bookkeeping its progress needs. Callers hold the emulator's lock."""

    batch: dict[str, Any]
    seq: int  #: insertion order, which breaks ``created_at`` ties in lists
    cancel_after_polls: int
    cancel_after_seconds: float | None
    finish_as: str
    #: (completed, failed) requests when it ends with results; None for the defaults of :func:`_settle`.
    results: tuple[int, int] | None = None
    #: Approximate size of each line of its generated input file; None for short lines.
    request_bytes: int | None = None
    #: (polls, seconds) after which it takes each step of :data:`NEXT_STEP` by itself (a created batch's run);
    #: None holds it where it is (a seeded batch).
    step_after: tuple[int, float | None] | None = None
    polls: int = 0  #: looks at this batch, ever: GETs of it and list pages showing it
    polls_at_move: int = 0  #: ``polls`` when its status last changed
    moved_at: float = 0.0  #: ``time.monotonic()`` when its status last changed, finer than the timestamps

    def __post_init__(self) -> None:
        if self.finish_as not in TERMINAL:
            raise ValueError(f"finish_as must be one of {sorted(TERMINAL)}, not {self.finish_as!r}.")

    def move_to(self, status: str, at: int) -> None:
        """Set ``status``, its own timestamp, any missing earlier ones, and what the status carries."""
        if status not in TIMESTAMPS:
            raise ValueError(f"Unknown batch status {status!r}; expected one of {sorted(TIMESTAMPS)}.")
        stamps = TIMESTAMPS[status]
        for name in stamps[:-1]:
            if self.batch[name] is None:
                self.batch[name] = at
        if stamps:
            self.batch[stamps[-1]] = at
        self.batch["status"] = status
        self.polls_at_move, self.moved_at = self.polls, time.monotonic()
        _settle(self.batch, status, self.results)

    def poll(self) -> None:
        """Count a look (a GET, or a list page showing it); a cancelling batch turns final on the Nth look since
        the cancel, or after the delay, and a running one with ``step_after`` takes its next step likewise. One
        change per look at most."""
        self.polls += 1
        status = self.batch["status"]
        if status == "cancelling" and self._due(self.cancel_after_polls, self.cancel_after_seconds):
            self.move_to(self.finish_as, int(time.time()))
        elif status in NEXT_STEP and self.step_after is not None and self._due(*self.step_after):
            if NEXT_STEP[status] == "completed" and self.results is None:
                self.results = (self.batch["request_counts"]["total"], 0)  # a run that ends answers all
            self.move_to(NEXT_STEP[status], int(time.time()))

    def _due(self, polls: int, seconds: float | None) -> bool:
        """Whether ``polls`` looks were taken, or ``seconds`` passed, since the status last changed."""
        timed_out = seconds is not None and time.monotonic() - self.moved_at >= seconds
        return timed_out or self.polls - self.polls_at_move >= polls
