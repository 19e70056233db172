"""Keeping what a batch paid for: its output and error files, and the requests that never ran.

:func:`save_results` writes three files under ``<root>/<batch_id>/``:

* ``output.jsonl`` and ``errors.jsonl``: the batch's output and error files, as the API serves them;
* ``remaining.jsonl``: the lines of its input file whose request never ran, in input order and byte for byte, so
  that submitting this file as a new batch runs exactly what the cancelled one did not.

A request ran if its ``custom_id`` is in the output file, or in the error file with an error other than the two
the API writes for requests it never executed (``batch_cancelled``, ``batch_expired``). Memory stays bounded
whatever the sizes: the files are streamed through (see ``hooks._download``), and only the set of ``custom_id``\\ s
that ran is kept, 50,000 short strings at most.

A file the batch has no id for (no error file, say) is not written and its manifest entry is ``None``. So is one
the API no longer has (deleted or expired: HTTP 404), with a warning. Then ``remaining.jsonl`` is not written
either when which requests ran is unknown (an output or error file gone), or when the input file is gone.
"""

from __future__ import annotations

import logging
import re
from functools import partial
from typing import IO, TYPE_CHECKING, Any

from pydantic import BaseModel

from airflow_provider_openai_batch.exceptions import OpenAIBatchError, OpenAIFileNotFoundError
from airflow_provider_openai_batch.hooks import _download, _errors

if TYPE_CHECKING:
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.models import Batch, File
    from airflow_provider_openai_batch.storage import Target

log = logging.getLogger(__name__)

OUTPUT, ERRORS, REMAINING = "output.jsonl", "errors.jsonl", "remaining.jsonl"
#: Error codes of the error-file lines of requests the API never executed (the batch ended first).
NEVER_RAN = frozenset({"batch_cancelled", "batch_expired"})
#: A line's ``custom_id`` when it is the object's first key, or its second after a plain ``id`` (result lines),
#: and holds no escape: how the API and the SDKs write them. Read so, a 4 kB request line costs a regex match
#: instead of a JSON parse; any other line is parsed.
_LEADING_CUSTOM_ID = re.compile(rb'\s*\{\s*(?:"id"\s*:\s*"[^"\\]*"\s*,\s*)?"custom_id"\s*:\s*"([^"\\]*)"')


class SavedFile(BaseModel):
    """One file written: where (a local path, or a URL for object storage), its size and its number of lines."""

    path: str
    bytes: int
    lines: int


class ResultsManifest(BaseModel):
    """What :func:`save_results` wrote for a batch: each file, or ``None`` when it was not written."""

    batch_id: str
    output: SavedFile | None = None
    errors: SavedFile | None = None
    remaining: SavedFile | None = None

    def to_xcom(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def save_results(hook: OpenAIBatchHook, batch: Batch, root: Target) -> ResultsManifest:
    """Write ``batch``'s output, errors and remaining requests under ``root / batch.id`` (see the module doc)."""
    folder = root / batch.id
    manifest = ResultsManifest(batch_id=batch.id)
    ran: set[str] = set()
    all_known = True
    for field, file_id, name, errors in (
        ("output", batch.output_file_id, OUTPUT, False),
        ("errors", batch.error_file_id, ERRORS, True),
    ):
        file = _file(hook, batch, file_id, field)
        if file is None:
            all_known = all_known and file_id is None
            continue
        recording = _download.transfer(
            hook, file, folder / name, partial(_Recording, file_id=file.id, errors=errors)
        )
        ran |= recording.ran
        setattr(manifest, field, _saved(folder / name, recording))
    input_file = _file(hook, batch, batch.input_file_id, "input")
    if not all_known:
        log.warning("Batch '%s': not writing %s, as which requests ran cannot be told.", batch.id, REMAINING)
    elif input_file is not None:
        keeping = _download.transfer(
            hook, input_file, folder / REMAINING, partial(_Remaining, file_id=input_file.id, ran=ran)
        )
        manifest.remaining = _saved(folder / REMAINING, keeping)
    log.info("Batch '%s': saved %s", batch.id, _describe(manifest))
    return manifest


def _file(hook: OpenAIBatchHook, batch: Batch, file_id: str | None, what: str) -> File | None:
    """The file's metadata; ``None`` if the batch has no such file or the API no longer has it."""
    if file_id is None:
        return None
    try:
        return hook.get_file(file_id)
    except OpenAIFileNotFoundError:
        log.warning(
            "Batch '%s' names %s file '%s', but the API has no such file (deleted or expired): not saved.",
            batch.id,
            what,
            file_id,
        )
        return None


def _saved(target: Target, sink: _download.Sink) -> SavedFile:
    return SavedFile(path=str(target), bytes=sink.bytes_written, lines=sink.lines)


def _describe(manifest: ResultsManifest) -> str:
    entries = {"output": manifest.output, "errors": manifest.errors, "remaining": manifest.remaining}
    return ", ".join(
        f"{name}: {f'{entry.lines} lines in {entry.path}' if entry else 'none'}"
        for name, entry in entries.items()
    )


class _Lines:
    """Cuts a stream of chunks into lines, without their ``\\n``; a line may span any number of chunks."""

    def __init__(self) -> None:
        self._head: list[bytes] = []  # the start of a line that has not ended yet

    def ended_in(self, chunk: bytes) -> list[bytes]:
        """The lines that end in ``chunk``."""
        pieces = chunk.split(b"\n")
        tail = pieces.pop()
        if self._head and pieces:
            pieces[0] = b"".join([*self._head, pieces[0]])
            self._head = []
        if tail:
            self._head.append(tail)
        return pieces

    def last(self) -> bytes:
        """What follows the last ``\\n``: a last line without a line break, or ``b""``."""
        return b"".join(self._head)


class _Recording(_download.Copy):
    """Copies a result file and records the ``custom_id`` of each line whose request ran."""

    def __init__(self, out: IO[bytes], *, file_id: str, errors: bool) -> None:
        super().__init__(out)
        self.ran: set[str] = set()
        self._file_id = file_id
        self._errors = errors
        self._lines = _Lines()
        self._number = 0

    def write(self, chunk: bytes) -> None:
        super().write(chunk)
        for line in self._lines.ended_in(chunk):
            self._record(line)

    def finish(self) -> None:
        super().finish()
        self._record(self._lines.last())

    def _record(self, line: bytes) -> None:
        self._number += 1
        if not line.strip():
            return
        if not self._errors:
            self.ran.add(_custom_id(line, self._number, self._file_id))
            return
        entry = _parsed(line, self._number, self._file_id)
        error = entry.get("error")
        if not (isinstance(error, dict) and error.get("code") in NEVER_RAN):
            self.ran.add(_custom_id(line, self._number, self._file_id, entry))


class _Remaining:
    """Writes the input lines whose request did not run, byte for byte; blank lines are not requests."""

    def __init__(self, out: IO[bytes], *, file_id: str, ran: set[str]) -> None:
        self._out = out
        self._file_id = file_id
        self._ran = ran
        self._lines = _Lines()
        self._number = 0
        self.bytes_written = 0
        self.lines = 0

    def write(self, chunk: bytes) -> None:
        kept = [line for line in self._lines.ended_in(chunk) if self._keeps(line)]
        if kept:
            self._write(b"\n".join(kept) + b"\n", len(kept))

    def finish(self) -> None:
        if self._keeps(last := self._lines.last()):
            self._write(last, 1)

    def _keeps(self, line: bytes) -> bool:
        self._number += 1
        return bool(line.strip()) and _custom_id(line, self._number, self._file_id) not in self._ran

    def _write(self, data: bytes, lines: int) -> None:
        self._out.write(data)
        self.bytes_written += len(data)
        self.lines += lines


def _custom_id(line: bytes, number: int, file_id: str, entry: dict[str, Any] | None = None) -> str:
    if entry is None and (leading := _LEADING_CUSTOM_ID.match(line)):
        return leading[1].decode()
    custom_id = (entry if entry is not None else _parsed(line, number, file_id)).get("custom_id")
    if not isinstance(custom_id, str):
        raise OpenAIBatchError(
            f"Line {number} of file '{file_id}' has no string 'custom_id': cannot tell whether its request ran.",
            file_id=file_id,
        )
    return custom_id


def _parsed(line: bytes, number: int, file_id: str) -> dict[str, Any]:
    try:
        entry = _errors.json_value(line)  # nesting bounded: a line of "[" * 100_000 is no object, no crash
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        raise OpenAIBatchError(f"Line {number} of file '{file_id}' is not a JSON object.", file_id=file_id)
    return entry
