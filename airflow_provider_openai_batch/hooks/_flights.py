"""One in-flight call per key and event loop, shared by every caller that asks for it meanwhile.

When a triggerer starts thousands of waits at once, each would make the same slow, identical call: build the
process's TLS context, or look the same connection up. Each costs the event loop a little (the lookup goes
through Airflow's secrets backends, in asgiref's worker thread), and the answers come back together, so that
many waits resume in one turn of the loop and hold it. Sharing the call that is in flight makes it once per
burst of starts. Nothing is kept once it is answered: a caller that comes later makes a new call, so a changed
connection is seen by every wait started after the change.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

Key = TypeVar("Key", bound=Hashable)
Result = TypeVar("Result")


class Flights(Generic[Key, Result]):
    """The calls in flight on each event loop, by key."""

    def __init__(self) -> None:
        self._per_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[Key, asyncio.Future[Result]]
        ] = weakref.WeakKeyDictionary()

    async def join(self, key: Key, call: Callable[[], Awaitable[Result]]) -> Result:
        """The result of the call in flight for ``key`` on this loop, or of ``call()`` started now if none is.

        The call is shielded: a caller cancelled meanwhile (its trigger cleared) does not cancel it for the
        others, and a failure that no caller is left to see is not reported as unretrieved. Its exception is
        raised in every caller that waited for it.
        """
        in_flight = self._per_loop.setdefault(asyncio.get_running_loop(), {})
        flight = in_flight.get(key)
        if flight is None:
            flight = in_flight[key] = asyncio.ensure_future(call())
            flight.add_done_callback(lambda _: in_flight.pop(key, None))
        return await asyncio.shield(flight)
