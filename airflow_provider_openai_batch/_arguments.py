"""Arguments of the operators, triggers and callbacks: what a usable one is, each rule in one place.

An operator applies these rules when it is built (or, for a templated argument, once rendered and before its
first request), so a bad value fails the task before anything is cancelled. A trigger applies the same rules to
the kwargs it was rebuilt from: a row of the triggerer's database, which an older version, a hand edit or
Airflow 3.0's serialiser (it stores NaN and infinity as strings) may have left malformed. There a refusal becomes
the trigger's error event instead of a crash in the triggerer.

Every refusal is a ``ValueError`` that names the argument. Like :mod:`ids` and :mod:`_time`, this module imports
nothing of the provider, so the triggerer and the callbacks can use it without the operators.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from datetime import timedelta
from numbers import Real
from typing import Any

#: The shortest poll interval: it bounds a wait to 100 polls a second, against a busy loop (an interval of 0, or
#: a tiny one, polled 2,000 times a second). Not a recommendation: a batch is cancelled within minutes.
MIN_POLL_INTERVAL = 0.01
#: The longest wait for a cancellation (the API promises at most 10 minutes): every wait has a finite deadline,
#: and one this far away is a mistake (``timeout=inf`` made one that overflowed Airflow's deferral timeout).
MAX_WAIT = timedelta(days=7)


def poll_interval(value: Any) -> float:
    """``value`` as the seconds between polls, from :data:`MIN_POLL_INTERVAL` to :data:`MAX_WAIT`."""
    seconds = _seconds(value, "poll_interval")
    if seconds < MIN_POLL_INTERVAL:
        raise ValueError(
            f"poll_interval must be at least {MIN_POLL_INTERVAL} seconds (a shorter one makes a busy loop), "
            f"got {value!r:.80}."
        )
    return seconds


def timeout(value: Any) -> float:
    """``value`` as the seconds a wait may last, positive and at most :data:`MAX_WAIT`."""
    return _seconds(value, "timeout")


def deadline(value: Any) -> float:
    """``value`` as the UNIX time at which a wait ends: finite, and at most :data:`MAX_WAIT` from now.

    A trigger's deadline is the time it was deferred plus its timeout, so one further away did not come from an
    operator: waiting for it could last for ever.
    """
    moment = _float(value) if _is_number(value) else math.nan
    if not math.isfinite(moment):
        raise ValueError(f"deadline must be finite UNIX seconds, got {type(value).__name__}: {value!r:.80}.")
    if moment - time.time() > MAX_WAIT.total_seconds():
        raise ValueError(
            f"deadline {value!r} is more than {MAX_WAIT.days} days away: no wait lasts that long."
        )
    return moment


def connection_id(value: Any) -> str:
    """``value`` as an Airflow connection id: a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"conn_id must be a connection id (a non-empty string), got {value!r:.80}.")
    return value


def batch_ids(value: Any) -> list[Any]:
    """``value`` as a list of batch ids, each still to be checked on its own (one bad id ends one wait only).

    A string is refused, not read as a sequence of one-letter ids.
    """
    if not isinstance(value, list | tuple):
        raise ValueError(  # noqa: TRY004 - one error for every bad argument (see the module doc)
            f"batch_ids must be a list of batch ids, got {type(value).__name__}: {value!r:.80}."
        )
    return list(value)


def metadata_filter(value: Any, *, rendered: bool = True) -> Any:
    """``value`` as metadata pairs a batch must have: a dict of strings (a batch's metadata values are).

    Before rendering (``rendered=False``, in an operator's constructor) what may still render is let through:
    a string (a template rendering to a dict with ``render_template_as_native_obj``) or an ``XComArg``, as the
    whole or as a value.
    """
    if not rendered and _may_render(value):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(  # noqa: TRY004 - one error for every bad argument (see the module doc)
            f"metadata must be a dict of string keys and values, got {type(value).__name__}: {value!r:.80}."
        )
    for key, item in value.items():
        if not isinstance(key, str) or not (isinstance(item, str) or (not rendered and _may_render(item))):
            raise ValueError(
                f"metadata must be a dict of string keys and values; {key!r:.80} is {type(item).__name__}: "
                f"{item!r:.80}."
            )
    return value if not rendered else dict(value)


def _may_render(value: Any) -> bool:
    """A template string, or what Airflow resolves when it renders (an ``XComArg``)."""
    return isinstance(value, str) or callable(getattr(value, "resolve", None))


def positive_int(value: Any, name: str) -> int:
    """``value`` as a count of at least 1; a string or a float is refused rather than converted."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}: {value!r:.80}.")  # noqa: TRY004
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value!r}.")
    return value


def _seconds(value: Any, name: str) -> float:
    """A duration (seconds or a ``timedelta``) as float seconds: positive, finite, at most :data:`MAX_WAIT`."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif _is_number(value):
        seconds = _float(value)
    else:
        raise ValueError(
            f"{name} must be a number of seconds or a timedelta, got {type(value).__name__}: {value!r:.80}."
        )
    if math.isnan(seconds):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}.")
    if seconds <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    if seconds > MAX_WAIT.total_seconds():
        raise ValueError(f"{name} must be at most {MAX_WAIT.days} days, got {value!r:.80}.")
    return seconds


def _float(value: Real) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond a float's range
        return math.inf


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)
