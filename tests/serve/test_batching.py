"""The coalescer: concurrent requests in token-budget batches, in arrival order, errors to their batch."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from visualprm_ray.serve.batching import Coalescer


def _run(coalescer_kwargs, items, *, run=None, stagger=0.0):
    calls: list[list[int]] = []
    threads: set[int] = set()

    def default_run(batch):
        threads.add(threading.get_ident())
        calls.append(list(batch))
        return [x * 10 for x in batch]

    async def main():
        with ThreadPoolExecutor(1) as executor:
            coalescer = Coalescer(run or default_run, executor=executor, **coalescer_kwargs)
            tasks = []
            for item in items:
                tasks.append(asyncio.create_task(coalescer.submit(item)))
                if stagger:
                    await asyncio.sleep(stagger)
            return await asyncio.gather(*tasks, return_exceptions=True), coalescer

    results, coalescer = asyncio.run(main())
    return results, calls, threads, coalescer


def test_concurrent_requests_share_batches_under_the_budget_in_arrival_order():
    results, calls, threads, coalescer = _run(
        dict(size=lambda x: x, budget=10, wait_s=0.05), [3, 4, 2, 5, 1, 9]
    )
    assert results == [30, 40, 20, 50, 10, 90]
    assert calls == [[3, 4, 2], [5, 1], [9]]  # each batch the longest run that fits 10
    assert [x for batch in calls for x in batch] == [3, 4, 2, 5, 1, 9]
    assert len(threads) == 1 and list(coalescer.batches) == [3, 2, 1]


def test_an_item_over_the_budget_goes_alone_rather_than_being_refused():
    results, calls, _, _ = _run(dict(size=lambda x: x, budget=10, wait_s=0.02), [50, 1, 2])
    assert results == [500, 10, 20] and calls == [[50], [1, 2]]


def test_a_failing_batch_fails_its_requests_only_and_the_next_batch_runs():
    def run(batch):
        if 7 in batch:
            raise RuntimeError("boom")
        return [x for x in batch]

    results, _, _, _ = _run(dict(size=lambda x: 5, budget=10, wait_s=0.02), [7, 1, 2, 3], run=run)
    assert [type(r) for r in results[:2]] == [RuntimeError, RuntimeError]
    assert results[2:] == [2, 3]


def test_requests_apart_in_time_each_run_without_waiting_for_company():
    results, calls, _, _ = _run(dict(size=lambda x: 1, budget=10, wait_s=0.0), [1, 2, 3], stagger=0.05)
    assert results == [10, 20, 30] and calls == [[1], [2], [3]]


def test_a_request_whose_client_left_is_not_scored():
    calls = []

    async def main():
        with ThreadPoolExecutor(1) as executor:
            coalescer = Coalescer(
                lambda b: calls.append(list(b)) or b,
                size=lambda x: 1,
                budget=10,
                wait_s=0.05,
                executor=executor,
            )
            gone = asyncio.create_task(coalescer.submit(1))
            kept = asyncio.create_task(coalescer.submit(2))
            await asyncio.sleep(0)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            return await kept

    assert asyncio.run(main()) == 2 and calls == [[2]]
