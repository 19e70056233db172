"""The Batch API emulator in its own process, for benchmarks, driven by JSON commands on stdin.

Usage: .venv/bin/python bench/_emulator.py [--cancel-after-polls N]  (then JSON commands on stdin, one a line)

The emulator runs out of the measured process so its CPU and memory are not counted against a trigger. It is
driven over stdin/stdout (JSON lines) rather than its HTTP control endpoints so that seeding thousands of
batches and reading request counts costs nothing on the loopback path being measured.

Everything is the package's :class:`BatchAPIEmulator`, through its public API. Batches seeded with
``finish_after_polls=K`` stay ``in_progress`` for K-1 GETs and are ``completed`` on the K-th: the official
provider's trigger stops waiting at ``cancelling`` (it counts it as done), so to give it the same number of
polls per wait as this provider's trigger gets on a ``cancelling`` -> ``cancelled`` batch, its batches are
seeded this way. ``last_served`` reads the batch status each GET was answered with from the recorded requests
(:attr:`RecordedRequest.batch_status`): what a client's last poll saw, even if the batch changed since.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import IO, Any, Self

from airflow_provider_openai_batch.testing.emulator import BatchAPIEmulator, Fault

LIST_PATH = "/v1/batches"  #: the batch list; a GET of one batch is below it


def _stats(emulator: BatchAPIEmulator) -> dict[str, Any]:
    """Requests received so far (control traffic excluded), by method, by answered status code, and the list
    pages (``GET /v1/batches``) and GETs of one batch among them."""
    requests = emulator.requests
    reads = Counter(
        "pages" if request.path == LIST_PATH else "gets"
        for request in requests
        if request.method == "GET" and request.path.startswith(LIST_PATH)
    )
    return {
        "requests": len(requests),
        "by_method": dict(Counter(request.method for request in requests)),
        "by_status": {str(code): count for code, count in Counter(r.status for r in requests).items()},
        "pages": reads["pages"],
        "gets": reads["gets"],
    }


def _last_served(emulator: BatchAPIEmulator, ids: list[str]) -> dict[str, str | None]:
    """Per batch id, the batch status its last answered GET carried; None if no GET of it was answered."""
    served: dict[str, str | None] = dict.fromkeys(ids)
    for request in emulator.requests:  # in the order answered, so the last GET of a batch wins
        if request.method == "GET" and request.batch_status is not None:
            batch_id = request.path.rpartition("/")[2]
            if batch_id in served:
                served[batch_id] = request.batch_status
    return served


def _serve(args: argparse.Namespace, commands: IO[str], replies: IO[str]) -> None:
    emulator = BatchAPIEmulator(cancel_after_polls=args.cancel_after_polls)
    emulator.start()
    print(json.dumps({"base_url": emulator.base_url, "api_key": emulator.api_key}), file=replies, flush=True)
    try:
        for line in commands:
            command = json.loads(line)
            print(json.dumps(_execute(emulator, command)), file=replies, flush=True)
    finally:
        emulator.stop()


def _execute(emulator: BatchAPIEmulator, command: dict[str, Any]) -> dict[str, Any]:
    match command["cmd"]:
        case "seed":
            polls, kwargs = command.get("finish_after_polls"), command.get("kwargs", {})
            batches = emulator.add_batches(command["count"], finish_after_polls=polls, **kwargs)
            return {"ids": [batch["id"] for batch in batches]}
        case "stats":
            return _stats(emulator)
        case "clear":
            emulator.clear_requests()
            return {}
        case "requests_for":
            wanted = set(command["ids"])
            per_batch: Counter[str] = Counter()
            for request in emulator.requests:
                parts = request.path.split("/")
                if len(parts) > 3 and parts[3] in wanted:
                    per_batch[parts[3]] += 1
            return {"per_batch": dict(per_batch)}
        case "last_served":
            return {"statuses": _last_served(emulator, command["ids"])}
        case "restart_cancels":
            # The batches are cancelled now: a cancelling batch's ``cancel_after_seconds`` count from here, so a
            # time-based cancellation starts with the measured run, not at seeding.
            for batch_id in command["ids"]:
                emulator.set_status(batch_id, "cancelling")
            return {}
        case "limit_rate":
            emulator.limit_rate(command["requests"], per=command.get("per", 1.0))
            return {}
        case "latency":
            # Every later GET answered after this many seconds, as a distant API would be (a "delay" fault that
            # is never used up).
            emulator.inject(Fault("delay", times=2**62, method="GET", delay=command["seconds"]))
            return {}
    return {"error": f"unknown command {command['cmd']!r}"}


class EmulatorProcess:
    """Start ``bench/_emulator.py`` as a child process and talk to it; use as a context manager."""

    def __init__(self, python: str | Path = sys.executable, cancel_after_polls: int = 2) -> None:
        self._process = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), "--cancel-after-polls", str(cancel_after_polls)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        hello = json.loads(self._readline())
        self.base_url: str = hello["base_url"]
        self.api_key: str = hello["api_key"]
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._process.pid

    def call(self, cmd: str, **payload: Any) -> dict[str, Any]:
        with self._lock:
            assert self._process.stdin is not None
            self._process.stdin.write(json.dumps({"cmd": cmd, **payload}) + "\n")
            self._process.stdin.flush()
            return json.loads(self._readline())

    def seed(self, count: int, *, finish_after_polls: int | None = None, **kwargs: Any) -> list[str]:
        """Seed ``count`` batches; with ``finish_after_polls`` they complete on that GET (see the module doc)."""
        return self.call("seed", count=count, kwargs=kwargs, finish_after_polls=finish_after_polls)["ids"]

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def close(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _readline(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the emulator process exited (code {self._process.poll()})")
        return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cancel-after-polls", type=int, default=2)
    _serve(parser.parse_args(argv), sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
