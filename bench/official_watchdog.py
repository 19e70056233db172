"""Does a real triggerer holding N waits of the official provider's blocking trigger trip Airflow's watchdog?

Usage: .venv/bin/python bench/official_watchdog.py [--waits 1000] [--duration 180] [--poll-interval 60]
       [--latency 0] [--capacity N] [--no-standby] [--logs DIR] [--json out.json]

Airflow 3.2.2 added ``[triggerer] runner_health_check_threshold`` (default 30 s): when the trigger runner's event
loop sends nothing to the triggerer's supervisor for that long, the supervisor stops heartbeating ("TriggerRunner
subprocess event loop appears deadlocked"), and once its last heartbeat is older than
``triggerer_health_check_threshold`` (30 s) another triggerer takes every trigger it holds. The official
``apache-airflow-providers-openai`` ``OpenAIBatchTrigger`` calls the synchronous OpenAI client from its async
``run()``: each poll blocks the loop for one HTTP round trip. This script runs that trigger at scale in a real
``airflow triggerer`` process (the Airflow of ``.venv``, default settings) and reports what its log and its
metadata DB show.

Set-up, all on loopback and in a temporary AIRFLOW_HOME (SQLite, ``airflow db migrate``): an emulator process
(bench/_emulator.py) with N batches that stay ``in_progress``; the ``openai_default`` connection (conn type
``openai``) pointing at it through ``AIRFLOW_CONN_OPENAI_DEFAULT``; N ``OpenAIBatchTrigger`` rows
(``poll_interval`` the official operator's default, 60 s; ``timeout`` its default, 24 h) inserted with
``Trigger.from_object``. A trigger is only picked up by a triggerer if something depends on it (a deferred task
instance, an asset or a callback: ``Trigger.get_sorted_triggers``); the rows are attached to one asset, as an
asset watcher's would be, which spares running a scheduler and a dag-processor for N deferred tasks. Their
``run()`` is the same code whatever depends on them; the official trigger is not a ``BaseEventTrigger``, so the
runner treats them as plain triggers, not watchers.

Then ``airflow triggerer`` runs for ``--duration`` seconds. Once it holds all N waits (or after half the
duration), a second, idle triggerer is started as a stand-by (``--no-standby`` to skip it): if the first one's
heartbeat stops, the stand-by adopts its triggers, which the ``trigger`` table shows. Every 2 s this process
samples the triggerers' CPU (supervisor plus trigger runner) and, from the DB, the age of each triggerer's last
heartbeat and how many triggers each holds. At the end it reads the triggerers' logs: the watchdog's error, the
"async thread was blocked" warnings (``blocked_main_thread_warning_threshold``, 0.2 s) and their durations, how
many triggers started, and the trigger runner's full garbage collections over 50 ms (reported by
tests/system/support/sitecustomize.py, put on the triggerers' PYTHONPATH), all as logged before the triggerers
were told to stop. The triggerers are stopped by PID (process group) before the emulator, and the temporary
directory is removed.

On loopback a GET takes a few milliseconds; ``--latency S`` makes the emulator answer each one after S seconds,
as a distant API would (0.1-0.3 s), which the blocking trigger then spends with the event loop held.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    MAIN_PYTHON,
    bench_env,
    connection_json,
    cpu_seconds,
    machine_busy_seconds,
    percentile,
    report,
    rss_bytes,
)
from _emulator import EmulatorProcess

SAMPLE_EVERY = 2.0  #: seconds between samples of CPU and of the metadata DB
MIGRATE_TIMEOUT = 600
STOP_TIMEOUT = 20
OFFICIAL_DEFAULT_POLL_INTERVAL = 60.0  #: OpenAITriggerBatchOperator's ``poll_interval`` default (2.2.0)
OFFICIAL_DEFAULT_TIMEOUT = 24 * 60 * 60.0  #: and its ``timeout`` default

#: What Airflow 3.3's triggerer logs (airflow/jobs/triggerer_job_runner.py): the supervisor's watchdog when the
#: runner was silent for ``runner_health_check_threshold``, and the runner's ``block_watchdog``.
WATCHDOG_MESSAGE = "TriggerRunner subprocess event loop appears deadlocked"
BLOCKED_MESSAGE = "Triggerer's async thread was blocked for"
_BLOCKED = re.compile(r"^(\S+) .*" + re.escape(BLOCKED_MESSAGE) + r" ([0-9.]+) seconds", re.MULTILINE)
#: tests/system/support/sitecustomize.py's report of a full garbage collection over 50 ms (forked=1: in the
#: trigger runner), to tell the collector's pauses from the triggers' own blocking.
_GC_PAUSE = re.compile(r"SYSTEM_TEST_GC_PAUSE end=[0-9.]+ seconds=([0-9.]+) forked=1")
_GC_INSTRUMENTATION = Path(__file__).resolve().parents[1] / "tests" / "system" / "support"
_STARTING = re.compile(r"trigger ID \d+ starting")
_RUNNING = re.compile(r"(\d+) triggers currently running")

#: Run in a child process with the deployment's environment: insert the trigger rows, attached to one asset.
_SEED_SNIPPET = """
import json, sys
from airflow.models.asset import AssetModel
from airflow.models.trigger import Trigger
from airflow.providers.openai.triggers.openai import OpenAIBatchTrigger
from airflow.utils.session import create_session

batch_ids, poll_interval, timeout = json.loads(sys.stdin.read())
with create_session() as session:
    asset = AssetModel(name="official_watchdog_bench", uri="bench://official-watchdog")
    session.add(asset)
    triggers = [
        Trigger.from_object(OpenAIBatchTrigger("openai_default", batch_id, poll_interval, timeout=timeout))
        for batch_id in batch_ids
    ]
    session.add_all(triggers)
    session.flush()
    for trigger in triggers:
        asset.add_trigger(trigger, f"wait_{trigger.id}")

"""


@dataclass
class Triggerer:
    """One ``airflow triggerer`` process group and its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    job_id: int | None = None

    def tree(self) -> list[int]:
        """The supervisor and its descendants (the trigger runner)."""
        pids, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as children:
                        todo.extend(int(child) for child in children.read().split())
            except OSError:
                continue
        return pids

    def cpu(self) -> float:
        total = 0.0
        for pid in self.tree():
            try:
                total += cpu_seconds(pid)
            except OSError:
                continue
        return total

    def rss(self) -> int:
        total = 0
        for pid in self.tree():
            try:
                total += rss_bytes(pid)
            except OSError:
                continue
        return total

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group is left
        if self.process.poll() is None:
            self.process.wait()


def _stop(triggerers: list[Triggerer]) -> None:
    for triggerer in reversed(triggerers):
        triggerer.stop()


def _environment(home: Path, emulator: EmulatorProcess, capacity: int | None) -> dict[str, str]:
    capacity_setting = {"AIRFLOW__TRIGGERER__CAPACITY": str(capacity)} if capacity else {}
    return bench_env(
        str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home / 'airflow.db'}",
        AIRFLOW__CORE__FERNET_KEY=base64.urlsafe_b64encode(os.urandom(32)).decode(),
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        # INFO: the blocked-loop warning and the "triggers currently running" lines are logged at INFO.
        AIRFLOW__LOGGING__LOGGING_LEVEL="INFO",
        AIRFLOW__LOGGING__COLORED_CONSOLE_LOG="False",
        AIRFLOW_CONN_OPENAI_DEFAULT=connection_json("openai", emulator.api_key, emulator.base_url),
        NO_COLOR="1",
        PYTHONUNBUFFERED="1",
        **capacity_setting,
    )


def _airflow(*args: str) -> list[str]:
    return [str(MAIN_PYTHON.parent / "airflow"), *args]


def _migrate(env: dict[str, str], home: Path) -> None:
    log_path = home / "db-migrate.log"
    with open(log_path, "wb") as log:
        result = subprocess.run(
            _airflow("db", "migrate"),
            check=False,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=MIGRATE_TIMEOUT,
        )
    if result.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{log_path.read_text(errors='replace')[-4000:]}")


def _seed_triggers(env: dict[str, str], batch_ids: list[str], poll_interval: float) -> None:
    payload = json.dumps([batch_ids, poll_interval, OFFICIAL_DEFAULT_TIMEOUT])
    subprocess.run(
        [str(MAIN_PYTHON), "-c", _SEED_SNIPPET],
        input=payload,
        text=True,
        env=env,
        check=True,
        timeout=600,
        stdout=subprocess.DEVNULL,
    )


def _start_triggerer(name: str, env: dict[str, str], home: Path) -> Triggerer:
    log_path = home / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            _airflow("triggerer", "--skip-serve-logs"),
            env={**env, "PYTHONPATH": str(_GC_INSTRUMENTATION), "SYSTEM_TEST_LOG_GC_PAUSES": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole
        )
    return Triggerer(name, process, log_path)


def _db_sample(db_path: Path) -> tuple[dict[int, float], dict[int | None, int]]:
    """Per triggerer job id, the age of its last heartbeat (s); per triggerer id, how many triggers it holds."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        ages = dict(
            db.execute(
                "SELECT id, (julianday('now') - julianday(latest_heartbeat)) * 86400 FROM job "
                "WHERE job_type = 'TriggererJob' AND end_date IS NULL"
            ).fetchall()
        )
        held = dict(db.execute("SELECT triggerer_id, count(*) FROM trigger GROUP BY triggerer_id").fetchall())
    return ages, held


def _job_ids(db_path: Path) -> list[int]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10) as db:
        return [
            row[0] for row in db.execute("SELECT id FROM job WHERE job_type = 'TriggererJob' ORDER BY id")
        ]


def run(
    waits: int,
    duration: float,
    poll_interval: float,
    standby: bool,
    capacity: int | None = None,
    keep_logs: Path | None = None,
    latency: float = 0.0,
) -> dict[str, Any]:
    """One run; ``capacity`` sets ``[triggerer] capacity`` (Airflow's default, 1,000, if None); every GET is
    answered after ``latency`` seconds."""
    home = Path(tempfile.mkdtemp(prefix="bench-official-watchdog-"))
    triggerers: list[Triggerer] = []
    try:
        with EmulatorProcess(MAIN_PYTHON) as emulator:
            batch_ids = emulator.seed(waits, status="in_progress")  # never final: every wait lasts the run
            if latency:
                emulator.call("latency", seconds=latency)
            env = _environment(home, emulator, capacity)
            print("  airflow db migrate ...", file=sys.stderr, flush=True)
            _migrate(env, home)
            _seed_triggers(env, batch_ids, poll_interval)
            db_path = home / "airflow.db"
            print(
                f"  {waits} OpenAIBatchTrigger rows inserted; starting the triggerer",
                file=sys.stderr,
                flush=True,
            )
            requests_before = emulator.stats()["requests"]
            busy_before = machine_busy_seconds()
            started = time.monotonic()
            triggerers.append(_start_triggerer("triggerer-1", env, home))
            timeline: list[dict[str, Any]] = []
            all_held_at: float | None = None
            while (elapsed := time.monotonic() - started) < duration:
                time.sleep(SAMPLE_EVERY)
                elapsed = time.monotonic() - started
                for triggerer in triggerers:
                    if triggerer.process.poll() is not None:
                        raise RuntimeError(
                            f"{triggerer.name} exited with {triggerer.process.returncode}:\n"
                            + triggerer.log_path.read_text(errors="replace")[-4000:]
                        )
                try:
                    ages, held = _db_sample(db_path)
                except sqlite3.OperationalError:
                    continue  # the DB was locked for longer than the timeout: skip this sample
                job_ids = _job_ids(db_path)
                for triggerer, job_id in zip(triggerers, job_ids):
                    triggerer.job_id = job_id
                sample = {
                    "t": round(elapsed, 1),
                    "cpu_s": [round(t.cpu(), 2) for t in triggerers],
                    "rss_mib": [round(t.rss() / 2**20) for t in triggerers],
                    "heartbeat_age_s": {str(job): round(age, 1) for job, age in ages.items()},
                    "held": {str(job): count for job, count in held.items()},
                }
                timeline.append(sample)
                first = triggerers[0].job_id
                if all_held_at is None and first is not None and held.get(first, 0) >= waits:
                    all_held_at = elapsed
                    print(
                        f"  triggerer-1 holds all {waits} waits at {elapsed:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                if standby and len(triggerers) == 1 and (all_held_at is not None or elapsed >= duration / 2):
                    print(
                        f"  starting the stand-by triggerer at {elapsed:.0f} s", file=sys.stderr, flush=True
                    )
                    triggerers.append(_start_triggerer("triggerer-2", env, home))
            wall = time.monotonic() - started
            busy = machine_busy_seconds() - busy_before
            requests = emulator.stats()["requests"] - requests_before
            final_ages, final_held = _db_sample(db_path)
            stopped_at = datetime.now(UTC)
            _stop(triggerers)  # before the emulator goes: its absence would make the triggers block anew
    finally:
        _stop(triggerers)
        if keep_logs is not None:  # also after a failure: the logs say why
            keep_logs.mkdir(parents=True, exist_ok=True)
            for triggerer in triggerers:
                shutil.copyfile(triggerer.log_path, keep_logs / triggerer.log_path.name)
        logs = {t.name: t.log_path.read_text(errors="replace") for t in triggerers}
        shutil.rmtree(home, ignore_errors=True)
    before_stop = {name: _until(log, stopped_at) for name, log in logs.items()}
    result = _result(waits, duration, poll_interval, wall, busy, requests, triggerers, timeline, all_held_at,
                     before_stop, final_ages, final_held)  # fmt: skip
    result["capacity"] = capacity or 1000
    result["latency_s"] = latency
    return result


def _result(
    waits: int,
    duration: float,
    poll_interval: float,
    wall: float,
    busy: float,
    requests: int,
    triggerers: list[Triggerer],
    timeline: list[dict[str, Any]],
    all_held_at: float | None,
    logs: dict[str, str],
    final_ages: dict[int, float],
    final_held: dict[int | None, int],
) -> dict[str, Any]:
    per_triggerer = {}
    for index, triggerer in enumerate(triggerers):
        log = logs[triggerer.name]
        blocked_at = [(match.group(1), float(match.group(2))) for match in _BLOCKED.finditer(log)]
        blocked = [seconds for _, seconds in blocked_at]
        gc_pauses = [float(match.group(1)) for match in _GC_PAUSE.finditer(log)]
        running = [int(match.group(1)) for match in _RUNNING.finditer(log)]
        started = len(_STARTING.findall(log))
        cpu = [sample["cpu_s"][index] for sample in timeline if len(sample["cpu_s"]) > index]
        rss = [sample["rss_mib"][index] for sample in timeline if len(sample["rss_mib"]) > index]
        ages = [
            sample["heartbeat_age_s"].get(str(triggerer.job_id))
            for sample in timeline
            if str(triggerer.job_id) in sample["heartbeat_age_s"]
        ]
        per_triggerer[triggerer.name] = {
            "job_id": triggerer.job_id,
            "watchdog_errors": log.count(WATCHDOG_MESSAGE),
            "watchdog_lines": [line for line in log.splitlines() if WATCHDOG_MESSAGE in line][:5],
            "blocked_warnings": len(blocked),
            "blocked_total_s": round(sum(blocked), 2),
            "blocked_max_s": max(blocked, default=0.0),
            "blocked_p50_s": round(percentile(blocked, 50), 2),
            "blocked_p99_s": round(percentile(blocked, 99), 2),
            "blocked_over_5s": sum(1 for value in blocked if value > 5),
            "blocked": blocked_at,
            "runner_full_gc_pauses_s": gc_pauses,
            "triggers_running_logged": running,
            "triggers_started": started,
            "events_fired": log.count("Trigger fired event"),
            "cpu_s": cpu[-1] if cpu else None,
            **(_cpu_split(timeline, index, poll_interval) if index == 0 else {}),
            "peak_rss_mib": max(rss, default=None),
            "heartbeat_age_max_s": max((age for age in ages if age is not None), default=None),
            "errors": [line for line in log.splitlines() if " error " in line.lower() or "Traceback" in line][
                :10
            ],
        }
    return {
        "waits": waits,
        "duration_s": duration,
        "wall_s": round(wall, 1),
        "poll_interval_s": poll_interval,
        "all_held_at_s": None if all_held_at is None else round(all_held_at, 1),
        "requests": requests,
        "machine_busy_cores": round(busy / wall, 2),
        "nproc": os.cpu_count(),
        "airflow": _version("apache-airflow"),
        "official_provider": _version("apache-airflow-providers-openai"),
        "openai": _version("openai"),
        "triggerers": per_triggerer,
        "final_held": {str(job): count for job, count in final_held.items()},
        "final_heartbeat_age_s": {str(job): round(age, 1) for job, age in final_ages.items()},
        "timeline": timeline,
    }


def _until(log: str, moment: datetime) -> str:
    """The lines of a triggerer log up to ``moment`` (its lines start with an ISO UTC timestamp): what was
    logged while the run lasted, not while the triggerer was being stopped."""
    cut = moment.strftime("%Y-%m-%dT%H:%M:%S.%f")
    kept = []
    for line in log.splitlines():
        if line[:4].isdigit() and line[:26] > cut:
            break
        kept.append(line)
    return "\n".join(kept)


def _cpu_split(timeline: list[dict[str, Any]], index: int, poll_interval: float) -> dict[str, float | None]:
    """CPU over the first poll interval (start-up: every trigger starts, builds its client, polls once) and,
    after it, in cores on average (steady state: each wait polls once per interval)."""
    first = next((s for s in timeline if s["t"] >= poll_interval and len(s["cpu_s"]) > index), None)
    last = timeline[-1] if timeline else None
    if first is None or last is None or last["t"] <= first["t"]:
        return {"cpu_first_interval_s": None, "cpu_steady_cores": None}
    steady = (last["cpu_s"][index] - first["cpu_s"][index]) / (last["t"] - first["t"])
    return {"cpu_first_interval_s": first["cpu_s"][index], "cpu_steady_cores": round(steady, 3)}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def table(result: dict[str, Any]) -> str:
    header = (
        f"Official OpenAIBatchTrigger x {result['waits']} in a real triggerer (Airflow {result['airflow']}, "
        f"apache-airflow-providers-openai {result['official_provider']}, openai {result['openai']}), "
        f"capacity {result['capacity']}, GET latency {result['latency_s']:g} s, poll {result['poll_interval_s']:g} s, {result['wall_s']:.0f} s, "
        f"{result['nproc']} CPUs ({result['machine_busy_cores']:.2f} busy on average), "
        f"{result['requests']} requests"
    )
    held = (
        f"triggerer-1 held all waits at: {result['all_held_at_s']} s; trigger rows per triggerer job at the "
        f"end: {result['final_held']}"
    )
    columns = (
        "| triggerer | job | watchdog errors | blocked warnings | blocked total s | max s | p50 s | > 5 s "
        "| max heartbeat age s | CPU s | CPU s, first poll interval | CPU cores after it | peak RSS MiB |"
    )
    lines = [header, held, columns, "|---" * 13 + "|"]
    for name, t in result["triggerers"].items():
        lines.append(
            f"| {name} | {t['job_id']} | {t['watchdog_errors']} | {t['blocked_warnings']} | {t['blocked_total_s']} "
            f"| {t['blocked_max_s']} | {t['blocked_p50_s']} | {t['blocked_over_5s']} | {t['heartbeat_age_max_s']} "
            f"| {t['cpu_s']} | {t.get('cpu_first_interval_s')} | {t.get('cpu_steady_cores')} | {t['peak_rss_mib']} |"
        )
    for name, t in result["triggerers"].items():
        for line in t["watchdog_lines"]:
            lines.append(f"{name}: {line.strip()[:300]}")
        if t["triggers_running_logged"]:
            lines.append(f"{name}: 'triggers currently running' logged: {t['triggers_running_logged']}")
        lines.append(f"{name}: triggers started {t['triggers_started']}, events fired {t['events_fired']}")
        if t["blocked"]:
            lines.append(f"{name}: blocked (log time, s): {t['blocked']}")
        if t["runner_full_gc_pauses_s"]:
            lines.append(
                f"{name}: trigger runner's full collections over 50 ms (s): {t['runner_full_gc_pauses_s']}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--waits", type=int, default=1000, help="official OpenAIBatchTrigger waits (default 1000)"
    )
    parser.add_argument(
        "--duration", type=float, default=180, help="seconds the triggerer runs (default 180)"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=OFFICIAL_DEFAULT_POLL_INTERVAL,
        help="the triggers' poll_interval (default 60, the official operator's)",
    )
    parser.add_argument("--no-standby", action="store_true", help="run no second, stand-by triggerer")
    parser.add_argument("--capacity", type=int, help="[triggerer] capacity (default: Airflow's, 1000)")
    parser.add_argument(
        "--latency",
        type=float,
        default=0.0,
        help="seconds the emulator takes to answer each GET (default 0: loopback; a distant API takes 0.1-0.3)",
    )
    parser.add_argument("--logs", type=Path, help="copy the triggerers' logs into this directory")
    parser.add_argument("--json", type=Path, help="write the full result (with the timeline) here")
    args = parser.parse_args(argv)
    result = run(
        args.waits,
        args.duration,
        args.poll_interval,
        not args.no_standby,
        args.capacity,
        args.logs,
        args.latency,
    )
    report(table(result), result, args.json)
    return result


if __name__ == "__main__":
    main()
