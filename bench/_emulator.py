"""The Batch API emulator in its own process, for benchmarks, plus the one behaviour the benchmarks add to it.

Usage: .venv/bin/python bench/_emulator.py [--cancel-after-polls N]  (then JSON commands on stdin, one a line)

The emulator runs out of the measured process so its CPU and memory are not counted against a trigger. It is
driven over stdin/stdout (JSON lines) rather than its HTTP control endpoints so that seeding thousands of
batches and reading request counts costs nothing on the loopback path being measured.

:class:`BenchEmulator` adds one workload the package's emulator does not model: a batch that stays
``in_progress`` for K-1 GETs and is ``completed`` on the K-th. The official provider's trigger stops waiting at
``cancelling`` (it counts it as done), so to give it the same number of polls per wait as this provider's trigger
gets on a ``cancelling`` -> ``cancelled`` batch, its batches are seeded this way.
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

from airflow_provider_openai_batch.testing.emulator import BatchAPIEmulator


class BenchEmulator(BatchAPIEmulator):
    """:class:`BatchAPIEmulator` plus batches that finish on their K-th GET without a cancel."""

    def __init__(self, *, record_statuses: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._record_statuses = record_statuses
        self._served: dict[str, str] = {}  # batch id -> status in the last GET answered for it
        if not hasattr(BatchAPIEmulator, "_retrieve"):
            raise RuntimeError(
                "BatchAPIEmulator no longer has _retrieve(batch_id): update bench/_emulator.py."
            )
        self._finish_after: dict[str, tuple[int, str]] = {}
        self._gets: dict[str, int] = {}
        self._bench_lock = threading.Lock()

    def add_finishing_batch(self, polls: int, finish_as: str = "completed", **kwargs: Any) -> dict[str, Any]:
        """Seed an ``in_progress`` batch that becomes ``finish_as`` on its ``polls``-th GET (1 = the first)."""
        batch = self.add_batch(status="in_progress", **kwargs)
        with self._bench_lock:
            self._finish_after[batch["id"]] = (max(1, polls), finish_as)
        return batch

    def _retrieve(self, batch_id: str) -> Any:
        plan = self._finish_after.get(batch_id)
        if plan is not None:
            with self._bench_lock:
                gets = self._gets[batch_id] = self._gets.get(batch_id, 0) + 1
                due = gets >= plan[0]
                if due:
                    del self._finish_after[batch_id]
            if due:
                self.set_status(batch_id, plan[1])
        response = super()._retrieve(batch_id)
        if self._record_statuses and response.status == 200:
            self._served[batch_id] = json.loads(response.body)["status"]
        return response

    def stats(self) -> dict[str, Any]:
        """Requests received so far (control traffic excluded), by method, and by answered status code."""
        requests = self.requests
        return {
            "requests": len(requests),
            "by_method": dict(Counter(request.method for request in requests)),
            "by_status": {str(code): count for code, count in Counter(r.status for r in requests).items()},
        }


def _serve(args: argparse.Namespace, commands: IO[str], replies: IO[str]) -> None:
    emulator = BenchEmulator(cancel_after_polls=args.cancel_after_polls, record_statuses=args.record_statuses)
    emulator.start()
    print(json.dumps({"base_url": emulator.base_url, "api_key": emulator.api_key}), file=replies, flush=True)
    try:
        for line in commands:
            command = json.loads(line)
            print(json.dumps(_execute(emulator, command)), file=replies, flush=True)
    finally:
        emulator.stop()


def _execute(emulator: BenchEmulator, command: dict[str, Any]) -> dict[str, Any]:
    match command["cmd"]:
        case "seed":
            kwargs = command.get("kwargs", {})
            polls = command.get("finish_after_polls")
            count = command["count"]
            if polls is None:
                ids = [emulator.add_batch(**kwargs)["id"] for _ in range(count)]
            else:
                ids = [emulator.add_finishing_batch(polls, **kwargs)["id"] for _ in range(count)]
            return {"ids": ids}
        case "stats":
            return emulator.stats()
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
            return {"statuses": {i: emulator._served.get(i) for i in command["ids"]}}
    return {"error": f"unknown command {command['cmd']!r}"}


class EmulatorProcess:
    """Start ``bench/_emulator.py`` as a child process and talk to it; use as a context manager."""

    def __init__(
        self, python: str | Path = sys.executable, cancel_after_polls: int = 2, record_statuses: bool = False
    ) -> None:
        self._process = subprocess.Popen(
            [
                str(python),
                str(Path(__file__).resolve()),
                "--cancel-after-polls",
                str(cancel_after_polls),
                *(["--record-statuses"] if record_statuses else []),
            ],
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
        """Seed ``count`` batches; with ``finish_after_polls`` they are in_progress batches that complete."""
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
    parser.add_argument("--record-statuses", action="store_true", help="remember the status each GET served")
    _serve(parser.parse_args(argv), sys.stdin, sys.stdout)


if __name__ == "__main__":
    main()
