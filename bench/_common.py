"""Helpers shared by the benchmark scripts: paths, interpreters, /proc readers, statistics, machine facts."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
MAIN_PYTHON = ROOT / ".venv" / "bin" / "python"
BENCH_PYTHON = ROOT / ".bench-venv" / "bin" / "python"
OFFICIAL_VERSION = "2.2.0"

#: Clock ticks per second, to turn /proc/<pid>/stat CPU fields into seconds.
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def ensure_official_venv() -> Path:
    """Create ``.bench-venv`` (official provider 2.2.0 + this package) if needed; return its interpreter."""
    subprocess.run(["bash", str(BENCH_DIR / "setup_official.sh")], check=True)
    return BENCH_PYTHON


def bench_env(airflow_home: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for child processes: a throw-away ``AIRFLOW_HOME``, quiet logs, ``extra`` on top."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW_CONN_")}
    env["AIRFLOW_HOME"] = airflow_home or tempfile.mkdtemp(prefix="bench-airflow-home-")
    env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    env["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
    env["PYTHONDONTWRITEBYTECODE"] = "0"
    env.update(extra)
    return env


def connection_json(conn_type: str, api_key: str, base_url: str) -> str:
    """An ``AIRFLOW_CONN_*`` value: ``password`` is the API key, ``host`` the base URL (both providers agree)."""
    return json.dumps({"conn_type": conn_type, "password": api_key, "host": base_url})


# -- /proc readers ------------------------------------------------------------------------------------------------


def _status_value(pid: int | str, field: str) -> int:
    """The number of a ``/proc/<pid>/status`` field (in kB for memory fields)."""
    with open(f"/proc/{pid}/status") as status:
        match = re.search(rf"^{field}:\s+(\d+)", status.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_bytes(pid: int | str = "self") -> int:
    """Current resident set size."""
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


def peak_rss_bytes(pid: int | str = "self") -> int:
    """Resident set high-water mark (``VmHWM``), since start or the last :func:`reset_peak_rss`."""
    return _status_value(pid, "VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0); False if the kernel refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int | str) -> float:
    """User + system CPU seconds consumed so far by a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def thread_count(pid: int | str) -> int:
    return _status_value(pid, "Threads")


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot (``/proc/stat``), to tell how loaded the machine was."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def busy_cores(over: float = 3.0) -> float:
    """How many CPUs' worth of work the machine did over the next ``over`` seconds."""
    before = machine_busy_seconds()
    time.sleep(over)
    return (machine_busy_seconds() - before) / over


def wait_until_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait up to ``max_wait`` s for other processes to use under ``threshold`` CPUs; return the last reading.

    Benchmarks on a 2-CPU machine are meaningless while something else (a test suite, say) is running.
    """
    deadline = time.monotonic() + max_wait
    while True:
        busy = busy_cores()
        if busy < threshold or time.monotonic() >= deadline:
            if busy >= threshold:
                print(
                    f"WARNING: the machine is busy ({busy:.2f} CPUs used by other processes); numbers will be "
                    "noisy (see each run's 'other load').",
                    file=sys.stderr,
                    flush=True,
                )
            return busy
        print(f"  waiting for a quiet machine ({busy:.2f} CPUs busy) ...", file=sys.stderr, flush=True)
        time.sleep(10)


def load_average() -> float:
    """The 1-minute load average."""
    with open("/proc/loadavg") as loadavg:
        return float(loadavg.read().split()[0])


def socket_count(pid: int | str) -> int:
    """Open socket file descriptors of a process (entries of /proc/<pid>/fd that link to ``socket:[...]``)."""
    count = 0
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return 0
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}").startswith("socket:"):
                count += 1
        except OSError:
            continue  # closed between listdir and readlink
    return count


# -- statistics ---------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


# -- machine ------------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu_model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total_kb = _status_meminfo("MemTotal")
    versions = json.loads(
        subprocess.run(
            [str(BENCH_PYTHON), "-c", _VERSIONS_SNIPPET], capture_output=True, text=True, check=True
        ).stdout
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_total_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        **versions,
    }


_VERSIONS_SNIPPET = """
import json, sys
from importlib.metadata import version
names = ["apache-airflow", "apache-airflow-task-sdk", "apache-airflow-providers-openai", "openai", "httpx",
         "pydantic", "airflow-provider-openai-batch"]
print(json.dumps({"python_bench_venv": sys.version.split()[0], **{name: version(name) for name in names}}))
"""


def _status_meminfo(field: str) -> int:
    with open("/proc/meminfo") as meminfo:
        match = re.search(rf"^{field}:\s+(\d+) kB", meminfo.read(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def package_digest() -> str:
    """A short digest of the package's source as it is on disk now, edits included: which code a run measured."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "airflow_provider_openai_batch").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def report(table: str, result: Any, json_path: Path | None) -> None:
    """What each script ends with: print its table, and write its full result as JSON if ``--json`` was given."""
    print(table)
    if json_path:
        write_json(json_path, result)
