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

import json
import logging
import re
from functools import partial
from typing import IO, TYPE_CHECKING, Any

from pydantic import BaseModel

from airflow_provider_openai_batch import storage
from airflow_provider_openai_batch.exceptions import (
    OpenAIBatchError,
    OpenAIBatchResponseError,
    OpenAIFileNotFoundError,
)
from airflow_provider_openai_batch.hooks import _download, _errors
from airflow_provider_openai_batch.ids import validate_batch_id

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
#: An escaped letter of "custom_id" (``\u0063`` is ``c``): a key spelled so is "custom_id" to a JSON parser, so a
#: line holding one is parsed, as is a line with "custom_id" twice. The JSON parser takes the last of duplicate
#: keys, the leading match the first: they would disagree, and remaining.jsonl would be wrong.
_ESCAPED_ID_LETTER = re.compile(rb"\\u00(?:[67][0-9A-Fa-f]|5[Ff])")
#: Stands for the ``custom_id`` of an object that has more than one: which request the line is about is unknown.
_AMBIGUOUS = object()


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


def save_results(hook: OpenAIBatchHook, batch_id: str, batch: Batch, root: Target) -> ResultsManifest:
    """Write ``batch``'s output, errors and remaining requests under ``root / batch_id`` (see the module doc).

    ``batch_id`` is the id the task was given, checked like any id: the folder is named after it, never after
    the id in the API's answer (``"../x"`` or an absolute path there would write outside ``root``, another
    batch's id into that batch's folder). An answer about another batch is refused. The three files are
    written all or nothing: if any fails, none is left under its name.
    """
    batch_id = validate_batch_id(batch_id)
    if batch.id != batch_id:
        raise OpenAIBatchResponseError(
            f"The API's answer for batch '{batch_id}' is about batch {batch.id!r:.80}: not saving its results.",
            batch_id=batch_id,
        )
    folder = root / batch_id
    manifest = ResultsManifest(batch_id=batch_id)
    ran: set[str] = set()
    all_known = True
    with storage.all_or_nothing() as staging:
        for field, file_id, name, errors in (
            ("output", batch.output_file_id, OUTPUT, False),
            ("errors", batch.error_file_id, ERRORS, True),
        ):
            file = _file(hook, batch, file_id, field)
            if file is None:
                all_known = all_known and file_id is None
                continue
            recording = _download.transfer(
                hook, file, staging.stage(folder / name), partial(_Recording, file_id=file.id, errors=errors)
            )
            ran |= recording.ran
            setattr(manifest, field, _saved(folder / name, recording))
        input_file = _file(hook, batch, batch.input_file_id, "input")
        if not all_known:
            log.warning(
                "Batch '%s': not writing %s, as which requests ran cannot be told.", batch_id, REMAINING
            )
        elif input_file is not None:
            keeping = _download.transfer(
                hook,
                input_file,
                staging.stage(folder / REMAINING),
                partial(_Remaining, file_id=input_file.id, ran=ran),
            )
            manifest.remaining = _saved(folder / REMAINING, keeping)
    log.info("Batch '%s': saved %s", batch_id, _describe(manifest))
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
        code = error.get("code") if isinstance(error, dict) else None
        if not (isinstance(code, str) and code in NEVER_RAN):  # a code may be anything: a list is unhashable
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
    if entry is None and (leading := _LEADING_CUSTOM_ID.match(line)) and _one_plain_custom_id(line):
        try:
            return leading[1].decode()
        except UnicodeDecodeError:
            raise _unreadable(number, file_id) from None
    custom_id = (entry if entry is not None else _parsed(line, number, file_id)).get("custom_id")
    if custom_id is _AMBIGUOUS:
        raise OpenAIBatchError(
            f"Line {number} of file '{file_id}' has more than one 'custom_id': cannot tell which request it is.",
            file_id=file_id,
        )
    if not isinstance(custom_id, str):
        raise OpenAIBatchError(
            f"Line {number} of file '{file_id}' has no string 'custom_id': cannot tell whether its request ran.",
            file_id=file_id,
        )
    return custom_id


def _one_plain_custom_id(line: bytes) -> bool:
    """Whether the leading ``custom_id`` is the line's only one, as a JSON parser would read it."""
    return line.count(b'"custom_id"') == 1 and (b"\\u00" not in line or not _ESCAPED_ID_LETTER.search(line))


def _parsed(line: bytes, number: int, file_id: str) -> dict[str, Any]:
    try:
        text = line.decode()
    except UnicodeDecodeError:
        raise _unreadable(number, file_id) from None
    try:
        entry = _errors.json_value(text)  # nesting bounded: a line of "[" * 100_000 is no object, no crash
        if not _one_plain_custom_id(line):
            # It may have two: the bounded parser keeps the last, so json.loads (its nesting now known to be
            # bounded) tells them apart. Lines with one plain "custom_id", nearly all, are parsed once.
            entry = json.loads(text, object_pairs_hook=_object)
    except ValueError:
        entry = None
    if not isinstance(entry, dict):
        raise OpenAIBatchError(f"Line {number} of file '{file_id}' is not a JSON object.", file_id=file_id)
    return entry


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, its ``custom_id`` :data:`_AMBIGUOUS` if it has more than one."""
    entry = dict(pairs)
    if len(entry) < len(pairs) and sum(key == "custom_id" for key, _ in pairs) > 1:
        entry["custom_id"] = _AMBIGUOUS
    return entry


def _unreadable(number: int, file_id: str) -> OpenAIBatchError:
    return OpenAIBatchError(f"Line {number} of file '{file_id}' is not UTF-8 text.", file_id=file_id)
