"""Streaming a file's content into storage: through a temporary name, checked against its size, restarted whole.

:func:`transfer` is the one download loop of the provider: :meth:`OpenAIBatchHook.download_file` runs it with a
plain :class:`Copy`, the saving of a cancelled batch's results with sinks that also read the lines going by. The
content is never held whole: each chunk goes to the sink as it arrives.

A download that stops short (the connection lost mid-body, or fewer bytes than the file's ``bytes``) starts over
from the first byte, into a fresh temporary file, up to the connection's ``max_retries`` times, with the retry
policy's backoff: the Files API has no ranges to resume from. More bytes than ``bytes`` fails at once: asking
again would get the same surprise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import closing
from typing import IO, TYPE_CHECKING, Protocol, TypeVar

from airflow_provider_openai_batch import storage
from airflow_provider_openai_batch.exceptions import OpenAIFileDownloadError

if TYPE_CHECKING:
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook
    from airflow_provider_openai_batch.models import File
    from airflow_provider_openai_batch.storage import Target


class Sink(Protocol):
    """Where one attempt's chunks go, in order; :meth:`finish` is called once the whole content has arrived."""

    bytes_written: int
    lines: int

    def write(self, chunk: bytes) -> None: ...

    def finish(self) -> None: ...


SinkT = TypeVar("SinkT", bound=Sink)


class Copy:
    """Writes every chunk as it comes and counts the lines (a last line without a line break counts too)."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self.bytes_written = 0
        self.lines = 0
        self._line_open = False

    def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._out.write(chunk)
        self.bytes_written += len(chunk)
        self.lines += chunk.count(b"\n")
        self._line_open = not chunk.endswith(b"\n")

    def finish(self) -> None:
        self.lines += self._line_open


def transfer(hook: OpenAIBatchHook, file: File, target: Target, sink: Callable[[IO[bytes]], SinkT]) -> SinkT:
    """Download ``file`` through ``sink(out)`` into ``target``; return the sink of the attempt that got it whole."""
    policy = hook.retry_policy
    restarts = 0
    while True:
        try:
            return storage.write_via_temporary(target, lambda out: _receive(hook, file, sink(out)))
        except OpenAIFileDownloadError as error:
            if not error.transient:
                raise
            if restarts == policy.max_retries:
                raise OpenAIFileDownloadError(
                    f"{error.message} Gave up after {restarts + 1} attempt(s).",
                    file_id=file.id,
                    received_bytes=error.received_bytes,
                    expected_bytes=error.expected_bytes,
                ) from error
            delay = policy.backoff(restarts)
            restarts += 1
            hook.log.warning(
                "%s Downloading it again from the start in %.2f s (retry %d of %d).",
                error,
                delay,
                restarts,
                policy.max_retries,
            )
        time.sleep(delay)


def _receive(hook: OpenAIBatchHook, file: File, sink: SinkT) -> SinkT:
    """One attempt: every chunk of the content into ``sink``, counted against ``file.bytes``."""
    received = 0
    with closing(hook.iter_file_content(file.id)) as chunks:
        for chunk in chunks:
            received += len(chunk)
            if received > file.bytes:
                raise OpenAIFileDownloadError(
                    f"File '{file.id}' has {file.bytes} bytes, but its download sent more ({received} so far): "
                    "the content is not the file the API describes.",
                    file_id=file.id,
                    received_bytes=received,
                    expected_bytes=file.bytes,
                )
            sink.write(chunk)
    if received < file.bytes:
        raise OpenAIFileDownloadError(
            f"Download of file '{file.id}' ended after {received} of its {file.bytes} bytes.",
            file_id=file.id,
            received_bytes=received,
            expected_bytes=file.bytes,
        )
    sink.finish()
    return sink
