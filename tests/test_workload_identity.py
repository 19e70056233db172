"""Workload identity (issue 21): key-less access through the token exchange, over real loopback HTTP.

The emulator serves the exchange and accepts the tokens it issues; the Azure IMDS and GCP metadata servers are
local fakes on loopback (nothing is sent to 169.254.169.254 or metadata.google.internal). Every test runs under
the secrets guard (tests/_guards.py), which looks for the subject tokens and every access token issued as it
looks for the key.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from airflow_provider_openai_batch.exceptions import OpenAIBatchAuthenticationError, OpenAIBatchError
from airflow_provider_openai_batch.hooks import _tokens
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.testing import BatchAPIEmulator, EmulatorControl, Fault
from airflow_provider_openai_batch.triggers.openai_batch import OpenAIMultiBatchCancellationTrigger
from tests._guards import (  # noqa: F401 - fixtures: guard and fast_backoff are autouse
    EXTRA_SECRETS,
    Guard,
    fast_backoff,
    guard,
    run_async,
    run_trigger,
)
from tests.conftest import FAST_RETRIES
from tests.test_e2e import dagbag, metadata_db, run_dag  # noqa: F401 - fixtures

SUBJECT = "eyJhbGciOi.k8s-subject-SECRET-7c1e.sig"
CUSTOM_SUBJECT = "custom-subject-SECRET-93ab"
IDS = {"identity_provider_id": "idp_123", "service_account_id": "sa_456"}
JWT = "urn:ietf:params:oauth:token-type:jwt"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


def custom_token() -> str:
    """The custom source's ``token_provider`` of these tests."""
    return CUSTOM_SUBJECT


def failing_token() -> str:
    raise RuntimeError("vault unreachable")


@pytest.fixture(autouse=True)
def fresh_tokens(emulator: BatchAPIEmulator) -> Iterator[None]:
    """Each test starts as a new process does, with no token; every token issued is a secret to guard."""
    EXTRA_SECRETS.extend([SUBJECT, CUSTOM_SUBJECT, lambda: emulator.token_exchange.issued])
    yield
    _tokens._caches.clear()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(SUBJECT + "\n")
    return path


@pytest.fixture
def connect(
    emulator: BatchAPIEmulator, set_connection: Callable[..., None], token_file: Path
) -> Callable[..., None]:
    """Define ``openai_default`` with workload identity against the emulator; ``extra`` overrides."""

    def define(**extra: Any) -> None:
        fields = {
            "auth_type": "workload_identity",
            **IDS,
            "workload_identity_provider": "kubernetes",
            "token_file_path": str(token_file),
            "token_exchange_url": emulator.token_exchange_url,
            **extra,
        }
        set_connection(host=emulator.base_url, extra={k: v for k, v in fields.items() if v is not None})

    return define


class FakeMetadata:
    """A metadata server (Azure IMDS or GCP) on loopback, recording what it was asked."""

    def __init__(self, body: bytes, content_type: str, status: int = 200) -> None:
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urlsplit(self.path)
                fake.requests.append(
                    {"path": url.path, "query": dict(parse_qsl(url.query)), "headers": dict(self.headers)}
                )
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metadata"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def azure_imds() -> Iterator[FakeMetadata]:
    fake = FakeMetadata(
        json.dumps({"access_token": SUBJECT, "expires_in": "3599"}).encode(), "application/json"
    )
    yield fake
    fake.close()


@pytest.fixture
def gcp_metadata() -> Iterator[FakeMetadata]:
    fake = FakeMetadata(SUBJECT.encode() + b"\n", "text/html")
    yield fake
    fake.close()


def get_batch(path: str, batch_id: str, **hook_kwargs: Any) -> str:
    """Retrieve a batch with a new hook on ``path``; return its status."""
    if path == "sync":
        with OpenAIBatchHook(**hook_kwargs) as hook:
            return str(hook.get_batch(batch_id).status)

    async def aget() -> str:
        async with OpenAIBatchHook(**hook_kwargs) as hook:
            return str((await hook.aget_batch(batch_id)).status)

    return run_async(aget())


def assert_requests_carry_issued_tokens(emulator: BatchAPIEmulator) -> None:
    issued = set(emulator.token_exchange.issued)
    assert emulator.requests
    for request in emulator.requests:
        scheme, _, token = request.headers["authorization"].partition(" ")
        assert (scheme, token in issued) == ("Bearer", True)


# -- the four token sources --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["sync", "async"])
def test_kubernetes_token_file_is_exchanged_and_the_token_opens_the_api(
    emulator: BatchAPIEmulator, connect: Callable[..., None], guard: Guard, path: str
) -> None:
    connect()
    batch_id = emulator.add_batch()["id"]
    assert get_batch(path, batch_id) == "in_progress"
    [exchange] = emulator.token_exchange.exchanges
    assert (exchange.subject_token, exchange.subject_token_type, exchange.status) == (SUBJECT, JWT, 200)
    assert (exchange.identity_provider_id, exchange.service_account_id) == ("idp_123", "sa_456")
    assert_requests_carry_issued_tokens(emulator)


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize(("token_type", "sent_type"), [(None, JWT), ("id", ID_TOKEN)])
def test_custom_token_provider_is_imported_and_called(
    emulator: BatchAPIEmulator,
    connect: Callable[..., None],
    path: str,
    token_type: str | None,
    sent_type: str,
) -> None:
    connect(
        workload_identity_provider="custom",
        token_provider=f"{__name__}.custom_token",
        token_type=token_type,
        token_file_path=None,
    )
    assert get_batch(path, emulator.add_batch()["id"]) == "in_progress"
    [exchange] = emulator.token_exchange.exchanges
    assert (exchange.subject_token, exchange.subject_token_type) == (CUSTOM_SUBJECT, sent_type)
    assert_requests_carry_issued_tokens(emulator)


@pytest.mark.parametrize("path", ["sync", "async"])
def test_azure_managed_identity_token_comes_from_imds(
    emulator: BatchAPIEmulator, connect: Callable[..., None], azure_imds: FakeMetadata, path: str
) -> None:
    connect(
        workload_identity_provider="azure",
        metadata_url=azure_imds.url,
        client_id="mi-client-1",
        resource="api://openai-wif",
    )
    assert get_batch(path, emulator.add_batch()["id"]) == "in_progress"
    [asked] = azure_imds.requests
    assert asked["query"] == {
        "api-version": "2018-02-01",
        "resource": "api://openai-wif",
        "client_id": "mi-client-1",
    }
    assert asked["headers"]["Metadata"] == "true"
    [exchange] = emulator.token_exchange.exchanges
    assert (exchange.subject_token, exchange.subject_token_type) == (SUBJECT, JWT)
    assert_requests_carry_issued_tokens(emulator)


@pytest.mark.parametrize("path", ["sync", "async"])
def test_gcp_identity_token_comes_from_the_metadata_server(
    emulator: BatchAPIEmulator, connect: Callable[..., None], gcp_metadata: FakeMetadata, path: str
) -> None:
    connect(workload_identity_provider="gcp", metadata_url=gcp_metadata.url)
    assert get_batch(path, emulator.add_batch()["id"]) == "in_progress"
    [asked] = gcp_metadata.requests
    assert asked["query"] == {"audience": "https://api.openai.com/v1"}
    assert asked["headers"]["Metadata-Flavor"] == "Google"
    [exchange] = emulator.token_exchange.exchanges
    assert (exchange.subject_token, exchange.subject_token_type) == (SUBJECT, ID_TOKEN)
    assert_requests_carry_issued_tokens(emulator)


def test_the_metadata_servers_default_to_the_platforms_own(
    connect: Callable[..., None],
) -> None:
    """Read, not contacted: the defaults are the SDK's addresses."""
    connect(workload_identity_provider="azure")
    assert OpenAIBatchHook().settings.workload_identity.metadata_url.startswith("http://169.254.169.254/")  # type: ignore[union-attr]
    connect(workload_identity_provider="gcp")
    assert "metadata.google.internal" in OpenAIBatchHook().settings.workload_identity.metadata_url  # type: ignore[union-attr]


# -- one token per identity, refreshed, single flight -------------------------------------------------------------


class TokenClock:
    """The token cache's clock, ``offset`` seconds ahead of the real one: a test moves past a refresh time
    without sleeping, so nothing depends on how fast the machine is."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture
def token_clock(monkeypatch: pytest.MonkeyPatch) -> TokenClock:
    clock = TokenClock()
    monkeypatch.setattr(_tokens, "time", clock)
    return clock


def test_the_token_is_shared_and_refreshed_before_it_expires(
    emulator: BatchAPIEmulator, connect: Callable[..., None], token_clock: TokenClock
) -> None:
    """Lifetime 3,000 s with the default buffer: refreshed at 3,000 - min(1,200, 3,000 / 2) = 1,800 s, by sync and
    async hooks alike, all using the one token until then."""
    emulator.token_exchange.lifetime = 3000.0
    connect()
    batch_id = emulator.add_batch()["id"]
    for path in ("sync", "async", "sync", "async"):
        get_batch(path, batch_id)
    token_clock.offset = 1700.0
    get_batch("sync", batch_id)
    assert len(emulator.token_exchange.exchanges) == 1
    token_clock.offset = 1810.0
    get_batch("async", batch_id)
    get_batch("sync", batch_id)
    assert len(emulator.token_exchange.exchanges) == 2
    first, second = emulator.token_exchange.issued
    assert [r.headers["authorization"] for r in emulator.requests] == [f"Bearer {first}"] * 5 + [
        f"Bearer {second}"
    ] * 2


def test_refresh_buffer_seconds_sets_when_the_token_is_refreshed(
    emulator: BatchAPIEmulator, connect: Callable[..., None], token_clock: TokenClock
) -> None:
    """Lifetime 3,000 s, buffer 400 s: refreshed at 2,600 s (not at 1,500 s, as half the lifetime would be)."""
    emulator.token_exchange.lifetime = 3000.0
    connect(refresh_buffer_seconds="400")
    batch_id = emulator.add_batch()["id"]
    get_batch("sync", batch_id)
    token_clock.offset = 2000.0  # past half the lifetime
    get_batch("sync", batch_id)
    assert len(emulator.token_exchange.exchanges) == 1
    token_clock.offset = 2610.0
    get_batch("sync", batch_id)
    assert len(emulator.token_exchange.exchanges) == 2


def test_many_concurrent_async_waits_exchange_once(
    emulator: BatchAPIEmulator, connect: Callable[..., None]
) -> None:
    connect()
    emulator.token_exchange.lifetime = 60
    batch_ids = [batch["id"] for batch in emulator.add_batches(50)]

    async def one(batch_id: str) -> str:
        async with OpenAIBatchHook() as hook:
            return str((await hook.aget_batch(batch_id)).status)

    async def main() -> list[str]:
        return await asyncio.gather(*map(one, batch_ids))

    assert run_async(main()) == ["in_progress"] * 50
    assert len(emulator.token_exchange.exchanges) == 1
    assert len(emulator.requests) == 50
    assert_requests_carry_issued_tokens(emulator)


def test_many_threads_exchange_once(emulator: BatchAPIEmulator, connect: Callable[..., None]) -> None:
    connect()
    batch_id = emulator.add_batch()["id"]
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(get_batch("sync", batch_id))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["in_progress"] * 8
    assert len(emulator.token_exchange.exchanges) == 1


# -- the API refusing a token ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_401_to_a_token_valid_when_sent_exchanges_again_and_retries_once(
    emulator: BatchAPIEmulator, connect: Callable[..., None], path: str
) -> None:
    connect()
    batch_id = emulator.add_batch()["id"]
    get_batch(path, batch_id)
    emulator.token_exchange.expire_tokens()  # revoked early: still valid by the hook's clock
    assert get_batch(path, batch_id) == "in_progress"
    assert [r.status for r in emulator.requests] == [200, 401, 200]
    assert len(emulator.token_exchange.exchanges) == 2


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_second_401_is_final(
    emulator: BatchAPIEmulator, connect: Callable[..., None], guard: Guard, path: str
) -> None:
    connect()
    batch_id = emulator.add_batch()["id"]
    emulator.inject(Fault("status", status=401, times=2))
    with guard.raises(OpenAIBatchAuthenticationError, match="HTTP 401"):
        get_batch(path, batch_id, retry_policy=FAST_RETRIES)
    assert [r.status for r in emulator.requests] == [401, 401]
    assert len(emulator.token_exchange.exchanges) == 2


# -- bad input ---------------------------------------------------------------------------------------------------

BAD_CONNECTIONS = {
    "no_identity_provider_id": ({"identity_provider_id": None}, "'identity_provider_id' is required"),
    "no_service_account_id": ({"service_account_id": " "}, "'service_account_id' is required"),
    "no_token_source": ({"workload_identity_provider": None}, "'workload_identity_provider' must be one of"),
    "unknown_token_source": ({"workload_identity_provider": "aws"}, "not 'aws'"),
    "custom_without_provider": ({"workload_identity_provider": "custom"}, "'token_provider' is required"),
    "unknown_token_type": (
        {"workload_identity_provider": "custom", "token_provider": "a.b", "token_type": "saml"},
        "'token_type' must be 'jwt' or 'id'",
    ),
    "bad_exchange_url": (
        {"token_exchange_url": "auth.openai.com/oauth/token"},
        "'token_exchange_url' must be",
    ),
    "bad_refresh_buffer": ({"refresh_buffer_seconds": "-1"}, "'refresh_buffer_seconds' must be at least 0"),
    "azure_openai": ({"api_type": "azure"}, "'api_type' must be 'openai' with workload identity"),
}


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("case", BAD_CONNECTIONS)
def test_a_bad_workload_identity_connection_is_refused_before_any_request(
    emulator: BatchAPIEmulator, connect: Callable[..., None], case: str, path: str
) -> None:
    extra, message = BAD_CONNECTIONS[case]
    connect(**extra)
    with pytest.raises(ValueError, match=message):
        get_batch(path, "batch_1")
    assert emulator.requests == []
    assert emulator.token_exchange.exchanges == []


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_an_unreadable_or_empty_token_file_is_named(
    emulator: BatchAPIEmulator,
    connect: Callable[..., None],
    tmp_path: Path,
    guard: Guard,
    path: str,
    content: str | None,
) -> None:
    token_file = tmp_path / "missing" if content is None else tmp_path / "empty"
    if content is not None:
        token_file.write_text(content)
    connect(token_file_path=str(token_file))
    problem = "Cannot read" if content is None else "is empty"
    with guard.raises(OpenAIBatchAuthenticationError, match=problem) as caught:
        get_batch(path, "batch_1")
    assert repr(str(token_file)) in str(caught.value)
    assert emulator.requests == []
    assert emulator.token_exchange.exchanges == []


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize(
    ("provider", "problem"),
    [
        ("no_such_module_xyz.get", "Cannot import token_provider"),
        (f"{__name__}.failing_token", "RuntimeError"),
    ],
)
def test_a_custom_provider_that_cannot_give_a_token_is_named(
    emulator: BatchAPIEmulator,
    connect: Callable[..., None],
    guard: Guard,
    path: str,
    provider: str,
    problem: str,
) -> None:
    connect(workload_identity_provider="custom", token_provider=provider)
    with guard.raises(OpenAIBatchAuthenticationError, match=problem) as caught:
        get_batch(path, "batch_1")
    assert provider in str(caught.value)
    assert emulator.requests == []


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_rejected_exchange_is_an_authentication_error_with_its_reason(
    emulator: BatchAPIEmulator, connect: Callable[..., None], guard: Guard, path: str
) -> None:
    emulator.token_exchange.subject_tokens = {"another-subject"}
    connect()
    with guard.raises(
        OpenAIBatchAuthenticationError, match="HTTP 401.*invalid_grant: The subject token could not"
    ):
        get_batch(path, "batch_1", retry_policy=FAST_RETRIES)
    assert len(emulator.token_exchange.exchanges) == 1  # refused: not retried
    assert emulator.requests == []


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_transient_exchange_failure_is_retried(
    emulator: BatchAPIEmulator, connect: Callable[..., None], path: str
) -> None:
    connect()
    emulator.token_exchange.fail(503)
    emulator.token_exchange.fail(0)  # dropped without an answer
    assert get_batch(path, emulator.add_batch()["id"], retry_policy=FAST_RETRIES) == "in_progress"
    assert [exchange.status for exchange in emulator.token_exchange.exchanges] == [503, 0, 200]


ANSWERS = {
    "token_not_sendable": (
        200,
        {"access_token": "two words", "expires_in": 60},
        "without a valid access_token",
    ),
    "no_token": (200, {"expires_in": 60}, "without a valid access_token"),
    "lifetime_as_text": (200, {"access_token": "t", "expires_in": "60"}, "without a valid expires_in"),
    "no_lifetime": (200, {"access_token": "t"}, "without a valid expires_in"),
    "not_json": (200, "<html>", "without a valid access_token"),
    "forbidden_as_text": (403, "denied by policy", r"\(HTTP 403\): denied by policy"),
    "not_found": (404, {"error": "not_found"}, "failed with HTTP 404"),
}


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("answer", ANSWERS)
def test_an_exchange_answer_that_cannot_be_used_fails_before_any_api_request(
    emulator: BatchAPIEmulator, connect: Callable[..., None], guard: Guard, path: str, answer: str
) -> None:
    status, body, message = ANSWERS[answer]
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    fake = FakeMetadata(raw, "text/plain" if isinstance(body, str) else "application/json", status)
    try:
        connect(token_exchange_url=fake.url)
        with guard.raises(OpenAIBatchError, match=message):
            get_batch(path, "batch_1", retry_policy=FAST_RETRIES)
    finally:
        fake.close()
    assert len(fake.requests) == 1
    assert emulator.requests == []


@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_metadata_server_refusal_is_an_authentication_error(
    emulator: BatchAPIEmulator, connect: Callable[..., None], guard: Guard, path: str
) -> None:
    fake = FakeMetadata(b'{"error": "invalid_request"}', "application/json", 400)
    try:
        connect(workload_identity_provider="azure", metadata_url=fake.url)
        with guard.raises(OpenAIBatchAuthenticationError, match="Azure IMDS answered HTTP 400"):
            get_batch(path, "batch_1", retry_policy=FAST_RETRIES)
    finally:
        fake.close()
    assert emulator.token_exchange.exchanges == []
    assert emulator.requests == []


def test_a_wait_whose_exchange_is_rejected_ends_with_error_at_once(
    emulator: BatchAPIEmulator, connect: Callable[..., None], guard: Guard
) -> None:
    emulator.token_exchange.subject_tokens = {"another-subject"}
    connect()
    batch_ids = [batch["id"] for batch in emulator.add_batches(20, status="cancelling")]
    trigger = OpenAIMultiBatchCancellationTrigger(batch_ids, "openai_default", 0.01, time.time() + 60)
    started = time.monotonic()
    payload = run_trigger(trigger, guard)
    assert time.monotonic() - started < 5
    assert {event["status"] for event in payload["events"]} == {"error"}
    assert "invalid_grant" in payload["events"][0]["message"]
    # One for the list page (refused: the round falls back to GETs), one shared by the twenty GETs.
    assert len(emulator.token_exchange.exchanges) == 2
    assert trigger.serialize()[1] == {
        "batch_ids": batch_ids,
        "conn_id": "openai_default",
        "poll_interval": 0.01,
        "deadline": trigger.deadline,
    }


# -- secrets -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["sync", "async"])
def test_subject_and_access_tokens_are_masked_and_kept_out_of_reprs(
    emulator: BatchAPIEmulator, connect: Callable[..., None], guard: Guard, path: str
) -> None:
    from airflow.providers.common.compat.sdk import redact

    connect()
    batch_id = emulator.add_batch()["id"]
    get_batch(path, batch_id)
    [token] = emulator.token_exchange.issued
    for secret in (SUBJECT, token):
        assert redact(f"Authorization: Bearer {secret}") == "Authorization: Bearer ***"
    hook = OpenAIBatchHook()
    guard.check(repr(hook.settings), "the settings' repr")
    guard.check(repr(_tokens.cache_for(hook.settings.workload_identity)), "the token cache's repr")  # type: ignore[arg-type]
    guard.check(repr(_tokens.cache_for(hook.settings.workload_identity).token), "the token's repr")  # type: ignore[arg-type]


# -- the emulator's token exchange -------------------------------------------------------------------------------


def test_issued_tokens_open_every_endpoint(emulator: BatchAPIEmulator, connect: Callable[..., None]) -> None:
    connect()
    batch = emulator.add_batch(status="completed", completed=2, failed=0)
    with OpenAIBatchHook() as hook:
        assert [b.id for b in hook.list_batches()] == [batch["id"]]
        assert hook.get_file(batch["output_file_id"]).id == batch["output_file_id"]
        assert b"".join(hook.iter_file_content(batch["output_file_id"]))
        other = emulator.add_batch()["id"]
        assert hook.cancel_batch(other).status == "cancelling"
    assert {r.status for r in emulator.requests} == {200}
    assert len(emulator.token_exchange.exchanges) == 1


def test_the_emulator_refuses_an_expired_token_and_a_bad_exchange(emulator: BatchAPIEmulator) -> None:
    import httpx

    exchange = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": SUBJECT,
        "subject_token_type": JWT,
        **IDS,
    }
    emulator.token_exchange.lifetime = 60
    with httpx.Client() as client:
        issued = client.post(emulator.token_exchange_url, json=exchange).json()
        assert issued["expires_in"] == 60
        url = f"{emulator.base_url}/batches"
        headers = {"Authorization": f"Bearer {issued['access_token']}"}
        assert client.get(url, headers=headers).status_code == 200
        emulator.token_exchange.expire_tokens()  # as if its 60 s were over
        expired = client.get(url, headers=headers)
        assert (expired.status_code, expired.json()["error"]["code"]) == (401, "token_expired")
        emulator.token_exchange.lifetime = 0  # over as soon as issued: the lifetime is what expires a token
        short_lived = client.post(emulator.token_exchange_url, json=exchange).json()["access_token"]
        at_once = client.get(url, headers={"Authorization": f"Bearer {short_lived}"})
        assert (at_once.status_code, at_once.json()["error"]["code"]) == (401, "token_expired")
        refused = client.post(emulator.token_exchange_url, json={**exchange, "grant_type": "password"})
        assert (refused.status_code, refused.json()["error"]) == (400, "unsupported_grant_type")
        unverified = client.post(emulator.token_exchange_url, json={**exchange, "service_account_id": ""})
        assert unverified.json() == {
            "error": "invalid_request",
            "error_description": "Missing service_account_id.",
        }
    control = EmulatorControl(emulator.base_url).token_exchanges()
    assert [(e["status"], e["subject_token"]) for e in control] == [(200, None)] * 2 + [(400, None)] * 2


# -- a real DAG run ----------------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("dag_id", ["e2e_cancel_deferrable", "e2e_cancel_blocking"])
def test_a_dag_run_cancels_with_workload_identity(
    dagbag: Any, emulator: BatchAPIEmulator, connect: Callable[..., None], guard: Guard, dag_id: str
) -> None:
    """``dag.test()`` runs the tasks and the trigger in this process: one exchange serves the operator's sync
    cancel and the trigger's async polls, and no XCom, log file or output line holds a token."""
    from airflow.configuration import conf

    guard.unix_sockets_allowed = True  # dag.test()'s in-process supervisor keeps a socket pair open
    connect()
    batch_id = emulator.add_batch()["id"]
    state, states, xcoms = run_dag(dagbag, dag_id, {"batch_id": batch_id})
    assert state == "success", states
    assert xcoms[("cancel", "status")] == "cancelled"
    assert len(emulator.token_exchange.exchanges) == 1
    assert_requests_carry_issued_tokens(emulator)
    guard.check(xcoms, "an XCom of the DAG run")
    for path in Path(conf.get("logging", "base_log_folder")).rglob("*"):
        if path.is_file():
            guard.check(path.read_text(errors="replace"), f"the log file {path}")


def test_an_exchange_over_plain_http_to_another_host_is_warned_about(
    connect: Callable[..., None], caplog: pytest.LogCaptureFixture
) -> None:
    connect(token_exchange_url="http://auth.example.com/oauth/token")
    _ = OpenAIBatchHook().settings
    assert "identity token in clear text over http:// to auth.example.com" in caplog.text
    caplog.clear()
    connect()  # the emulator, on loopback
    _ = OpenAIBatchHook().settings
    assert "clear text" not in caplog.text
