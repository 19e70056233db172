"""One measured download, in a fresh process: ``bench/download_split.py`` runs it and reads its JSON line.

Usage: python bench/_download_worker.py MODE BATCH_ID WARMUP_BATCH_ID OUT_DIR

``ours`` saves the batch's results with :func:`airflow_provider_openai_batch.results.save_results` to a local
``ObjectStoragePath`` under OUT_DIR (three downloads: output, errors, and the input split into remaining.jsonl);
``httpx`` streams the same three files with a plain ``httpx.Client`` into local files, with no processing, the
floor any download of those bytes pays. The connection comes from ``AIRFLOW_CONN_OPENAI_DEFAULT``.

Both first do the same on the small WARMUP_BATCH_ID (so imports, lazy caches, the filesystem and the TLS context
are not measured), then collect garbage, take the RSS as the baseline and reset the kernel's peak-RSS mark; peak
RSS growth is ``VmHWM`` after the run minus that baseline.
"""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import peak_rss_bytes, reset_peak_rss, rss_bytes


def ours(batch_id: str, out_dir: Path) -> dict[str, Any]:
    from airflow.providers.common.compat.sdk import ObjectStoragePath

    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.results import save_results

    with OpenAIBatchHook() as hook:
        batch = hook.get_batch(batch_id)
        files = [batch.output_file_id, batch.error_file_id, batch.input_file_id]
        received = sum(hook.get_file(file_id).bytes for file_id in files if file_id)
        manifest = save_results(hook, batch_id, batch, ObjectStoragePath(f"file://{out_dir}"))
    written = {name: getattr(manifest, name).model_dump() for name in ("output", "errors", "remaining")}
    return {"bytes_received": received, "written": written}


def plain_httpx(batch_id: str, out_dir: Path) -> dict[str, Any]:
    import httpx

    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    settings = OpenAIBatchHook().settings
    received = 0
    with httpx.Client(base_url=settings.base_url, headers=settings.headers, timeout=60) as client:
        batch = client.get(f"/batches/{batch_id}").json()
        for file_id in (batch["output_file_id"], batch["error_file_id"], batch["input_file_id"]):
            with (
                client.stream("GET", f"/files/{file_id}/content") as response,
                open(out_dir / file_id, "wb") as out,
            ):
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    out.write(chunk)
    return {"bytes_received": received}


MODES = {"ours": ours, "httpx": plain_httpx}


def main(mode: str, batch_id: str, warmup_batch_id: str, out_dir: str) -> None:
    run = MODES[mode]
    root = Path(out_dir)
    warmup = root / "warmup"
    warmup.mkdir(parents=True)
    run(warmup_batch_id, warmup)
    shutil.rmtree(warmup)
    measured = root / "measured"
    measured.mkdir()
    gc.collect()
    baseline = rss_bytes()
    peak_reset = reset_peak_rss()
    started = time.perf_counter()
    result = run(batch_id, measured)
    wall = time.perf_counter() - started
    print(
        json.dumps(
            {
                "mode": mode,
                "wall_s": wall,
                "baseline_rss_bytes": baseline,
                "peak_rss_growth_bytes": peak_rss_bytes() - baseline,
                "peak_reset": peak_reset,
                **result,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
