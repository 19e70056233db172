"""Pydantic models of the OpenAI Batch API objects.

They follow the ``Batch``, ``ListBatchesResponse`` and ``OpenAIFile`` schemas of the official OpenAPI spec field
for field.
Three choices make them safe against a live, evolving API:

* every optional field is nullable, because the API sends ``null`` for unset fields rather than omitting them;
* unknown fields are kept (``extra="allow"``), so a field added by OpenAI survives a round trip to XCom;
* an unknown ``status`` string is kept as a plain ``str`` instead of failing validation, so one batch in a
  new state cannot break the parsing of a whole list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Re-exported: the statuses live in a module without pydantic, which DAG files import at every parse.
from airflow_provider_openai_batch.statuses import (  # noqa: F401
    CANCELLABLE_STATUSES,
    FINISHED_STATUSES,
    TERMINAL_STATUSES,
    BatchStatus,
)

#: The API's limits on a batch's ``metadata`` (its ``Metadata`` schema): pairs, characters per key and value.
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_LENGTH = 64
MAX_METADATA_VALUE_LENGTH = 512


def check_metadata(metadata: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` saying what in ``metadata`` breaks the API's limits: it would refuse the batch.

    The provider checks the metadata it builds before any request; the emulator refuses what the API refuses.
    """
    if len(metadata) > MAX_METADATA_KEYS:
        raise ValueError(
            f"Batch metadata takes at most {MAX_METADATA_KEYS} keys; got {len(metadata)}: {sorted(metadata)}."
        )
    for key, value in metadata.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY_LENGTH:
            raise ValueError(
                f"Batch metadata keys are 1 to {MAX_METADATA_KEY_LENGTH} characters; "
                f"{key!r:.80} has {len(key)}."
            )
        if not isinstance(value, str):
            raise ValueError(  # noqa: TRY004 - one error for all metadata the API refuses
                f"Batch metadata values are strings; {key!r} is {type(value).__name__} {value!r:.80}."
            )
        if len(value) > MAX_METADATA_VALUE_LENGTH:
            raise ValueError(
                f"Batch metadata values are at most {MAX_METADATA_VALUE_LENGTH} characters; "
                f"the value of {key!r} has {len(value)}."
            )


class _APIObject(BaseModel):
    """Base of every API object: keeps unknown fields so newer API versions round-trip intact."""

    model_config = ConfigDict(extra="allow")


class BatchRequestCounts(_APIObject):
    total: int
    completed: int
    failed: int


class BatchError(_APIObject):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(_APIObject):
    object: str | None = None
    data: list[BatchError] = Field(default_factory=list)


class BatchInputTokensDetails(_APIObject):
    cached_tokens: int


class BatchOutputTokensDetails(_APIObject):
    reasoning_tokens: int


class BatchUsage(_APIObject):
    input_tokens: int
    input_tokens_details: BatchInputTokensDetails
    output_tokens: int
    output_tokens_details: BatchOutputTokensDetails
    total_tokens: int


class Batch(_APIObject):
    """A batch as returned by the retrieve, list and cancel endpoints."""

    id: str
    object: str
    endpoint: str
    input_file_id: str
    completion_window: str
    # Left-to-right union: known statuses become ``BatchStatus`` members, an unknown one stays a ``str``.
    status: BatchStatus | str = Field(union_mode="left_to_right")
    created_at: int
    model: str | None = None
    errors: BatchErrors | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: BatchRequestCounts | None = None
    usage: BatchUsage | None = None
    metadata: dict[str, str] | None = None

    @property
    def is_terminal(self) -> bool:
        """Whether the batch reached a final state; an unknown status is never taken as final."""
        return isinstance(self.status, BatchStatus) and self.status.is_terminal

    @property
    def is_cancellable(self) -> bool:
        return isinstance(self.status, BatchStatus) and self.status.is_cancellable

    def to_xcom(self) -> dict[str, Any]:
        """JSON-serialisable form, fit for XCom and trigger events; unknown fields included."""
        return self.model_dump(mode="json")


class BatchList(_APIObject):
    """One page of ``GET /batches``; ``last_id`` is the cursor for the next page when ``has_more``."""

    object: str
    data: list[Batch]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class File(_APIObject):
    """A file's metadata as ``GET /files/{file_id}`` returns it: a batch's input, output or error file.

    ``bytes`` is what a download of the file's content must add up to. The spec lists the deprecated ``status``
    as required, yet its own examples (and the API) leave it out: it is optional here.
    """

    id: str
    object: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    expires_at: int | None = None
    status: str | None = None
    status_details: str | None = None
