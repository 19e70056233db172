"""Triggerer scale: N concurrent cancellation waits in one event loop, this provider against the official one.

Usage: .venv/bin/python bench/trigger_scale.py [--n 100,1000,5000] [--repeats 3] [--polls 3] [--json out.json]
       [--local-settings]

For each N and provider, in a fresh ``.bench-venv`` process (bench/_scale_worker.py) against a fresh emulator
process (bench/_emulator.py), every batch answers K-1 polls with a waiting status and the K-th with a final one:

* this provider's ``OpenAIBatchCancellationTrigger`` waits on batches seeded ``cancelling`` that become
  ``cancelled`` on their K-th GET;
* the official ``OpenAIBatchTrigger`` stops at ``cancelling`` (it reports the batch cancelled before its partial
  results exist), so it would do a single poll on that workload; to give it the same work, K polls per wait, it
  waits on batches seeded ``in_progress`` that become ``completed`` on their K-th GET.

Same N, poll interval, K and emulator for both. The worker measures wall time to the last event, CPU seconds,
event-loop lag (a 10 ms probe) and RSS (baseline after imports and one warm-up wait; peak from ``VmHWM`` reset at
the baseline). This process samples the worker's open sockets from ``/proc/<pid>/fd`` and reads the emulator's
request count and CPU, so neither is charged to the worker. ``--local-settings`` runs each worker as a triggerer
deployed with docs/recipes/airflow_local_settings.py (see bench/_scale_worker.py).
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BENCH_DIR,
    BENCH_PYTHON,
    MAIN_PYTHON,
    bench_env,
    connection_json,
    cpu_seconds,
    ensure_official_venv,
    load_average,
    machine_busy_seconds,
    median,
    package_digest,
    report,
    rss_bytes,
    socket_count,
    thread_count,
    wait_until_quiet,
)
from _emulator import EmulatorProcess

PROVIDERS = ("ours", "official")
CONN_TYPES = {"ours": "openai_batch", "official": "openai"}
SAMPLE_EVERY = 0.5  #: seconds between samples of the worker's sockets
NOISY = 0.3  #: a run during which other processes used more CPUs than this is run again (once)


def default_poll_interval(n: int) -> float:
    """Poll interval for N triggers: at least 2 s, and N / 250 s, so the steady rate stays at 250 polls/s.

    That keeps the emulator (one process, one request at a time under the GIL) well below saturation while every
    trigger still polls several times in a run of a few seconds to a minute.
    """
    return max(2.0, n / 250)


class Sampler(threading.Thread):
    """Samples the worker's open sockets, threads and RSS every ``SAMPLE_EVERY`` seconds, from outside it."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.max_sockets = 0
        self.max_threads = 0
        self.max_rss = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.max_sockets = max(self.max_sockets, socket_count(self.pid))
                self.max_threads = max(self.max_threads, thread_count(self.pid))
                self.max_rss = max(self.max_rss, rss_bytes(self.pid))
                self.samples += 1
            except OSError:
                return  # the worker exited
            self._stop_event.wait(SAMPLE_EVERY)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _attach_profiler(pid: int, output: Path) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` on ``pid`` and give it time to attach before the measured run starts."""
    profiler = subprocess.Popen(
        [str(MAIN_PYTHON.parent / "py-spy"), "record", "--pid", str(pid), "--idle", "--threads", "--nonblocking",
         "-r", "200", "-f", "raw", "-o", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(2.0)
    return profiler


def _line_reader(stream: IO[str]) -> queue.Queue[str]:
    """Lines of ``stream`` on a queue, so they can be awaited with a timeout."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    return lines


def seed(
    emulators: list[EmulatorProcess],
    provider: str,
    n: int,
    polls: int,
    cancelling: dict[str, Any] | None = None,
    unrelated: int = 0,
) -> list[list[str]]:
    """Seed one warm-up batch (final on its first poll) and N measured ones, round-robin over the emulators.

    ``cancelling`` overrides how this provider's measured batches end (``add_batch`` arguments, e.g.
    ``cancel_after_seconds``). ``unrelated`` batches that no wait asks for are then seeded in each emulator, in
    progress: the rest of an organisation's list, newest, hence first on its pages.

    Returns ``[conn_id, batch_id]`` pairs, the warm-up first.
    """

    def batches(emulator: EmulatorProcess, count: int, k: int, **kwargs: Any) -> list[str]:
        if provider == "ours":
            return emulator.seed(count, status="cancelling", **{"cancel_after_polls": k, **kwargs})
        return emulator.seed(count, finish_after_polls=k)

    targets = [["bench_0", batches(emulators[0], 1, 1)[0]]]
    for index, emulator in enumerate(emulators):
        count = n // len(emulators) + (1 if index < n % len(emulators) else 0)
        measured = batches(emulator, count, polls, **(cancelling or {}))
        targets.extend([f"bench_{index}", batch_id] for batch_id in measured)
        if unrelated:
            emulator.seed(unrelated, status="in_progress")
    return targets


def run_once(
    provider: str,
    n: int,
    poll_interval: float,
    polls: int,
    cap: float,
    emulator_count: int = 1,
    profile_to: Path | None = None,
    cold: bool = False,
    local_settings: bool = False,
    rate_limit: int | None = None,
    per_get: bool = False,
    cancelling: dict[str, Any] | None = None,
    unrelated: int = 0,
    cancel_at_go: bool = False,
) -> dict[str, Any]:
    """One measured run of N triggers of ``provider``; returns the worker's report plus the external samples.

    With ``rate_limit``, each emulator serves that many requests a second, and answers OpenAI's 429 beyond it.
    ``per_get`` polls as before the status board, one GET per wait and round (see bench/_scale_worker.py);
    ``cancelling`` and ``unrelated`` are :func:`seed`'s; ``cancel_at_go`` puts the measured batches back to
    ``cancelling`` just before the run starts, so that a ``cancel_after_seconds`` counts from the start.

    With ``profile_to``, ``py-spy record`` attaches to the worker for the measured window only (wall-clock samples
    of every thread, idle included, written there as raw collapsed stacks): for diagnosis, as it perturbs numbers.
    """
    emulators = [EmulatorProcess(MAIN_PYTHON, cancel_after_polls=polls) for _ in range(emulator_count)]
    worker: subprocess.Popen[str] | None = None
    try:
        with tempfile.TemporaryFile(mode="w+") as stderr:
            targets = seed(emulators, provider, n, polls, cancelling, unrelated)
            if rate_limit is not None:
                for emulator in emulators:
                    emulator.call("limit_rate", requests=rate_limit)
            ids_file = Path(tempfile.mkstemp(prefix="bench-ids-", suffix=".json")[1])
            ids_file.write_text(json.dumps(targets))
            conns = {
                f"AIRFLOW_CONN_BENCH_{index}": connection_json(
                    CONN_TYPES[provider], emulator.api_key, emulator.base_url
                )
                for index, emulator in enumerate(emulators)
            }
            worker = subprocess.Popen(
                [
                    str(BENCH_PYTHON),
                    str(BENCH_DIR / "_scale_worker.py"),
                    "--provider",
                    provider,
                    "--ids-file",
                    str(ids_file),
                    "--poll-interval",
                    str(poll_interval),
                    "--cap",
                    str(cap),
                    *(["--cold"] if cold else []),
                    *(["--local-settings"] if local_settings else []),
                    *(["--per-get"] if per_get else []),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=bench_env(**conns),
            )
            assert worker.stdout is not None and worker.stdin is not None
            lines = _line_reader(worker.stdout)
            ready = _expect(lines, "ready", 300, worker, stderr)
            pid = ready["pid"]  # with --local-settings, the forked child: the trigger runner
            if cancel_at_go:
                for index, emulator in enumerate(emulators):
                    emulator.call("restart_cancels", ids=[b for c, b in targets[1:] if c == f"bench_{index}"])
            stats_before = [emulator.stats() for emulator in emulators]
            emulator_cpu_before = [cpu_seconds(emulator.pid) for emulator in emulators]
            profiler = _attach_profiler(pid, profile_to) if profile_to else None
            sampler = Sampler(pid)
            sampler.start()
            load_before = load_average()
            busy_before = machine_busy_seconds()
            own_before = time.process_time()
            worker_cpu_before = cpu_seconds(pid)
            started = time.perf_counter()
            worker.stdin.write("go\n")
            worker.stdin.flush()
            done = _expect(lines, "done", cap + 120, worker, stderr)
            elapsed = time.perf_counter() - started
            busy = machine_busy_seconds() - busy_before
            own = time.process_time() - own_before
            worker_cpu = cpu_seconds(pid) - worker_cpu_before
            sampler.stop()
            emulator_cpu = sum(
                cpu_seconds(e.pid) - before for e, before in zip(emulators, emulator_cpu_before)
            )
            stats = [emulator.stats() for emulator in emulators]
            requests, pages, gets = (
                sum(s[key] - before[key] for s, before in zip(stats, stats_before))
                for key in ("requests", "pages", "gets")
            )
            worker.stdin.close()
            worker.wait(timeout=60)
            if profiler is not None:
                profiler.wait(timeout=60)
            ids_file.unlink()
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait()
        for emulator in emulators:
            emulator.close()
    peak_rss = done["peak_rss"] if done["hwm_reset"] else max(done["peak_rss"], sampler.max_rss)
    return {
        "provider": provider,
        "n": n,
        "poll_interval": poll_interval,
        "polls_per_wait": polls,
        "emulators": emulator_count,
        **{key: value for key, value in done.items() if key != "phase"},
        "peak_rss": peak_rss,
        "rss_per_trigger": (peak_rss - ready["baseline_rss"]) / n,
        "requests": requests,
        "pages": pages,
        "gets": gets,
        "requests_per_trigger": requests / n,
        "cpu_per_request_s": done["cpu_s"] / requests if requests else None,
        "sockets_peak": sampler.max_sockets,
        "threads_peak": sampler.max_threads,
        "socket_samples": sampler.samples,
        "emulator_cpu_s": emulator_cpu,
        "emulator_busy": emulator_cpu / elapsed / emulator_count,
        "emulator_status_codes": [s["by_status"] for s in stats],
        "status_codes": _counts_since(stats, stats_before, "by_status"),
        # CPU the rest of the machine used meanwhile (other processes), in cores: near 0 on a quiet machine.
        "other_load_cores": max(0.0, busy - worker_cpu - emulator_cpu - own) / elapsed,
        "load_average_before": load_before,
        "package_sha256": package_digest(),
        "cold": cold,
        "local_settings": local_settings,
        "rate_limit": rate_limit,
        "per_get": per_get,
        "unrelated": unrelated,
    }


def _counts_since(stats: list[dict[str, Any]], before: list[dict[str, Any]], key: str) -> dict[str, int]:
    """A per-emulator count (``by_status``, ``by_method``) of the measured run: summed, warm-up excluded."""
    total: dict[str, int] = {}
    for now, then in zip(stats, before, strict=True):
        for name, count in now[key].items():
            total[name] = total.get(name, 0) + count - then[key].get(name, 0)
    return {name: count for name, count in total.items() if count}


def _expect(
    lines: queue.Queue[str], phase: str, timeout: float, worker: subprocess.Popen[str], stderr: IO[str]
) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if not line:
            stderr.seek(0)
            reason = "timed out" if line is None else f"exited with {worker.poll()}"
            raise RuntimeError(f"scale worker {reason} waiting for '{phase}':\n{stderr.read()[-4000:]}")
        if not line.startswith("{"):
            continue  # py-spy's own messages, when profiling
        payload = json.loads(line)
        if payload.get("phase") == phase:
            return payload


#: Per-run metrics summarised as medians over repeats.
METRICS = (
    "wall_s", "cpu_s", "cpu_per_request_s", "peak_rss", "rss_per_trigger", "lag_max_s", "lag_p99_s", "requests",
    "sockets_peak", "emulator_busy", "elapsed_s", "other_load_cores",
)  # fmt: skip


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each metric over the repeated runs of one (provider, N)."""
    summary: dict[str, Any] = {metric: median(run[metric] for run in runs) for metric in METRICS}
    summary["complete"] = all(run["complete"] for run in runs)
    summary["repeats"] = len(runs)
    summary["statuses"] = runs[-1]["statuses"]
    summary["events"] = min(run["events"] for run in runs)
    summary["pool_size"] = runs[-1].get("pool_size")
    summary["package_sha256"] = sorted(
        {run.get("package_sha256") for run in runs if run.get("package_sha256")}
    )
    return summary


def measure(
    ns: list[int],
    repeats_for: dict[int, int],
    polls: int,
    cap: float,
    emulator_count: int = 1,
    poll_intervals: dict[int, float] | None = None,
    profile_dir: Path | None = None,
    providers: tuple[str, ...] = PROVIDERS,
    cold: bool = False,
    local_settings: bool = False,
) -> dict[str, Any]:
    """Run every (N, provider) ``repeats_for[N]`` times, alternating providers; medians and ratios per N."""
    result: dict[str, Any] = {
        "polls_per_wait": polls,
        "cap_s": cap,
        "emulators": emulator_count,
        "local_settings": local_settings,
        "by_n": {},
    }
    for n in ns:
        poll_interval = (poll_intervals or {}).get(n) or default_poll_interval(n)
        runs: dict[str, list[dict[str, Any]]] = {provider: [] for provider in providers}
        for repeat in range(repeats_for[n]):
            for provider in providers:
                print(
                    f"  trigger scale N={n} {provider} run {repeat + 1}/{repeats_for[n]} (poll {poll_interval:g} s)",
                    file=sys.stderr,
                    flush=True,
                )
                profile_to = profile_dir / f"{provider}-n{n}-run{repeat + 1}.raw" if profile_dir else None
                run = quiet_run(
                    provider, n, poll_interval, polls, cap, emulator_count, profile_to, cold, local_settings
                )
                runs[provider].append(run)
        summaries = {provider: summarise(runs[provider]) for provider in providers}
        result["by_n"][str(n)] = {
            "poll_interval": poll_interval,
            "summary": summaries,
            "ratios": {
                metric: _ratio(summaries["ours"][metric], summaries["official"][metric]) for metric in METRICS
            }
            if len(summaries) == 2
            else {},
            "runs": runs,
        }
    return result


def quiet_run(
    provider: str,
    n: int,
    poll_interval: float,
    polls: int,
    cap: float,
    emulator_count: int,
    profile_to: Path | None,
    cold: bool = False,
    local_settings: bool = False,
    quiet_wait: float = 300.0,
    **options: Any,
) -> dict[str, Any]:
    """:func:`run_once` on a quiet machine: wait for other processes to calm down first, and run again (once) if
    they used more than ``NOISY`` CPUs during the run, keeping the quieter of the two. ``quiet_wait`` bounds
    each wait for calm, in seconds; ``options`` are :func:`run_once`'s."""
    best: dict[str, Any] | None = None
    for _attempt in range(2):
        wait_until_quiet(quiet_wait)
        run = run_once(
            provider,
            n,
            poll_interval,
            polls,
            cap,
            emulator_count,
            profile_to,
            cold,
            local_settings,
            **options,
        )
        print(f"    {_one_line(run)}", file=sys.stderr, flush=True)
        if best is None or run["other_load_cores"] < best["other_load_cores"]:
            best = run
        if run["other_load_cores"] <= NOISY:
            break
        print(
            "    (other processes were busy during that run: running it again)", file=sys.stderr, flush=True
        )
    assert best is not None
    return best


def _ratio(ours: float | None, official: float | None) -> float | None:
    return ours / official if ours is not None and official else None


def _one_line(run: dict[str, Any]) -> str:
    flag = "" if run["complete"] else f" INCOMPLETE ({run['events']}/{run['n']} events at the cap)"
    flag += f", built {run['constructions']}" if run.get("constructions") else ""
    return (
        f"wall {run['wall_s']:.1f} s, cpu {run['cpu_s']:.2f} s, {run['requests']} requests, "
        f"cpu/req {1000 * (run['cpu_per_request_s'] or 0):.2f} ms, lag max {1000 * run['lag_max_s']:.0f} ms "
        f"p99 {1000 * run['lag_p99_s']:.0f} ms, rss/trigger {run['rss_per_trigger'] / 1024:.1f} KiB, "
        f"peak rss {run['peak_rss'] / 2**20:.0f} MiB, sockets {run['sockets_peak']}, "
        f"emulator busy {100 * run['emulator_busy']:.0f}%, other load {run['other_load_cores']:.2f} cores, "
        f"statuses {run['statuses']}{flag}"
    )


def format_table(result: dict[str, Any]) -> str:
    """Markdown table: one block of rows per N, this provider, the official one, and the ratio."""
    header = (
        "| N | provider | poll s | wall s | CPU s | CPU/poll ms | peak RSS MiB | RSS/trigger KiB | lag max ms "
        "| lag p99 ms | HTTP requests | sockets at peak | emulator busy | other load |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [header]
    for n, block in result["by_n"].items():
        for provider in [provider for provider in PROVIDERS if provider in block["summary"]]:
            s = block["summary"][provider]
            cap_note = "" if s["complete"] else f" (> cap {result['cap_s']:.0f} s, {s['events']}/{n} events)"
            label = (
                f"this (pool {s['pool_size']})"
                if provider == "ours" and s.get("pool_size")
                else ("this" if provider == "ours" else "official 2.2.0")
            )
            rows.append(
                f"| {n} | {label} | {block['poll_interval']:g} "
                f"| {s['wall_s']:.1f}{cap_note} | {s['cpu_s']:.2f} | {_ms(s['cpu_per_request_s'])} "
                f"| {s['peak_rss'] / 2**20:.0f} | {s['rss_per_trigger'] / 1024:.1f} | {1000 * s['lag_max_s']:.0f} "
                f"| {1000 * s['lag_p99_s']:.1f} | {s['requests']:.0f} | {s['sockets_peak']:.0f} "
                f"| {100 * s['emulator_busy']:.0f}% | {_other(s.get('other_load_cores'))} |"
            )
        r = block["ratios"]
        if not r:
            continue
        capped = not block["summary"]["official"]["complete"]
        cells = [
            _ratio_cell(r, metric, capped, kind)
            for metric, kind in (
                ("wall_s", "total"), ("cpu_s", "total"), ("cpu_per_request_s", "rate"), ("peak_rss", "total"),
                ("rss_per_trigger", "count"), ("lag_max_s", "total"), ("lag_p99_s", "rate"), ("requests", "count"),
                ("sockets_peak", "count"),
            )
        ]  # fmt: skip
        rows.append(f"| {n} | **ratio this/official** | | {' | '.join(cells)} | | |")
    return "\n".join(rows)


def _ratio_cell(ratios: dict[str, float | None], metric: str, capped: bool, kind: str) -> str:
    """A ratio for the table. Against a capped official run, which did only part of the work, totals and peaks
    are lower bounds for the official provider, so their ratio is an upper bound (``<``); per-trigger figures and
    counts of the unfinished work are not comparable (``n/a``); rates stay as they are."""
    if not capped or kind == "rate":
        return _x(ratios[metric])
    return "n/a" if kind == "count" else f"<{_x(ratios[metric])}"


def _other(cores: float | None) -> str:
    return "not measured" if cores is None else f"{cores:.2f}"


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.2f}"


def _x(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3g}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", default="100,1000,5000", help="comma-separated trigger counts")
    parser.add_argument("--repeats", type=int, default=3, help="runs per (N, provider) for N <= 1000")
    parser.add_argument("--repeats-large", type=int, default=1, help="runs per (N, provider) for N > 1000")
    parser.add_argument(
        "--polls", type=int, default=3, help="polls per wait: the K-th GET returns a final status"
    )
    parser.add_argument("--poll-interval", type=float, help="override the per-N default (max(2, N/250) s)")
    parser.add_argument("--cap", type=float, default=600.0, help="wall-time cap per run, seconds")
    parser.add_argument(
        "--emulators", type=int, default=1, help="emulator processes, batches spread over them"
    )
    parser.add_argument("--json", type=Path, help="write the full result here")
    parser.add_argument(
        "--profile", type=Path, help="attach py-spy to each worker, raw stacks in this directory"
    )
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="for diagnosis: e.g. only 'ours'")
    parser.add_argument("--cold", action="store_true", help="no warm-up wait: a freshly started triggerer")
    parser.add_argument(
        "--local-settings",
        action="store_true",
        help="as a triggerer deployed with docs/recipes/airflow_local_settings.py",
    )
    args = parser.parse_args(argv)
    ensure_official_venv()
    ns = [int(part) for part in args.n.split(",") if part]
    result = measure(
        ns,
        {n: args.repeats if n <= 1000 else args.repeats_large for n in ns},
        args.polls,
        args.cap,
        args.emulators,
        {n: args.poll_interval for n in ns} if args.poll_interval else None,
        args.profile,
        tuple(args.providers.split(",")),
        args.cold,
        args.local_settings,
    )
    report(format_table(result), result, args.json)
    return result


if __name__ == "__main__":
    main()
