"""The emulator against the real client: every endpoint it serves, driven by the ``openai`` SDK (sync and async),
and every answer validated strictly with the SDK's own models.

The SDK runs with ``_strict_response_validation``, and an event hook on its HTTP client keeps every raw answer,
which is then checked with ``model_validate(..., strict=True)`` against the SDK model of its route: ``Batch``,
``FileObject``, their cursor pages, ``ErrorObject`` for errors. So a change to the emulator that the real client
would reject (a missing or mistyped field, a status the SDK does not know, a list envelope without ``has_more``)
fails here, and so does a route the scenario forgot to cover.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import openai
import pytest
from openai.pagination import SyncCursorPage
from openai.types import Batch, FileObject
from openai.types.shared import ErrorObject
from pydantic import BaseModel, ConfigDict, ValidationError

from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault

CHAT = "/v1/chat/completions"


class _Envelope(BaseModel):
    """The list envelope as the spec has it (the SDK's page reads only ``data`` and ``has_more``)."""

    model_config = ConfigDict(strict=True)
    object: Literal["list"]
    first_id: str | None
    last_id: str | None
    has_more: bool
    data: list[dict[str, Any]]


class _ErrorEnvelope(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    error: ErrorObject


def _page(model: type[BaseModel]) -> Callable[[Any], object]:
    def validate(body: Any) -> object:
        _Envelope.model_validate(body, strict=True)
        return SyncCursorPage[model].model_validate(body, strict=True)  # type: ignore[valid-type]

    return validate


#: (method, path regex) -> how its 2xx body is validated; None: a file's raw bytes.
ROUTES: dict[tuple[str, str], Callable[[Any], object] | None] = {
    ("POST", r"/v1/files"): lambda body: FileObject.model_validate(body, strict=True),
    ("GET", r"/v1/files"): _page(FileObject),
    ("GET", r"/v1/files/[^/]+"): lambda body: FileObject.model_validate(body, strict=True),
    ("GET", r"/v1/files/[^/]+/content"): None,
    ("POST", r"/v1/batches"): lambda body: Batch.model_validate(body, strict=True),
    ("GET", r"/v1/batches"): _page(Batch),
    ("GET", r"/v1/batches/[^/]+"): lambda body: Batch.model_validate(body, strict=True),
    ("POST", r"/v1/batches/[^/]+/cancel"): lambda body: Batch.model_validate(body, strict=True),
}


@dataclass
class Answer:
    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: bytes


def route_of(answer: Answer) -> tuple[str, str]:
    [route] = [(m, p) for m, p in ROUTES if m == answer.method and re.fullmatch(p, answer.path)]
    return route


def check(answer: Answer) -> None:
    """Validate one raw answer strictly with the SDK's model of its route; raise if it does not fit."""
    assert re.fullmatch(r"req_[0-9a-f]{32}", answer.headers.get("x-request-id", "")), answer
    if answer.status >= 400:
        _ErrorEnvelope.model_validate(json.loads(answer.body), strict=True)
        return
    validate = ROUTES[route_of(answer)]
    if validate is None:
        assert answer.headers["content-type"] == "application/octet-stream"
    else:
        assert answer.headers["content-type"] == "application/json"
        validate(json.loads(answer.body))


@pytest.fixture
def emulator() -> Iterator[BatchAPIEmulator]:
    with BatchAPIEmulator(step_after_polls=1, cancel_after_polls=1) as server:
        yield server


@pytest.fixture
def answers() -> list[Answer]:
    return []


def _keep(answers: list[Answer], response: Any) -> None:
    answers.append(
        Answer(
            response.request.method,
            response.request.url.path,
            response.status_code,
            {name.lower(): value for name, value in response.headers.items()},
            response.content,
        )
    )


def make_client(emulator: BatchAPIEmulator, answers: list[Answer], kind: str, **kwargs: Any) -> Any:
    """The SDK's client of ``kind`` ("sync" or "async"), every raw answer kept in ``answers``."""
    options = {"api_key": emulator.api_key, "base_url": emulator.base_url, "max_retries": 0, **kwargs}
    if kind == "sync":

        def keep(response: Any) -> None:
            response.read()
            _keep(answers, response)

        http = openai.DefaultHttpxClient(event_hooks={"response": [keep]})
        return openai.OpenAI(http_client=http, _strict_response_validation=True, **options)

    async def akeep(response: Any) -> None:
        await response.aread()
        _keep(answers, response)

    ahttp = openai.DefaultAsyncHttpxClient(event_hooks={"response": [akeep]})
    return openai.AsyncOpenAI(http_client=ahttp, _strict_response_validation=True, **options)


async def run(value: Any) -> Any:
    """The result of a client call, whichever client made it."""
    return await value if inspect.isawaitable(value) else value


async def collect(paginator: Any) -> list[Any]:
    """Every item of a list call, through the SDK's auto-pagination."""
    if hasattr(paginator, "__aiter__"):
        return [item async for item in paginator]
    return list(paginator)


def requests_file(*custom_ids: str, url: str = CHAT) -> bytes:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    lines = [{"custom_id": c, "method": "POST", "url": url, "body": body} for c in custom_ids]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


async def scenario(client: Any, emulator: BatchAPIEmulator) -> None:
    """Every endpoint, as a user's code calls it; the answers are checked afterwards."""
    custom_ids = [f"req-{n}" for n in range(6)]
    content = requests_file(*custom_ids)

    # Files: upload, retrieve, content, list with auto-pagination.
    uploaded = await run(client.files.create(file=("requests.jsonl", content), purpose="batch"))
    assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("batch", len(content), "requests.jsonl")
    assert (await run(client.files.retrieve(uploaded.id))).id == uploaded.id
    assert (await run(client.files.content(uploaded.id))).content == content
    others = [
        await run(client.files.create(file=(f"more-{n}.jsonl", requests_file(f"x{n}")), purpose="batch"))
        for n in range(2)
    ]
    listed = await collect(client.files.list(limit=1, purpose="batch"))
    assert [file.id for file in listed] == [others[1].id, others[0].id, uploaded.id]

    # A batch from the upload runs to completed; its output answers every request.
    created = await run(
        client.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h", metadata={"team": "search"}
        )
    )
    assert (created.status, created.request_counts.total) == ("validating", 6)
    statuses = [(await run(client.batches.retrieve(created.id))).status for _ in range(3)]
    assert statuses == ["in_progress", "finalizing", "completed"]
    done = await run(client.batches.retrieve(created.id))
    output = (await run(client.files.content(done.output_file_id))).content
    assert sorted(json.loads(line)["custom_id"] for line in output.splitlines()) == sorted(custom_ids)
    assert (await run(client.files.retrieve(done.output_file_id))).purpose == "batch_output"

    # Cancel another on its way; the list pages through every batch, seeded and created.
    running = await run(
        client.batches.create(input_file_id=others[0].id, endpoint=CHAT, completion_window="24h")
    )
    assert (await run(client.batches.cancel(running.id))).status == "cancelling"
    assert (await run(client.batches.retrieve(running.id))).status == "cancelled"
    seeded = [emulator.add_batch(status=status)["id"] for status in ("in_progress", "failed", "expired")]
    every = await collect(client.batches.list(limit=2))
    assert {batch.id for batch in every} == {created.id, running.id, *seeded}

    # The errors the SDK maps: 404, 409, 400; each carries the answer's request id.
    with pytest.raises(openai.NotFoundError) as not_found:
        await run(client.batches.retrieve("batch_nope"))
    with pytest.raises(openai.NotFoundError):
        await run(client.files.retrieve("file-nope"))
    with pytest.raises(openai.ConflictError) as conflict:
        await run(client.batches.cancel(created.id))
    with pytest.raises(openai.BadRequestError) as bad_line:
        await run(client.files.create(file=("bad.jsonl", content + b"{}\n"), purpose="batch"))
    with pytest.raises(openai.BadRequestError) as no_file:
        await run(client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h"))
    assert "Cannot cancel a batch with status 'completed'" in conflict.value.message
    assert "Line 7 has no 'custom_id'" in bad_line.value.message
    assert no_file.value.param == "input_file_id"  # type: ignore[attr-defined]
    for caught in (not_found, conflict, bad_line, no_file):
        assert caught.value.request_id and caught.value.request_id.startswith("req_")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_every_endpoint_answers_as_the_sdk_expects(
    emulator: BatchAPIEmulator, answers: list[Answer], kind: str
) -> None:
    client = make_client(emulator, answers, kind)

    async def main() -> None:
        try:
            await scenario(client, emulator)
        finally:
            await run(client.close())

    asyncio.run(main())

    for answer in answers:
        check(answer)
    assert {route_of(answer) for answer in answers if answer.status < 400} == set(ROUTES), "every route"
    assert {answer.status for answer in answers} == {200, 400, 404, 409}
    assert [answer.headers["x-request-id"] for answer in answers] == [r.request_id for r in emulator.requests]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_wrong_key_is_the_sdks_authentication_error(
    emulator: BatchAPIEmulator, answers: list[Answer], kind: str
) -> None:
    client = make_client(emulator, answers, kind, api_key="sk-wrong-0123456789abcdef")

    async def main() -> None:
        with pytest.raises(openai.AuthenticationError) as caught:
            await run(client.batches.list())
        assert "Incorrect API key provided: sk-*" in caught.value.message
        assert caught.value.request_id == answers[-1].headers["x-request-id"]
        await run(client.close())

    asyncio.run(main())
    [answer] = answers
    assert answer.status == 401
    check(answer)


def test_the_sdk_rides_out_a_rate_limit(emulator: BatchAPIEmulator, answers: list[Answer]) -> None:
    emulator.add_batch()
    emulator.inject(Fault.rate_limited(retry_after=0.01))
    client = make_client(emulator, answers, "sync", max_retries=1)
    assert len(client.batches.list().data) == 1
    assert [answer.status for answer in answers] == [429, 200]
    for answer in answers:
        check(answer)


@pytest.mark.parametrize(
    ("change", "where", "sdk_refuses"),
    [
        ({"status": "running"}, "status", True),
        ({"request_counts": {"total": 1}}, "request_counts.completed", True),
        ({"object": "batches"}, "object", True),
        ({"created_at": "1711471533"}, "created_at", False),  # the SDK coerces it; a strict check does not
    ],
    ids=["unknown-status", "partial-counts", "object", "string-timestamp"],
)
def test_an_answer_the_sdk_would_refuse_fails_the_check(
    emulator: BatchAPIEmulator, answers: list[Answer], change: dict, where: str, sdk_refuses: bool
) -> None:
    """The check bites: an emulator answer changed as the SDK would refuse it (or only coerce it) fails it."""
    batch = emulator.add_batch()
    body = json.dumps({**batch, **change})
    emulator.inject(Fault("body", status=200, body=body, headers={"x-request-id": "req_" + "0" * 32}))
    client = make_client(emulator, answers, "sync")
    try:
        client.batches.retrieve(batch["id"])
    except openai.APIResponseValidationError:
        assert sdk_refuses
    else:
        assert not sdk_refuses
    with pytest.raises(ValidationError, match=re.escape(where)):
        check(answers[-1])
