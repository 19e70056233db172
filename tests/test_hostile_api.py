"""What the API (or a proxy, a CDN, a broken server) sends back, at its most hostile, over real loopback HTTP.

One test per defect of issue 24 about the answers and the transport, each on the sync and the async hook: a
list whose cursor never advances, rate-limit headers that are not finite durations, a body whose
``Content-Encoding`` lies, error bodies and result lines nested a hundred thousand deep, a body dripped byte
by byte, and a refused cancel contradicted by the next answer. The rule they check: a documented
``OpenAIBatchError`` names the response, nothing undocumented escapes a hook call, no loop or wait is unbounded.

Every test runs under ``tests._guards.guard`` (no socket, thread or task left behind; the key nowhere).
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from airflow_provider_openai_batch import storage
from airflow_provider_openai_batch.exceptions import (
    OpenAIBatchAPIError,
    OpenAIBatchConnectionError,
    OpenAIBatchError,
    OpenAIBatchResponseError,
)
from airflow_provider_openai_batch.hooks._retry import RetryPolicy
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator
from airflow_provider_openai_batch.results import save_results
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIBatchCancellationTrigger
from tests._guards import (  # noqa: F401 - fixtures: guard and fast_backoff are autouse
    FAKE_API_KEY,
    Guard,
    TaskContext,
    fast_backoff,
    guard,
    run_async,
    run_operator,
    run_trigger,
)

pytestmark = pytest.mark.timeout(90)

SURFACES = ["sync", "async"]
#: A body nested deeper than any parser's recursion can follow: ``json.loads`` raised ``RecursionError``.
DEEP = "[" * 100_000 + "]" * 100_000


def call(surface: str, method: str, *args: Any, policy: RetryPolicy | None = None, **kwargs: Any) -> Any:
    """``method`` of a hook, or its ``a``-prefixed twin on a fresh event loop; list iterators are drained."""
    if surface == "sync":
        with OpenAIBatchHook(retry_policy=policy) as hook:
            result = getattr(hook, method)(*args, **kwargs)
            return list(result) if method == "list_batches" else result

    async def acall() -> Any:
        async with OpenAIBatchHook(retry_policy=policy) as hook:
            if method == "list_batches":
                return [batch async for batch in hook.alist_batches(*args, **kwargs)]
            return await getattr(hook, f"a{method}")(*args, **kwargs)

    return run_async(acall())


# -- 1: list pagination never ends ------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize(
    ("last_id", "message"),
    [
        ("batch_a", "a second time"),  # the cursor repeats
        (None, "a second time"),  # no cursor, and the server ignores ``after``: the last batch's id repeats
        ("../files", "not a batch id"),
    ],
    ids=["cursor-repeats", "null-cursor-ignored-after", "cursor-not-an-id"],
)
def test_list_pagination_that_does_not_advance_stops(
    emulator_connection: BatchAPIEmulator, surface: str, last_id: str | None, message: str
) -> None:
    batch = emulator_connection.add_batch("batch_a")
    page = {"object": "list", "data": [batch], "has_more": True, "first_id": "batch_a", "last_id": last_id}
    emulator_connection.inject(
        Fault("body", status=200, method="GET", path=r"/batches$", body=json.dumps(page), times=50)
    )

    with pytest.raises(OpenAIBatchResponseError, match=message):
        call(surface, "list_batches")

    listed = [r for r in emulator_connection.requests if r.path == "/v1/batches"]
    assert len(listed) <= 2, "stopped at the first page that does not advance"


@pytest.mark.parametrize("surface", SURFACES)
def test_list_pagination_stops_when_the_first_cursor_comes_back(
    emulator_connection: BatchAPIEmulator, surface: str
) -> None:
    """The ``after`` the caller gave is a cursor already sent: a page naming it again does not advance."""
    batch = emulator_connection.add_batch("batch_b")
    page = {"object": "list", "data": [batch], "has_more": True, "last_id": "batch_a"}
    emulator_connection.inject(Fault("body", status=200, path=r"/batches$", body=json.dumps(page), times=50))

    with pytest.raises(OpenAIBatchResponseError, match="does not advance"):
        call(surface, "list_batches", after="batch_a")
    assert len([r for r in emulator_connection.requests if r.path == "/v1/batches"]) == 1


# -- 2: a bad rate-limit header ---------------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("reset", ["NaN", "inf", "99999999999h", "1e308"])
def test_a_bad_rate_limit_reset_header_freezes_nothing(
    emulator_connection: BatchAPIEmulator, surface: str, reset: str
) -> None:
    """``remaining: 0`` with a reset that is no duration: the next requests on the key still go out at once.

    Before: ``NaN`` spun the async path at 100 % CPU and made ``time.sleep`` raise a bare ``ValueError``;
    ``inf`` and absurd durations held every request for the policy's longest pause (60 s here).
    """
    batch_id = emulator_connection.add_batch()["id"]
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": reset}
    emulator_connection.inject(Fault("delay", method="GET", headers=headers))
    policy = RetryPolicy(max_retries=0)

    started = time.monotonic()
    batches = [call(surface, "get_batch", batch_id, policy=policy) for _ in range(3)]

    assert [batch.id for batch in batches] == [batch_id] * 3
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("header", ["retry-after-ms", "retry-after"])
def test_a_retry_hint_that_is_no_duration_is_no_rate_limit(
    emulator_connection: BatchAPIEmulator, surface: str, header: str
) -> None:
    """A 503 is backpressure only with a usable retry hint: ``NaN`` is none, so the 503 fails as an outage."""
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault("status", status=503, headers={header: "NaN"}, times=10))

    with pytest.raises(OpenAIBatchAPIError) as raised:
        call(surface, "get_batch", batch_id, policy=RetryPolicy(max_retries=1, initial_delay=0.01))

    assert type(raised.value) is OpenAIBatchAPIError and raised.value.status_code == 503


# -- 6: a body whose Content-Encoding lies ----------------------------------------------------------------------

GZIP = {"Content-Encoding": "gzip"}


@pytest.mark.parametrize("surface", SURFACES)
def test_a_body_that_cannot_be_decoded_is_retried(
    emulator_connection: BatchAPIEmulator, surface: str
) -> None:
    """``Content-Encoding: gzip`` on a plain body, as a CDN may send: retried like a connection lost mid-body."""
    batch = emulator_connection.add_batch()
    emulator_connection.inject(Fault("body", status=200, body=json.dumps(batch), headers=GZIP, method="GET"))

    assert call(surface, "get_batch", batch["id"], policy=RetryPolicy(initial_delay=0.01)).id == batch["id"]
    assert [r.status for r in emulator_connection.requests] == [200, 200]


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("status", [200, 500])
def test_a_body_that_never_decodes_is_a_response_error(
    emulator_connection: BatchAPIEmulator, surface: str, status: int
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault("body", status=status, body="{}", headers=GZIP, times=10))

    with pytest.raises(
        OpenAIBatchResponseError, match=f"batch '{batch_id}' with a body that cannot be decoded"
    ):
        call(surface, "get_batch", batch_id, policy=RetryPolicy(max_retries=2, initial_delay=0.01))
    assert len(emulator_connection.requests) == 3


@pytest.mark.parametrize("surface", SURFACES)
def test_a_download_labelled_gzip_but_plain_arrives_whole(
    emulator_connection: BatchAPIEmulator, surface: str, tmp_path: Path
) -> None:
    """A file's content is asked for as ``identity`` and read as sent: a CDN's ``gzip`` label on the plain
    file is not taken at its word, and the bytes, checked against the file's size, are the file."""
    content = b'{"custom_id": "r1"}\n' * 100
    file = emulator_connection.add_file(content)
    emulator_connection.inject(Fault("body", status=200, body=content, headers=GZIP, path=r"/content$"))

    if surface == "sync":
        with OpenAIBatchHook() as hook:
            assert hook.download_file(file["id"], tmp_path / "out.jsonl") == len(content)
        assert (tmp_path / "out.jsonl").read_bytes() == content
    else:

        async def chunks() -> bytes:
            async with OpenAIBatchHook() as hook:
                return b"".join([chunk async for chunk in hook.aiter_file_content(file["id"])])

        assert run_async(chunks()) == content
    [download] = [r for r in emulator_connection.requests if r.path.endswith("/content")]
    assert download.headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("surface", SURFACES)
def test_a_download_refused_with_a_body_that_cannot_be_decoded_is_retried(
    emulator_connection: BatchAPIEmulator, surface: str
) -> None:
    """An error's body is read whole to be mapped: one that does not decode is retried, leaving no task behind."""
    content = b'{"custom_id": "r1"}\n'
    file = emulator_connection.add_file(content)
    emulator_connection.inject(Fault("body", status=503, body="{}", headers=GZIP, path=r"/content$"))
    policy = RetryPolicy(initial_delay=0.01)

    if surface == "sync":
        with OpenAIBatchHook(retry_policy=policy) as hook:
            assert b"".join(hook.iter_file_content(file["id"])) == content
    else:

        async def chunks() -> bytes:
            async with OpenAIBatchHook(retry_policy=policy) as hook:
                return b"".join([chunk async for chunk in hook.aiter_file_content(file["id"])])

        assert run_async(chunks()) == content
    assert [r.status for r in emulator_connection.requests if r.path.endswith("/content")] == [503, 200]


def test_the_trigger_polls_through_a_body_that_cannot_be_decoded(
    emulator_connection: BatchAPIEmulator, guard: Guard
) -> None:
    batch = emulator_connection.add_batch(status="cancelling", cancel_after_polls=1)
    emulator_connection.inject(
        Fault("body", status=200, body=json.dumps(batch), headers=GZIP, method="GET", times=8)
    )
    trigger = OpenAIBatchCancellationTrigger(
        batch_id=batch["id"], conn_id="openai_default", poll_interval=0.01, deadline=time.time() + 30
    )

    assert run_trigger(trigger, guard)["status"] == "cancelled"


# -- 7: nesting a hundred thousand deep ------------------------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
def test_a_deeply_nested_error_body_is_an_api_error(
    emulator_connection: BatchAPIEmulator, surface: str
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault("body", status=400, body=DEEP))

    with pytest.raises(OpenAIBatchAPIError) as raised:
        call(surface, "get_batch", batch_id)
    assert raised.value.status_code == 400 and raised.value.api_message is None


@pytest.mark.parametrize("surface", SURFACES)
def test_a_deeply_nested_success_body_is_a_response_error(
    emulator_connection: BatchAPIEmulator, surface: str
) -> None:
    batch_id = emulator_connection.add_batch()["id"]
    emulator_connection.inject(Fault("body", status=200, body=DEEP))

    with pytest.raises(OpenAIBatchResponseError, match="not a valid Batch"):
        call(surface, "get_batch", batch_id)


def test_a_deeply_nested_result_line_is_a_clear_error(
    emulator_connection: BatchAPIEmulator, tmp_path: Path
) -> None:
    batch = emulator_connection.add_batch(
        status="cancelled", total_requests=3, completed_requests=1, failed_requests=1
    )
    emulator_connection.add_file(DEEP + "\n", batch["error_file_id"])

    with (
        OpenAIBatchHook() as hook,
        pytest.raises(OpenAIBatchError, match=r"Line 1 of file '.*' is not a JSON object"),
    ):
        save_results(hook, batch["id"], hook.get_batch(batch["id"]), storage.directory(str(tmp_path), "root"))


# -- 13: a refused cancel contradicted by the next answer -------------------------------------------------------


@pytest.mark.parametrize("deferrable", [False, True], ids=["blocking", "deferrable"])
@pytest.mark.parametrize("status", ["cancelling", "paused"])
def test_a_refusal_as_finished_then_a_status_that_is_not_final_is_a_response_error(
    emulator_connection: BatchAPIEmulator, guard: Guard, deferrable: bool, status: str
) -> None:
    """The 409 names ``completed``; the next GET says ``cancelling`` (or a status unknown to the provider)."""
    batch = emulator_connection.add_batch(status="cancelling")
    refusal = {
        "error": {
            "message": "Cannot cancel a batch with status 'completed'.",
            "type": "invalid_request_error",
        }
    }
    emulator_connection.inject(Fault("body", status=409, method="POST", body=json.dumps(refusal)))
    emulator_connection.inject(
        Fault("body", status=200, method="GET", body=json.dumps({**batch, "status": status}))
    )
    operator = OpenAICancelBatchOperator(task_id="cancel", batch_id=batch["id"], deferrable=deferrable)

    with pytest.raises(OpenAIBatchResponseError) as raised:
        run_operator(operator, TaskContext(), guard)

    assert str(raised.value) == (
        f"OpenAI Batch API refused to cancel batch '{batch['id']}' as completed (HTTP 409), then reported it "
        f"'{status}', which is not a final status: cannot tell how it ended."
    )


# -- 10: a body dripped byte by byte ---------------------------------------------------------------------------


@pytest.fixture
def dripping_server() -> Iterator[str]:
    """A server that answers every request with a 200 whose body it drips, one byte every 0.3 s, until the
    client leaves: each read of the socket returns within any timeout, the whole response never arrives."""
    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()
    threads: list[threading.Thread] = []

    def drip(connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            body = json.dumps({"id": "batch_drip", "padding": "x" * 200}).encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            try:
                connection.sendall(head.encode())
                for byte in body:
                    if stopping.wait(0.3):
                        return
                    connection.sendall(bytes([byte]))
            except OSError:
                return  # the client gave up: what the test expects

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            thread = threading.Thread(target=drip, args=(connection,), daemon=True)
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    stopping.set()
    listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
    listener.close()
    for thread in [acceptor, *threads]:
        thread.join(5)


@pytest.mark.parametrize("surface", SURFACES)
def test_a_dripped_body_times_out_at_the_read_timeout(
    dripping_server: str, set_connection: Callable[..., None], surface: str
) -> None:
    """``timeout=1, max_retries=0``: the request ends at about 1 s, not after the 70 s the drip lasts."""
    set_connection(password=FAKE_API_KEY, host=dripping_server, extra={"timeout": 1, "max_retries": 0})

    started = time.monotonic()
    with pytest.raises(OpenAIBatchConnectionError, match="ReadTimeout"):
        call(surface, "get_batch", "batch_drip")

    assert time.monotonic() - started < 3
