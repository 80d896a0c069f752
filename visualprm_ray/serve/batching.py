"""Requests of concurrent clients coalesced into scorer batches under a token budget.

Each replica has one :class:`Coalescer`. A request's prepared group waits here until the model is
free; the next batch takes the waiting groups in arrival order while their tokens fit the budget
(a group larger than the budget goes alone), waits ``wait_s`` at most for more once it has one,
and runs on the replica's single model thread. Ray Serve's own ``@serve.batch`` counts items, or
refuses an item larger than its size limit; a batch here counts tokens and never refuses one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """``await submit(item)`` -> ``run([... item ...])``'s result for it, batched with its neighbours."""

    def __init__(
        self,
        run: Callable[[list[T]], list[R]],
        *,
        size: Callable[[T], int],
        budget: int,
        wait_s: float,
        executor: Executor,
    ) -> None:
        self._run, self._size, self._budget, self._wait_s = run, size, budget, wait_s
        self._executor = executor
        self._waiting: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.batches: deque[int] = deque(maxlen=1024)  # the latest batch sizes, for tests and metrics

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        self._arrived.set()
        return await future

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        """The longest run of waiting items, in order, whose sizes fit the budget (at least one)."""
        batch, used = [], 0
        while self._waiting:
            item, future = self._waiting[0]
            if future.cancelled():  # the client went away while it waited
                self._waiting.popleft()
                continue
            cost = self._size(item)
            if batch and used + cost > self._budget:
                break
            batch.append(self._waiting.popleft())
            used += cost
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._arrived is not None
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            # Give concurrent requests a moment to join, unless the batch is already full.
            if self._wait_s and sum(self._size(item) for item, _ in self._waiting) < self._budget:
                await asyncio.sleep(self._wait_s)
            while self._waiting:
                batch = self._take()
                if not batch:
                    break
                self.batches.append(len(batch))
                try:
                    results = await loop.run_in_executor(self._executor, self._run, [i for i, _ in batch])
                except Exception as exc:  # every request of the batch gets it; the worker goes on
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                if len(results) != len(batch):
                    error = AssertionError(f"{len(results)} results for a batch of {len(batch)}")
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
