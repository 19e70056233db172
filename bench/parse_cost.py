"""DAG-parse cost: extra import time and memory of each provider's operator module on top of ``airflow.sdk``.

Usage: .venv/bin/python bench/parse_cost.py [--runs 7] [--json out.json]

Each sample is a fresh interpreter of ``.bench-venv`` (the same interpreter and site-packages for both
providers) that first imports ``airflow.sdk`` (as every DAG file does), then measures the one ``from ... import``
line a DAG file adds: wall time (``time.perf_counter``), RSS growth (``/proc/self/statm``), modules added to
``sys.modules``. A second, separate set of interpreters measures the Python heap retained by the import with
``tracemalloc`` (which slows the import, so it is never timed). Providers alternate run by run so drift on the
machine hits both alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_PYTHON, bench_env, ensure_official_venv, median, report, wait_until_quiet

#: The import line a DAG file adds for each provider.
IMPORTS: dict[str, str] = {
    "ours": "from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator",
    "official": "from airflow.providers.openai.operators.openai import OpenAITriggerBatchOperator",
}

_CHILD = r"""
import gc, json, os, sys, time
import airflow.sdk  # what every DAG file imports first
statement = sys.argv[1]
mode = sys.argv[2]
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * page
gc.collect()
modules_before = set(sys.modules)
if mode == "tracemalloc":
    import tracemalloc
    tracemalloc.start()
    exec(statement)
    gc.collect()
    heap, _ = tracemalloc.get_traced_memory()
    print(json.dumps({"heap_bytes": heap}))
else:
    rss_before = rss()
    start = time.perf_counter()
    exec(statement)
    seconds = time.perf_counter() - start
    rss_after = rss()
    added = sorted(set(sys.modules) - modules_before)
    top = sorted({name.split(".")[0] for name in added})
    print(json.dumps({"seconds": seconds, "rss_bytes": rss_after - rss_before, "modules": len(added),
                      "top_level_packages": top}))
"""


def sample(provider: str, mode: str, env: dict[str, str]) -> dict[str, Any]:
    """One fresh interpreter measuring ``provider``'s import line in ``mode`` (``time`` or ``tracemalloc``)."""
    completed = subprocess.run(
        [str(BENCH_PYTHON), "-c", _CHILD, IMPORTS[provider], mode],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"parse-cost child for {provider} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure(runs: int = 7, heap_runs: int = 3) -> dict[str, Any]:
    """Medians per provider over ``runs`` timed interpreters and ``heap_runs`` tracemalloc interpreters."""
    env = bench_env()
    samples: dict[str, list[dict[str, Any]]] = {provider: [] for provider in IMPORTS}
    heaps: dict[str, list[int]] = {provider: [] for provider in IMPORTS}
    for provider in IMPORTS:  # warm the bytecode caches so no sample pays for compiling
        sample(provider, "time", env)
    for run in range(runs):
        wait_until_quiet(120)
        for provider in IMPORTS:
            samples[provider].append(sample(provider, "time", env))
            print(
                f"  parse cost {provider} run {run + 1}/{runs}: {samples[provider][-1]['seconds'] * 1000:.1f} ms",
                file=sys.stderr,
            )
    for _ in range(heap_runs):
        wait_until_quiet(120)
        for provider in IMPORTS:
            heaps[provider].append(sample(provider, "tracemalloc", env)["heap_bytes"])
    result: dict[str, Any] = {"runs": runs, "heap_runs": heap_runs, "imports": IMPORTS, "providers": {}}
    for provider, rows in samples.items():
        result["providers"][provider] = {
            "import_seconds": median(row["seconds"] for row in rows),
            "rss_bytes": median(row["rss_bytes"] for row in rows),
            "modules": median(row["modules"] for row in rows),
            "heap_bytes": median(heaps[provider]),
            "top_level_packages": rows[-1]["top_level_packages"],
            "samples": rows,
            "heap_samples": heaps[provider],
        }
    ours, official = result["providers"]["ours"], result["providers"]["official"]
    result["ratios"] = {
        key: (ours[key] / official[key]) if official[key] else None
        for key in ("import_seconds", "rss_bytes", "modules", "heap_bytes")
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of the medians and the ours/official ratios."""
    ours, official, ratios = result["providers"]["ours"], result["providers"]["official"], result["ratios"]
    rows = [
        ("Extra import time", f"{ours['import_seconds'] * 1000:.1f} ms", f"{official['import_seconds'] * 1000:.1f} ms",
         f"{ratios['import_seconds']:.3f}"),
        ("Extra RSS", f"{ours['rss_bytes'] / 2**20:.2f} MiB", f"{official['rss_bytes'] / 2**20:.2f} MiB",
         _ratio(ratios["rss_bytes"])),
        ("Python heap retained (tracemalloc)", f"{ours['heap_bytes'] / 2**20:.2f} MiB",
         f"{official['heap_bytes'] / 2**20:.2f} MiB", _ratio(ratios["heap_bytes"])),
        ("Modules added", f"{ours['modules']:.0f}", f"{official['modules']:.0f}", _ratio(ratios["modules"])),
    ]  # fmt: skip
    lines = [
        "| Metric (median) | this provider | official 2.2.0 | ratio (this / official) |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {this} | {theirs} | {ratio} |" for name, this, theirs, ratio in rows]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=7, help="timed fresh interpreters per provider (default 7)"
    )
    parser.add_argument("--heap-runs", type=int, default=3, help="tracemalloc interpreters per provider")
    parser.add_argument("--json", type=Path, help="write the full result here")
    args = parser.parse_args(argv)
    ensure_official_venv()
    result = measure(args.runs, args.heap_runs)
    report(format_table(result), result, args.json)
    return result


if __name__ == "__main__":
    main()
