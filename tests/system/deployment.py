"""A real local Airflow 3 deployment for the system tests: processes, REST API, metadata DB and logs.

``airflow api-server``, ``scheduler`` (LocalExecutor), ``dag-processor`` and ``triggerer`` run as separate
processes from this project's venv, on loopback, against a SQLite metadata DB in a temporary AIRFLOW_HOME, the
DAGs in ``tests/system/dags`` and the Batch API emulator (running in the pytest process) as the
``openai_default`` connection. Each process has its own log file and its own process group, and is stopped by
its PID (group) at the end, also on failure or interruption.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import httpx

import airflow_provider_openai_batch

if TYPE_CHECKING:
    from airflow_provider_openai_batch.testing.emulator import BatchAPIEmulator

HERE = Path(__file__).resolve().parent
DAGS_FOLDER = HERE / "dags"
#: On every Airflow process's PYTHONPATH: test-only triggers the triggerer must be able to import.
SUPPORT_FOLDER = HERE / "support"
#: Also on it, before the venv's packages: where the provider these tests import lives, so that every Airflow
#: process runs the code under test, be it this clone's editable install or a checkout put on PYTHONPATH.
PROVIDER_ROOT = Path(airflow_provider_openai_batch.__file__).resolve().parents[1]
#: The deployment's ``airflow_local_settings``: the recipe the docs recommend for triggerers, as published.
LOCAL_SETTINGS = HERE.parents[1] / "docs" / "recipes" / "airflow_local_settings.py"

#: The DAGs the dag-processor must have parsed before any test runs.
EXPECTED_DAGS = (
    "system_smoke_deferrable",
    "system_smoke_blocking_trigger",
    "system_openai_batch_cancel_on_upstream_failure",
    "system_openai_batch_cancel_one",
    "system_openai_batch_cancel_many",
    "system_openai_batch_cancel_on_deadline",
    "system_openai_batch_cancel_distributed",
)

#: What Airflow 3.3's triggerer logs when its event loop was blocked for longer than
#: ``[triggerer] blocked_main_thread_warning_threshold`` (airflow/jobs/triggerer_job_runner.py, block_watchdog;
#: the deployment keeps its default, 0.2 s).
BLOCKED_LOOP_MESSAGE = "Triggerer's async thread was blocked for"
_BLOCKED = re.compile(r"^(\S+) .*" + re.escape(BLOCKED_LOOP_MESSAGE) + r" ([0-9.]+) seconds")
_GC_PAUSE = re.compile(r"SYSTEM_TEST_GC_PAUSE end=([0-9.]+) seconds=([0-9.]+) forked=([01])")

# Bounds, in seconds. Generous: the machine may have 2 CPUs and other work on it.
MIGRATE_TIMEOUT = 300
READY_TIMEOUT = 240
STOP_TIMEOUT = 20
LOG_TAIL_LINES = 60
#: Everything but the triggerer runs at NICENESS, the triggerer at TRIGGERER_NICENESS (negative values need
#: root, as in CI; otherwise ``nice`` just warns and runs it at 0). So under CPU contention (2 CPUs, 16 worker
#: processes starting tasks) the triggerer's blocked-loop watchdog measures the triggers' code, not a starved
#: process.
NICENESS = 5
TRIGGERER_NICENESS = -5

T = TypeVar("T")

#: Errors of a metadata DB query that mean "not yet": SQLite may be busy; PostgreSQL (distributed.py) may not
#: have the database yet.
_DB_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error,)
with contextlib.suppress(ImportError):
    import psycopg2

    _DB_ERRORS = (sqlite3.Error, psycopg2.Error)


def wait_for(
    condition: Callable[[], T], *, timeout: float, interval: float = 0.5, what: str = "condition"
) -> T:
    """Poll ``condition`` until it returns something truthy and return that; ``TimeoutError`` after ``timeout``.

    HTTP errors, metadata DB errors (the DB may be busy) and OS errors count as "not yet".
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = condition()
        except (httpx.HTTPError, *_DB_ERRORS, OSError) as error:
            result, last_error = None, error
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"Timed out after {timeout:.0f}s waiting for {what}{detail}.")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def airflow_command(*args: str) -> list[str]:
    """``airflow ARGS`` from the venv running pytest (the project's own)."""
    script = Path(sys.executable).with_name("airflow")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "airflow", *args]


class ProcessDied(RuntimeError):
    """An Airflow process the deployment needs has exited."""


@dataclass(frozen=True)
class BlockedLoop:
    """One "blocked event loop" warning of a triggerer, and the full garbage collection that explains it, if any."""

    at: float  #: UNIX time of the warning (the loop's wake-up, within a few ms)
    seconds: float
    gc_pause: float = 0.0  #: seconds of full garbage collection within the blocked interval

    def __str__(self) -> str:
        return f"{self.seconds:.2f}s" + (
            f" ({self.gc_pause:.2f}s of it in a full GC)" if self.gc_pause else ""
        )


def trigger_loop_gc_pauses(triggerer_log: str) -> list[tuple[float, float]]:
    """``(start, end)`` UNIX times of the full GC pauses over 50 ms that the process running the triggers logged
    (support/sitecustomize.py); the triggerer's own pauses, in its parent process, do not stop the trigger loop."""
    return [
        (float(m[1]) - float(m[2]), float(m[1])) for m in _GC_PAUSE.finditer(triggerer_log) if m[3] == "1"
    ]


def blocked_loops(triggerer_log: str) -> list[BlockedLoop]:
    """The triggerer's blocked-loop warnings in a slice of its log, matched with the trigger loop's GC pauses."""
    pauses = trigger_loop_gc_pauses(triggerer_log)
    found = []
    for line in triggerer_log.splitlines():
        match = _BLOCKED.search(line)
        if not match:
            continue
        at = datetime.fromisoformat(match[1]).timestamp()
        seconds = float(match[2])
        start = at - seconds - 0.05  # slack: the warning is logged just after the wake-up
        in_gc = sum(max(0.0, min(end, at) - max(begin, start)) for begin, end in pauses)
        found.append(BlockedLoop(at, seconds, round(in_gc, 3)))
    return found


class ManagedProcess:
    """One long-running command in its own process group, logging to its own file, stopped by its PID (group).

    ``user`` (a UID) runs it as that user when the tests run as root (as in CI): PostgreSQL refuses to run as
    root. ``stop_signal`` is what asks it to shut down.
    """

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        log_path: Path,
        niceness: int = 0,
        *,
        user: int | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        self.name, self.command, self.env, self.log_path, self.niceness = (
            name,
            command,
            env,
            log_path,
            niceness,
        )
        self.user, self.stop_signal = user, stop_signal
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def start(self) -> ManagedProcess:
        command = self.command
        if self.niceness:
            command = ["nice", "-n", str(self.niceness), *command]
        with open(self.log_path, "ab") as log:
            log.write(f"===== {time.strftime('%H:%M:%S')} starting: {' '.join(command)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: its workers and subprocesses go with it
                **as_user(self.user),
            )
        _STARTED.add(self)
        return self

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def check_running(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise ProcessDied(f"{self.name} exited with code {self.popen.returncode}; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as a crash, an OOM kill or a lost node would."""
        self._signal_group(signal.SIGKILL)
        self._reap(STOP_TIMEOUT)
        _STARTED.discard(self)

    def stop(self) -> None:
        """Send the stop signal to the process group, wait, then SIGKILL whatever is left of it."""
        if self.popen is None:
            return
        self._signal_group(self.stop_signal)
        if not self._reap(STOP_TIMEOUT):
            self._signal_group(signal.SIGKILL)
            self._reap(STOP_TIMEOUT)
        self._signal_group(signal.SIGKILL)  # stragglers of the group, if the leader went first
        _STARTED.discard(self)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def _reap(self, timeout: float) -> bool:
        assert self.popen is not None
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the live processes of this process's group."""
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            if int(fields[2]) == self.pid:  # field 5 of /proc/PID/stat: the process group
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_text(self, start: int = 0) -> str:
        with open(self.log_path, "rb") as log:
            log.seek(start)
            return log.read().decode(errors="replace")


class AirflowProcess(ManagedProcess):
    """One long-running Airflow command (``airflow ARGS``) from the project's venv."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log_path: Path, niceness: int = 0
    ) -> None:
        super().__init__(f"airflow {name}", airflow_command(*args), env, log_path, niceness)


def as_user(uid: int | None) -> dict[str, Any]:
    """``subprocess`` arguments that run a command as ``uid`` (and its own group only) if we are root."""
    if uid is None or os.geteuid() != 0:
        return {}
    return {"user": uid, "group": pwd.getpwuid(uid).pw_gid, "extra_groups": []}


_STARTED: set[ManagedProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Should the session end without its finaliser (a hard timeout, say), still leave no process behind."""
    for process in list(_STARTED):
        with contextlib.suppress(Exception):
            os.killpg(process.pid, signal.SIGKILL)


class Deployment:
    """The running deployment: its processes, its REST API, its metadata DB and the emulator behind it."""

    def __init__(self, home: Path, emulator: BatchAPIEmulator, api_key: str) -> None:
        self.home = home
        self.emulator = emulator
        self.api_key = api_key
        self.db_path = home / "airflow.db"
        self.process_logs = home / "process-logs"
        self.process_logs.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.fernet_key = base64.urlsafe_b64encode(os.urandom(32)).decode()
        self.processes: dict[str, ManagedProcess] = {}
        self.triggerer_generation = 0
        self.started_at = time.time()
        #: The Kubernetes service account token of the workload identity connection: a secret, as the key is.
        self.subject_token = "k8s-subject-SECRET-" + secrets.token_hex(8)
        self.subject_token_file = home / "serviceaccount-token"
        self.subject_token_file.write_text(self.subject_token)
        self.env = self._environment()
        self.http = httpx.Client(base_url=self.api_url, timeout=60)

    def _environment(self) -> dict[str, str]:
        keep = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "HOME", "USER", "LOGNAME")
        env = {name: os.environ[name] for name in keep if name in os.environ}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",  # leave no __pycache__ in the source tree's DAG folder
                "PYTHONPATH": os.pathsep.join([str(SUPPORT_FOLDER), str(PROVIDER_ROOT)]),
                "NO_COLOR": "1",
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.home / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__PARALLELISM": "16",
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "256",
                "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "0",
                "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",  # the UI's Test button (test_connection_form.py)
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
                "AIRFLOW__CORE__AUTH_MANAGER": (
                    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
                ),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # the REST API without a login
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__BASE_URL": self.api_url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
                # The scheduler signs the workers' tokens and the API server checks them: one shared secret.
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
                "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                # Fast loops: a small test deployment.
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
                "AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY": "64",
                "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "5",
                # A worker notices its task process exited (after deferring, say) within this many seconds.
                # Airflow 3.3 races a trigger that fires before then against that exit (the scheduler then
                # fails the task: "finished with state success, but the task instance's state attribute is
                # queued"), so keep it well under the DAGs' poll intervals.
                "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
                # A killed triggerer's triggers go to another one once its last heartbeat is this old.
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "5",
                "AIRFLOW__TRIGGERER__MAX_TRIGGER_TO_SELECT_PER_LOOP": "250",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",  # the DAG files never change mid-run
                "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "600",
                # The OpenAI Batch API: the emulator in the pytest process.
                "AIRFLOW_CONN_OPENAI_DEFAULT": json.dumps(
                    {"conn_type": "openai_batch", "password": self.api_key, "host": self.emulator.base_url}
                ),
                # The same API without a key: workload identity with a Kubernetes token file (scenario 9).
                "AIRFLOW_CONN_OPENAI_WORKLOAD_IDENTITY": json.dumps(
                    {
                        "conn_type": "openai_batch",
                        "host": self.emulator.base_url,
                        "extra": {
                            "auth_type": "workload_identity",
                            "identity_provider_id": "idp_system",
                            "service_account_id": "sa_system",
                            "workload_identity_provider": "kubernetes",
                            "token_file_path": str(self.subject_token_file),
                            "token_exchange_url": self.emulator.token_exchange_url,
                        },
                    }
                ),
                **self._backend_environment(),
            }
        )
        return env

    #: More of support/sitecustomize.py's instrumentation for the triggerers, by environment variable.
    triggerer_instrumentation: ClassVar[dict[str, str]] = {}

    def _backend_environment(self) -> dict[str, str]:
        """The metadata DB and the executor: here SQLite and the LocalExecutor."""
        return {
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.db_path}",
        }

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        (self.home / "plugins").mkdir(exist_ok=True)
        (self.home / "config").mkdir(exist_ok=True)
        shutil.copyfile(LOCAL_SETTINGS, self.home / "config" / "airflow_local_settings.py")
        self._start_backends()
        self._migrate()
        self._start(
            "api-server", ["api-server", "--port", str(self.api_port), "--host", "127.0.0.1"], NICENESS
        )
        wait_for(
            lambda: self._alive_and(lambda: self.http.get("/api/v2/monitor/health").status_code == 200),
            timeout=READY_TIMEOUT,
            what="the API server to answer",
        )
        # The execution API (what workers call) is built on its first request, which can take many
        # seconds on a small machine: do it now, not in the first task's time.
        wait_for(
            lambda: self._alive_and(lambda: self.http.get("/execution/health").status_code == 200),
            timeout=READY_TIMEOUT,
            what="the execution API to answer",
        )
        self._start("scheduler", ["scheduler"], NICENESS)
        self._start("dag-processor", ["dag-processor"], NICENESS)
        self._start_workers()
        wait_for(
            self._ready, timeout=READY_TIMEOUT, interval=1, what="all components healthy and DAGs parsed"
        )

    def _start_backends(self) -> None:
        """Start what Airflow needs before its first command: nothing for SQLite."""

    def _start_workers(self) -> None:
        """Start what runs the tasks and the triggers: the LocalExecutor is the scheduler's; one triggerer."""
        self.start_triggerer()

    def _migrate(self) -> None:
        log_path = self.process_logs / "db-migrate.log"
        with open(log_path, "wb") as log:
            result = subprocess.run(
                airflow_command("db", "migrate"),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=MIGRATE_TIMEOUT,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{tail(log_path.read_text(errors='replace'))}")

    def _start(self, name: str, args: list[str], niceness: int = 0) -> ManagedProcess:
        log_path = self.process_logs / f"{name}.log"
        process = AirflowProcess(name, args, self.env, log_path, niceness)
        self.processes[name] = process.start()
        return process

    def _alive_and(self, condition: Callable[[], T]) -> T:
        """Fail at once, rather than time out, if one of the processes died."""
        for process in self.processes.values():
            process.check_running()
        return condition()

    def _ready(self) -> bool:
        def check() -> bool:
            health = self.http.get("/api/v2/monitor/health").json()
            if any(
                health[part]["status"] != "healthy" for part in ("scheduler", "triggerer", "dag_processor")
            ):
                return False
            errors = self.http.get("/api/v2/importErrors").json()
            if errors["total_entries"]:
                raise AssertionError(f"DAG import errors: {json.dumps(errors['import_errors'], indent=2)}")
            dags = self.http.get("/api/v2/dags", params={"limit": 100}).json()["dags"]
            return set(EXPECTED_DAGS) <= {dag["dag_id"] for dag in dags}

        return self._alive_and(check)

    def stop(self) -> None:
        """Stop every process, the last started first."""
        self.http.close()
        for process in reversed(list(self.processes.values())):
            process.stop()

    # ------------------------------------------------------------------------------------ triggerer

    @property
    def triggerer(self) -> ManagedProcess:
        return self.processes["triggerer"]

    def start_triggerer(self, key: str = "triggerer") -> ManagedProcess:
        """Start a(nother) triggerer as ``processes[key]``, at high priority; each one logs to its own
        ``triggerer-<n>.log`` and serves its trigger logs on its own port."""
        self.triggerer_generation += 1
        name = f"triggerer-{self.triggerer_generation}"
        env = {
            **self.env,
            "SYSTEM_TEST_LOG_GC_PAUSES": "1",  # see support/sitecustomize.py
            **self.triggerer_instrumentation,
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        }
        process = AirflowProcess(
            key, ["triggerer"], env, self.process_logs / f"{name}.log", TRIGGERER_NICENESS
        )
        self.processes[key] = process.start()
        return process

    def latest_triggerer_job(self) -> sqlite3.Row | None:
        rows = self.query("SELECT * FROM job WHERE job_type = 'TriggererJob' ORDER BY id DESC LIMIT 1")
        return rows[0] if rows else None

    # ------------------------------------------------------------------------------------- REST API

    def trigger_dag(self, dag_id: str, conf: dict[str, Any] | None = None, run_id: str | None = None) -> str:
        body: dict[str, Any] = {"logical_date": None, "conf": conf or {}}
        if run_id is not None:
            body["dag_run_id"] = run_id
        response = self.http.post(f"/api/v2/dags/{dag_id}/dagRuns", json=body)
        assert response.status_code == 200, response.text
        return str(response.json()["dag_run_id"])

    def wait_for_dag_run(self, dag_id: str, run_id: str, *, timeout: float) -> str:
        """Wait for the run to finish and return its final state."""

        def finished() -> str | None:
            response = self._alive_and(lambda: self.http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"))
            response.raise_for_status()
            state = response.json()["state"]
            return state if state in ("success", "failed") else None

        return wait_for(finished, timeout=timeout, interval=1, what=f"DAG run {dag_id} / {run_id} to finish")

    def task_states(self, dag_id: str, run_id: str) -> dict[tuple[str, int], str | None]:
        """``{(task_id, map_index): state}`` for every task instance of the run."""
        found: dict[tuple[str, int], str | None] = {}
        total = None
        while total is None or len(found) < total:
            response = self.http.get(
                f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                params={"limit": 100, "offset": len(found)},
            )
            response.raise_for_status()
            page = response.json()
            total = page["total_entries"]
            if not page["task_instances"]:
                break
            found.update({(ti["task_id"], ti["map_index"]): ti["state"] for ti in page["task_instances"]})
        return found

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1
    ) -> Any:
        response = self.http.get(
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}",
            params={"map_index": map_index, "deserialize": True},
        )
        response.raise_for_status()
        return response.json()["value"]

    # ----------------------------------------------------------------------------------- metadata DB

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """A short read-only query on the metadata DB (in WAL mode, so it never blocks Airflow's writers)."""
        connection = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            connection.row_factory = sqlite3.Row
            return connection.execute(sql, params).fetchall()
        finally:
            connection.close()

    def ti_states(self, dag_id: str, run_id: str, task_id: str) -> dict[int, str | None]:
        rows = self.query(
            "SELECT map_index, state FROM task_instance WHERE dag_id = ? AND run_id = ? AND task_id = ?",
            (dag_id, run_id, task_id),
        )
        return {row["map_index"]: row["state"] for row in rows}

    def triggers_of(self, dag_id: str, run_id: str, task_id: str) -> list[sqlite3.Row]:
        """The ``trigger`` rows of the task's deferred instances, with their ``map_index``."""
        return self.query(
            "SELECT t.id, t.classpath, t.kwargs, t.triggerer_id, t.created_date, ti.map_index "
            "FROM task_instance AS ti JOIN trigger AS t ON t.id = ti.trigger_id "
            "WHERE ti.dag_id = ? AND ti.run_id = ? AND ti.task_id = ? ORDER BY ti.map_index",
            (dag_id, run_id, task_id),
        )

    def state_history(self, dag_id: str, run_id: str, task_id: str) -> dict[int, list[str]]:
        """``{map_index: [event, ...]}`` from the audit log: ``running``, ``deferred``, ``success``..."""
        rows = self.query(
            "SELECT map_index, event FROM log WHERE dag_id = ? AND run_id = ? AND task_id = ? ORDER BY dttm, id",
            (dag_id, run_id, task_id),
        )
        history: dict[int, list[str]] = {}
        for row in rows:
            history.setdefault(row["map_index"], []).append(row["event"])
        return history

    def db_bytes(self) -> bytes:
        """The metadata DB's raw bytes, its write-ahead log included (recent writes live there)."""
        return b"".join(
            path.read_bytes() for path in (self.db_path, Path(f"{self.db_path}-wal")) if path.exists()
        )

    # ------------------------------------------------------------------------------------------ logs

    def log_files(self) -> list[Path]:
        """Every log file of the deployment: the processes', the tasks', the dag-processor's."""
        return sorted(path for path in self.home.rglob("*.log") if path.is_file())

    def task_log_files(self, since: float) -> list[Path]:
        base = self.home / "logs"
        if not base.exists():
            return []
        files = [
            p for p in base.rglob("*.log") if "dag_processor" not in p.parts and p.stat().st_mtime >= since
        ]
        return sorted(files, key=lambda p: p.stat().st_mtime)

    def failure_report(self, since: float) -> list[tuple[str, str]]:
        """(title, text) sections for a failed test: process log tails, task logs written since, the emulator."""
        sections = []
        for path in sorted(self.process_logs.glob("*.log")):
            text = _strip_noise(path.read_text(errors="replace"))
            sections.append((f"{path.name} (last {LOG_TAIL_LINES} lines)", tail(text)))
        task_logs = self.task_log_files(since)
        failed = [path for path in task_logs if _looks_failed(path)]
        for path in (failed or task_logs)[-4:]:
            title = f"task log {path.relative_to(self.home / 'logs')} (last {LOG_TAIL_LINES} lines)"
            sections.append((title, tail(path.read_text(errors="replace"))))
        tally: dict[str, int] = {}
        for request in self.emulator.requests:
            path = re.sub(r"batch_\w+", "batch_*", request.path)
            kind = f"{request.method} {path} -> {request.status}"
            tally[kind] = tally.get(kind, 0) + 1
        summary = "\n".join(f"{count:6d}  {kind}" for kind, count in sorted(tally.items()))
        sections.append(("emulator requests", summary or "(none)"))
        sections.append(
            (
                "deployment",
                f"AIRFLOW_HOME={self.home}\nREST API={self.api_url}\nemulator={self.emulator.base_url}",
            )
        )
        return sections


def tail(text: str, lines: int = LOG_TAIL_LINES, width: int = 600) -> str:
    """The last ``lines`` lines of ``text``, each cut to ``width`` characters (trigger events are long)."""
    return "\n".join(
        line if len(line) <= width else line[:width] + " [...]" for line in text.splitlines()[-lines:]
    )


def _strip_noise(text: str) -> str:
    """Drop the REST API access lines of the tests' own polling, which would fill every tail."""
    return "\n".join(line for line in text.splitlines() if "path=/api/v2/" not in line)


def _looks_failed(path: Path) -> bool:
    text = path.read_text(errors="replace")
    return '"level":"error"' in text or "Traceback" in text


def decrypt_trigger_kwargs(raw: str, fernet_key: str) -> tuple[str, dict[str, Any]]:
    """The plaintext of a ``trigger.kwargs`` value, and the kwargs it decodes to, as Airflow 3.3 stores them.

    ``Trigger(kwargs=...)`` encrypts ``airflow.sdk.serde`` JSON with the Fernet key; but the execution API of
    Airflow 3.3 stores the kwargs of a task deferred from a worker as the plain JSON the worker sent (it starts
    with ``{``). Both are read here.
    """
    from airflow.sdk.serde import deserialize
    from cryptography.fernet import Fernet

    plaintext = raw if raw.startswith("{") else Fernet(fernet_key.encode()).decrypt(raw.encode()).decode()
    kwargs = deserialize(json.loads(plaintext))
    assert isinstance(kwargs, dict), kwargs
    return plaintext, kwargs
