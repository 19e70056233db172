"""What the fuzz properties share: example budgets, hostile values, and the checks every surface makes.

The checks state the promises of docs/reliability.md ("Hostile input"): a failure is a ``ValueError`` (for an
argument or a connection value) or a documented :class:`OpenAIBatchError` subclass, and nothing else; bad input
is refused before any request; the API key is in no exception, log record, event or file; nothing hangs.
"""

from __future__ import annotations

import os
import string
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from hypothesis import settings
from hypothesis import strategies as st

from airflow_provider_openai_batch.exceptions import OpenAIBatchError
from tests._guards import exception_chain, text_of

T = TypeVar("T")

#: ``make fuzz`` (the ``fuzz`` profile) runs ten times each property's CI budget.
SCALE = 10 if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else 1
#: Seconds any one call may take before the property calls it hung. The hooks' own timeouts are shorter.
HANG = 10.0


def budget(examples: int) -> settings:
    """``examples`` in ``make test``, ten times as many in ``make fuzz``."""
    return settings(max_examples=examples * SCALE)


# -- values -------------------------------------------------------------------------------------------------------

#: The characters a secret read from a file or pasted in a form may carry around the key itself.
KEY_AFFIXES = ("", "", "", "\n", "\r\n", "\r", "\x00", " ", "\t", "é", "\u2028", "\x7f")


@st.composite
def api_keys(draw: st.DrawFn) -> tuple[str, str]:
    """``(key, core)``: a generated secret, possibly wrapped in hostile characters, and the part of it no
    text may ever contain."""
    core = "sk-fuzz-" + draw(st.text(string.ascii_letters + string.digits, min_size=12, max_size=24))
    key = draw(st.sampled_from(KEY_AFFIXES)) + core + draw(st.sampled_from(KEY_AFFIXES))
    return key, core


#: Numbers a careless parser turns into a hang, a busy loop or an overflow.
NASTY_NUMBERS = (
    float("nan"),
    float("inf"),
    float("-inf"),
    0,
    -1,
    0.0,
    -0.0,
    1e-9,
    1e308,
    10**30,
    1.9,
    True,
    False,
)
NASTY_STRINGS = ("", " ", "\n", "\x00", "NaN", "inf", "-1", "1e309", "é", "../x", "a" * 300, "0x10", "١٢")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),  # NaN and infinities included
    st.sampled_from(NASTY_NUMBERS),
    st.sampled_from(NASTY_STRINGS),
    st.text(max_size=12),
)
#: Any JSON document Python's ``json`` reads (NaN and Infinity included), a few levels deep.
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def deeply_nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# -- checks -------------------------------------------------------------------------------------------------------


def assert_documented(error: BaseException, *, arguments: bool) -> None:
    """``error`` is one the docs promise: an :class:`OpenAIBatchError` subclass, or (for bad ``arguments``,
    connection values included) a ``ValueError``; a pydantic ``ValidationError`` does not count as one."""
    documented: tuple[type[BaseException], ...] = (
        (OpenAIBatchError, ValueError) if arguments else (OpenAIBatchError,)
    )
    kind = type(error)
    assert isinstance(error, documented) and kind.__module__.split(".")[0] in (
        "builtins",
        "airflow_provider_openai_batch",
    ), f"undocumented {kind.__module__}.{kind.__qualname__} escaped: {error!r:.500}"


def assert_secret_absent(core: str, **places: Any) -> None:
    """Fail if ``core`` (a generated key's distinctive part) is in any of ``places``; exceptions are searched
    with their whole cause/context chain, their reprs and attributes."""
    for where, value in places.items():
        if isinstance(value, BaseException):
            texts = [
                f"{link}{link!r}{vars(link) if hasattr(link, '__dict__') else ''}{link.args!r}"
                for link in exception_chain(value)
            ]
            text = "\n".join(texts)
        else:
            text = text_of(value)
        assert core not in text, (
            f"the key leaked into {where}: ...{text[max(0, text.index(core) - 200) :][:300]!r}"
        )


def bounded(call: Callable[[], T], seconds: float = HANG) -> tuple[T | None, BaseException | None]:
    """Run a blocking call; its result or the exception it raised. Fail if it is still running after
    ``seconds`` (the thread is a daemon: a hung call does not keep the test process alive)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((call(), None))
        except BaseException as error:  # noqa: BLE001 - handed to the property
            outcome.append((None, error))

    thread = threading.Thread(target=run, name="fuzz-bounded-call", daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s: it hangs"
    return outcome[0]
