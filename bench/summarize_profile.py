"""Summarise a py-spy raw (collapsed-stack) profile: where each thread's samples go, inclusive and leaf.

Usage: .venv/bin/python bench/summarize_profile.py PROFILE.raw [--thread MainThread] [--top 25] [--match TEXT]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def load(path: Path) -> list[tuple[list[str], int]]:
    """(frames root-first, sample count) per distinct stack; the first frame names the thread."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _name(frame: str) -> str:
    """``function (module/path.py:line)`` -> ``function (path.py)``: one entry per function, not per line."""
    function, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    short = "/".join(path.split("/")[-2:])
    return f"{function} ({short})" if path else function


def summarise(path: Path, thread: str | None, top: int, match: str | None) -> str:
    stacks = load(path)
    per_thread: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for frames, count in stacks:
        per_thread[frames[0]] += count
        if thread and thread not in frames[0]:
            continue
        if match and not any(match in frame for frame in frames):
            continue
        total += count
        for name in {_name(frame) for frame in frames[1:]}:
            inclusive[name] += count
        leaf[_name(frames[-1])] += count
    lines = [f"{path.name}: {sum(per_thread.values())} samples", "threads:"]
    lines += [f"  {count:7d}  {name}" for name, count in per_thread.most_common()]
    lines.append(f"selected: {total} samples (thread={thread!r}, match={match!r})")
    lines.append("inclusive (share of selected samples with the function on the stack):")
    lines += (
        [f"  {100 * count / total:5.1f}%  {name}" for name, count in inclusive.most_common(top)]
        if total
        else []
    )
    lines.append("leaf (share of selected samples where the function is running):")
    lines += (
        [f"  {100 * count / total:5.1f}%  {name}" for name, count in leaf.most_common(top)] if total else []
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--thread", default="MainThread", help="substring of the thread to keep ('' for all)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", help="keep only stacks with a frame containing this text")
    args = parser.parse_args(argv)
    print(summarise(args.profile, args.thread or None, args.top, args.match))


if __name__ == "__main__":
    main()
