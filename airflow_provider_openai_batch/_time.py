"""Points in time as UNIX seconds, the unit of a batch's ``created_at``."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any


def unix_time(value: Any, name: str) -> float:
    """``value`` as UNIX seconds, or ``ValueError`` naming ``name`` and saying what is wrong with it.

    Accepted: a datetime with a time zone (Airflow's dates, pendulum's too), an ISO 8601 string with one (what
    a template renders a date to, e.g. ``{{ dag_run.start_date }}``), or a non-negative number of seconds, or
    its string (``{{ dag_run.start_date.timestamp() }}``). A date without a time zone is refused rather than
    guessed: read in the wrong zone it would move the bound by hours, and a listing stopped at it would miss
    the very batches it looks for.
    """
    moment = _from_text(value, name) if isinstance(value, str) else value
    if isinstance(moment, datetime):
        if moment.utcoffset() is None:
            raise ValueError(
                f"{name} has no time zone: {value!r:.80}. Give one, e.g. '2025-06-01T08:00:00+00:00'."
            )
        return moment.timestamp()
    if isinstance(moment, int | float) and not isinstance(moment, bool):
        if not math.isfinite(moment) or moment < 0:
            raise ValueError(f"{name} must be non-negative, finite UNIX seconds, got {value!r:.80}.")
        return float(moment)
    raise ValueError(
        f"{name} must be a date with a time zone or UNIX seconds, got {type(value).__name__}: {value!r:.80}."
    )


def _from_text(text: str, name: str) -> float | datetime:
    """What a rendered template holds: a number of seconds, or an ISO 8601 date."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{name} must be a date with a time zone or UNIX seconds; got {text!r:.80}, which is neither."
        ) from None
