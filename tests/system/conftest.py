"""Fixtures of the system tests: the Batch API emulator and a real Airflow 3 deployment, once per session.

See ``deployment.py`` for what runs. When a test fails (or the deployment fails to start), the tails of every
Airflow process's log, the task logs written during the test and a tally of the emulator's requests are
attached to the test's report.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator

import pytest

from tests.system.deployment import Deployment
from tests.system.distributed import DistributedDeployment

try:
    from airflow_provider_openai_batch.testing import BatchAPIEmulator
except ImportError:  # the package's re-export may not be there
    from airflow_provider_openai_batch.testing.emulator import BatchAPIEmulator

#: The deployment running, as soon as processes may exist, for the report hook.
_DEPLOYMENT: Deployment | None = None
#: The session's single-machine deployment, once started.
_LOCAL: Deployment | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "system: runs against the real Airflow deployment of tests/system")


@pytest.fixture(scope="session")
def api_key() -> str:
    """Recognisable fake key: the leak checks look for it in the metadata DB and in every log."""
    return "sk-system-SECRET-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def system_emulator(api_key: str) -> Iterator[BatchAPIEmulator]:
    """The Batch API, in this process, reached by every Airflow process over loopback.

    Batches created over HTTP (by ``system_cancel_on_deadline``, from its input file ``file-system-test``) are
    held in ``validating``: that DAG waits for a deadline to cancel a batch still running.
    """
    with BatchAPIEmulator(api_key=api_key, cancel_after_polls=2, step_after_polls=10**9) as emulator:
        request = {"custom_id": "q-1", "method": "POST", "url": "/v1/chat/completions", "body": {}}
        emulator.add_file(json.dumps(request) + "\n", "file-system-test")
        yield emulator


@pytest.fixture(scope="session")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, system_emulator: BatchAPIEmulator, api_key: str
) -> Iterator[Deployment]:
    global _DEPLOYMENT, _LOCAL
    _DEPLOYMENT = _LOCAL = Deployment(tmp_path_factory.mktemp("airflow-home"), system_emulator, api_key)
    try:
        started = time.monotonic()
        _LOCAL.start()
        print(f"\nAirflow deployment ready in {time.monotonic() - started:.0f}s in {_LOCAL.home}")
        yield _LOCAL
    finally:
        _LOCAL.stop()


@pytest.fixture(scope="module")
def distributed_deployment(
    tmp_path_factory: pytest.TempPathFactory, system_emulator: BatchAPIEmulator, api_key: str
) -> Iterator[DistributedDeployment]:
    """The distributed deployment (distributed.py), for its own module, which runs last (test_distributed.py).

    The single-machine deployment is stopped first, if it ran: two deployments would share two CPUs.
    """
    global _DEPLOYMENT
    if _LOCAL is not None:
        _LOCAL.stop()
    _DEPLOYMENT = DistributedDeployment(
        tmp_path_factory.mktemp("airflow-home-distributed"), system_emulator, api_key
    )
    try:
        started = time.monotonic()
        _DEPLOYMENT.start()
        print(
            f"\nDistributed Airflow deployment ready in {time.monotonic() - started:.0f}s in {_DEPLOYMENT.home}"
        )
        yield _DEPLOYMENT
    finally:
        _DEPLOYMENT.stop()


@pytest.fixture
def emulator(deployment: Deployment) -> Iterator[BatchAPIEmulator]:
    """The deployment's emulator, its injected faults cleared after each test."""
    yield deployment.emulator
    deployment.emulator.clear_faults()


@pytest.fixture(autouse=True)
def _test_started_at(request: pytest.FixtureRequest) -> None:
    request.node.stash[_STARTED_AT] = time.time()


_STARTED_AT = pytest.StashKey[float]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure of a test, or of starting the deployment, attach the deployment's logs to the report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed and report.when in ("setup", "call") and _DEPLOYMENT is not None:
        since = item.stash.get(_STARTED_AT, _DEPLOYMENT.started_at)
        try:
            report.sections.extend(_DEPLOYMENT.failure_report(since))
        except Exception as error:  # noqa: BLE001 - never hide the real failure behind a reporting one
            report.sections.append(("deployment logs", f"could not collect them: {error!r}"))
