"""The API key goes into the Authorization header and nowhere else.

With the recognisable fake key, every component is run through its happy path and its failures, and the key
is looked for in: log records of every logger at DEBUG and stdout/stderr (``tests._guards.guard`` does that for
every test here, in test_reliability.py and in test_bad_input.py), exception messages and reprs with their
whole ``__cause__``/``__context__`` chain, the hook's and the settings' repr, both triggers' ``serialize()``
output, XCom values and return values, trigger events, and the emulator's recorded request bodies, query
strings and paths. The key must also be registered with Airflow's secrets masker whenever a hook reads its
connection, so Airflow redacts it from task logs. Last, one real ``dag.test()`` run is checked end to end.
"""

# ruff: noqa: F811 - test arguments named after the fixtures imported from tests._guards

from __future__ import annotations

import asyncio
import dataclasses
import glob
import json
import os
import secrets
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.providers.common.compat.sdk import AirflowException, Connection, TaskDeferred, redact

from airflow_provider_openai_batch.callbacks import cancel_run_batches
from airflow_provider_openai_batch.exceptions import OpenAIBatchError
from airflow_provider_openai_batch.hooks import openai_batch as hook_module
from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAICancelBatchOperator,
    OpenAICancelStaleBatchesOperator,
)
from airflow_provider_openai_batch.testing import BatchAPIEmulator, Fault
from airflow_provider_openai_batch.triggers.openai_batch import (
    OpenAIBatchCancellationTrigger,
    OpenAIMultiBatchCancellationTrigger,
)
from tests._guards import (  # noqa: F401 - fixtures: guard, and fast_backoff are autouse
    FAKE_API_KEY,
    Guard,
    TaskContext,
    assert_no_key,
    assert_no_key_in_files,
    emulator,
    exception_chain,
    fast_backoff,
    first_event,
    guard,
    private_emulator,
    rebuild,
    run_async,
    run_operator,
    run_trigger,
    shared_emulator,
)

pytestmark = pytest.mark.timeout(120)

OLD = int(time.time()) - 3 * 86_400


@pytest.fixture
def connected(emulator: BatchAPIEmulator, set_connection: Any) -> BatchAPIEmulator:
    set_connection(password=FAKE_API_KEY, host=emulator.base_url)
    return emulator


@pytest.fixture
def fresh_key(emulator: BatchAPIEmulator) -> Iterator[str]:
    """A key that no test has registered with Airflow's secrets masker yet, and that the emulator accepts: only
    the code under test can have masked it. It does not contain the fake key, which the masker may hold (its
    partial match would hide the key only in part), but it contains the part of it the leak guards look for."""
    emulator.api_key = f"{FAKE_API_KEY[:-4]}x{secrets.token_hex(4)}"
    yield emulator.api_key
    emulator.api_key = FAKE_API_KEY  # the module's tests share the emulator


def is_masked(secret: str) -> bool:
    return redact(f"Authorization: Bearer {secret}") == "Authorization: Bearer ***"


@pytest.fixture
def unmasked_lookup(emulator: BatchAPIEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections served without Airflow's own lookup (which masks passwords itself), so that only the hook's
    own ``mask_secret`` call can register the key."""

    def connection(conn_id: str) -> Connection:
        return Connection(
            conn_id=conn_id, conn_type="openai_batch", password=emulator.api_key, host=emulator.base_url
        )

    async def aconnection(conn_id: str) -> Connection:
        return connection(conn_id)

    monkeypatch.setattr(OpenAIBatchHook, "get_connection", staticmethod(connection))
    # raising=False: Airflow 3.0's BaseHook has no aget_connection; common-compat then uses the hook's own.
    monkeypatch.setattr(OpenAIBatchHook, "aget_connection", staticmethod(aconnection), raising=False)


# -- the secrets masker ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("style", ["password", "official_provider_extras", "azure"])
def test_reading_the_connection_registers_the_key_with_the_masker(
    emulator: BatchAPIEmulator, set_connection: Any, fresh_key: str, mocker: Any, path: str, style: str
) -> None:
    fields: dict[str, Any] = {"password": fresh_key, "host": emulator.base_url}
    if style == "official_provider_extras":
        fields = {"extra": {"openai_client_kwargs": {"api_key": fresh_key, "base_url": emulator.base_url}}}
    elif style == "azure":
        fields["extra"] = {"api_type": "azure", "api_version": "2024-10-21"}
    set_connection(**fields)
    # The async path must not call the sync ``mask_secret``, which talks to the supervisor synchronously.
    spy = mocker.spy(hook_module, "mask_secret" if path == "sync" else "amask_secret")
    other = mocker.spy(hook_module, "amask_secret" if path == "sync" else "mask_secret")
    assert not is_masked(fresh_key), "no test masked this key before"
    hook = OpenAIBatchHook()
    settings = hook.settings if path == "sync" else asyncio.run(hook.asettings())
    assert settings.api_key == fresh_key
    assert is_masked(fresh_key)
    spy.assert_called_once_with(fresh_key)
    other.assert_not_called()


@pytest.mark.parametrize(
    "component", ["hook_sync", "hook_async", "operator", "deferrable", "trigger", "callback"]
)
def test_each_component_registers_the_key_itself(
    emulator: BatchAPIEmulator, fresh_key: str, unmasked_lookup: None, guard: Guard, component: str
) -> None:
    """Even when the connection did not come through Airflow's masking lookup, the key ends up masked."""
    batch_id = emulator.add_batch(cancel_after_polls=1)["id"]

    async def via_async_hook() -> None:
        async with OpenAIBatchHook() as hook:
            await hook.aget_batch(batch_id)

    assert not is_masked(fresh_key)
    if component == "hook_sync":
        with OpenAIBatchHook() as hook:
            hook.get_batch(batch_id)
    elif component == "hook_async":
        run_async(via_async_hook())
    elif component in ("operator", "deferrable"):
        operator = OpenAICancelBatchOperator(
            task_id="cancel", batch_id=batch_id, deferrable=component == "deferrable", poll_interval=0.01
        )
        run_operator(operator, TaskContext(), guard)
    elif component == "trigger":
        emulator.set_status(batch_id, "cancelling")
        run_trigger(OpenAIBatchCancellationTrigger(batch_id, "openai_default", 0.01, time.time() + 5), guard)
    else:
        from airflow_provider_openai_batch.callbacks import cancel_batch_on_failure

        cancel_batch_on_failure(batch_id)(TaskContext())
    assert is_masked(fresh_key)
    assert emulator.requests, "the component really used the connection"


# -- reprs and serialized triggers ------------------------------------------------------------------------------


@pytest.mark.parametrize("api_type", ["openai", "azure"])
def test_hook_and_settings_reprs_hide_the_key(
    connected: BatchAPIEmulator, set_connection: Any, api_type: str
) -> None:
    set_connection(
        password=FAKE_API_KEY, host=connected.base_url, extra={"api_type": api_type, "api_version": "v1"}
    )
    batch_id = connected.add_batch()["id"]
    hook = OpenAIBatchHook()
    assert_no_key(repr(hook), "repr(hook) before use")
    with hook:
        hook.get_batch(batch_id)
        settings = hook.settings
        for text, where in [
            (repr(settings), "repr(settings)"),
            (str(settings), "str(settings)"),
            (repr(hook), "repr(hook)"),
            (str(hook), "str(hook)"),
            (repr(vars(hook)), "the hook's attributes"),
            (repr(hook.client), "repr(hook.client)"),
        ]:
            assert_no_key(text, where)
        assert dataclasses.asdict(settings)["api_key"] == FAKE_API_KEY, "the key is there, just not shown"

    async def async_use() -> None:
        async with OpenAIBatchHook() as async_hook:
            await async_hook.aget_batch(batch_id)
            assert_no_key(repr(vars(async_hook)), "the async hook's attributes")
            assert_no_key(repr(async_hook._shared_async_client), "the shared client")

    run_async(async_use())


def test_serialized_triggers_hold_no_key(connected: BatchAPIEmulator, guard: Guard) -> None:
    """Both triggers, as the operators build them, before and after they ran: only the connection's id."""
    batch_id = connected.add_batch(cancel_after_polls=1)["id"]
    deferrals: list[TaskDeferred] = []
    operator = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=batch_id, deferrable=True, poll_interval=0.01
    )
    run_operator(operator, TaskContext(), guard, deferred=deferrals)
    stale = connected.add_batch(created_at=OLD, metadata={"purpose": "serialize"}, cancel_after_polls=1)["id"]
    cleanup = OpenAICancelStaleBatchesOperator(
        task_id="cleanup",
        older_than=timedelta(days=1),
        metadata={"purpose": "serialize"},
        deferrable=True,
        poll_interval=0.01,
    )
    run_operator(cleanup, TaskContext(task_id="cleanup"), guard, deferred=deferrals)
    assert [type(d.trigger) for d in deferrals] == [
        OpenAIBatchCancellationTrigger,
        OpenAIMultiBatchCancellationTrigger,
    ]
    for deferral in deferrals:
        classpath, kwargs = deferral.trigger.serialize()
        assert kwargs["conn_id"] == "openai_default"
        assert_no_key(json.dumps([classpath, kwargs]), "serialize() after running")
        assert_no_key(repr(deferral.trigger), "repr(trigger)")
        assert_no_key(json.dumps(deferral.kwargs), "the deferral's kwargs")
    assert stale in deferrals[1].trigger.batch_ids


# -- XComs, results and trigger events --------------------------------------------------------------------------


def test_xcoms_results_and_events_hold_no_key(connected: BatchAPIEmulator, guard: Guard) -> None:
    """Success and failure of both operators in both modes: everything pushed, returned or fired."""
    everything: list[Any] = []

    def run(operator: Any, context: TaskContext, failure: type[BaseException] | None = None) -> None:
        if failure is None:
            everything.append(run_operator(operator, context, guard))
        else:
            with guard.raises(failure):
                run_operator(operator, context, guard)
        assert context.xcoms, "the task pushed XComs"
        everything.append(context.xcoms)

    for deferrable in (False, True):
        done = connected.add_batch(cancel_after_polls=1)["id"]
        run(
            OpenAICancelBatchOperator(
                task_id="cancel", batch_id=done, deferrable=deferrable, poll_interval=0.01
            ),
            TaskContext(),
        )
        stuck = connected.add_batch(cancel_after_polls=10**9)["id"]
        timing_out = OpenAICancelBatchOperator(
            task_id="cancel", batch_id=stuck, deferrable=deferrable, poll_interval=0.02, timeout=0.1
        )
        run(timing_out, TaskContext(), AirflowException)
        tag = {"team": f"secrets-{deferrable}"}
        connected.add_batch(created_at=OLD, metadata=tag, cancel_after_polls=1)
        broken = connected.add_batch(created_at=OLD, metadata=tag)["id"]
        connected.inject(Fault("status", status=400, path=f"{broken}/cancel$"))
        cleanup = OpenAICancelStaleBatchesOperator(
            task_id="cleanup",
            older_than=timedelta(days=1),
            metadata=tag,
            deferrable=deferrable,
            poll_interval=0.01,
        )
        run(cleanup, TaskContext(task_id="cleanup"), AirflowException)  # one batch could not be cancelled
    events = []
    for trigger in (
        OpenAIBatchCancellationTrigger("batch_missing", "openai_default", 0.01, time.time() + 5),
        OpenAIMultiBatchCancellationTrigger(
            ["batch_missing", "batch_gone"], "openai_default", 0.01, time.time() + 5
        ),
    ):
        events.append(run_trigger(trigger, guard))
    assert "HTTP 404" in json.dumps(events)
    assert_no_key(everything + events, "XComs, results or trigger events")


# -- exceptions -------------------------------------------------------------------------------------------------

FAILURES = {
    "wrong_key_401": ({}, None, "HTTP 401"),
    "unknown_batch_404": ({}, None, "HTTP 404"),
    "finished_batch_409": ({}, None, "HTTP 409"),
    "rate_limited_429": (
        {},
        Fault("status", status=429, times=100, headers={"Retry-After": "0"}),
        "HTTP 429",
    ),
    "server_error_503": ({}, Fault("status", status=503, times=100), "HTTP 503"),
    "dropped": ({}, Fault("drop", times=100), "No response"),
    "read_timeout": (
        {"timeout": 0.05, "max_retries": 0},
        Fault("delay", delay=1.0, times=100),
        "ReadTimeout",
    ),
    "invalid_json": ({}, Fault("body", status=200, body="{", times=100), "Invalid JSON"),
    "html_page": (
        {},
        Fault("body", status=502, body="<html>bad gateway</html>", content_type="text/html", times=100),
        "HTTP 502",
    ),
    "refused": ({}, None, "ConnectError"),
    "bad_timeout_extra": ({"timeout": "soon"}, None, "extra 'timeout' must be a number"),
    "bad_base_url": ({}, None, "must be an absolute http(s) URL"),
    "bad_batch_id": ({}, None, "Invalid batch id"),
}


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("name", FAILURES)
def test_exceptions_hold_no_key(
    private_emulator: BatchAPIEmulator, set_connection: Any, guard: Guard, name: str, path: str
) -> None:
    """Every error the hook raises, with its whole chain, through str(), repr() and its attributes."""
    extra, fault, expected = FAILURES[name]
    server = private_emulator
    host = server.base_url
    if name == "wrong_key_401":
        server.api_key = "sk-the-right-key-000000000"  # the API answers with the offered key masked
    elif name == "refused":
        with BatchAPIEmulator() as gone:
            host = gone.base_url
    elif name == "bad_base_url":
        host = host.removeprefix("http://")
    set_connection(password=FAKE_API_KEY, host=host, extra=extra)
    batch_id = server.add_batch(status="completed" if name == "finished_batch_409" else "in_progress")["id"]
    if name == "unknown_batch_404":
        batch_id = "batch_unknown"
    elif name == "bad_batch_id":
        batch_id = f"../{FAKE_API_KEY[:3]}"
    if fault is not None:
        server.inject(fault)

    async def acancel() -> None:
        async with OpenAIBatchHook() as hook:
            await hook.acancel_batch(batch_id)

    with guard.raises((OpenAIBatchError, ValueError)) as caught:
        if path == "sync":
            with OpenAIBatchHook() as hook:
                hook.cancel_batch(batch_id)
        else:
            run_async(acancel())
    assert expected in str(caught.value)
    assert len(exception_chain(caught.value)) >= 1


#: Keys that cannot be a header value (issue 24, defect 3), and how the refusal names the flaw.
UNSENDABLE_KEYS = {
    "trailing_newline": (FAKE_API_KEY + "\n", "a line feed (\\n) at its end"),
    "trailing_crlf": (FAKE_API_KEY + "\r\n", "a carriage return (\\r) inside it"),
    "nul_inside": (FAKE_API_KEY[:10] + "\x00" + FAKE_API_KEY[10:], "a NUL byte inside it"),
    "non_ascii": (FAKE_API_KEY + "é", "a non-ASCII character at its end"),
    "leading_space": (" " + FAKE_API_KEY, "a space at its start"),
}


@pytest.mark.parametrize("name", UNSENDABLE_KEYS)
def test_a_key_that_cannot_be_a_header_is_refused_without_being_quoted(
    emulator: BatchAPIEmulator, set_connection: Any, guard: Guard, name: str
) -> None:
    """Regression (issue 24, defect 3): such a key used to go out, fail in the HTTP stack as a retried "network
    error" quoting ``Bearer <key>``, and reach the exception, the trigger's event, the callback's JSON and the
    warning logs. It is now refused before any request, by every path, with an error that does not quote it;
    the guard checks the logs and stdout/stderr."""
    key, flaw = UNSENDABLE_KEYS[name]
    set_connection(password=key, host=emulator.base_url)
    batch_id = emulator.add_batch(metadata={"airflow_dag_id": "d", "airflow_run_id": "r"})["id"]
    expected = f"Connection 'openai_default': the API key cannot be sent in an HTTP header: it has {flaw}"

    async def acancel() -> None:
        async with OpenAIBatchHook() as hook:
            await hook.acancel_batch(batch_id)

    for call in (lambda: OpenAIBatchHook().cancel_batch(batch_id), lambda: run_async(acancel())):
        with guard.raises(ValueError) as caught:
            call()
        assert expected in str(caught.value)
    operator = OpenAICancelBatchOperator(task_id="cancel", batch_id=batch_id, deferrable=True)
    with guard.raises(ValueError, match="cannot be sent in an HTTP header"):
        run_operator(operator, TaskContext(), guard)
    event = run_trigger(
        OpenAIBatchCancellationTrigger(batch_id, "openai_default", 0.01, time.time() + 5), guard
    )
    assert event["status"] == "error" and expected in event["message"]
    context = {"dag_run": {"dag_id": "d", "dag_run_id": "r"}}
    summaries = [cancel_run_batches()(context), run_async(cancel_run_batches(context=context))]  # type: ignore[arg-type]
    assert_no_key(json.dumps(summaries), "the JSON of cancel_run_batches")
    assert expected in guard.output(), "the callback logged why it cancelled nothing"
    assert emulator.requests == [], "refused before any request"
    assert emulator.batch(batch_id)["status"] == "in_progress"


def test_a_server_echoing_the_key_does_not_get_it_repeated(
    emulator: BatchAPIEmulator, set_connection: Any
) -> None:
    """A proxy or gateway that quotes the request's headers in its error message: the provider must not carry
    the key from that message into its exceptions, trigger events or XComs (which Airflow does not mask)."""
    set_connection(password=FAKE_API_KEY, host=emulator.base_url)
    echo = json.dumps(
        {"error": {"message": f"Bad request: header 'Authorization: Bearer {FAKE_API_KEY}' rejected"}}
    )
    batch_id = emulator.add_batch(created_at=OLD, metadata={"team": "echo"})["id"]
    for path in (f"/{batch_id}/cancel$", f"/{batch_id}$"):  # the batch's own requests, not the list
        emulator.inject(Fault("body", status=400, body=echo, times=100, path=path))
    found: dict[str, str] = {}
    try:
        with OpenAIBatchHook() as hook:
            hook.cancel_batch(batch_id)
    except OpenAIBatchError as error:
        assert "HTTP 400" in str(error)
        found["the hook's exception"] = str(error) + repr(vars(error))
    emulator.set_status(batch_id, "cancelling")
    trigger = OpenAIBatchCancellationTrigger(batch_id, "openai_default", 0.01, time.time() + 5)
    found["the trigger event"] = json.dumps(run_async(first_event(trigger)))
    emulator.set_status(batch_id, "in_progress")
    context = TaskContext(task_id="cleanup")
    cleanup = OpenAICancelStaleBatchesOperator(
        task_id="cleanup", older_than=timedelta(days=1), metadata={"team": "echo"}
    )
    with pytest.raises(AirflowException):
        cleanup.execute(context)
    assert context.xcoms["summary"]["failed"][0]["batch_id"] == batch_id
    found["the cleanup's summary XCom"] = json.dumps(context.xcoms)
    leaked = [where for where, text in found.items() if FAKE_API_KEY in text]
    assert leaked == [], f"the key echoed by the server reached: {', '.join(leaked)}"


# -- files: downloads and saved results ---------------------------------------------------------------------------


@pytest.mark.parametrize("deferrable", [False, True])
def test_saved_results_and_their_manifest_hold_no_key(
    connected: BatchAPIEmulator, guard: Guard, tmp_path: Path, deferrable: bool
) -> None:
    """A save that works and one whose download is cut short every time: files written (and their names),
    XComs, return values, exceptions and logs hold no key; the key went in the auth header only."""
    done = connected.add_batch(cancel_after_polls=1, total_requests=50)["id"]
    operator = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=done, deferrable=deferrable, poll_interval=0.01, save_results_to=tmp_path
    )
    context = TaskContext()
    run_operator(operator, context, guard)
    assert context.xcoms["results"]["remaining"]["lines"] == 50 - 16 - 1
    cut = connected.add_batch(cancel_after_polls=1)
    connected.inject(Fault("drop", times=100, path="/content$"))
    failing = OpenAICancelBatchOperator(
        task_id="cancel",
        batch_id=cut["id"],
        deferrable=deferrable,
        poll_interval=0.01,
        save_results_to=tmp_path,
    )
    with guard.raises(OpenAIBatchError, match="cut short"):
        run_operator(failing, TaskContext(), guard)
    assert_no_key_in_files(tmp_path)
    file_requests = [r for r in connected.requests if r.path.startswith("/v1/files/")]
    assert file_requests and {r.headers["authorization"] for r in file_requests} == {f"Bearer {FAKE_API_KEY}"}


@pytest.mark.parametrize("path", ["metadata", "content", "async_content"])
def test_a_server_echoing_the_key_about_a_file_does_not_get_it_repeated(
    connected: BatchAPIEmulator, guard: Guard, path: str
) -> None:
    echo = json.dumps({"error": {"message": f"Denied: 'Authorization: Bearer {FAKE_API_KEY}'"}})
    file_id = connected.add_batch()["input_file_id"]
    connected.inject(Fault("body", status=403, body=echo, path=f"/files/{file_id}"))

    async def read_async() -> None:
        async with OpenAIBatchHook() as hook:
            [chunk async for chunk in hook.aiter_file_content(file_id)]

    with guard.raises(
        OpenAIBatchError, match=r"refused the credentials for file .* \(HTTP 403\): Denied"
    ) as caught:
        if path == "async_content":
            run_async(read_async())
        else:
            with OpenAIBatchHook() as hook:
                hook.get_file(file_id) if path == "metadata" else list(hook.iter_file_content(file_id))
    assert "***" in str(caught.value)


# -- what reaches the wire --------------------------------------------------------------------------------------


@pytest.mark.parametrize("api_type", ["openai", "azure"])
def test_the_key_travels_in_the_auth_header_only(
    emulator: BatchAPIEmulator, set_connection: Any, api_type: str
) -> None:
    extra = {"api_type": "azure", "api_version": "2024-10-21"} if api_type == "azure" else {}
    set_connection(password=FAKE_API_KEY, host=emulator.base_url, extra=extra)
    ids = [emulator.add_batch(created_at=OLD + i)["id"] for i in range(3)]

    async def async_calls() -> None:
        async with OpenAIBatchHook() as hook:
            await hook.acancel_batch(ids[1])
            await hook.aget_batch(ids[1])
            [batch async for batch in hook.alist_batches(after=ids[2], limit=1)]

    with OpenAIBatchHook() as hook:
        hook.cancel_batch(ids[0])
        hook.get_batch(ids[0])
        list(hook.list_batches(limit=1))
    run_async(async_calls())
    assert len(emulator.requests) >= 6
    header = "api-key" if api_type == "azure" else "authorization"
    expected = FAKE_API_KEY if api_type == "azure" else f"Bearer {FAKE_API_KEY}"
    for request in emulator.requests:
        assert request.headers[header] == expected
        assert request.body == b""
        assert set(request.query) <= {"limit", "after", "api-version"}
        assert_no_key([request.path, request.query], "the URL")
        others = {name: value for name, value in request.headers.items() if name != header}
        assert_no_key(others, "another header")


def test_debug_logs_of_every_logger_hold_no_key(connected: BatchAPIEmulator, guard: Guard) -> None:
    """Retries, HTTP tracing and failures, logged at DEBUG: the guard finds the key nowhere in them."""
    batch_id = connected.add_batch(cancel_after_polls=1)["id"]
    connected.inject(Fault("status", status=503, times=2))
    connected.inject(Fault("drop"))
    operator = OpenAICancelBatchOperator(
        task_id="cancel", batch_id=batch_id, deferrable=True, poll_interval=0.01
    )
    run_operator(operator, TaskContext(), guard)
    logged = guard.output()
    assert "send_request_headers.started" in logged, "httpcore's DEBUG tracing was captured"
    assert f"POST /v1/batches/{batch_id}/cancel got HTTP 503; retry 1 of 3" in logged, (
        "Airflow's structlog output was captured"
    )
    assert_no_key(logged, "the logs")


# -- a real DAG run ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metadata_db() -> None:
    """The metadata DB this process's Airflow uses, created in-process (``dag.test()`` runs in-process too)."""
    from airflow.utils.db import initdb

    initdb()


@pytest.mark.e2e
def test_dag_run_leaks_no_key(metadata_db: None, connected: BatchAPIEmulator, guard: Guard) -> None:
    """``e2e_cancel_deferrable`` under ``dag.test()``: no XCom, task log or output line holds the key."""
    from airflow.configuration import conf
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    from tests._compat import DagBag

    guard.unix_sockets_allowed = True  # dag.test()'s in-process supervisor keeps a socket pair open
    dag_file = Path(conf.get("core", "dags_folder")) / "e2e_cancel_batch.py"
    batch_id = connected.add_batch()["id"]
    connected.inject(Fault("status", status=503, method="POST"))  # a retry, logged, on the way
    run = (
        DagBag(dag_folder=str(dag_file))
        .get_dag("e2e_cancel_deferrable")
        .test(run_conf={"batch_id": batch_id})
    )
    assert run.state == "success"
    with create_session() as session:
        rows = (
            session.query(XComModel)
            .filter(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id)
            .all()
        )
        xcoms = {(row.task_id, row.key): row.value for row in rows}
    assert xcoms[("cancel", "status")] == "cancelled"
    assert_no_key(xcoms, "an XCom of the DAG run")
    logs = [
        path for path in glob.glob(os.path.join(conf.get("logging", "base_log_folder"), "**"), recursive=True)
    ]
    for path in filter(os.path.isfile, logs):
        assert_no_key(Path(path).read_text(errors="replace"), f"the log file {path}")
    output = guard.output()
    assert f"Cancel of batch '{batch_id}' accepted" in output, "the task's log lines were captured"
    assert_no_key(output, "the DAG run's output")
