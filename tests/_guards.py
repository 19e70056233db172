"""Checks shared by the reliability, bad-input and secrets suites.

Every test in those modules runs under :func:`guard`, which fails the test if, once it is over,

* a socket opened during the test is still open (``socket:[...]`` links in ``/proc/self/fd``, compared with a
  baseline taken before the test: a module's shared emulator, started earlier, is part of the baseline; an
  emulator of the test's own is stopped first, which closes its side of every connection),
* an emulator thread started during the test is still alive (a connection's server thread outliving it),
* the fake API key appears in any log record (every logger, at DEBUG), in stdout/stderr (where Airflow's
  structlog writes), or in the body, query string or path of any request the emulator received.

Asynchronous code runs through :func:`run_async`, which fails if an asyncio task is still pending, or a shared
HTTP client still open, when the awaited code returns. Exceptions are checked for the key through
:meth:`Guard.raises` and :meth:`Guard.check_exception`; task results, XComs, serialized triggers and trigger
events through :meth:`Guard.check`, which :func:`run_operator` and :func:`run_trigger` call on everything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import pytest
from airflow import __version__ as airflow_version
from airflow.providers.common.compat.module_loading import import_string
from airflow.providers.common.compat.sdk import TaskDeferred

from airflow_provider_openai_batch.hooks import _async_clients
from airflow_provider_openai_batch.hooks import openai_batch as hook_module
from airflow_provider_openai_batch.hooks._retry import RetryPolicy
from airflow_provider_openai_batch.testing import BatchAPIEmulator
from airflow_provider_openai_batch.testing.emulator import THREAD_NAME
from tests.conftest import FAKE_API_KEY

T = TypeVar("T")

#: The whole key, and its distinctive middle, which any copy of the key (even cut or re-prefixed) contains.
KEY_MARKERS = (FAKE_API_KEY, FAKE_API_KEY[3:-4])
#: Secrets standing for the key that a test adds (workload identity's subject and access tokens): strings, or
#: callables returning the tokens issued so far. Looked for like the key; emptied after each test.
EXTRA_SECRETS: list[str | Callable[[], Iterable[str]]] = []


def secret_markers() -> list[str]:
    markers = list(KEY_MARKERS)
    for secret in EXTRA_SECRETS:
        markers.extend([secret] if isinstance(secret, str) else secret())
    return markers


#: How long async code may run before the test calls it hung.
ASYNC_TIMEOUT = 20.0


def socket_inodes() -> set[str]:
    """``socket:[inode]`` of every socket this process holds open."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed between listdir and readlink (the listdir's own fd, for one)
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def emulator_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == THREAD_NAME and thread.is_alive()}


def assert_no_new_sockets(baseline: set[str], wait: float = 2.0, *, unix_allowed: bool = False) -> None:
    """Fail if a socket not in ``baseline`` is still open after up to ``wait`` seconds.

    ``unix_allowed`` ignores Unix-domain sockets (the provider only opens TCP ones; Airflow's in-process
    ``dag.test()`` supervisor keeps a socket pair for the rest of the process).
    """
    deadline = time.monotonic() + wait
    while True:
        leaked = socket_inodes() - baseline
        if unix_allowed:
            leaked = {inode for inode in leaked if not describe_sockets({inode})[0].endswith("] unix ")}
        if not leaked or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    assert not leaked, (
        f"{len(leaked)} socket(s) opened during the test are still open: {describe_sockets(leaked)}"
    )


def describe_sockets(inodes: set[str]) -> list[str]:
    """``socket:[inode]`` with its kind and addresses, from /proc/net, to tell what leaked."""
    wanted = {inode.removeprefix("socket:[").removesuffix("]") for inode in inodes}
    found = {}
    for table in ("tcp", "tcp6", "udp", "unix"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            inode = fields[9] if table != "unix" else fields[6]
            if inode in wanted:
                found[inode] = f"{table} {' '.join(fields[1:3]) if table != 'unix' else ' '.join(fields[7:])}"
    return [f"socket:[{inode}] {found.get(inode, '?')}" for inode in sorted(wanted)]


#: Airflow 3.0's in-process supervisor (used by ``dag.test()`` only) logs each message a task sends it at DEBUG,
#: and Airflow's own connection lookup sends the password in a ``MaskSecret`` before masking it locally: the key
#: is in that line before the provider ever sees the connection. Airflow 3.1 no longer logs it. Nothing else
#: is excused: only this exact line, and only on 3.0.
AIRFLOW_3_0_DEBUG_LEAK = re.compile(
    r"^.*\[debug\s*\] Sending request\s+msg=MaskSecret\(value='[^']*', name=None, type='MaskSecret'\)$",
    re.MULTILINE,
)


def without_airflow_3_0_leak(text: str) -> str:
    if not airflow_version.startswith("3.0."):
        return text
    return AIRFLOW_3_0_DEBUG_LEAK.sub("", text)


def text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    try:
        return json.dumps(value, default=repr)
    except (TypeError, ValueError):
        return repr(value)


def assert_no_key(value: Any, where: str) -> None:
    text = text_of(value)
    for marker in secret_markers():
        if marker in text:
            at = text.index(marker)
            raise AssertionError(
                f"The API key (or a token standing for it) leaked into {where}: ...{text[max(0, at - 200) : at + 60]!r}..."
            )


def assert_no_key_in_files(root: Path) -> None:
    """Fail if the key is in the name or the content of any file under ``root`` (a download's destination)."""
    for path in root.rglob("*"):
        assert_no_key(str(path), "a file name")
        if path.is_file():
            assert_no_key(path.read_bytes(), f"the file {path}")


def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and every exception reachable through ``__cause__`` and ``__context__``."""
    chain: list[BaseException] = []
    todo = [error]
    while todo:
        current = todo.pop()
        if current is None or any(current is seen for seen in chain):
            continue
        chain.append(current)
        todo += [current.__cause__, current.__context__]
    return chain


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.lines.append(repr({k: v for k, v in vars(record).items() if k not in ("msg", "args")}))


class Guard:
    """What one test may leak, checked when it ends; see the module docstring."""

    def __init__(self, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
        self._capfd = capfd
        self._captured: list[str] = []
        self._marks = (0, 0)
        #: Emulators a test starts itself; those of its fixtures are found without this.
        self.emulators: list[BatchAPIEmulator] = []
        #: Set by a test that runs Airflow machinery keeping Unix-domain socket pairs (``dag.test()``).
        self.unix_sockets_allowed = False
        self.recorder = _Recorder()
        # Every logger: the root at DEBUG, plus any that does not propagate to it (Airflow configures some).
        caplog.set_level(logging.DEBUG)
        for name in ("httpx", "httpcore", "airflow_provider_openai_batch"):
            caplog.set_level(logging.DEBUG, logger=name)
        self._loggers = [logging.getLogger()] + [
            logger
            for logger in logging.root.manager.loggerDict.values()
            if isinstance(logger, logging.Logger) and not logger.propagate
        ]
        for logger in self._loggers:
            logger.addHandler(self.recorder)
        self.baseline = socket_inodes()
        self.baseline_threads = emulator_threads()

    def output(self) -> str:
        """Everything logged so far: stdlib log records of every logger, and stdout/stderr, less the one line
        Airflow 3.0 itself leaks (see :data:`AIRFLOW_3_0_DEBUG_LEAK`)."""
        out, err = self._capfd.readouterr()
        self._captured += [out, err]
        return without_airflow_3_0_leak("\n".join([*self.recorder.lines, *self._captured]))

    def new_output(self) -> str:
        """What was logged since the previous call (or since the test started)."""
        self.output()
        lines, captured = self._marks
        self._marks = (len(self.recorder.lines), len(self._captured))
        return "\n".join([*self.recorder.lines[lines:], *self._captured[captured:]])

    def forget_output(self) -> None:
        """Drop what was logged so far (for the tests that log the key on purpose, to test the guard)."""
        self.output()
        self.recorder.lines.clear()
        self._captured.clear()
        self._marks = (0, 0)

    def check(self, value: Any, where: str) -> Any:
        assert_no_key(value, where)
        return value

    def check_exception(self, error: BaseException) -> BaseException:
        for link in exception_chain(error):
            name = type(link).__name__
            assert_no_key(str(link), f"str() of a raised {name}")
            assert_no_key(repr(link), f"repr() of a raised {name}")
            assert_no_key(
                repr(vars(link)) if hasattr(link, "__dict__") else "", f"attributes of a raised {name}"
            )
        return error

    @contextmanager
    def raises(
        self, expected: type[BaseException] | tuple[type[BaseException], ...], match: str | None = None
    ):
        with pytest.raises(expected, match=match) as caught:
            yield caught
        self.check_exception(caught.value)

    def finish(self, emulators: list[BatchAPIEmulator]) -> None:
        logged = self.output()
        for logger in self._loggers:
            logger.removeHandler(self.recorder)
        for emulator in emulators:
            if not getattr(emulator, "shared", False):  # a module's emulator serves on, in the baseline
                emulator.stop()  # idempotent; closes the server side of every connection
            for request in emulator.requests:
                where = f"request {request.method} {request.path}"
                assert_no_key(request.body, f"the body of {where}")
                assert_no_key(request.query, f"the query string of {where}")
                assert_no_key(request.path, f"the path of {where}")
        assert_no_key(logged + self.output(), "the logs or stdout/stderr")

        assert_no_new_sockets(self.baseline, unix_allowed=self.unix_sockets_allowed)
        # A connection's thread on the emulator's side ends when the client closes the connection.
        deadline = time.monotonic() + 2.0
        while (alive := emulator_threads() - self.baseline_threads) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive, f"emulator threads started during the test still alive: {alive}"


@pytest.fixture(autouse=True)
def guard(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> Iterator[Guard]:
    """Set up before any other fixture of the test (it is autouse), so it is torn down after all of them."""
    checks = Guard(caplog, capfd)
    yield checks
    emulators = [value for value in request.node.funcargs.values() if isinstance(value, BatchAPIEmulator)]
    try:
        checks.finish(emulators + checks.emulators)
    finally:
        EXTRA_SECRETS.clear()


def fast_policy(max_retries: int = 3) -> RetryPolicy:
    """The real policy's shape (honours hints up to a cap, then backs off), in milliseconds."""
    return RetryPolicy(
        max_retries=max_retries,
        initial_delay=0.005,
        max_delay=0.02,
        max_retry_after=1.0,
        rate_limit_patience=0.5,
    )


@pytest.fixture(scope="module")
def shared_emulator() -> Iterator[BatchAPIEmulator]:
    """One emulator for a whole module: starting and stopping one per test would cost more than the tests."""
    with BatchAPIEmulator(api_key=FAKE_API_KEY, cancel_after_polls=2) as server:
        server.shared = True  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def emulator(shared_emulator: BatchAPIEmulator) -> Iterator[BatchAPIEmulator]:
    """Overrides conftest's: the module's emulator, with no faults queued and no requests recorded.

    Tests whose faults keep a server thread busy after the test (``delay``) use ``private_emulator``.
    """
    shared_emulator.clear_faults()
    shared_emulator.clear_requests()
    yield shared_emulator
    shared_emulator.clear_faults()


@pytest.fixture
def private_emulator() -> Iterator[BatchAPIEmulator]:
    """An emulator of the test's own, stopped (which cuts its ``delay`` faults short) when the test ends."""
    with BatchAPIEmulator(api_key=FAKE_API_KEY, cancel_after_polls=2) as server:
        yield server


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hooks built from a connection (by operators, triggers, callbacks) back off in ms instead of seconds.

    ``max_retries`` still comes from the connection, and server hints above 1 s are ignored (the cap).
    """
    monkeypatch.setattr(hook_module, "RetryPolicy", fast_policy)


def run_async(awaitable: Awaitable[T], timeout: float = ASYNC_TIMEOUT) -> T:
    """Run ``awaitable`` on a fresh event loop, as the triggerer would, and check it left nothing behind.

    Fails if it runs longer than ``timeout`` (it hung), if any other task is still pending when it returns, or
    if a shared HTTP client of that loop is still open.
    """
    leftovers: list[asyncio.Task] = []
    open_clients: list[Any] = []

    async def main() -> tuple[Any, BaseException | None]:
        try:
            result, error = await asyncio.wait_for(awaitable, timeout), None
        except TimeoutError as hung:
            raise AssertionError(f"still running after {timeout} s: it hangs") from hung
        except Exception as raised:  # noqa: BLE001 - re-raised below, after the leak checks
            result, error = None, raised
        for _ in range(3):
            await asyncio.sleep(0)  # let callbacks already scheduled run
        leftovers.extend(task for task in asyncio.all_tasks() if task is not asyncio.current_task())
        open_clients.extend(_async_clients._clients.get(asyncio.get_running_loop(), {}).values())
        return result, error

    result, error = asyncio.run(main())
    assert not leftovers, f"asyncio tasks still pending: {leftovers}"
    assert not open_clients, f"shared HTTP clients still open: {open_clients}"
    if error is not None:
        raise error
    return result


class TaskContext(dict):
    """A task context whose ``ti`` is a MagicMock that really stores XComs (``ti.xcom_pull`` reads them back)."""

    def __init__(self, task_id: str = "cancel") -> None:
        self.xcoms: dict[str, Any] = {}
        ti = mock.MagicMock(name="ti", task_id=task_id, map_index=-1)
        ti.xcom_push.side_effect = lambda key, value, **_: self.xcoms.__setitem__(key, value)
        ti.xcom_pull.side_effect = lambda task_ids=None, key="return_value", **_: self.xcoms.get(key)
        super().__init__(ti=ti)


def stored_by_airflow(trigger: Any) -> Any:
    """The ``Trigger`` row Airflow stores for a deferred trigger: its ``serialize()`` output, the kwargs
    serialized (and encrypted where a Fernet key is set) as the metadata DB holds them."""
    from airflow.models.trigger import Trigger

    return Trigger.from_object(trigger)


def built_by_the_triggerer(row: Any) -> Any:
    """The trigger a triggerer runs for a stored row, at start-up or after a restart."""
    return import_string(row.classpath)(**row.kwargs)


def rebuild(trigger: Any, guard: Guard) -> Any:
    """Store ``trigger`` as Airflow does and build the triggerer's instance from that; what is stored is checked
    for the key."""
    guard.check(list(trigger.serialize()), "the trigger's serialize() output")
    return built_by_the_triggerer(stored_by_airflow(trigger))


async def first_event(trigger: Any) -> dict[str, Any]:
    """Run a trigger to its end as the triggerer does; it must fire exactly one event."""
    events = [event async for event in trigger.run()]
    assert len(events) == 1, events
    return events[0].payload


def run_trigger(trigger: Any, guard: Guard, timeout: float = ASYNC_TIMEOUT) -> dict[str, Any]:
    payload = run_async(first_event(rebuild(trigger, guard)), timeout)
    guard.check(payload, "the trigger event")
    return payload


def run_operator(operator: Any, context: TaskContext, guard: Guard, *, deferred: list | None = None) -> Any:
    """``execute``; if it defers, run its trigger (rebuilt from ``serialize()``), then the resume method.

    Deferrals are appended to ``deferred`` when given. Everything the task returns or pushes is checked for
    the key, and so is any exception it raises.
    """
    try:
        try:
            result = operator.execute(context)
        except TaskDeferred as deferral:
            if deferred is not None:
                deferred.append(deferral)
            payload = run_trigger(deferral.trigger, guard)
            resume = getattr(operator, deferral.method_name)
            result = resume(context, payload, **(deferral.kwargs or {}))
    except BaseException as error:
        guard.check_exception(error)
        raise
    finally:
        guard.check(context.xcoms, "the task's XComs")
    return guard.check(result, "the task's return value")


@dataclass
class Outcome:
    """What a component reported: a status, or the exception it raised; ``event`` for triggers."""

    status: str | None = None
    error: BaseException | None = None
    event: dict[str, Any] | None = None
    others: list[dict[str, Any]] = field(default_factory=list)  #: the multi-trigger's other batches' events
    deferrals: list[Any] = field(default_factory=list)  #: ``TaskDeferred`` raised by an operator

    def ok(self) -> str | None:
        if self.error is not None:
            raise AssertionError(f"expected success, got {self.error!r}") from self.error
        return self.status


def capture(call: Callable[[], T], guard: Guard) -> tuple[T | None, BaseException | None]:
    try:
        return call(), None
    except Exception as error:  # noqa: BLE001 - returned for the test to assert on
        guard.check_exception(error)
        return None, error
