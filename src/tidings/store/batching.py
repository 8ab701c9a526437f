"""Group commit: concurrent requests coalesced so one database round trip serves many.

Both SQL backends use `Batcher`: SQLite for every operation (one hop to its store thread,
one write transaction per batch), PostgreSQL for commits (one statement per batch) and for
the hot lookups (`is_processed`, `load_state`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class Batcher(Generic[_Item, _Result]):
    """Coalesces concurrent requests so one database round trip serves many callers.

    Why: a commit costs a thread hop (SQLite) or network round trips and a WAL flush
    (PostgreSQL) no matter how little it writes, so doing them one by one caps a worker at
    a few thousand per second. Here callers queue their item and wait; a flusher task takes
    everything queued, hands it to `handle` in one call (one transaction, for commits) and
    resolves each caller from its own entry of the returned list, a result or an exception
    that reaches only that caller. While a batch runs the next one queues up, so batches
    grow with load by themselves; a lone request goes out at once, with no added delay.

    `claims` names what an item must not share with another in the same batch (e.g. its
    event marker or state row): such an item is left for a later batch. With one batch in
    flight, that batch runs after the first one is done and sees its outcome; with several
    in flight, the database's own locks order the two, as for two workers.
    """

    def __init__(
        self,
        handle: Callable[[list[_Item]], Awaitable[Sequence[_Result | BaseException]]],
        *,
        max_batch: int,
        max_in_flight: int = 1,
        claims: Callable[[_Item], Iterable[Hashable]] | None = None,
    ) -> None:
        self._handle = handle
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._claims = claims
        self._queue: list[tuple[_Item, asyncio.Future[_Result]]] = []
        self._running = 0  # flushers that may still take from the queue
        self._tasks: set[asyncio.Task[None]] = set()  # strong references to them

    async def submit(self, item: _Item) -> _Result:
        """Queue `item`, then wait until the batch it went out in is done."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Result] = loop.create_future()
        self._queue.append((item, future))
        if self._running < self._max_in_flight:
            self._running += 1
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def wait_idle(self) -> None:
        """Wait until every queued request was handled (before closing connections)."""
        while pending := [task for task in self._tasks if not task.done()]:
            await asyncio.wait(pending)

    def _take(self) -> list[tuple[_Item, asyncio.Future[_Result]]]:
        batch: list[tuple[_Item, asyncio.Future[_Result]]] = []
        claimed: set[Hashable] = set()
        rest: list[tuple[_Item, asyncio.Future[_Result]]] = []
        for entry in self._queue:
            item, future = entry
            if future.done():  # the caller was cancelled before its batch went out
                continue
            if len(batch) >= self._max_batch:
                rest.append(entry)
                continue
            if self._claims is not None:
                wanted = set(self._claims(item))
                if not claimed.isdisjoint(wanted):
                    rest.append(entry)
                    continue
                claimed |= wanted
            batch.append(entry)
        self._queue = rest
        return batch

    async def _flush(self) -> None:
        batch: list[tuple[_Item, asyncio.Future[_Result]]] = []
        try:
            # The queue is checked and `_running` lowered with no await in between, so a
            # request queued after the last check always finds a flusher or starts one.
            while self._queue:
                batch = self._take()
                if not batch:
                    continue
                try:
                    results = await self._handle([item for item, _ in batch])
                except Exception as e:  # a bug or a lost connection: the whole batch failed
                    results = [e] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        except BaseException:
            # Cancelled (the loop is shutting down): nobody may wait forever.
            for _, future in [*batch, *self._queue]:
                future.cancel()
            self._queue.clear()
            raise
        finally:
            self._running -= 1
