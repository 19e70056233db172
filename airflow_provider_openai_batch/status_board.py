"""One status board per event loop and connection: the waits that are due share each round's requests.

Each wait polling its batch with its own ``GET /batches/{id}`` costs N requests per interval for N waits, and
under an organisation's rate limit that floor is what makes a thousand waits slow. ``GET /batches?limit=100``
answers for up to a hundred batches at once. Every wait on one event loop and connection (the triggers, and the
operators' blocking waits, which run the same coroutine) asks the loop's board for its batch instead of sending
its own GET, and the board serves the waits that are due together, in one *round*, by whichever is cheaper:

* (a) one GET per due batch, or
* (b) a walk of the list's pages until every due batch has been seen.

It estimates (b) from its last walk (the page it saw each due batch on) and walks only when that is fewer
requests than (a), so a few waits stay on GETs. A walk is bounded: once it has cost as many pages as (a) would
have requests, it stops, and every due batch it did not see gets its own GET in the same round, as does every
due batch not seen yet when a page fails after the hook's retries. A page refused for the rate limit is
backpressure, not a failure: the waits it leaves unseen are told so, as their GETs would have been, and poll
again next round. Nothing depends on the list's order. Pages and GETs go through the hook, hence the shared
client's gate and the API key's rate governor.

A wait gets the Batch a GET would have given it (the list's items are the same ``Batch`` objects, validated by
the same model) or the error its own GET raised, so its outcome, status history, deadline and error budget are
what they were before the board. Boards are per connection settings: waits on different connections never share
a walk.

When a wait asks is up to it: the window from the earliest to the latest moment its next poll may run (see
:meth:`~airflow_provider_openai_batch.cancellation.CancellationWatch.poll_window`). A round runs at the first
latest moment of the queued waits and serves every wait whose window has opened, so waits due at nearly the same
time (the jitter spreads them over a fifth of the interval) share one round, and keep sharing it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

from airflow_provider_openai_batch.exceptions import (
    OpenAIBatchError,
    OpenAIBatchPollingError,
    OpenAIBatchRateLimitError,
)
from airflow_provider_openai_batch.hooks._connection import ConnectionSettings
from airflow_provider_openai_batch.hooks.openai_batch import MAX_PAGE_SIZE, OpenAIBatchHook
from airflow_provider_openai_batch.models import Batch

log = logging.getLogger(__name__)

#: What a poll gives a wait: its batch, or the error its GET raised (``ValueError``: an answer so malformed that
#: it failed below the hook's error mapping; it ends that wait only).
PollResult = Batch | OpenAIBatchError | ValueError

#: Results handed out before the round yields to the event loop: each wakes a wait, and ten thousand waits woken
#: in one turn of the loop would hold it for a tenth of a second. A page holds at most a hundred batches when
#: the API keeps to ``limit``; nothing holds it to that.
DELIVERY_SLICE = 200


@dataclass(slots=True, eq=False)
class _Ask:
    """One wait's request for its batch's next status: the window (event loop time) in which to poll it."""

    opens: float
    closes: float
    answer: asyncio.Future[PollResult]


@dataclass(eq=False)
class StatusBoard:
    """The waits of one event loop and connection, and the rounds that poll for them.

    :param hook: the hook the rounds send through; the board owns it, and closes it when the last wait leaves.
    """

    hook: OpenAIBatchHook
    waits: int = 0
    #: The page on which the last walk saw each batch it looked for; ``inf`` for one it did not see. A batch it
    #: did not look for (a wait that joined since) is assumed to be found a hundred a page: new batches are the
    #: newest, which the list shows first.
    page_of: dict[str, float] = field(default_factory=dict)
    _queued: dict[str, list[_Ask]] = field(default_factory=dict)
    _timer: asyncio.TimerHandle | None = None
    _rounds: set[asyncio.Task[None]] = field(default_factory=set)

    async def poll(self, batch_ids: Sequence[str], opens_in: float, closes_in: float) -> list[PollResult]:
        """Each batch's next status, from the first round that runs between ``opens_in`` and ``closes_in``
        seconds from now, in the order of ``batch_ids``."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        asks = [_Ask(now + opens_in, now + closes_in, loop.create_future()) for _ in batch_ids]
        for batch_id, ask in zip(batch_ids, asks, strict=True):
            self._queued.setdefault(batch_id, []).append(ask)
        self._run_round_by(now + closes_in)
        try:
            if len(asks) == 1:
                return [await asks[0].answer]
            return list(await asyncio.gather(*(ask.answer for ask in asks)))
        except asyncio.CancelledError:
            self._withdraw(batch_ids, asks)
            raise

    def walk_pays(self, due: Collection[str]) -> bool:
        """Whether a round for the ``due`` batches is estimated to cost fewer requests walking the list than with
        a GET each: the pages down to the deepest one the last walk saw them on, plus a GET for each it did not
        see."""
        depth, unseen = self._expected_walk(due)
        return depth + unseen < len(due)

    def _expected_walk(self, due: Collection[str]) -> tuple[int, int]:
        """The page down to which a walk should see the ``due`` batches it can, and how many it cannot (the last
        walk did not see them)."""
        unknown = math.ceil(len(due) / MAX_PAGE_SIZE)
        pages = [self.page_of.get(batch_id, unknown) for batch_id in due]
        return int(max((page for page in pages if page < math.inf), default=0)), pages.count(math.inf)

    async def close(self) -> None:
        """Stop every round and release the hook: the last wait has left."""
        if self._timer is not None:
            self._timer.cancel()
        for task in self._rounds:
            task.cancel()
        await asyncio.gather(*self._rounds, return_exceptions=True)
        await self.hook.aclose()

    def _run_round_by(self, at: float) -> None:
        """Make sure a round starts by ``at`` (event loop time)."""
        if self._timer is None or at < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(at, self._start_round)

    def _start_round(self) -> None:
        """Take every batch with a wait whose window has opened into a new round; schedule the next round for
        the rest."""
        self._timer = None
        now = asyncio.get_running_loop().time()
        due: dict[str, list[_Ask]] = {}
        queued: dict[str, list[_Ask]] = {}
        next_round = math.inf
        for batch_id, asks in self._queued.items():
            for ask in asks:
                if ask.opens <= now:
                    due.setdefault(batch_id, []).append(ask)
                else:
                    queued.setdefault(batch_id, []).append(ask)
                    next_round = min(next_round, ask.closes)
        self._queued = queued
        if due:
            task = asyncio.get_running_loop().create_task(self._round(due))
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)
        if queued:
            self._run_round_by(next_round)

    async def _round(self, due: dict[str, list[_Ask]]) -> None:
        unseen = set(due)
        try:
            if self.walk_pays(due):
                await self._walk(due, unseen)
            if unseen:
                await asyncio.gather(*(self._get(batch_id, due[batch_id]) for batch_id in unseen))
        except Exception as error:  # the last guard: no wait may be left without its answer
            log.exception("A polling round failed; its waits poll again next round.")
            failure = OpenAIBatchPollingError(
                f"A polling round failed ({type(error).__name__}); see the log."
            )
            for asks in due.values():
                _answer(asks, failure)

    async def _walk(self, due: dict[str, list[_Ask]], unseen: set[str]) -> None:
        """Answer the due batches the list's pages show, removing them from ``unseen``. Stop when none is left,
        at the list's end, once the pages cost what GETs for all would have, or at the first page past the
        expected depth that shows none of them: the rest are older than the list's busy head, and fewer GETs
        than the pages it would take to find them."""
        depth, _ = self._expected_walk(due)
        pages = delivered = 0
        page_of: dict[str, float] = dict.fromkeys(due, math.inf)
        try:
            listing_pages = self.hook.alist_batch_pages(limit=MAX_PAGE_SIZE, patient=False)
            async with aclosing(listing_pages) as listing:
                async for page in listing:
                    pages += 1
                    found = False
                    for batch in page.data:
                        if batch.id in unseen:
                            unseen.discard(batch.id)
                            page_of[batch.id] = pages
                            found = True
                            delivered += _answer(due[batch.id], batch)
                            if delivered >= DELIVERY_SLICE:
                                delivered = 0
                                await asyncio.sleep(0)
                    if not unseen or pages >= len(due) or (pages > depth and not found):
                        break
        except OpenAIBatchRateLimitError as error:
            # Backpressure, not a failure, and what their GETs would have been told: they poll again next round.
            for batch_id in unseen:
                _answer(due[batch_id], error)
            unseen.clear()
            return
        except (OpenAIBatchError, ValueError) as error:
            log.info(
                "A page of the batch list failed; %d batch(es) not seen yet are polled one by one: %s",
                len(unseen),
                error,
            )
            return
        except Exception:  # a walk only saves requests: whatever breaks it, the GETs remain
            log.exception("Walking the batch list failed; %d batch(es) are polled one by one.", len(unseen))
            return
        self.page_of = page_of

    async def _get(self, batch_id: str, asks: list[_Ask]) -> None:
        result: PollResult
        try:
            result = await self.hook.aget_batch(batch_id)
        except (OpenAIBatchError, ValueError) as error:
            result = error
        _answer(asks, result)

    def _withdraw(self, batch_ids: Sequence[str], asks: list[_Ask]) -> None:
        """Forget the asks of a wait that was cancelled (its task cleared, killed or reassigned)."""
        for batch_id, ask in zip(batch_ids, asks, strict=True):
            ask.answer.cancel()
            queued = self._queued.get(batch_id)
            if queued is not None and ask in queued:
                queued.remove(ask)
                if not queued:
                    del self._queued[batch_id]


def _answer(asks: list[_Ask], result: PollResult) -> int:
    """Give ``result`` to every ask still waiting for it; return how many."""
    answered = 0
    for ask in asks:
        if not ask.answer.done():
            ask.answer.set_result(result)
            answered += 1
    return answered


_boards: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[ConnectionSettings, StatusBoard]] = (
    weakref.WeakKeyDictionary()
)


@asynccontextmanager
async def joined(hook: OpenAIBatchHook) -> AsyncIterator[StatusBoard]:
    """The board of the running loop and ``hook``'s connection, which the caller uses until it leaves.

    ``hook`` must have looked its connection up (``async with hook``). The first wait's arrival creates the
    board, with a hook of its own; the last one's departure, even by cancellation, closes it.
    """
    settings = await hook.asettings()
    boards = _boards.setdefault(asyncio.get_running_loop(), {})
    board = boards.get(settings)
    if board is None:
        board = boards[settings] = StatusBoard(hook.sibling())
    board.waits += 1
    try:
        yield board
    finally:
        board.waits -= 1
        if board.waits == 0:
            del boards[settings]
            await board.close()
