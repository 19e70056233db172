"""OpenAIBatchHook over real HTTP against the emulator, plus a few mocked-transport cases (respx)."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import respx

from airflow_provider_openai_batch.exceptions import (
    BatchNotCancellableError,
    BatchNotFoundError,
    OpenAIBatchAPIError,
    OpenAIBatchAuthenticationError,
    OpenAIBatchConnectionError,
    OpenAIBatchGatewayError,
    OpenAIBatchRateLimitError,
    OpenAIBatchResponseError,
)
from airflow_provider_openai_batch.hooks import _async_clients
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.models import BatchStatus
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from tests.conftest import FAKE_API_KEY, FAST_RETRIES

CONNECTIONS_DOC = Path(__file__).parents[1] / "docs" / "connections.md"


def hook(conn_id: str = "openai_default") -> OpenAIBatchHook:
    return OpenAIBatchHook(conn_id, retry_policy=FAST_RETRIES)


def batch_json(batch_id: str = "batch_abc123", status: str = "in_progress", **fields: object) -> dict:
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "completion_window": "24h",
        "status": status,
        "created_at": 1711471533,
        **fields,
    }


# -- the happy paths, over real HTTP ---------------------------------------------------------------------------


def test_get_batch(emulator_connection: BatchAPIEmulator) -> None:
    seeded = emulator_connection.add_batch(metadata={"team": "search"})
    batch = hook().get_batch(seeded["id"])
    assert batch.id == seeded["id"]
    assert batch.status is BatchStatus.IN_PROGRESS
    assert batch.metadata == {"team": "search"}
    [request] = emulator_connection.requests
    assert (request.method, request.path) == ("GET", f"/v1/batches/{seeded['id']}")
    assert request.headers["authorization"] == f"Bearer {FAKE_API_KEY}"


def test_cancel_batch_moves_it_to_cancelling(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    batch = hook().cancel_batch(batch_id)
    assert batch.status is BatchStatus.CANCELLING
    assert batch.cancelling_at is not None
    assert emulator_connection.batch(batch_id)["status"] == "cancelling"
    assert emulator_connection.cancel_count(batch_id) == 1


def test_cancel_is_idempotent(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    assert hook().cancel_batch(batch_id).status is BatchStatus.CANCELLING
    assert hook().cancel_batch(batch_id).status is BatchStatus.CANCELLING
    emulator_connection.set_status(batch_id, "cancelled")
    again = hook().cancel_batch(
        batch_id
    )  # the API answers 409 for a cancelled batch: the hook fetches it instead
    assert again.status is BatchStatus.CANCELLED
    assert again.output_file_id is not None


@pytest.mark.parametrize("status", ["completed", "failed", "expired"])
def test_cancel_of_a_finished_batch_raises_with_its_status(
    emulator_connection: BatchAPIEmulator, status: str
) -> None:
    batch_id = emulator_connection.add_batch(status=status)["id"]
    with pytest.raises(BatchNotCancellableError) as caught:
        hook().cancel_batch(batch_id)
    error = caught.value
    assert error.batch_status == status
    assert error.status_code == 409
    assert error.batch_id == batch_id
    assert batch_id in str(error) and "409" in str(error)
    assert error.api_message == f"Cannot cancel a batch with status '{status}'."
    assert emulator_connection.cancel_count(batch_id) == 1, "a 409 is never retried"


def test_unknown_batch_is_not_found(emulator_connection: BatchAPIEmulator) -> None:
    with pytest.raises(BatchNotFoundError, match=r"batch 'batch_nope'.*HTTP 404.*No batch found"):
        hook().get_batch("batch_nope")
    assert len(emulator_connection.requests) == 1, "a 404 is never retried"


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize(
    ("call", "error_class"),
    [
        ("get_batch('batch_nope')", BatchNotFoundError),
        ("cancel_batch(done)", BatchNotCancellableError),
        ("get_batch(running)", OpenAIBatchAPIError),  # a 500 after every retry
    ],
    ids=["404", "409", "500"],
)
def test_an_error_quotes_the_request_id_of_the_failed_response(
    emulator_connection: BatchAPIEmulator, path: str, call: str, error_class: type[Exception]
) -> None:
    """OpenAI support asks for the request id: the message carries the one of the answer that decided."""
    done = emulator_connection.add_batch(status="completed")["id"]
    running = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault("status", status=500, times=10, path=f"{running}$"))
    method, argument = call.removesuffix(")").split("(")
    target = {"done": done, "running": running}.get(argument, argument.strip("'"))

    async def on_the_async_path() -> object:
        async with hook() as async_hook:
            return await getattr(async_hook, f"a{method}")(target)

    with pytest.raises(error_class) as caught:
        if path == "sync":
            getattr(hook(), method)(target)
        else:
            asyncio.run(on_the_async_path())

    last = emulator_connection.requests[-1]
    assert last.request_id and last.request_id.startswith("req_")
    assert caught.value.request_id == last.request_id  # type: ignore[attr-defined]
    assert str(caught.value).endswith(f" (request id {last.request_id})")


def test_a_conflict_decided_on_the_batch_quotes_the_conflicts_request_id(
    emulator_connection: BatchAPIEmulator,
) -> None:
    """A 409 worded as a gateway words it is decided by a GET of the batch; the request id quoted is the 409's."""
    batch_id = emulator_connection.add_batch(status="completed")["id"]
    conflict = (
        '{"error": {"message": "Conflict.", "type": "invalid_request_error", "param": null, "code": null}}'
    )
    emulator_connection.inject(Fault("status", status=409, body=conflict, path="/cancel$"))
    with pytest.raises(BatchNotCancellableError) as caught:
        hook().cancel_batch(batch_id)
    refused, looked_up = emulator_connection.requests
    assert (refused.status, looked_up.method) == (409, "GET")
    assert caught.value.request_id == refused.request_id
    assert str(caught.value).endswith(f"it is completed (HTTP 409). (request id {refused.request_id})")


@pytest.mark.parametrize("request_id", [FAKE_API_KEY, "req_1 <script>", "x" * 200])
def test_a_request_id_unfit_to_quote_is_left_out(
    emulator_connection: BatchAPIEmulator, request_id: str
) -> None:
    emulator_connection.inject(Fault("status", status=404, headers={"x-request-id": request_id}))
    with pytest.raises(BatchNotFoundError) as caught:
        hook().get_batch("batch_nope")
    assert caught.value.request_id is None
    assert "request id" not in str(caught.value) and FAKE_API_KEY not in str(caught.value)


def test_wrong_key_is_an_authentication_error(emulator: BatchAPIEmulator, set_connection: Callable) -> None:
    set_connection(password="sk-wrong-key-0000000000", host=emulator.base_url)
    batch_id = emulator.add_batch()["id"]
    with pytest.raises(OpenAIBatchAuthenticationError, match="HTTP 401") as caught:
        hook().cancel_batch(batch_id)
    assert caught.value.status_code == 401
    assert emulator.batch(batch_id)["status"] == "in_progress"
    assert len(emulator.requests) == 1


def test_list_batches_pages_lazily(emulator_connection: BatchAPIEmulator) -> None:
    seeded = [emulator_connection.add_batch(created_at=1_700_000_000 + i)["id"] for i in range(7)]
    batches = hook().list_batches(limit=3)
    first = next(batches)
    assert first.id == seeded[-1], "newest first"
    assert len(emulator_connection.requests) == 1, "the next page is fetched only when needed"
    rest = [batch.id for batch in batches]
    assert [first.id, *rest] == seeded[::-1]
    pages = [request.query for request in emulator_connection.requests]
    assert pages == [{"limit": "3"}, {"limit": "3", "after": seeded[4]}, {"limit": "3", "after": seeded[1]}]


def test_list_batches_starts_after_a_cursor(emulator_connection: BatchAPIEmulator) -> None:
    seeded = [emulator_connection.add_batch(created_at=1_700_000_000 + i)["id"] for i in range(3)]
    assert [b.id for b in hook().list_batches(after=seeded[2])] == [seeded[1], seeded[0]]


T0 = 1_700_000_000


def seed_ages(emulator: BatchAPIEmulator, newer: int, older: int) -> list[str]:
    """``newer`` batches created at or after ``T0`` (one second apart), then ``older`` ones before it; return
    the newer ids, newest first (the list's order)."""
    for i in range(older):
        emulator.add_batch(created_at=T0 - 1 - i)
    return [emulator.add_batch(created_at=T0 + i)["id"] for i in range(newer)][::-1]


def list_pages(emulator: BatchAPIEmulator) -> int:
    return sum(1 for r in emulator.requests if r.path == "/v1/batches")


@pytest.mark.parametrize(
    ("newer", "older", "pages"),
    [(3, 250, 1), (100, 250, 2), (150, 250, 2), (0, 5, 1)],
    ids=["within-the-first-page", "exactly-one-page", "two-pages", "nothing-newer"],
)
def test_created_after_stops_at_the_first_older_batch(
    emulator_connection: BatchAPIEmulator, newer: int, older: int, pages: int
) -> None:
    expected = seed_ages(emulator_connection, newer, older)
    assert [b.id for b in hook().list_batches(created_after=T0)] == expected
    assert list_pages(emulator_connection) == pages, "pages past the first older batch are never requested"


@pytest.mark.parametrize(
    "created_after",
    [T0, float(T0), str(T0), datetime.fromtimestamp(T0, UTC), "2023-11-14T22:13:20+00:00",
     "2023-11-14 23:13:20+01:00", "2023-11-14T22:13:20Z"],
)  # fmt: skip
def test_created_after_takes_datetimes_iso_strings_and_unix_seconds(
    emulator_connection: BatchAPIEmulator, created_after: object
) -> None:
    expected = seed_ages(emulator_connection, 2, 2)
    listed = hook().list_batches(created_after=created_after)  # type: ignore[arg-type]
    assert [b.id for b in listed] == expected


@pytest.mark.parametrize(
    ("created_after", "message"),
    [
        ("2023-11-14T22:13:20", "created_after has no time zone"),
        (datetime(2023, 11, 14), "created_after has no time zone"),
        ("None", "created_after must be a date with a time zone or UNIX seconds; got 'None'"),
        ("", "created_after must be a date with a time zone or UNIX seconds; got ''"),
        (-1, "created_after must be non-negative, finite UNIX seconds"),
        ("nan", "created_after must be non-negative, finite UNIX seconds"),
        (True, "created_after must be a date with a time zone or UNIX seconds, got bool"),
        ([T0], "created_after must be a date with a time zone or UNIX seconds, got list"),
    ],
)
def test_bad_created_after_is_rejected_before_any_request(
    emulator_connection: BatchAPIEmulator, created_after: object, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        next(hook().list_batches(created_after=created_after))  # type: ignore[arg-type]
    assert emulator_connection.requests == []


@pytest.mark.parametrize("limit", [0, 101, -1, "10", True, 2.5])
def test_list_rejects_bad_limits_before_any_request(
    emulator_connection: BatchAPIEmulator, limit: object
) -> None:
    with pytest.raises(ValueError, match="limit must be an integer from 1 to 100"):
        next(hook().list_batches(limit=limit))  # type: ignore[arg-type]
    assert emulator_connection.requests == []


def test_test_connection(emulator_connection: BatchAPIEmulator, set_connection: Callable) -> None:
    emulator_connection.add_batch()
    assert hook().test_connection() == (True, "Connection successfully tested: the Batch API listed batches.")
    assert emulator_connection.requests[-1].query == {"limit": "1"}
    set_connection(password="sk-wrong-key-0000000000", host=emulator_connection.base_url)
    ok, message = hook().test_connection()
    assert not ok and "HTTP 401" in message


# -- retries ----------------------------------------------------------------------------------------------------


def test_rate_limit_with_retry_after_is_retried(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault(kind="status", status=429, times=2, headers={"Retry-After": "0"}))
    assert hook().cancel_batch(batch_id).status is BatchStatus.CANCELLING
    assert [r.status for r in emulator_connection.requests] == [429, 429, 200]


def test_retry_after_ms_sets_the_wait(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault(kind="status", status=429, times=1, headers={"retry-after-ms": "300"}))
    hook().get_batch(batch_id)
    first, second = emulator_connection.requests
    assert second.at - first.at >= 0.29


def test_rate_limit_that_outlasts_the_retries(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault(kind="status", status=429, times=10, headers={"Retry-After": "0"}))
    with pytest.raises(OpenAIBatchRateLimitError, match=rf"batch '{batch_id}'.*HTTP 429") as caught:
        hook().get_batch(batch_id)
    assert caught.value.transient
    assert len(emulator_connection.requests) == FAST_RETRIES.max_retries + 1


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors_shorter_than_the_budget_are_absorbed(
    emulator_connection: BatchAPIEmulator, status: int
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault(kind="status", status=status, times=FAST_RETRIES.max_retries))
    assert hook().get_batch(batch_id).id == batch_id


def test_server_errors_longer_than_the_budget_raise(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault(kind="status", status=503, times=10))
    with pytest.raises(OpenAIBatchAPIError, match="HTTP 503") as caught:
        hook().get_batch(batch_id)
    assert caught.value.status_code == 503 and caught.value.transient


def test_max_retries_comes_from_the_connection(emulator: BatchAPIEmulator, set_connection: Callable) -> None:
    set_connection(password=FAKE_API_KEY, host=emulator.base_url, extra={"max_retries": "1"})
    batch_id = emulator.add_batch()["id"]
    emulator.inject(Fault(kind="status", status=503, times=10, headers={"Retry-After": "0"}))
    with pytest.raises(OpenAIBatchAPIError):
        OpenAIBatchHook().get_batch(batch_id)
    assert len(emulator.requests) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_client_errors_are_not_retried(emulator_connection: BatchAPIEmulator, status: int) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault(kind="status", status=status, times=5))
    with pytest.raises(OpenAIBatchAPIError) as caught:
        hook().get_batch(batch_id)
    assert caught.value.status_code == status
    assert len(emulator_connection.requests) == 1


def test_dropped_connection_is_retried(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault(kind="drop", times=1))
    assert hook().get_batch(batch_id).id == batch_id
    assert [r.status for r in emulator_connection.requests] == [0, 200]


def test_connection_refused_after_retries(set_connection: Callable) -> None:
    with BatchAPIEmulator(api_key=FAKE_API_KEY) as server:
        url = server.base_url  # a loopback port that is closed once the emulator stops
    set_connection(password=FAKE_API_KEY, host=url)
    with pytest.raises(
        OpenAIBatchConnectionError, match=r"No response .* batch 'batch_x': ConnectError"
    ) as caught:
        hook().get_batch("batch_x")
    assert caught.value.transient


def test_read_timeout(emulator: BatchAPIEmulator, set_connection: Callable) -> None:
    set_connection(password=FAKE_API_KEY, host=emulator.base_url, extra={"timeout": 0.2})
    batch_id = emulator.add_batch()["id"]
    emulator.inject(Fault(kind="delay", delay=1.0, times=10))
    with pytest.raises(OpenAIBatchConnectionError, match="ReadTimeout"):
        OpenAIBatchHook(retry_policy=FAST_RETRIES).get_batch(batch_id)


def test_retries_are_logged_without_the_key(
    emulator_connection: BatchAPIEmulator, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault(kind="status", status=502, times=1))
    with caplog.at_level(logging.DEBUG):
        hook().get_batch(batch_id)
    logged = caplog.text + capsys.readouterr().out  # the hook's own logger is Airflow's structlog, on stdout
    assert f"GET /v1/batches/{batch_id} got HTTP 502; retry 1 of 3" in logged
    assert FAKE_API_KEY not in logged


# -- malformed responses ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (b"not json at all", "application/json", "Invalid JSON"),
        (b"<html><body>502 Bad Gateway</body></html>", "text/html", "Invalid JSON"),
        (b'{"id": "batch_x", "object": "batch"}', "application/json", "Field required"),
    ],
)
def test_malformed_bodies(
    emulator_connection: BatchAPIEmulator, body: bytes, content_type: str, expected: str
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault(kind="body", status=200, body=body, content_type=content_type))
    with pytest.raises(OpenAIBatchResponseError, match=expected) as caught:
        hook().get_batch(batch_id)
    assert caught.value.transient
    assert batch_id in str(caught.value) and "HTTP 200" in str(caught.value)


def test_html_error_page_from_a_proxy_is_a_server_error(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    html = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
    emulator_connection.inject(Fault(kind="body", status=502, body=html, content_type="text/html", times=10))
    with pytest.raises(OpenAIBatchAPIError, match=r"HTTP 502\.$") as caught:
        hook().get_batch(batch_id)
    assert caught.value.api_message is None


# -- bad input --------------------------------------------------------------------------------------------------

BAD_IDS = [
    None,
    "",
    " ",
    "batch 1",
    42,
    ["batch_1"],
    "../files",
    "batch_1/cancel",
    "batch?x=1",
    "b" * 300,
    "batch_é",
    "batch_1\n",
]


@pytest.mark.parametrize("batch_id", BAD_IDS)
def test_bad_batch_ids_are_rejected_before_any_request(
    emulator_connection: BatchAPIEmulator, batch_id: object
) -> None:
    for call in (hook().get_batch, hook().cancel_batch):
        with pytest.raises(ValueError, match="batch id"):
            call(batch_id)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch id"):
        asyncio.run(hook().acancel_batch(batch_id))  # type: ignore[arg-type]
    assert emulator_connection.requests == []


# -- connections ------------------------------------------------------------------------------------------------


def test_official_provider_connection_style(emulator: BatchAPIEmulator, set_connection: Callable) -> None:
    set_connection(
        "openai_official",
        extra={
            "openai_client_kwargs": {
                "api_key": FAKE_API_KEY,
                "base_url": emulator.base_url,
                "organization": "org-1",
            }
        },
    )
    batch_id = emulator.add_batch()["id"]
    assert hook("openai_official").get_batch(batch_id).id == batch_id
    headers = emulator.requests[0].headers
    assert headers["authorization"] == f"Bearer {FAKE_API_KEY}"
    assert headers["openai-organization"] == "org-1"


def test_organization_and_project_headers(emulator: BatchAPIEmulator, set_connection: Callable) -> None:
    set_connection(
        password=FAKE_API_KEY, host=emulator.base_url, extra={"organization": "org-9", "project": "proj-3"}
    )
    hook().get_batch(emulator.add_batch()["id"])
    headers = emulator.requests[0].headers
    assert (headers["openai-organization"], headers["openai-project"]) == ("org-9", "proj-3")


def test_azure_sends_an_api_key_header_and_api_version(
    emulator: BatchAPIEmulator, set_connection: Callable
) -> None:
    set_connection(
        password=FAKE_API_KEY,
        host=emulator.base_url,
        extra={"api_type": "azure", "api_version": "2024-10-21"},
    )
    batch_id = emulator.add_batch()["id"]
    assert hook().cancel_batch(batch_id).status is BatchStatus.CANCELLING
    [request] = emulator.requests
    assert request.headers["api-key"] == FAKE_API_KEY
    assert "authorization" not in request.headers
    assert request.query == {"api-version": "2024-10-21"}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"host": "http://127.0.0.1:1/v1"}, "has no API key"),
        ({"password": "k" * 20, "host": "api.openai.com/v1"}, "must be an absolute http"),
        ({"password": "k" * 20, "host": "ftp://example.com"}, "must be an absolute http"),
        (
            {"password": "k" * 20, "extra": {"timeout": "soon"}},
            "extra 'timeout' must be a number, got 'soon'",
        ),
        ({"password": "k" * 20, "extra": {"timeout": 0}}, "extra 'timeout' must be greater than 0"),
        ({"password": "k" * 20, "extra": {"max_retries": -1}}, "extra 'max_retries' must be at least 0"),
        (
            {"password": "k" * 20, "extra": {"api_type": "bedrock"}},
            "extra 'api_type' must be 'openai' or 'azure'",
        ),
        ({"password": "k" * 20, "extra": {"openai_client_kwargs": "x"}}, "must be a JSON object"),
    ],
)
def test_bad_connections_fail_before_any_request(
    set_connection: Callable, fields: dict, message: str
) -> None:
    set_connection(**fields)
    with pytest.raises(ValueError, match=message) as caught:
        hook().get_batch("batch_abc")
    assert "openai_default" in str(caught.value)


def test_clear_text_http_to_a_remote_host_warns(
    set_connection: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    set_connection(password=FAKE_API_KEY, host="http://batch-proxy.internal/v1")
    with caplog.at_level(logging.WARNING):
        settings = hook().settings
    assert settings.base_url == "http://batch-proxy.internal/v1"
    assert "clear text over http:// to batch-proxy.internal" in caplog.text
    assert FAKE_API_KEY not in caplog.text


def test_loopback_http_does_not_warn(
    emulator_connection: BatchAPIEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        settings = hook().settings
    assert settings.base_url == emulator_connection.base_url
    assert "clear text" not in caplog.text


def documented_defaults() -> dict[str, str]:
    """The "Default" column of docs/connections.md's field and extra tables, by field name, backticks off."""
    rows = (
        line.split("|")[1:-1] for line in CONNECTIONS_DOC.read_text().splitlines() if line.startswith("| ")
    )
    return {cells[0].strip().strip("`"): cells[-1].strip().strip("`") for cells in rows}


def test_a_connection_with_only_a_key_has_the_documented_defaults(set_connection: Callable) -> None:
    set_connection(password=FAKE_API_KEY)
    settings = OpenAIBatchHook().settings
    documented = documented_defaults()
    assert settings.base_url == documented["host"]
    assert settings.api_type == documented["api_type"]
    assert settings.timeout == float(documented["timeout"])
    assert settings.max_retries == int(documented["max_retries"])
    assert (settings.organization, settings.project, settings.api_version) == (None, None, None)
    assert FAKE_API_KEY not in repr(settings)


# -- async twins ------------------------------------------------------------------------------------------------


async def test_async_cancel_get_and_list(emulator_connection: BatchAPIEmulator) -> None:
    ids = [emulator_connection.add_batch(created_at=1_700_000_000 + i)["id"] for i in range(5)]
    async with hook() as async_hook:
        cancelled = await async_hook.acancel_batch(ids[0])
        assert cancelled.status is BatchStatus.CANCELLING
        assert (await async_hook.aget_batch(ids[0])).status is BatchStatus.CANCELLING
        listed = [batch.id async for batch in async_hook.alist_batches(limit=2)]
    assert listed == ids[::-1]
    assert sum(1 for r in emulator_connection.requests if r.path == "/v1/batches") == 3


async def test_async_list_stops_at_created_after_too(emulator_connection: BatchAPIEmulator) -> None:
    expected = seed_ages(emulator_connection, 150, 250)
    async with hook() as async_hook:
        listed = [batch.id async for batch in async_hook.alist_batches(created_after=T0)]
    assert listed == expected
    assert list_pages(emulator_connection) == 2


async def test_async_idempotent_cancel_and_409(emulator_connection: BatchAPIEmulator) -> None:
    done = emulator_connection.add_batch(status="completed")["id"]
    cancelled = emulator_connection.add_batch(status="cancelled")["id"]
    async with hook() as async_hook:
        assert (await async_hook.acancel_batch(cancelled)).status is BatchStatus.CANCELLED
        with pytest.raises(BatchNotCancellableError) as caught:
            await async_hook.acancel_batch(done)
    assert caught.value.batch_status == "completed"


async def test_async_retries(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault(kind="status", status=429, times=2, headers={"retry-after-ms": "10"}))
    emulator_connection.inject(Fault(kind="drop", times=1))
    async with hook() as async_hook:
        assert (await async_hook.aget_batch(batch_id)).id == batch_id
    assert [r.status for r in emulator_connection.requests] == [429, 429, 0, 200]


async def test_hooks_on_one_loop_share_one_client_and_close_it(emulator_connection: BatchAPIEmulator) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    first, second = hook(), hook()
    await first.aget_batch(batch_id)
    await second.aget_batch(batch_id)
    shared = first._shared_async_client
    assert shared is not None and shared is second._shared_async_client
    assert shared.users == 2
    await first.aclose()
    assert not shared.client.is_closed
    await second.aclose()
    assert shared.client.is_closed
    assert _async_clients._clients.get(asyncio.get_running_loop(), {}) == {}


async def test_async_connection_lookup_happens_once_off_the_loop(
    emulator_connection: BatchAPIEmulator, connection_lookups: list[str]
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    async with hook() as async_hook:
        for _ in range(3):
            await async_hook.aget_batch(batch_id)
    assert connection_lookups == ["openai_default"]


async def test_hooks_starting_together_share_one_lookup_and_a_later_hook_looks_again(
    emulator_connection: BatchAPIEmulator,
    connection_lookups: list[str],
    set_connection: Callable[..., None],
) -> None:
    """A triggerer starting many waits looks their connection up once; nothing is kept after it, so a hook
    that starts after the connection changed sees the change."""
    together = await asyncio.gather(*(hook().asettings() for _ in range(50)))
    assert connection_lookups == ["openai_default"]
    assert {settings.api_key for settings in together} == {FAKE_API_KEY}

    set_connection(password="sk-rotated-key-0123456789", host=emulator_connection.base_url)
    later = await hook().asettings()
    assert connection_lookups == ["openai_default", "openai_default"]
    assert later.api_key == "sk-rotated-key-0123456789"


async def test_different_connections_are_looked_up_apart(
    emulator_connection: BatchAPIEmulator,
    connection_lookups: list[str],
    set_connection: Callable[..., None],
) -> None:
    set_connection("other", password="sk-other-key-0123456789", host=emulator_connection.base_url)
    default, other = await asyncio.gather(hook().asettings(), hook("other").asettings())
    assert sorted(connection_lookups) == ["openai_default", "other"]
    assert (default.api_key, other.api_key) == (FAKE_API_KEY, "sk-other-key-0123456789")


@pytest.fixture
def held_lookups(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Connection lookups wait for the returned event before they start."""
    from airflow_provider_openai_batch.hooks import openai_batch as hook_module

    release = asyncio.Event()
    lookup = hook_module.get_async_connection

    async def held(conn_id: str, **kwargs: object) -> object:
        await release.wait()
        return await lookup(conn_id, **kwargs)

    monkeypatch.setattr(hook_module, "get_async_connection", held)
    return release


async def test_a_hook_cancelled_during_a_shared_lookup_leaves_it_to_the_others(
    emulator_connection: BatchAPIEmulator, held_lookups: asyncio.Event
) -> None:
    leaving = asyncio.create_task(hook().asettings())
    staying = asyncio.create_task(hook().asettings())
    await asyncio.sleep(0)
    leaving.cancel()
    held_lookups.set()
    assert (await staying).api_key == FAKE_API_KEY
    assert leaving.cancelled()


async def test_a_failed_lookup_fails_every_hook_that_shared_it_and_is_not_kept(
    emulator_connection: BatchAPIEmulator,
    connection_lookups: list[str],
    set_connection: Callable[..., None],
) -> None:
    outcomes = await asyncio.gather(*(hook("late").asettings() for _ in range(3)), return_exceptions=True)
    assert connection_lookups == ["late"]
    assert [type(outcome).__name__ for outcome in outcomes] == ["AirflowNotFoundException"] * 3

    set_connection("late", password="sk-late-key-0123456789", host=emulator_connection.base_url)
    assert (await hook("late").asettings()).api_key == "sk-late-key-0123456789"


async def test_a_lookup_failing_after_its_every_hook_left_is_not_reported_as_unretrieved(
    held_lookups: asyncio.Event,
) -> None:
    """asyncio reports a task's exception that nobody retrieved; a lookup whose triggers were all cleared
    meanwhile has nobody left to retrieve it, and its failure is no error of the triggerer's."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        leaving = asyncio.create_task(hook("missing").asettings())
        await asyncio.sleep(0)
        leaving.cancel()
        held_lookups.set()
        for _ in range(5):
            await asyncio.sleep(0.01)
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert leaving.cancelled()
    assert reported == []


# -- mocked transport (respx) -----------------------------------------------------------------------------------

BASE = "https://api.openai.test/v1"


@pytest.fixture
def mocked_api(set_connection: Callable) -> respx.MockRouter:
    set_connection(password=FAKE_API_KEY, host=BASE)
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


def test_400_cannot_cancel_is_not_cancellable(mocked_api: respx.MockRouter) -> None:
    envelope = {
        "error": {"message": "Cannot cancel a batch with status 'expired'.", "type": "invalid_request_error"}
    }
    mocked_api.post("/batches/batch_1/cancel").respond(400, json=envelope)
    with pytest.raises(BatchNotCancellableError) as caught:
        hook().cancel_batch("batch_1")
    assert caught.value.batch_status == "expired" and caught.value.status_code == 400


def test_other_400_is_a_plain_api_error(mocked_api: respx.MockRouter) -> None:
    mocked_api.get("/batches/batch_1").respond(400, json={"error": {"message": "Bad things."}})
    with pytest.raises(OpenAIBatchAPIError, match="failed with HTTP 400: Bad things.") as caught:
        hook().get_batch("batch_1")
    assert type(caught.value) is OpenAIBatchAPIError and not caught.value.transient


def test_403_is_an_authentication_error(mocked_api: respx.MockRouter) -> None:
    mocked_api.get("/batches/batch_1").respond(
        403, json={"error": {"message": "Project does not have access."}}
    )
    with pytest.raises(OpenAIBatchAuthenticationError, match="HTTP 403"):
        hook().get_batch("batch_1")


def test_pagination_over_three_mocked_pages(mocked_api: respx.MockRouter) -> None:
    def page(ids: list[str], has_more: bool) -> httpx.Response:
        data = [batch_json(i) for i in ids]
        return httpx.Response(
            200,
            json={
                "object": "list",
                "data": data,
                "first_id": ids[0],
                "last_id": ids[-1],
                "has_more": has_more,
            },
        )

    route = mocked_api.get("/batches")
    route.side_effect = [page(["b_5", "b_4"], True), page(["b_3", "b_2"], True), page(["b_1"], False)]
    assert [b.id for b in hook().list_batches(limit=2)] == ["b_5", "b_4", "b_3", "b_2", "b_1"]
    assert [dict(call.request.url.params) for call in route.calls] == [
        {"limit": "2"},
        {"limit": "2", "after": "b_4"},
        {"limit": "2", "after": "b_2"},
    ]


@pytest.mark.parametrize(
    ("body", "content_type", "error_type"),
    [
        ("<html><title>Just a moment...</title></html>", "text/html", OpenAIBatchGatewayError),
        (
            '{"error": {"message": "Your organization lacks access to this project."}}',
            "application/json",
            OpenAIBatchAuthenticationError,
        ),
    ],
    ids=["cdn-page", "openai-envelope"],
)
def test_a_403_is_about_the_credentials_only_when_the_api_says_so(
    emulator_connection: BatchAPIEmulator, body: str, content_type: str, error_type: type
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault("body", status=403, body=body, content_type=content_type))
    with pytest.raises(error_type) as raised, hook() as sync_hook:
        sync_hook.get_batch(batch_id)
    assert raised.value.transient is (error_type is OpenAIBatchGatewayError)
    assert raised.value.status_code == 403
