"""Batch ids: what a well-formed one looks like, and how to find one in what an upstream task handed over.

The hook, the operators and the callbacks all apply these rules. They live here, in a module that imports
nothing of the provider, so that none of those has to import another only to share them (the callbacks run
in the DAG processor and the triggerer, which have no use for the operators).
"""

from __future__ import annotations

import re
from typing import Any

_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")

#: What a missing upstream batch id looks like once templated: Jinja renders a missing XCom as "None".
_MISSING = (None, "", "None")


def validate_batch_id(batch_id: Any) -> str:
    """Return ``batch_id`` if it is a well-formed batch id, else raise ``ValueError`` saying what is wrong.

    Checked before any request so that a malformed id (``None``, ``""``, ``"../files"``, ``"batch_1/cancel"``)
    can never be turned into a request to another endpoint.
    """
    if not isinstance(batch_id, str):  # ValueError all the same: callers handle one error for a bad id
        raise ValueError(  # noqa: TRY004
            f"A batch id must be a string, got {type(batch_id).__name__}: {batch_id!r:.80}."
        )
    if not _BATCH_ID.fullmatch(batch_id):
        raise ValueError(
            f"Invalid batch id {batch_id!r:.80}: expected 1 to 256 ASCII letters, digits, '_' or '-' "
            "(like 'batch_abc123')."
        )
    return batch_id


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
