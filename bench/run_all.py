"""Run every benchmark against the official OpenAI provider and write a report; what ``make bench`` runs.

Usage: .venv/bin/python bench/run_all.py [--quick] [--n 100,1000,5000] [--repeats 3]
       [--skip scale,settings,parse,requests,download,storm,board] [--only board,parse]

Creates ``.bench-venv`` (official provider 2.2.0) on first use, then runs bench/parse_cost.py,
bench/requests_per_cancel.py, bench/download_split.py (saving a 50,000-request batch's results, against a plain
httpx download) and bench/trigger_scale.py (for every N as Airflow runs triggers by default, and at
N = 1,000 again as a triggerer deployed with docs/recipes/airflow_local_settings.py), bench/rate_limit_storm.py
and bench/board_vs_get.py (the status board against one GET per wait and round), and writes
``bench/results/latest.json`` (every run's raw numbers) and ``bench/results/latest.md`` (machine, tables,
targets), also printed at the end. ``--quick`` is a smoke run of a minute or two (N=100 once, fewer samples); the
full run takes about 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import board_vs_get
import download_split
import parse_cost
import rate_limit_storm
import requests_per_cancel
import trigger_scale
from _common import (
    BENCH_DIR,
    BENCH_PYTHON,
    RESULTS_DIR,
    ROOT,
    bench_env,
    ensure_official_venv,
    machine_info,
    package_digest,
    wait_until_quiet,
    write_json,
)

#: The issue's targets for this provider at N = 1,000, and for the parse cost.
TARGET_N = 1000
TARGET_LAG_MAX_S = 0.050
TARGET_RSS_PER_TRIGGER = 50_000  # bytes: "50 KB"
TARGET_CPU_PER_POLL_S = 0.001
TARGET_PARSE_RATIO = 0.1
TARGET_IMPORT_S = 0.015  #: the operator module's import on top of airflow.sdk (issue 22)
#: What ``--skip`` and ``--only`` name, and each part's key in the results.
PARTS = {
    "parse": "parse_cost",
    "requests": "requests_per_cancel",
    "download": "download_split",
    "scale": "trigger_scale",
    "settings": "trigger_scale_local_settings",
    "storm": "rate_limit_storm",
    "board": "board_vs_get",
}


def source_state() -> dict[str, Any]:
    """Which code was measured: the commit, and a digest of the package's files as they were (edits included)."""
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--short", "airflow_provider_openai_batch"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    return {"commit": commit, "package_sha256": package_digest(), "uncommitted": [d for d in dirty if d]}


def run_requests_per_cancel(batches: int, quick: bool) -> dict[str, Any]:
    """Run bench/requests_per_cancel.py in ``.bench-venv`` (it needs both providers) and read its JSON."""
    out = RESULTS_DIR / "requests_per_cancel.json"
    cases = ["--cases", "1:0.25,3:1"] if quick else []
    subprocess.run(
        [str(BENCH_PYTHON), str(BENCH_DIR / "requests_per_cancel.py"), "--batches", str(batches), "--json", str(out),
         *cases],
        check=True,
        env=bench_env(),
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return json.loads(out.read_text())


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target: measured value, threshold, met or not (None when its measurement was not run)."""
    targets: list[dict[str, Any]] = []
    scale = results.get("trigger_scale", {}).get("by_n", {}).get(str(TARGET_N))
    ours = scale["summary"].get("ours") if scale else None
    with_settings = results.get("trigger_scale_local_settings", {}).get("by_n", {}).get(str(TARGET_N))
    ours_with_settings = with_settings["summary"].get("ours") if with_settings else None

    def add(name: str, value: Any, threshold: str, met: bool | None) -> None:
        targets.append({"target": name, "measured": value, "threshold": threshold, "met": met})

    if ours:
        add(
            "event-loop max lag at N=1000",
            f"{1000 * ours['lag_max_s']:.0f} ms",
            "< 50 ms",
            ours["lag_max_s"] < TARGET_LAG_MAX_S,
        )
        constructions = [run["constructions"] for run in scale["runs"]["ours"]]
        clients = max(c.get("httpx.AsyncClient", 0) + c.get("httpx.Client", 0) for c in constructions)
        add(
            "no per-poll client construction at N=1000",
            f"{clients} HTTP client(s) for {ours['requests']:.0f} polls",
            "1 shared client",
            clients <= 1,
        )
        add(
            "RSS per waiting trigger at N=1000",
            f"{ours['rss_per_trigger'] / 1024:.1f} KiB",
            "< 50 KB",
            ours["rss_per_trigger"] < TARGET_RSS_PER_TRIGGER,
        )
        add(
            "CPU per poll at N=1000",
            f"{1000 * ours['cpu_per_request_s']:.2f} ms",
            "< 1 ms",
            ours["cpu_per_request_s"] < TARGET_CPU_PER_POLL_S,
        )
    if ours_with_settings:
        add(
            "event-loop max lag at N=1000, triggerer with docs/recipes/airflow_local_settings.py",
            f"{1000 * ours_with_settings['lag_max_s']:.0f} ms",
            "< 50 ms",
            ours_with_settings["lag_max_s"] < TARGET_LAG_MAX_S,
        )
    storm = results.get("rate_limit_storm", {}).get("runs", {}).get("ours")
    if storm:
        for name, value, met in rate_limit_storm.targets(storm):
            add(f"rate-limit storm: {name}", value, name, met)
    download = results.get("download_split")
    if download:
        growth = download["summary"]["ours"]["peak_rss_growth_bytes"]
        add(
            f"peak RSS growth saving a {download['requests']:,}-request batch's results",
            f"{growth / 1024 / 1024:.1f} MiB",
            "< 64 MB",
            download["targets"]["peak_rss_growth"],
        )
        add(
            "throughput saving results vs a plain httpx download",
            f"{download['throughput_ratio']:.2f}x",
            ">= 0.5x",
            download["targets"]["throughput_ratio"],
        )
    board = results.get("board_vs_get")
    if board:
        for name, value, threshold, met in board_vs_get.targets(board):
            add(f"status board: {name}", value, threshold, met)
    parse = results.get("parse_cost")
    if parse:
        ours_parse = parse["providers"]["ours"]
        add(
            "operator module import on top of airflow.sdk (median of fresh interpreters)",
            f"{1000 * ours_parse['import_seconds']:.1f} ms (RSS +{ours_parse['rss_bytes'] / 2**20:.2f} MiB)",
            f"<= {1000 * TARGET_IMPORT_S:.0f} ms",
            ours_parse["import_seconds"] <= TARGET_IMPORT_S,
        )
        ratio = parse["ratios"]["import_seconds"]
        add("parse cost (import time) vs official", f"{ratio:.3f}x", "<= 0.1x", ratio <= TARGET_PARSE_RATIO)
        mem_ratio = parse["ratios"]["rss_bytes"]
        add("parse cost (RSS) vs official", f"{mem_ratio:.3f}x", "<= 0.1x", mem_ratio <= TARGET_PARSE_RATIO)
    return targets


def format_report(results: dict[str, Any]) -> str:
    machine = results["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Run {results['started']} in {results['duration_s'] / 60:.1f} min; mode: {results['mode']}."
        + "".join(
            f" {part} reused from the run of {when}." for part, when in results.get("reused", {}).items()
        ),
        f"Code: commit {results['source']['commit'][:12]}, package digest {results['source']['package_sha256']}"
        + (
            f" (uncommitted: {', '.join(results['source']['uncommitted'])})"
            if results["source"]["uncommitted"]
            else ""
        ),
        "",
        (
            f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['ram_gib']} GiB RAM, Linux "
            f"{machine['kernel']}, Python {machine['python']}, apache-airflow {machine['apache-airflow']} (task SDK "
            f"{machine['apache-airflow-task-sdk']}), apache-airflow-providers-openai "
            f"{machine['apache-airflow-providers-openai']} (openai {machine['openai']}), httpx {machine['httpx']}, "
            f"pydantic {machine['pydantic']}."
        ),
    ]
    if "trigger_scale" in results:
        scale = results["trigger_scale"]
        repeats = {
            n: block["summary"]["ours"]["repeats"]
            for n, block in scale["by_n"].items()
            if "ours" in block["summary"]
        }
        lines += [
            "",
            "## Trigger scale",
            "",
            f"{scale['polls_per_wait']} polls per wait; medians over runs per N: "
            + ", ".join(f"N={n}: {r}" for n, r in repeats.items())
            + f"; cap {scale['cap_s']:.0f} s per run.",
            "",
            trigger_scale.format_table(scale),
        ]
    if "trigger_scale_local_settings" in results:
        scale = results["trigger_scale_local_settings"]
        lines += [
            "",
            "## Trigger scale, triggerer deployed with docs/recipes/airflow_local_settings.py",
            "",
            (
                "Each worker loads the recipe as `airflow triggerer` would and forks; the child runs the triggers "
                "with the heap it inherited frozen. Same emulator workload as above."
            ),
            "",
            trigger_scale.format_table(scale),
        ]
    if "parse_cost" in results:
        parse = results["parse_cost"]
        lines += [
            "",
            "## Parse cost",
            "",
            f"Median of {parse['runs']} fresh interpreters (heap: {parse['heap_runs']}), on top of `import airflow.sdk`.",
            "",
            parse_cost.format_table(parse),
        ]
    if "rate_limit_storm" in results:
        storm = results["rate_limit_storm"]
        lines += [
            "",
            f"## Rate-limit storm: {storm['n']} waits, {storm['polls']} polls each, API serving {storm['rate']} requests/s",
            "",
            rate_limit_storm.format_table(storm),
        ]
    if "board_vs_get" in results:
        board = results["board_vs_get"]
        lines += [
            "",
            "## Status board against one GET per wait and round",
            "",
            (
                f"Each organisation's list also holds {board['unrelated']} unrelated batches, first on its pages. "
                f"Storm: {board['rate']} requests/s, batches cancelled {board['cancel_after_s']:.0f} s after their "
                f"cancel; unlimited and large: cancelled at look {board['polls']} (a GET, or a list page showing them)."
            ),
            "",
            board_vs_get.format_table(board),
        ]
    if "download_split" in results:
        lines += [
            "",
            "## Saving a cancelled batch's results",
            "",
            download_split.format_table(results["download_split"]),
        ]
    if "requests_per_cancel" in results:
        lines += [
            "",
            "## Requests per cancellation",
            "",
            f"{results['requests_per_cancel']['batches']} batches per case and flow.",
            "",
            requests_per_cancel.format_table(results["requests_per_cancel"]),
        ]
    if results.get("targets"):
        lines += ["", "## Targets", "", "| target | measured | threshold | met |", "|---|---|---|---|"]
        for target in results["targets"]:
            met = {True: "yes", False: "**no**", None: "n/a"}[target["met"]]
            lines.append(f"| {target['target']} | {target['measured']} | {target['threshold']} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N=100 once, fewer samples")
    parser.add_argument("--n", help="trigger counts (default 100,1000,5000; --quick: 100)")
    parser.add_argument(
        "--repeats", type=int, help="trigger-scale runs per N <= 1000 (default 3; --quick: 1)"
    )
    parser.add_argument(
        "--cap",
        type=float,
        default=300.0,
        help="wall-time cap of one trigger-scale run, seconds (default 300: keeps the run near 20 min)",
    )
    parser.add_argument("--skip", default="", help=f"comma-separated, of: {', '.join(PARTS)}")
    parser.add_argument("--only", default="", help="comma-separated: run these parts only (see --skip)")
    parser.add_argument("--reuse", type=Path, help="take the skipped parts' results from this earlier JSON")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=600.0,
        help="before each part, wait up to this many seconds for other processes to go quiet",
    )
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        skip |= set(PARTS) - set(args.only.split(","))
    if unknown := (skip | set(filter(None, args.only.split(",")))) - set(PARTS):
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    ns = [int(n) for n in (args.n or ("100" if args.quick else "100,1000,5000")).split(",")]
    repeats = args.repeats or (1 if args.quick else 3)

    started = time.time()
    ensure_official_venv()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(),
        "source": source_state(),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    results["other_load_at_start"] = {}
    if "parse" not in skip:
        results["other_load_at_start"]["parse_cost"] = wait_until_quiet(args.wait_quiet)
        print("parse cost ...", file=sys.stderr, flush=True)
        results["parse_cost"] = parse_cost.measure(
            runs=3 if args.quick else 7, heap_runs=1 if args.quick else 3
        )
    if "requests" not in skip:
        results["other_load_at_start"]["requests_per_cancel"] = wait_until_quiet(args.wait_quiet)
        print("requests per cancellation ...", file=sys.stderr, flush=True)
        results["requests_per_cancel"] = run_requests_per_cancel(
            batches=3 if args.quick else 10, quick=args.quick
        )
    if "download" not in skip:
        results["other_load_at_start"]["download_split"] = wait_until_quiet(args.wait_quiet)
        print("saving a cancelled batch's results ...", file=sys.stderr, flush=True)
        results["download_split"] = download_split.measure(
            requests=5_000 if args.quick else 50_000, request_bytes=4_000, repeats=1 if args.quick else 3
        )
    if args.reuse:
        earlier = json.loads(args.reuse.read_text())
        for part in skip:
            if PARTS[part] in earlier:
                results[PARTS[part]] = earlier[PARTS[part]]
                results.setdefault("reused", {})[PARTS[part]] = earlier.get("started")
                results.setdefault("reused_source", earlier.get("source"))
    if "scale" not in skip:
        results["other_load_at_start"]["trigger_scale"] = wait_until_quiet(args.wait_quiet)
        print("trigger scale ...", file=sys.stderr, flush=True)
        results["trigger_scale"] = trigger_scale.measure(
            ns, {n: repeats if n <= 1000 else 1 for n in ns}, polls=3, cap=args.cap
        )
    if "settings" not in skip:
        n = TARGET_N if TARGET_N in ns else ns[0]
        results["other_load_at_start"]["trigger_scale_local_settings"] = wait_until_quiet(args.wait_quiet)
        print(
            "trigger scale, triggerer with the recommended airflow_local_settings ...",
            file=sys.stderr,
            flush=True,
        )
        results["trigger_scale_local_settings"] = trigger_scale.measure(
            [n], {n: repeats}, polls=3, cap=args.cap, local_settings=True
        )
    if "storm" not in skip:
        results["other_load_at_start"]["rate_limit_storm"] = wait_until_quiet(args.wait_quiet)
        print("rate-limit storm ...", file=sys.stderr, flush=True)
        results["rate_limit_storm"] = rate_limit_storm.main(
            ["--n", "100" if args.quick else str(rate_limit_storm.N)]
        )
    if "board" not in skip:
        results["other_load_at_start"]["board_vs_get"] = wait_until_quiet(args.wait_quiet)
        print("status board against one GET per wait and round ...", file=sys.stderr, flush=True)
        results["board_vs_get"] = board_vs_get.measure(
            n=100 if args.quick else board_vs_get.N,
            large_n=1000 if args.quick else board_vs_get.LARGE_N,
            quiet_wait=args.wait_quiet,
        )
    results["targets"] = evaluate_targets(results)
    results["duration_s"] = time.time() - started
    if args.reuse:
        results["reused_from"] = str(args.reuse)
    write_json(RESULTS_DIR / "latest.json", results)
    report = format_report(results)
    (RESULTS_DIR / "latest.md").write_text(report)
    print(report)
    return results


if __name__ == "__main__":
    main()
