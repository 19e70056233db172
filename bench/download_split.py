"""Saving a cancelled batch's results: wall time, throughput and peak RSS growth, against a plain httpx download.

Usage: .venv/bin/python bench/download_split.py [--requests 50000] [--request-bytes 4000] [--repeats 3]
       [--json out.json]

The emulator (in its own process, ``bench/_emulator.py``) holds a ``cancelled`` batch of ``--requests`` requests
whose input file has lines of ``--request-bytes`` bytes (50,000 x 4,000 = a 200 MB input file), half of which ran
(49 % results, 1 % errors). Each run is a fresh process (``bench/_download_worker.py``) that either saves the
batch's results with ``save_results`` to a local ``ObjectStoragePath`` (``ours``: output.jsonl, errors.jsonl and
remaining.jsonl, the input split by custom_id), or streams the same three files with a plain ``httpx.Client``
into local files (``httpx``: the floor for moving those bytes). Modes alternate; medians of ``--repeats`` runs.

Throughput is the bytes received from the API over the wall time. Targets (issue 14): peak RSS growth of
``ours`` under 64 MB, and its throughput at least half of ``httpx``'s in the same run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import BENCH_DIR, bench_env, connection_json, median, report, wait_until_quiet
from _emulator import EmulatorProcess

TARGET_RSS_GROWTH = 64 * 1024 * 1024  # bytes: "64 MB"
TARGET_THROUGHPUT_RATIO = 0.5
MODES = ("ours", "httpx")


def measure(requests: int, request_bytes: int, repeats: int, wait_quiet: float = 60.0) -> dict[str, Any]:
    """Seed the batch, then run both modes ``repeats`` times, alternating; return every run and the medians."""
    ran, failed = requests // 2 - requests // 100, requests // 100
    with EmulatorProcess(sys.executable) as emulator:
        [batch_id] = emulator.seed(
            1,
            status="cancelled",
            total_requests=requests,
            completed_requests=ran,
            failed_requests=failed,
            request_bytes=request_bytes,
        )
        [warmup_id] = emulator.seed(1, status="cancelled", total_requests=200, request_bytes=request_bytes)
        sizes = _make_files(emulator, [batch_id, warmup_id])
        env = bench_env(
            AIRFLOW_CONN_OPENAI_DEFAULT=connection_json("openai_batch", emulator.api_key, emulator.base_url)
        )
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for mode in MODES:
                other_load = wait_until_quiet(wait_quiet)
                runs[mode].append({**_run(mode, batch_id, warmup_id, env), "other_load": other_load})
    summary = {mode: _summary(runs[mode]) for mode in MODES}
    ratio = summary["ours"]["throughput_bytes_per_s"] / summary["httpx"]["throughput_bytes_per_s"]
    return {
        "requests": requests,
        "request_bytes": request_bytes,
        "requests_ran": ran + failed,
        "file_bytes": sizes[batch_id],
        "repeats": repeats,
        "runs": runs,
        "summary": summary,
        "throughput_ratio": ratio,
        "targets": {
            "peak_rss_growth": summary["ours"]["peak_rss_growth_bytes"] < TARGET_RSS_GROWTH,
            "throughput_ratio": ratio >= TARGET_THROUGHPUT_RATIO,
        },
    }


def _make_files(emulator: EmulatorProcess, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Have the emulator make the batches' files now (asking for their sizes does), so no run waits for it."""
    sizes: dict[str, dict[str, int]] = {}
    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    with httpx.Client(base_url=emulator.base_url, headers=headers, timeout=600) as client:
        for batch_id in batch_ids:
            batch = client.get(f"/batches/{batch_id}").json()
            sizes[batch_id] = {
                kind: client.get(f"/files/{batch[f'{kind}_file_id']}").json()["bytes"]
                for kind in ("input", "output", "error")
            }
    return sizes


def _run(mode: str, batch_id: str, warmup_id: str, env: dict[str, str]) -> dict[str, Any]:
    out_dir = tempfile.mkdtemp(prefix=f"bench-download-{mode}-")
    try:
        finished = subprocess.run(
            [sys.executable, str(BENCH_DIR / "_download_worker.py"), mode, batch_id, warmup_id, out_dir],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
        )
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    result["throughput_bytes_per_s"] = result["bytes_received"] / result["wall_s"]
    return result


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("wall_s", "throughput_bytes_per_s", "peak_rss_growth_bytes", "bytes_received")
    return {key: median(run[key] for run in runs) for key in keys}


def format_table(result: dict[str, Any]) -> str:
    ours, floor = result["summary"]["ours"], result["summary"]["httpx"]
    mib = 1024 * 1024
    files = result["file_bytes"]
    header = (
        f"{result['requests']:,} requests, {files['input'] / 1e6:.0f} MB input file, {result['requests_ran']:,} "
        f"ran ({files['output'] / 1e6:.1f} MB output, {files['error'] / 1e6:.2f} MB errors); medians of "
        f"{result['repeats']} runs."
    )
    rows = [
        (
            "wall time",
            f"{ours['wall_s']:.2f} s",
            f"{floor['wall_s']:.2f} s",
            f"{ours['wall_s'] / floor['wall_s']:.2f}",
        ),
        (
            "throughput (bytes received / wall)",
            f"{ours['throughput_bytes_per_s'] / mib:.0f} MiB/s",
            f"{floor['throughput_bytes_per_s'] / mib:.0f} MiB/s",
            f"{result['throughput_ratio']:.2f}",
        ),
        (
            "peak RSS growth",
            f"{ours['peak_rss_growth_bytes'] / mib:.1f} MiB",
            f"{floor['peak_rss_growth_bytes'] / mib:.1f} MiB",
            "",
        ),
    ]
    targets = result["targets"]
    lines = [
        header,
        "",
        "| | save_results to a local ObjectStoragePath | plain httpx stream to local files | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {' | '.join(row)} |" for row in rows),
        "",
        (
            f"Targets: peak RSS growth < 64 MB **{_met(targets['peak_rss_growth'])}**; throughput >= 0.5x "
            f"plain httpx **{_met(targets['throughput_ratio'])}**."
        ),
    ]
    return "\n".join(lines)


def _met(met: bool) -> str:
    return "met" if met else "not met"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--request-bytes", type=int, default=4_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the full result here")
    args = parser.parse_args(argv)
    result = measure(args.requests, args.request_bytes, args.repeats)
    report(format_table(result), result, args.json)
    return result


if __name__ == "__main__":
    main()
