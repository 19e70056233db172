"""A connection means the same here as in the official ``apache-airflow-providers-openai`` (issue 21).

Over a table of connections, what this provider resolves (the URL of a request with its query, the credentials
and the other headers sent, the timeout and the retries) is compared with what the official hook resolves
through its own ``get_conn()`` / ``aget_conn()`` (so its ``_client_kwargs``, then the ``openai`` client the
kwargs build): each side's request for the same path, built and not sent. Both lookup paths are compared, sync
and async, for both connection types. If either provider changes how it reads a connection, a row fails.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from airflow.providers.openai.hooks.openai import OpenAIHook
from openai._models import FinalRequestOptions

from airflow_provider_openai_batch.hooks import _tokens
from airflow_provider_openai_batch.hooks._workload_identity import SUBJECT_TOKEN_TYPES
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.testing import BatchAPIEmulator
from tests.conftest import FAKE_API_KEY

KEY = "sk-parity-right-key-0000"
STALE = "sk-parity-stale-key-1111"
#: Headers each HTTP stack adds of its own, which say nothing about the connection.
GENERIC_HEADERS = {"host", "accept-encoding", "connection", "accept", "user-agent", "content-type"}

#: Connection fields, in the shapes a real ``openai_default`` takes.
SHAPES: dict[str, dict[str, Any]] = {
    "password_and_host": {"password": KEY, "host": "https://gateway.example/v1"},
    "password_only": {"password": KEY},
    "client_kwargs_only": {
        "extra": {
            "openai_client_kwargs": {
                "api_key": KEY,
                "base_url": "https://api.example/v1",
                "organization": "org-1",
                "project": "proj_1",
            }
        }
    },
    "base_url_and_another_host": {
        "password": KEY,
        "host": "https://wrong.example/v1",
        "extra": {"openai_client_kwargs": {"base_url": "https://right.example/v1"}},
    },
    "stale_password_and_right_api_key": {
        "password": STALE,
        "host": "https://api.example/v1",
        "extra": {"openai_client_kwargs": {"api_key": KEY}},
    },
    "empty_base_url_falls_back_to_host": {
        "password": KEY,
        "host": "https://host.example/v1",
        "extra": {"openai_client_kwargs": {"base_url": "", "api_key": ""}},
    },
    "default_headers": {
        "password": KEY,
        "extra": {
            "openai_client_kwargs": {"default_headers": {"X-Gateway-Route": "batch-eu", "X-Team": "a"}}
        },
    },
    "default_headers_replace_the_organization": {
        "password": KEY,
        "extra": {
            "openai_client_kwargs": {
                "organization": "org-1",
                "default_headers": {"OpenAI-Organization": "org-from-gateway"},
            }
        },
    },
    "default_query": {
        "password": KEY,
        "host": "https://gateway.example/v1",
        "extra": {"openai_client_kwargs": {"default_query": {"tenant": "t1", "route": "eu"}}},
    },
    "client_kwargs_win_over_top_level_extras": {
        "password": KEY,
        "extra": {
            "organization": "org-top",
            "project": "proj_top",
            "openai_client_kwargs": {"organization": "org-kw", "project": "proj_kw"},
        },
    },
    "timeout_and_retries": {
        "password": KEY,
        "extra": {"openai_client_kwargs": {"timeout": 12.5, "max_retries": 5}},
    },
    "not_applicable_keys": {
        "password": KEY,
        "extra": {
            "openai_client_kwargs": {
                "webhook_secret": "whsec_x",
                "websocket_base_url": "wss://realtime.example/v1",
                "organization": "org-2",
            }
        },
    },
    "explicit_api_key_auth_type": {
        "password": KEY,
        "extra": {"auth_type": "api_key", "openai_client_kwargs": {"project": "proj_2"}},
    },
}


@pytest.fixture(autouse=True)
def no_sdk_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The openai client falls back to these when a setting is missing; this provider reads only the
    connection. Unset, the comparison is of the connections alone."""
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "OPENAI_WEBHOOK_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)


def resolved(url: Any, headers: Any, timeout: float | None, max_retries: int | None) -> dict[str, Any]:
    sent = {
        name.lower(): value
        for name, value in dict(headers).items()
        if name.lower() not in GENERIC_HEADERS and not name.lower().startswith("x-stainless-")
    }
    return {"url": str(url), "headers": sent, "timeout": timeout, "max_retries": max_retries}


def ours(path: str) -> dict[str, Any]:
    hook = OpenAIBatchHook()
    settings = hook.settings if path == "sync" else asyncio.run(hook.asettings())
    with httpx.Client(**settings.client_kwargs()) as client:
        request = client.build_request("GET", "/batches/batch_1")
    return resolved(request.url, request.headers, settings.timeout, settings.max_retries)


def official(path: str) -> dict[str, Any]:
    hook = OpenAIHook()

    async def aclient() -> Any:
        return await hook.aget_conn()

    client = hook.get_conn() if path == "sync" else asyncio.run(aclient())
    request = client._build_request(FinalRequestOptions.construct(method="get", url="/batches/batch_1"))
    return resolved(request.url, request.headers, client.timeout, client.max_retries)


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("conn_type", ["openai", "openai_batch"])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_connection_resolves_as_the_official_hook_resolves_it(
    set_connection: Callable[..., None], shape: str, conn_type: str, path: str
) -> None:
    fields = SHAPES[shape]
    set_connection(conn_type=conn_type, **fields)
    here, there = ours(path), official(path)
    kwargs = fields.get("extra", {}).get("openai_client_kwargs", {})
    # Defaults that differ on purpose (docs/connections.md): compared only where the connection sets them.
    if "timeout" not in kwargs:
        here["timeout"] = there["timeout"] = None
    if "max_retries" not in kwargs:
        here["max_retries"] = there["max_retries"] = None
    assert here == there
    assert here["headers"]["authorization"] == f"Bearer {KEY}"


#: ``openai_client_kwargs`` keys the official hook hands to the ``openai`` client that this provider cannot
#: honour: refused, naming the key, rather than dropped.
REFUSED = {
    "data_residency": {"data_residency": "eu"},
    "admin_api_key": {"admin_api_key": "sk-admin-x"},
    "strict_response_validation": {"_strict_response_validation": True},
    "a_typo": {"base_ur": "https://api.example/v1"},
}


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("name", REFUSED)
def test_a_client_kwarg_not_honoured_is_refused_by_name(
    set_connection: Callable[..., None], name: str, path: str
) -> None:
    set_connection(password=KEY, extra={"openai_client_kwargs": REFUSED[name]})
    [key] = REFUSED[name]
    hook = OpenAIBatchHook()
    with pytest.raises(ValueError, match=rf"extra 'openai_client_kwargs\.{key}' is not supported") as caught:
        _ = hook.settings if path == "sync" else asyncio.run(hook.asettings())
    assert "sk-admin-x" not in str(caught.value)


@pytest.mark.parametrize("path", ["sync", "async"])
def test_an_unknown_auth_type_is_refused_as_the_official_hook_refuses_it(
    set_connection: Callable[..., None], path: str
) -> None:
    set_connection(password=KEY, extra={"auth_type": "oauth"})
    with pytest.raises(ValueError, match="Unsupported auth_type 'oauth'"):
        OpenAIHook().get_conn()
    hook = OpenAIBatchHook()
    with pytest.raises(
        ValueError, match="extra 'auth_type' must be one of 'api_key', 'workload_identity', not 'oauth'"
    ):
        _ = hook.settings if path == "sync" else asyncio.run(hook.asettings())


@pytest.mark.parametrize("header", ["Authorization", "api-key"])
def test_default_headers_cannot_carry_a_credential(set_connection: Callable[..., None], header: str) -> None:
    """The official client would send it; here the key has one home, where it is checked and masked."""
    set_connection(password=KEY, extra={"openai_client_kwargs": {"default_headers": {header: "Bearer sk-x"}}})
    with pytest.raises(ValueError, match=f"'openai_client_kwargs.default_headers' must not set '{header}'"):
        _ = OpenAIBatchHook().settings


@pytest.mark.parametrize("conn_type", ["openai", "openai_batch"])
def test_a_shared_connection_cancels_on_the_api_the_official_hook_uses(
    emulator: BatchAPIEmulator, set_connection: Callable[..., None], conn_type: str
) -> None:
    """Issue 21's report, over real HTTP: host names another API, the password is stale, and a gateway routes
    on a header. The official hook goes to ``base_url`` with ``api_key`` and the header; so do both hooks here,
    and the cancel lands."""
    with BatchAPIEmulator() as elsewhere:
        wrong_host = elsewhere.base_url
    set_connection(
        conn_type=conn_type,
        password=STALE,
        host=wrong_host,
        extra={
            "openai_client_kwargs": {
                "api_key": FAKE_API_KEY,
                "base_url": emulator.base_url,
                "default_headers": {"X-Gateway-Route": "batch"},
                "default_query": {"tenant": "t1"},
            }
        },
    )
    first, second = emulator.add_batch()["id"], emulator.add_batch()["id"]

    async def acancel() -> str:
        async with OpenAIBatchHook() as hook:
            return str((await hook.acancel_batch(second)).status)

    with OpenAIBatchHook() as hook:
        assert hook.cancel_batch(first).status == "cancelling"
    assert asyncio.run(acancel()) == "cancelling"
    assert [(r.method, r.path) for r in emulator.requests] == [
        ("POST", f"/v1/batches/{first}/cancel"),
        ("POST", f"/v1/batches/{second}/cancel"),
    ]
    for request in emulator.requests:
        assert request.headers["authorization"] == f"Bearer {FAKE_API_KEY}"
        assert request.headers["x-gateway-route"] == "batch"
        assert request.query == {"tenant": "t1"}


# -- workload identity -------------------------------------------------------------------------------------------

WI_IDS = {"auth_type": "workload_identity", "identity_provider_id": "idp_1", "service_account_id": "sa_1"}
#: Workload identity connections: the extras of each token source, with and without their optional keys.
WI_SHAPES: dict[str, dict[str, Any]] = {
    "kubernetes": {"workload_identity_provider": "kubernetes"},
    "kubernetes_with_buffer": {"workload_identity_provider": "kubernetes", "refresh_buffer_seconds": 300},
    "custom_jwt": {"workload_identity_provider": "custom", "token_provider": f"{__name__}.subject_token"},
    "custom_id": {
        "workload_identity_provider": "custom",
        "token_provider": f"{__name__}.subject_token",
        "token_type": "id",
    },
    "azure": {"workload_identity_provider": "azure"},
    "azure_user_assigned": {
        "workload_identity_provider": "azure",
        "client_id": "mi-1",
        "object_id": "obj-1",
        "msi_res_id": "/subscriptions/x/mi",
        "resource": "api://openai",
        "api_version": "2019-08-01",
    },
    "gcp": {"workload_identity_provider": "gcp"},
    "gcp_audience": {"workload_identity_provider": "gcp", "audience": "https://gateway.example/v1"},
}
SUBJECT_TOKEN = "subject-token-parity"


def subject_token() -> str:
    return SUBJECT_TOKEN


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("shape", WI_SHAPES)
def test_a_workload_identity_connection_resolves_as_the_official_hook_resolves_it(
    set_connection: Callable[..., None], tmp_path: Any, shape: str, path: str
) -> None:
    """The same API, headers and identity; the same subject token where it can be read here (a file, a
    callable), and the same metadata request parameters where it cannot (the official provider's get_token
    would call the real metadata servers)."""
    token_file = tmp_path / "token"
    token_file.write_text(SUBJECT_TOKEN)
    extra = {**WI_IDS, **WI_SHAPES[shape], "openai_client_kwargs": {"default_headers": {"X-Team": "a"}}}
    if shape.startswith("kubernetes"):
        extra["token_file_path"] = str(token_file)
    set_connection(conn_type="openai", host="https://gateway.example/v1", extra=extra)
    here, there = ours(path), official(path)
    assert there["headers"].pop("authorization") == "Bearer workload-identity-auth"  # the SDK's placeholder
    here["timeout"] = there["timeout"] = here["max_retries"] = there["max_retries"] = None
    assert here == there

    identity = OpenAIBatchHook().settings.workload_identity
    official_identity = OpenAIHook()._build_workload_identity(extra)
    assert identity is not None
    assert (identity.identity_provider_id, identity.service_account_id) == (
        official_identity["identity_provider_id"],
        official_identity["service_account_id"],
    )
    assert identity.refresh_buffer_seconds == official_identity.get("refresh_buffer_seconds", 1200)
    provider = official_identity["provider"]
    assert identity.subject_token_type == SUBJECT_TOKEN_TYPES[provider["token_type"]]
    if identity.source == "kubernetes":
        assert _tokens.read_token_file(identity.token_file_path) == provider["get_token"]() == SUBJECT_TOKEN
    elif identity.source == "custom":
        assert _tokens.call_token_provider(identity) == provider["get_token"]() == SUBJECT_TOKEN
    else:
        captured = inspect.getclosurevars(provider["get_token"]).nonlocals
        official_query = (
            {"audience": captured["audience"]}
            if identity.source == "gcp"
            else {"api-version": captured["api_version"], "resource": captured["resource"]}
            | {name: captured[name] for name in ("object_id", "client_id", "msi_res_id") if captured[name]}
        )
        assert dict(identity.metadata_params) == official_query
