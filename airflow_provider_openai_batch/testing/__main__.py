"""Run the Batch API emulator in the foreground: ``python -m airflow_provider_openai_batch.testing --port 0``.

For tests and demos whose Airflow components run in other processes. The one line printed at start-up carries
the API base URL, so a parent process can read it (and the port chosen by ``--port 0``) from stdout.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence

from airflow_provider_openai_batch.testing.emulator import DEFAULT_API_KEY, BatchAPIEmulator, seed_demo


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    parser = argparse.ArgumentParser(
        prog="python -m airflow_provider_openai_batch.testing", description="Local OpenAI Batch API emulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (the default)")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument("--seed", choices=["demo"], help="seed a small demo set of batches")
    parser.add_argument("--cancel-after-polls", type=int, default=2, help="GETs until a cancel completes")
    parser.add_argument("--cancel-after-seconds", type=float, help="or seconds until a cancel completes")
    parser.add_argument(
        "--step-after-polls", type=int, default=1, help="GETs per step of a created batch towards completed"
    )
    parser.add_argument("--step-after-seconds", type=float, help="or seconds per step")
    parser.add_argument(
        "--token-lifetime", type=float, default=3600.0, help="seconds a workload identity token lasts"
    )
    args = parser.parse_args(argv)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    emulator = BatchAPIEmulator(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        cancel_after_polls=args.cancel_after_polls,
        cancel_after_seconds=args.cancel_after_seconds,
        step_after_polls=args.step_after_polls,
        step_after_seconds=args.step_after_seconds,
    )
    emulator.token_exchange.lifetime = args.token_lifetime
    with emulator:
        if args.seed == "demo":
            seed_demo(emulator)
        print(f"OpenAI Batch API emulator listening on {emulator.base_url}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
