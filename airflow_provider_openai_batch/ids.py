"""Batch and file ids: what a well-formed one looks like, and how to find a batch id in what an upstream task
handed over; and the default connection id.

The hook, the operators and the callbacks all apply these rules. They live here, in a module that imports
nothing of the provider, so that none of those has to import another only to share them (the callbacks run
in the DAG processor and the triggerer, which have no use for the operators).
"""

from __future__ import annotations

import re
from typing import Any

#: The connection every hook, operator and callback uses unless told otherwise: the official provider's.
DEFAULT_CONN_ID = "openai_default"

_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")

#: What a missing upstream batch id looks like once templated: Jinja renders a missing XCom as "None".
_MISSING = (None, "", "None")


def validate_batch_id(batch_id: Any) -> str:
    """Return ``batch_id`` if it is a well-formed batch id, else raise ``ValueError`` saying what is wrong.

    Checked before any request so that a malformed id (``None``, ``""``, ``"../files"``, ``"batch_1/cancel"``)
    can never be turned into a request to another endpoint.
    """
    return _validated_id(batch_id, "batch", "batch_abc123")


def validate_file_id(file_id: Any) -> str:
    """Return ``file_id`` if it is a well-formed file id, else raise ``ValueError``: as :func:`validate_batch_id`."""
    return _validated_id(file_id, "file", "file-abc123")


def _validated_id(value: Any, kind: str, example: str) -> str:
    if not isinstance(value, str):  # ValueError all the same: callers handle one error for a bad id
        raise ValueError(f"A {kind} id must be a string, got {type(value).__name__}: {value!r:.80}.")  # noqa: TRY004
    if not _ID.fullmatch(value):
        raise ValueError(
            f"Invalid {kind} id {value!r:.80}: expected 1 to 256 ASCII letters, digits, '_' or '-' "
            f"(like '{example}')."
        )
    return value


def resolve_batch_id(value: Any) -> str | None:
    """Return the batch id held by ``value``, ``None`` if it holds none, or raise ``ValueError`` if malformed.

    ``value`` is what a ``batch_id`` argument rendered to, or what an XCom held: an id, or a dict returned by
    another operator (a Batch JSON with ``id``, or anything with a ``batch_id`` key).
    """
    if isinstance(value, dict):
        value = value.get("batch_id", value.get("id"))
    if value in _MISSING:
        return None
    return validate_batch_id(value)
