"""Coalesced polling (issue 22): the status board against one GET per wait and round, side by side in one run.

Usage: .venv/bin/python bench/board_vs_get.py [--parts storm,unlimited,large] [--n 1000] [--large-n 10000]
       [--repeats 1] [--large-per-get] [--wait-quiet 300] [--profile DIR] [--json FILE]

Every part runs this provider's single-batch ``OpenAIBatchCancellationTrigger``s in one event loop, in a fresh
worker process against an emulator process (bench/trigger_scale.py's ``run_once``), once per mode:

* ``board``: today's code; each round the loop's status board chooses GETs or a bounded walk of list pages;
* ``per-GET``: the same code with the board kept from walking (the worker's ``--per-get``), so every due wait
  gets its own ``GET /batches/{id}`` as before the board. A bench option only.

Each organisation's list also holds ``UNRELATED`` batches no wait asks for, seeded last, hence newest and first on
the list's pages: every walk reads past them.

Parts:

* ``storm``: N waits on batches that turn ``cancelled`` ``CANCEL_AFTER_S`` seconds after their cancel (the cancel
  is restarted when the measured run starts), polls every ``STORM_POLL_S`` s, an API serving ``RATE`` requests a
  second (429 with ``retry-after-ms`` beyond). Targets for the board: every wait ``cancelled``, at most
  ``STORM_MAX_REQUESTS`` requests (429s included), wall within 1.5x of cancelling time + one interval.
* ``unlimited``: N waits, no rate limit, batches ``cancelled`` on their ``POLLS``-th look (a GET, or a list page
  showing them), the poll interval of bench/trigger_scale.py for N. Targets for the board: worker CPU per
  wait-round (CPU seconds / the batches waits asked the board for, one per wait and round) at most 0.25 ms;
  loop lag p99 no worse than per-GET's.
* ``large``: ``--large-n`` waits as ``unlimited``, in a triggerer deployed with docs/recipes/airflow_local_settings.py.
  Targets for the board: every wait ``cancelled``; requests per round at most 1.1 x N / 100; max loop lag under
  50 ms. "Requests per round" is the run's requests over the rounds an average wait took part in (N x requests /
  wait-rounds), so a straggler round with few waits cannot lower it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trigger_scale
from _common import ensure_official_venv, median, report

MODES = ("board", "per-GET")
PARTS = ("storm", "unlimited", "large")
N, LARGE_N, UNRELATED = 1000, 10_000, 300
RATE, CANCEL_AFTER_S, STORM_POLL_S = 20, 30.0, 10.0
POLLS = 3  #: unlimited and large: the look that turns each batch cancelled
STORM_MAX_REQUESTS = 150
STORM_MAX_WALL_RATIO = 1.5
MAX_CPU_PER_WAIT_ROUND_S = 0.00025
MAX_LAG_S = 0.050
REQUESTS_PER_ROUND_FACTOR = 1.1  #: times N / 100


def run_part(
    part: str, mode: str, n: int, cap: float, quiet_wait: float, profile_dir: Path | None = None
) -> dict[str, Any]:
    """One measured run of ``part`` in ``mode``, with the figures its targets need; with ``profile_dir``, py-spy's
    raw stacks of the worker (diagnosis: it perturbs the numbers)."""
    options: dict[str, Any] = {"per_get": mode == "per-GET", "unrelated": UNRELATED, "quiet_wait": quiet_wait}
    if part == "storm":
        poll_interval, polls = STORM_POLL_S, POLLS
        options.update(
            rate_limit=RATE,
            cancelling={"cancel_after_seconds": CANCEL_AFTER_S, "cancel_after_polls": 10**9},
            cancel_at_go=True,
        )
    else:
        poll_interval, polls = trigger_scale.default_poll_interval(n), POLLS
        options["local_settings"] = part == "large"
    print(f"  {part} N={n} {mode} (poll {poll_interval:g} s)", file=sys.stderr, flush=True)
    profile_to = profile_dir / f"{part}-{mode}-n{n}.raw" if profile_dir else None
    run = trigger_scale.quiet_run("ours", n, poll_interval, polls, cap, 1, profile_to, **options)
    codes = run["status_codes"]
    wait_rounds = run["wait_rounds"]
    return {
        "mode": mode,
        "n": n,
        "poll_interval": poll_interval,
        "complete": run["complete"],
        "cancelled": run["statuses"].get("cancelled", 0),
        "statuses": run["statuses"],
        "requests": run["requests"],
        "pages": run["pages"],
        "gets": run["gets"],
        "rate_limited": codes.get("429", 0),
        "wall_s": run["wall_s"],
        "cpu_s": run["cpu_s"],
        "wait_rounds": wait_rounds,
        "board_rounds": run["board_rounds"],
        "rounds_per_wait": wait_rounds / n,
        "cpu_per_wait_round_s": run["cpu_s"] / wait_rounds if wait_rounds else None,
        "requests_per_round": n * run["requests"] / wait_rounds if wait_rounds else None,
        "lag_p99_s": run["lag_p99_s"],
        "lag_max_s": run["lag_max_s"],
        "lag_spikes": run["lag_spikes"],
        "gc_pause_max_s": run["gc_pause_max_s"],
        "gc_collections": run["gc_collections"],
        "gc_gen2": run["gc_gen2"],  # (pause s, objects freed) of each full collection, the first 20
        "frozen_objects": run["frozen_objects"],
        "peak_rss": run["peak_rss"],
        "emulator_busy": run["emulator_busy"],
        "other_load_cores": run["other_load_cores"],
        "local_settings": run["local_settings"],
        "package_sha256": run["package_sha256"],
    }


def measure(
    parts: tuple[str, ...] = PARTS,
    n: int = N,
    large_n: int = LARGE_N,
    repeats: int = 1,
    large_per_get: bool = False,
    cap: float = 900.0,
    quiet_wait: float = 300.0,
    profile_dir: Path | None = None,
) -> dict[str, Any]:
    """Every part in both modes (``large``: the board only, unless ``large_per_get``), modes alternating; per
    part and mode, the run with the median wall time of ``repeats``."""
    result: dict[str, Any] = {
        "unrelated": UNRELATED,
        "rate": RATE,
        "cancel_after_s": CANCEL_AFTER_S,
        "polls": POLLS,
        "repeats": repeats,
        "parts": {},
    }
    for part in parts:
        modes = MODES if part != "large" or large_per_get else ("board",)
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for _repeat in range(repeats if part != "large" else 1):
            for mode in modes:
                size = large_n if part == "large" else n
                runs[mode].append(run_part(part, mode, size, cap, quiet_wait, profile_dir))
        result["parts"][part] = {mode: _median_run(runs[mode]) for mode in modes}
        result["parts"][part]["all_runs"] = runs
    return result


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median wall time, with each rate and lag the median over all runs."""
    chosen = dict(sorted(runs, key=lambda run: run["wall_s"])[len(runs) // 2])
    for metric in ("cpu_per_wait_round_s", "lag_p99_s", "lag_max_s", "requests_per_round"):
        chosen[metric] = median(run[metric] for run in runs)
    chosen["repeats"] = len(runs)
    return chosen


def storm_ideal_s() -> float:
    """What the API's own cancelling time plus one interval allows."""
    return CANCEL_AFTER_S + STORM_POLL_S


def targets(result: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, threshold, met) for each target whose part was run; ``met`` is None for a part run at
    another size than the issue's (``--quick``), whose targets do not apply."""
    rows: list[tuple[str, str, str, bool | None]] = []
    parts = result["parts"]
    if storm := parts.get("storm", {}).get("board"):
        n = storm["n"]
        rows += [
            (f"storm N={n}: every wait cancelled", f"{storm['cancelled']} / {n}", f"{n} / {n}",
             storm["complete"] and storm["cancelled"] == n),
            (f"storm N={n}: requests (board)", (f"{storm['requests']} ({storm['pages']} pages, {storm['gets']} GETs, "
             f"{storm['rate_limited']} 429s)"), f"<= {STORM_MAX_REQUESTS}",
             storm["requests"] <= STORM_MAX_REQUESTS),
            (f"storm N={n}: wall (board)", f"{storm['wall_s']:.1f} s ({storm['wall_s'] / storm_ideal_s():.2f}x)",
             f"<= {STORM_MAX_WALL_RATIO}x ({storm_ideal_s():.0f} s) = {STORM_MAX_WALL_RATIO * storm_ideal_s():.0f} s",
             storm["wall_s"] <= STORM_MAX_WALL_RATIO * storm_ideal_s()),
        ]  # fmt: skip
    unlimited = parts.get("unlimited", {})
    if board := unlimited.get("board"):
        cpu = board["cpu_per_wait_round_s"]
        rows.append(
            (f"unlimited N={board['n']}: CPU per wait-round (board)", f"{1000 * cpu:.3f} ms",
             f"<= {1000 * MAX_CPU_PER_WAIT_ROUND_S:.2f} ms", cpu <= MAX_CPU_PER_WAIT_ROUND_S)
        )  # fmt: skip
        if per_get := unlimited.get("per-GET"):
            rows.append(
                (f"unlimited N={board['n']}: loop lag p99, board vs per-GET",
                 f"{1000 * board['lag_p99_s']:.1f} ms vs {1000 * per_get['lag_p99_s']:.1f} ms",
                 "board <= per-GET", board["lag_p99_s"] <= per_get["lag_p99_s"])
            )  # fmt: skip
    if large := parts.get("large", {}).get("board"):
        n = large["n"]
        limit = REQUESTS_PER_ROUND_FACTOR * n / 100
        rows += [
            (f"{n:,} waits, GC recipe: every wait cancelled", f"{large['cancelled']} / {n}", f"{n} / {n}",
             large["complete"] and large["cancelled"] == n),
            (f"{n:,} waits, GC recipe: requests per round", f"{large['requests_per_round']:.1f}",
             f"<= {limit:.0f}", large["requests_per_round"] <= limit),
            (f"{n:,} waits, GC recipe: max loop lag", f"{1000 * large['lag_max_s']:.0f} ms", "< 50 ms",
             large["lag_max_s"] < MAX_LAG_S),
        ]  # fmt: skip
    return [
        (name, value, threshold, met if _issue_size(name) else None) for name, value, threshold, met in rows
    ]


def _issue_size(name: str) -> bool:
    """Whether a target row's part ran at the size the issue sets its target for."""
    return name.startswith((f"storm N={N}:", f"unlimited N={N}:", f"{LARGE_N:,} waits"))


def format_table(result: dict[str, Any]) -> str:
    """One row per part and mode, then the targets."""
    rows = [
        (
            "| part | mode | N | poll s | waits cancelled | requests | list pages | GETs | 429s | rounds per wait "
            "| requests per round | wall s | CPU s | CPU per wait-round ms | lag p99 ms | lag max ms | other load |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for part, by_mode in result["parts"].items():
        for mode in MODES:
            if (r := by_mode.get(mode)) is None:
                continue
            label = part + (" (GC recipe)" if r["local_settings"] else "")
            incomplete = "" if r["complete"] else " (capped)"
            rows.append(
                f"| {label} | {mode} | {r['n']} | {r['poll_interval']:g} | {r['cancelled']}{incomplete} "
                f"| {r['requests']} | {r['pages']} | {r['gets']} | {r['rate_limited']} | {r['rounds_per_wait']:.2f} "
                f"| {_num(r['requests_per_round'], '.1f')} | {r['wall_s']:.1f} | {r['cpu_s']:.2f} "
                f"| {_num(r['cpu_per_wait_round_s'], '.3f', 1000)} | {1000 * r['lag_p99_s']:.1f} "
                f"| {1000 * r['lag_max_s']:.0f} | {r['other_load_cores']:.2f} |"
            )
    rows += ["", "| target | measured | threshold | met |", "|---|---|---|---|"]
    rows += [
        f"| {name} | {value} | {threshold} | {({True: 'yes', False: '**no**', None: 'n/a'})[met]} |"
        for name, value, threshold, met in targets(result)
    ]
    return "\n".join(rows)


def _num(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, spec)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--n", type=int, default=N, help="waits in the storm and the unlimited part")
    parser.add_argument("--large-n", type=int, default=LARGE_N, help="waits in the large part")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode of storm and unlimited")
    parser.add_argument("--large-per-get", action="store_true", help="run the large part per-GET too")
    parser.add_argument("--cap", type=float, default=900.0, help="wall-time cap per run, seconds")
    parser.add_argument(
        "--wait-quiet", type=float, default=300.0, help="wait up to this long for a quiet machine per run"
    )
    parser.add_argument(
        "--profile", type=Path, help="attach py-spy to each worker, raw stacks in this directory"
    )
    parser.add_argument("--json", type=Path, help="write the full result here")
    args = parser.parse_args(argv)
    parts = tuple(part for part in args.parts.split(",") if part)
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {', '.join(PARTS)}")
    ensure_official_venv()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    result = measure(
        parts, args.n, args.large_n, args.repeats, args.large_per_get, args.cap, args.wait_quiet, args.profile
    )
    report(format_table(result), result, args.json)
    return result


if __name__ == "__main__":
    main()
