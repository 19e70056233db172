"""Every Python snippet in the README runs as a user runs it, against the emulator over loopback HTTP.

A DAG snippet is a file in the DAGs folder, run with ``dag.test()``; an operator snippet goes in a DAG file, in
its ``with DAG(...)`` block, as it would in a user's; the hook snippet runs as a script, and a test module as
pytest runs it. What a snippet leaves to its user is prepared here, and only that: the batch it names, created at
the emulator; the connection (or the ``openai`` client's environment); the user's tasks it refers to without
showing them (the ``submit`` it pulls a batch id from); and, where its ``...`` stands for the user's own work,
that work failing, since a failure is what the snippet handles. The snippet's own code is run unchanged.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import json
import os
import re
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from airflow import __version__ as airflow_version
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_registry

from airflow_provider_openai_batch import cancellation
from airflow_provider_openai_batch.testing import DEFAULT_API_KEY, BatchAPIEmulator
from tests.conftest import DAGS_FOLDER, FAKE_API_KEY
from tests.test_e2e import metadata_db, run_dag  # noqa: F401 - metadata_db: the migrated DB dag.test() needs

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def snippet(marker: str) -> str:
    """The one README snippet that contains ``marker``."""
    [found] = [text for text in SNIPPETS if marker in text]
    return found


def bound_names(tree: ast.AST) -> set[str]:
    """Every name the snippet binds anywhere: imports, assignments, definitions, arguments, loop targets."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


@pytest.mark.parametrize("text", SNIPPETS, ids=[f"snippet-{index}" for index in range(len(SNIPPETS))])
def test_each_snippet_compiles_and_defines_what_it_uses(text: str) -> None:
    tree = ast.parse(text)
    compile(tree, "README.md", "exec")
    defined = bound_names(tree) | set(dir(builtins))
    used = {
        node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }
    assert used <= defined, f"undefined in the snippet: {sorted(used - defined)}\n{text}"


# ---------------------------------------------------------------------------------------------------------------
# What each snippet is recognised by; every snippet must be run by exactly one test below.

FIRST_DAG = "def cancel_on_failure():"
SAVE_RESULTS = 'save_results_to="s3://my-bucket/openai-batches"'
FAILURE_CALLBACKS = 'cancel_batch_on_failure(xcom_task_id="submit")'
OFFICIAL_PROVIDER = "from airflow.providers.openai.hooks.openai import OpenAIHook"
OPENAI_SDK = "from openai import OpenAI"
RUN_CALLBACK = 'dag_id="nightly_eval"'
RUN_TASK = 'task_id="cancel_this_runs_batches"'
CLEANUP = 'task_id="cancel_stale_batches"'
HOOK = 'with OpenAIBatchHook("openai_default") as hook:'
EMULATOR = "def test_my_dag_cancels_its_batch("
RUN = (
    FIRST_DAG,
    SAVE_RESULTS,
    FAILURE_CALLBACKS,
    OFFICIAL_PROVIDER,
    OPENAI_SDK,
    RUN_CALLBACK,
    RUN_TASK,
    CLEANUP,
    HOOK,
    EMULATOR,
)


def test_every_snippet_is_run_by_a_test() -> None:
    """A snippet added to the README without a test here, or one whose marker was edited away, fails."""
    found = [[marker for marker in RUN if marker in text] for text in SNIPPETS]
    assert all(len(markers) == 1 for markers in found), list(zip(found, SNIPPETS, strict=True))
    assert sorted(marker for [marker] in found) == sorted(RUN)


# ---------------------------------------------------------------------------------------------------------------
# Preparing what a snippet leaves to its user


@pytest.fixture
def api(emulator_connection: BatchAPIEmulator) -> BatchAPIEmulator:
    """The emulator, with ``openai_default`` pointing at it: the connection every snippet uses."""
    return emulator_connection


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The snippets poll every 30 s, as they should in production; here each wait between polls is a
    hundredth of that. What is waited for, and how many polls it takes, are unchanged."""
    window = cancellation.CancellationWatch.poll_window
    monkeypatch.setattr(
        cancellation.CancellationWatch,
        "poll_window",
        lambda self, poll_interval: window(self, poll_interval / 100),
    )


class MemoryS3(MemoryFileSystem):
    """``s3://`` in memory: what apache-airflow-providers-amazon gives a user's workers, without AWS."""

    protocol = ("s3",)
    root_marker = ""
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        """``s3://bucket/key`` is ``bucket/key``, as s3fs has it (Airflow 3.0 may repeat the scheme)."""
        while path.startswith("s3://"):
            path = path.removeprefix("s3://")
        return path.rstrip("/")


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[MemoryS3]]:
    """Register ``s3://`` with fsspec and with Airflow's object storage, as the Amazon provider does."""
    from airflow.sdk.io import attach, store

    monkeypatch.setitem(fsspec_registry, "s3", MemoryS3)
    MemoryS3.store.clear()
    attach("s3", fs=MemoryS3())
    yield MemoryS3
    store._STORE_CACHE.pop("s3", None)


def s3_object(url: str) -> bytes:
    return MemoryS3.store[MemoryS3._strip_protocol(url)].getvalue()


@pytest.fixture
def dag_file(metadata_db: None, fast_polls: None) -> Iterator[Callable[[str, str], Any]]:  # noqa: F811
    """Write a DAG file into the DAGs folder (dag.test() runs only the DAGs found there) and load it."""
    written: list[Path] = []

    def write(name: str, source: str) -> Any:
        from tests._compat import DagBag

        path = DAGS_FOLDER / f"readme_{name}.py"
        path.write_text(source)
        written.append(path)
        bag = DagBag(dag_folder=str(path))
        assert bag.import_errors == {}
        assert len(bag.dags) == 1, sorted(bag.dags)
        return bag

    yield write
    for path in written:
        path.unlink()


def in_a_dag(dag_id: str, text: str) -> str:
    """A DAG file with the snippet inside its ``with DAG(...)`` block, where a user puts an operator."""
    return (
        "import pendulum\nfrom airflow.sdk import DAG\n\n"
        f'with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2025, 1, 1, tz="UTC")):\n'
        + textwrap.indent(text, "    ")
    )


def only_dag(bag: Any) -> Any:
    [dag] = bag.dags.values()
    return dag


def the_users_work_fails(dag: Any, task_id: str) -> None:
    """Where the snippet's ``...`` stands for the user's own work, that work fails: what the snippet is for."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{task_id} failed")

    dag.task_dict[task_id].python_callable = fail


def with_unshown_tasks(text: str, chain: str, submit: str) -> str:
    """The snippet's DAG file, then the user's tasks that it refers to without showing them, chained with its own
    (``dag.task_dict[...]``). They are in the file, since Airflow 3.1+ runs the tasks of the DAG it parsed."""
    return f"""{text}

# Not in the README: the user's tasks that the snippet refers to without showing them.
import sys

from airflow.sdk import chain, get_current_context, task
from airflow.sdk.definitions._internal.contextmanager import DagContext

[dag] = [dag for dag, module in DagContext.autoregistered_dags if module is sys.modules[__name__]]


@task
def submit() -> str:
    {submit}


@task
def evaluate() -> None:
    raise RuntimeError("evaluate failed")  # the user's work, failing


with dag:
    chain({chain})
"""


def returning(batch_id: str) -> str:
    """A submit body returning the id of a batch the test created."""
    return f"return {batch_id!r}"


def tagged_submit(file_id: str) -> str:
    """A submit body creating a batch tagged with its run, with the openai client, as the run-tag snippets show."""
    return f"""from openai import OpenAI

    from airflow_provider_openai_batch.callbacks import run_batch_metadata

    return OpenAI().batches.create(
        input_file_id={file_id!r},
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=run_batch_metadata(get_current_context()),
    ).id"""


def run(bag: Any) -> tuple[str, dict[str, str], dict[tuple[str, str], Any]]:
    """dag.test() the file's DAG: the run's state, its task states and its XComs."""
    return run_dag(bag, only_dag(bag).dag_id, {})


# ---------------------------------------------------------------------------------------------------------------
# The snippets, run


def test_the_first_dag_cancels_and_hands_the_output_file_downstream(
    api: BatchAPIEmulator, dag_file: Callable[[str, str], Any], capfd: pytest.CaptureFixture[str]
) -> None:
    """It once ran `consume` before `submit`, with the template's "None": `consume` must follow the cancel."""
    api.add_batch("batch_abc123")  # the id its submit task returns
    bag = dag_file("first_dag", snippet(FIRST_DAG))
    the_users_work_fails(only_dag(bag), "build_features")

    _, states, xcoms = run(bag)

    batch = api.batch("batch_abc123")
    assert states == {
        "submit": "success",
        "build_features": "failed",
        "cancel_batch": "success",
        "consume": "success",
    }
    assert batch["status"] == "cancelled" and batch["output_file_id"]
    assert xcoms[("cancel_batch", "output_file_id")] == batch["output_file_id"]
    # The output file id exists only once the batch is cancelled: consume ran after the wait, with it.
    assert f"partial results in {batch['output_file_id']}\n" in capfd.readouterr().out


def test_save_results_to_saves_the_cancelled_batchs_files(
    api: BatchAPIEmulator, dag_file: Callable[[str, str], Any], s3: type[MemoryS3]
) -> None:
    batch_id = api.add_batch()["id"]
    text = in_a_dag("readme_save_results_to", snippet(SAVE_RESULTS))
    bag = dag_file(
        "save_results_to",
        with_unshown_tasks(text, 'submit(), dag.task_dict["cancel_batch"]', returning(batch_id)),
    )

    state, states, xcoms = run(bag)

    batch = api.batch(batch_id)
    assert state == "success", states
    assert batch["status"] == "cancelled"
    folder = f"s3://my-bucket/openai-batches/{batch_id}"
    assert s3_object(f"{folder}/output.jsonl") == api.file_content(batch["output_file_id"])
    assert s3_object(f"{folder}/errors.jsonl") == api.file_content(batch["error_file_id"])
    ran = batch["request_counts"]["completed"] + batch["request_counts"]["failed"]
    remaining = s3_object(f"{folder}/remaining.jsonl").splitlines()
    assert len(remaining) == batch["request_counts"]["total"] - ran
    assert xcoms[("cancel_batch", "results")]["remaining"]["lines"] == len(remaining)


def test_the_failure_callbacks_cancel_the_batch_of_submit(
    api: BatchAPIEmulator, dag_file: Callable[[str, str], Any]
) -> None:
    batch_id = api.add_batch()["id"]
    text = with_unshown_tasks(
        snippet(FAILURE_CALLBACKS), 'submit(), dag.task_dict["process"]', returning(batch_id)
    )
    bag = dag_file("failure_callbacks", text)
    the_users_work_fails(only_dag(bag), "process")

    state, states, _ = run(bag)

    assert state == "failed"
    assert states["process"] == "failed"
    assert api.batch(batch_id)["status"] == "cancelling"  # the callbacks cancel without waiting
    assert api.cancel_count(batch_id) >= 1


@pytest.fixture
def input_file(api: BatchAPIEmulator) -> str:
    """The batch input file the submit snippets take (uploaded earlier in a user's DAG)."""
    lines = [
        {
            "custom_id": f"request-{index}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Question {index}"}]},
        }
        for index in range(3)
    ]
    return api.add_file("".join(json.dumps(line) + "\n" for line in lines))["id"]


def calling_submit(dag_id: str, text: str, file_id: str) -> str:
    """A DAG file with the snippet, and a DAG that calls its ``submit`` task."""
    return (
        f"{text}\n\nimport pendulum\nfrom airflow.sdk import DAG\n\n"
        f'with DAG("{dag_id}", schedule=None, start_date=pendulum.datetime(2025, 1, 1, tz="UTC")):\n'
        f'    submit("{file_id}")\n'
    )


def test_the_official_providers_hook_creates_a_batch_tagged_with_its_run(
    api: BatchAPIEmulator, dag_file: Callable[[str, str], Any], input_file: str
) -> None:
    bag = dag_file(
        "official_provider", calling_submit("readme_official", snippet(OFFICIAL_PROVIDER), input_file)
    )

    state, states, xcoms = run(bag)

    assert state == "success", states
    batch = api.batch(xcoms[("submit", "return_value")])
    assert batch["input_file_id"] == input_file
    assert batch["metadata"] == {
        "airflow_dag_id": "readme_official",
        "airflow_run_id": batch["metadata"]["airflow_run_id"],
        "airflow_task_id": "submit",
        "team": "search",
    }
    assert batch["metadata"]["airflow_run_id"].startswith("manual__")


@pytest.fixture
def openai_env(api: BatchAPIEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """How ``OpenAI()`` finds its key and base URL."""
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_API_KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", api.base_url)


def test_the_openai_client_creates_a_batch_tagged_with_its_run(
    api: BatchAPIEmulator, dag_file: Callable[[str, str], Any], input_file: str, openai_env: None
) -> None:
    bag = dag_file("openai_sdk", calling_submit("readme_openai_sdk", snippet(OPENAI_SDK), input_file))

    state, states, xcoms = run(bag)

    assert state == "success", states
    batch = api.batch(xcoms[("submit", "return_value")])
    assert (batch["input_file_id"], batch["completion_window"]) == (input_file, "24h")
    assert batch["metadata"].keys() == {"airflow_dag_id", "airflow_run_id", "airflow_task_id"}
    assert batch["metadata"]["airflow_dag_id"] == "readme_openai_sdk"


def without_the_deadline(text: str) -> str:
    """The run-callback snippet as its comments tell an Airflow 3.0 user to write it: the deadline left out."""
    import_line = re.compile(r"^from airflow\.sdk\.definitions\.deadline import .*\n", re.MULTILINE)
    deadline_argument = re.compile(r"^    deadline=DeadlineAlert\(.*?^    \),\n", re.MULTILINE | re.DOTALL)
    trimmed = deadline_argument.sub("", import_line.sub("", text))
    assert "Deadline" not in trimmed, trimmed
    return trimmed


def test_the_run_callback_cancels_the_failed_runs_batches(
    api: BatchAPIEmulator, dag_file: Callable[[str, str], Any], input_file: str, openai_env: None
) -> None:
    """The same snippet on every line: on Airflow 3.0, which has no deadline alerts, as it says to trim it."""
    other_run = api.add_batch(metadata={"airflow_dag_id": "nightly_eval", "airflow_run_id": "scheduled__x"})[
        "id"
    ]
    text = snippet(RUN_CALLBACK)
    if airflow_version.startswith("3.0."):
        text = without_the_deadline(text)
    text = with_unshown_tasks(text, "submit(), evaluate()", tagged_submit(input_file))
    bag = dag_file("run_callback", text)  # the tasks its "..." stands for

    state, states, xcoms = run(bag)

    assert (state, states) == ("failed", {"submit": "success", "evaluate": "failed"})
    ours = xcoms[("submit", "return_value")]
    assert api.batch(ours)["status"] == "cancelling"  # the callback cancels without waiting
    assert api.batch(other_run)["status"] == "in_progress"


def test_the_cleanup_task_cancels_this_runs_batches(
    api: BatchAPIEmulator, dag_file: Callable[[str, str], Any], input_file: str, openai_env: None
) -> None:
    other_run = api.add_batch(
        metadata={"airflow_dag_id": "readme_run_task", "airflow_run_id": "scheduled__x"}
    )
    text = in_a_dag("readme_run_task", snippet(RUN_TASK))
    chain = 'submit(), evaluate(), dag.task_dict["cancel_this_runs_batches"]'
    bag = dag_file("run_task", with_unshown_tasks(text, chain, tagged_submit(input_file)))

    _, states, xcoms = run(bag)

    assert states == {"submit": "success", "evaluate": "failed", "cancel_this_runs_batches": "success"}
    ours = xcoms[("submit", "return_value")]
    assert api.batch(ours)["status"] == "cancelled"
    assert api.batch(other_run["id"])["status"] == "in_progress"
    assert xcoms[("cancel_this_runs_batches", "return_value")]["selected"] == [ours]


def test_the_scheduled_cleanup_cancels_the_stale_batches(
    api: BatchAPIEmulator, dag_file: Callable[[str, str], Any]
) -> None:
    two_days_ago = int(time.time()) - 2 * 86400
    stale = api.add_batch(metadata={"team": "search"}, created_at=two_days_ago)["id"]
    fresh = api.add_batch(metadata={"team": "search"})["id"]
    other_team = api.add_batch(metadata={"team": "ads"}, created_at=two_days_ago)["id"]
    bag = dag_file("cleanup", in_a_dag("readme_cleanup", snippet(CLEANUP)))

    state, states, xcoms = run(bag)

    assert state == "success", states
    assert api.batch(stale)["status"] == "cancelled"
    assert api.batch(fresh)["status"] == api.batch(other_team)["status"] == "in_progress"
    assert xcoms[("cancel_stale_batches", "return_value")]["selected"] == [stale]


def test_the_hook_snippet_waits_for_cancelled_then_reads_the_output_file(
    api: BatchAPIEmulator, s3: type[MemoryS3], monkeypatch: pytest.MonkeyPatch
) -> None:
    """It once read the files of the batch `cancel_batch` returned, still `cancelling`: with no file yet."""
    api.add_batch("batch_abc123")
    sleeps: list[float] = []  # the 30 s waits between polls, recorded instead of slept
    monkeypatch.setattr(time, "sleep", sleeps.append)

    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(snippet(HOOK), "README.md", "exec"), namespace)  # noqa: S102 - run as a script runs

    batch = api.batch("batch_abc123")
    assert batch["status"] == "cancelled"
    assert sleeps == [30, 30]  # the emulator holds a cancel in "cancelling" for two polls
    assert namespace["batch"].status == "cancelled"
    assert s3_object("s3://my-bucket/openai-batches/out.jsonl") == api.file_content(batch["output_file_id"])

    async def no_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    api.set_status("batch_abc123", "cancelling")  # the async twin waits for a batch being cancelled
    assert asyncio.run(namespace["in_a_trigger"]()) == api.batch("batch_abc123")["output_file_id"]
    assert api.batch("batch_abc123")["status"] == "cancelled"
    assert sleeps == [30, 30, 30]


def test_the_emulator_snippet_points_the_connection_at_the_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(snippet(EMULATOR), "README.md", "exec"), namespace)  # noqa: S102 - a test module, imported

    namespace["test_my_dag_cancels_its_batch"](monkeypatch)  # as pytest calls it

    connection = json.loads(os.environ["AIRFLOW_CONN_OPENAI_DEFAULT"])
    assert connection["password"] == DEFAULT_API_KEY
    assert connection["host"].startswith("http://127.0.0.1:")
