"""Fuzz surface 1: connection fields and extras, read by the sync and the async lookup.

A connection is built in-process, as Airflow reads one from an ``AIRFLOW_CONN_*`` variable, with a generated
key (possibly wrapped in characters a file or a form leaves around it), a host and extras drawn from clean and
hostile values. The hook then retrieves a batch from the module's emulator, sync and async. The promise:

* a clean connection works;
* a value that cannot be right (wrong type, not finite, out of range, not header-safe, a URL that is not a base
  URL) is refused with a ``ValueError`` naming the connection or the field, before any request;
* anything else ends in a result or a documented error; nothing else escapes, nothing hangs;
* the key is in no exception, log record or request the server saw outside its header.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from airflow import __version__ as airflow_version
from airflow.providers.common.compat.sdk import AirflowNotFoundException
from hypothesis import assume, given
from hypothesis import strategies as st

from airflow_provider_openai_batch.hooks import _rate
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.models import Batch
from airflow_provider_openai_batch.testing import BatchAPIEmulator
from tests._guards import (  # noqa: F401 - fixtures: guard, and fast_backoff are autouse
    FAKE_API_KEY,
    Guard,
    fast_backoff,
    guard,
    run_async,
    shared_emulator,
)
from tests.fuzz._hostile import (
    api_keys,
    assert_documented,
    assert_secret_absent,
    bounded,
    budget,
    json_values,
)

pytestmark = pytest.mark.timeout(300)

CONN_ID = "fuzz_conn"
EMULATOR = "{emulator}"  # replaced by the emulator's base URL
PORT = "{port}"

#: Hosts, and whether each must be refused (True), must work (False), or may go either way (None).
HOSTS: dict[str, bool | None] = {
    EMULATOR: False,
    EMULATOR + "/": None,
    f"  {EMULATOR}  ": None,
    f"http://localhost:{PORT}/v1": False,
    f"http://user:pw@127.0.0.1:{PORT}/v1": None,
    "http://[::1": True,
    "http://127.0.0.1:99999/v1": True,
    "http://127.0.0.1:-1/v1": True,
    EMULATOR + "?x=1": True,
    EMULATOR + "#fragment": True,
    "ftp://127.0.0.1/v1": True,
    "127.0.0.1": True,
    "http://": True,
    "http:///v1": True,
    EMULATOR + "\n": None,
    "http://127.0.0.1:" + PORT + "/v1\x00": True,
}
#: Clean values of each extra: any of them works with the emulator.
CLEAN_EXTRAS: dict[str, list[Any]] = {
    "api_type": ["openai", "OpenAI", "azure", None, ""],
    "organization": ["org-abc123", None, ""],
    "project": ["proj_abc", None],
    "api_version": ["2024-10-21", None],
    "timeout": [5, 2.5, "5", None, ""],
    "max_retries": [0, 1, "1", None],
}
HEADER_FIELDS = ("organization", "project")
STRING_FIELDS = ("api_type", "organization", "project", "api_version", "ca_bundle")


@dataclass
class Drawn:
    """A connection as drawn, and what it must do."""

    key: str
    core: str
    fields: dict[str, Any]
    #: The reasons it must be refused; empty when it need not be.
    refuse: list[str] = field(default_factory=list)
    clean: bool = True


def _must_refuse(name: str, value: Any) -> str | None:
    """Why ``value`` of extra ``name`` cannot be right, or None when it may be."""
    if value is None or value == "":
        return None
    if name in STRING_FIELDS:
        if not isinstance(value, str):
            return f"{name} is a {type(value).__name__}"
        if name in HEADER_FIELDS and not all(" " <= char <= "~" for char in value):
            return f"{name} is not a header-safe value"
        if name == "api_type" and value.lower() not in ("openai", "azure"):
            return f"api_type {value!r}"
        return None
    if isinstance(value, bool | list | dict):
        return f"{name} is a {type(value).__name__}"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return f"{name} {value!r} is not a number"
    if not math.isfinite(number):
        return f"{name} is not finite"
    if name == "timeout" and number <= 0:
        return "timeout is not positive"
    if name == "max_retries" and (number < 0 or number != int(number)):
        return "max_retries is not a count"
    return None


@st.composite
def connections(draw: st.DrawFn) -> Drawn:
    key, core = draw(api_keys())
    drawn = Drawn(key, core, {})
    if key != core:
        drawn.clean = False
        if key.strip(" \t") != core:  # a control or non-ASCII character: never a header value
            drawn.refuse.append("the key is not header-safe")

    host = draw(st.sampled_from(list(HOSTS)))
    if HOSTS[host] is not False:
        drawn.clean = False
        if HOSTS[host]:
            drawn.refuse.append(f"host {host!r}")

    extras: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    for name in [*CLEAN_EXTRAS, "ca_bundle"]:
        if name != "ca_bundle" and draw(st.booleans()):
            value = draw(st.sampled_from(CLEAN_EXTRAS[name]))
        elif draw(st.integers(0, 3)) == 0:
            value = draw(json_values)
            drawn.clean = False
            if (reason := _must_refuse(name, value)) is not None:
                drawn.refuse.append(reason)
        else:
            continue
        (client_kwargs if draw(st.booleans()) else extras)[name] = value

    where = draw(st.sampled_from(["password", "password", "client_kwargs", "blank"]))
    password: str | None = key
    if where == "client_kwargs":
        password = None
        client_kwargs["api_key"] = key
    elif where == "blank":
        password = draw(st.sampled_from(["", " ", "\n"]))
        drawn.clean = False
        drawn.refuse.append("no key")
    if draw(st.integers(0, 5)) == 0:
        odd = draw(st.one_of(json_values.filter(lambda value: not isinstance(value, dict)), st.just({})))
        if odd not in (None, "", {}, [], 0, False, 0.0):
            client_kwargs = odd
            drawn.clean = False
            drawn.refuse.append("openai_client_kwargs is not an object")
            if where == "client_kwargs":
                password = None
    if client_kwargs != {}:
        extras["openai_client_kwargs"] = client_kwargs
    extra: Any = extras
    if draw(st.integers(0, 9)) == 0 and not airflow_version.startswith("3.0."):
        extra = draw(st.lists(json_values, min_size=1, max_size=3))  # Airflow 3.0 refuses it itself
        drawn.clean = False
        drawn.refuse.append("the extra is not a JSON object")
    drawn.fields = {"password": password, "host": host, "extra": json.dumps(extra)}
    return drawn


def refused_by_airflow(error: BaseException | None, drawn: Drawn) -> bool:
    """Whether Airflow itself would not load the connection: its extra is no JSON object, which some lines (3.0
    for any list, 3.1 for some) refuse at lookup, before the provider sees it."""
    return (
        "the extra is not a JSON object" in drawn.refuse
        and isinstance(error, AirflowNotFoundException)
        and f"`{CONN_ID}`" in str(error)
    )


@pytest.fixture(scope="module")
def api(shared_emulator: BatchAPIEmulator) -> Iterator[tuple[BatchAPIEmulator, str]]:
    batch_id = shared_emulator.add_batch()["id"]
    yield shared_emulator, batch_id
    shared_emulator.api_key = FAKE_API_KEY


@budget(60)
@given(drawn=connections())
def test_connection_values(
    drawn: Drawn, api: tuple[BatchAPIEmulator, str], monkeypatch: pytest.MonkeyPatch, guard: Guard
) -> None:
    emulator, batch_id = api
    host = drawn.fields["host"].replace(EMULATOR, emulator.base_url).replace(PORT, str(emulator.port))
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{CONN_ID.upper()}",
        json.dumps({"conn_type": "openai_batch", **drawn.fields, "host": host}),
    )
    emulator.api_key = drawn.key
    emulator.clear_requests()
    emulator.clear_faults()
    _rate._governors.clear()

    def sync_call() -> Batch:
        with OpenAIBatchHook(CONN_ID) as hook:
            return hook.get_batch(batch_id)

    async def async_call() -> Batch:
        async with OpenAIBatchHook(CONN_ID) as hook:
            return await hook.aget_batch(batch_id)

    for path, call in (("sync", sync_call), ("async", lambda: run_async(async_call(), timeout=8))):
        result, error = bounded(call)
        assert_secret_absent(drawn.core, error=error, logs=guard.new_output())
        sent = len(emulator.requests)
        if drawn.clean:
            assert error is None, f"{path}: a clean connection fails: {error!r}"
        if refused_by_airflow(error, drawn):
            assert sent == 0, f"{path}: refused after {sent} request(s): {error}"
            continue
        if drawn.refuse:
            assert isinstance(error, ValueError), (
                f"{path}: must be refused ({', '.join(drawn.refuse)}), got {result or error!r}"
            )
        if error is None:
            assert isinstance(result, Batch) and result.id == batch_id
            continue
        assert_documented(error, arguments=True)
        if type(error) is ValueError:
            assert sent == 0, f"{path}: refused after {sent} request(s): {error}"
            message = str(error).lower()
            names = [
                CONN_ID,
                "password",
                "key",
                "host",
                "url",
                *(name.replace("_", " ") for name in STRING_FIELDS),
            ]
            names += ["timeout", "max_retries", "extra", "openai_client_kwargs"]
            assert any(name.lower() in message for name in names), f"{path}: names nothing: {error}"
        emulator.clear_requests()
    assume(True)
