"""The emulator's Files API content: a batch's input, output and error files, in the API's line shapes.

A batch's files are made from what the batch says about itself, so they always agree with it: the input file has
``request_counts.total`` request lines (``custom_id``, ``method``, ``url``, ``body``); once the batch has results,
its output file has ``completed`` result lines and its error file ``failed`` ones (``id``, ``custom_id``,
``response``, ``error``). Which requests ran is drawn from the input's ``custom_id``\\ s with a generator seeded by
the batch id, and results are listed in that drawn order, not the input's: the API does not keep input order
either, and the provider must not rely on it. An uploaded input file is checked line by line as the API checks
one (:func:`batch_requests`), and a batch created from it draws its results from its requests.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from airflow_provider_openai_batch.testing._wire import ENDPOINTS

#: Purposes the API gives a batch's input file and its result files.
INPUT_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"
#: The API's limits on one batch's input file.
MAX_REQUESTS = 50_000
MAX_INPUT_BYTES = 200 * 1024 * 1024
_FILLER = b"All work and no play makes a batch request a long one. "


@dataclass(frozen=True)
class StoredFile:
    """A file as the emulator serves it: its ``File`` object (``GET /files/{id}``) and its content."""

    object: dict[str, Any]
    content: bytes


def stored_file(
    file_id: str, content: bytes, *, filename: str, purpose: str, created_at: int, **fields: Any
) -> StoredFile:
    """A file with a ``File`` object like the API's (``bytes`` is the content's size); ``fields`` override it."""
    obj = {
        "id": file_id,
        "object": "file",
        "bytes": len(content),
        "created_at": created_at,
        "expires_at": None,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }
    obj.update(fields)
    return StoredFile(obj, content)


def input_content(batch: dict[str, Any], request_bytes: int | None) -> bytes:
    """``request_counts.total`` request lines, each padded to about ``request_bytes`` bytes if given."""
    model = batch["model"] or "gpt-4o-mini"
    return b"".join(
        _request_line(index, batch["endpoint"], model, request_bytes)
        for index in range(1, batch["request_counts"]["total"] + 1)
    )


def _request_line(index: int, endpoint: str, model: str, request_bytes: int | None) -> bytes:
    message = {"role": "user", "content": f"Request {index}: say something kind."}
    request = {"custom_id": f"request-{index}", "method": "POST", "url": endpoint}
    line = json.dumps({**request, "body": {"model": model, "messages": [message]}}).encode() + b"\n"
    missing = (request_bytes or 0) - len(line)
    if missing <= 0:
        return line
    filler = (_FILLER * (missing // len(_FILLER) + 1))[:missing].decode()
    message["content"] += filler
    return json.dumps({**request, "body": {"model": model, "messages": [message]}}).encode() + b"\n"


def batch_requests(content: bytes) -> list[tuple[str, str]]:
    """The ``(custom_id, url)`` of every request line of a batch input file, checked as the API checks one.

    Each line must be a JSON object with a unique non-empty ``custom_id``, ``method`` ``POST``, a ``url`` that is a
    batch endpoint and the same on every line (a batch has one endpoint), and an object ``body``. Raises
    ``ValueError`` naming the first bad line (numbered from 1, as an editor does). Blank lines are skipped.
    """
    if len(content) > MAX_INPUT_BYTES:
        raise ValueError(
            f"The file is {len(content)} bytes; a batch input file is at most {MAX_INPUT_BYTES}."
        )
    requests: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            line = None
        if not isinstance(line, dict):
            raise ValueError(f"Line {number} is not a JSON object.")  # noqa: TRY004 (the API's 400, not a type)
        custom_id, method, url = line.get("custom_id"), line.get("method"), line.get("url")
        if not isinstance(custom_id, str) or not custom_id:
            raise ValueError(f"Line {number} has no 'custom_id' (a non-empty string).")
        if custom_id in first_line:
            raise ValueError(
                f"Line {number} repeats the custom_id '{custom_id}' of line {first_line[custom_id]}: "
                "each request needs its own."
            )
        if method != "POST":
            raise ValueError(f"Line {number} has 'method' {method!r}; only 'POST' is supported.")
        if url not in ENDPOINTS:
            raise ValueError(f"Line {number} has 'url' {url!r}, which is not a batch endpoint.")
        if requests and url != requests[0][1]:
            raise ValueError(
                f"Line {number} has 'url' '{url}', but the first request's is '{requests[0][1]}': "
                "all the requests of a batch go to one endpoint."
            )
        if not isinstance(line.get("body"), dict):
            raise ValueError(f"Line {number} has no 'body' (a JSON object).")  # noqa: TRY004 (as above)
        first_line[custom_id] = number
        requests.append((custom_id, url))
        if len(requests) > MAX_REQUESTS:
            raise ValueError(f"Line {number} is one request too many: a batch holds at most {MAX_REQUESTS}.")
    if not requests:
        raise ValueError("The file holds no request.")
    return requests


def custom_ids(content: bytes) -> list[str]:
    """The ``custom_id`` of every request line of an input file, in order (blank lines skipped)."""
    return [json.loads(line)["custom_id"] for line in content.splitlines() if line.strip()]


def result_contents(batch: dict[str, Any], requests: list[str]) -> tuple[bytes, bytes]:
    """The output and error files of ``batch``, whose input holds the ``requests`` (custom ids), as it is now."""
    counts = batch["request_counts"]
    completed = min(counts["completed"], len(requests))
    failed = min(counts["failed"], len(requests) - completed)
    draw = random.Random(batch["id"])
    ran = draw.sample(requests, completed + failed)
    output = b"".join(_output_line(custom_id, batch, draw) for custom_id in ran[:completed])
    errors = b"".join(_error_line(custom_id, draw) for custom_id in ran[completed:])
    return output, errors


def _hex(draw: random.Random) -> str:
    return f"{draw.getrandbits(96):024x}"


def _output_line(custom_id: str, batch: dict[str, Any], draw: random.Random) -> bytes:
    completion = {
        "id": f"chatcmpl-{_hex(draw)}",
        "object": "chat.completion",
        "created": batch["created_at"],
        "model": batch["model"] or "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"A kind word for {custom_id}."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 14, "completion_tokens": 9, "total_tokens": 23},
    }
    response = {"status_code": 200, "request_id": f"req_{_hex(draw)}", "body": completion}
    return _line(
        {"id": f"batch_req_{_hex(draw)}", "custom_id": custom_id, "response": response, "error": None}
    )


def _error_line(custom_id: str, draw: random.Random) -> bytes:
    error = {
        "message": "Emulated request failure.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    response = {"status_code": 400, "request_id": f"req_{_hex(draw)}", "body": {"error": error}}
    return _line(
        {"id": f"batch_req_{_hex(draw)}", "custom_id": custom_id, "response": response, "error": None}
    )


def _line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode() + b"\n"
