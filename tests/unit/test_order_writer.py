"""The batching writer's commit window: under load a batch waits for company after its first
order; after a batch of one (an idle service) a lone order is written at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, cast

import pytest

from pydist.adapters.order_writer import BatchingOrderWriter
from pydist.adapters.write_store import WriteStore
from pydist.domain.money import Currency
from pydist.domain.order import CapRefused, OrderRequest, PlaceResult, PricedOrder
from pydist.service.ports import StoreUnavailableError

BOUND_S = 10.0
"""How long a test waits for a condition: far above the milliseconds each takes."""


class Store:
    """A fake write store that records the size of every batch it is handed."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    async def place_batch(self, orders: Sequence[Any]) -> list[PlaceResult]:
        self.batches.append(len(orders))
        return [CapRefused(Decimal(0)) for _ in orders]


def order() -> PricedOrder:
    return OrderRequest(uuid.uuid4(), Currency.EUR, Decimal(10)).priced(Decimal(50_000))


def writer(store: Store, window_s: float) -> BatchingOrderWriter:
    w = BatchingOrderWriter(cast(WriteStore, store), max_batch=64, window_s=window_s)
    w.start()
    return w


async def until_taken(w: BatchingOrderWriter) -> None:
    """Until the writer has taken every queued order (it is in its window, or committing)."""
    async with asyncio.timeout(BOUND_S):
        while w._queue.qsize():
            await asyncio.sleep(0.001)


async def late_company(window_s: float) -> list[int]:
    """Two orders at once (a busy writer), then one, then another after the writer took the first."""
    store = Store()
    w = writer(store, window_s)
    await asyncio.gather(w.place(order(), None), w.place(order(), None))
    first = asyncio.ensure_future(w.place(order(), None))
    await asyncio.sleep(0)  # tasks run in the order they were made: `first` has queued its order
    assert w._queue.qsize() == 1
    await until_taken(w)
    second = asyncio.ensure_future(w.place(order(), None))
    async with asyncio.timeout(BOUND_S):
        await asyncio.gather(first, second)
    await w.stop()
    return store.batches


async def test_under_load_a_late_order_joins_the_batch_in_its_window() -> None:
    assert await late_company(window_s=1.0) == [2, 2]


async def test_without_a_window_the_late_order_takes_the_next_batch() -> None:
    """The control: the same arrivals with no window make a batch each."""
    assert await late_company(window_s=0.0) == [2, 1, 1]


async def test_a_lone_order_on_an_idle_writer_does_not_wait_for_the_window() -> None:
    store = Store()
    w = writer(store, window_s=60.0)  # a window the bound below would notice
    async with asyncio.timeout(BOUND_S):
        for _ in range(3):
            await w.place(order(), None)
    await w.stop()
    assert store.batches == [1, 1, 1]


async def test_an_order_in_the_window_fails_fast_when_the_writer_is_cancelled() -> None:
    """Cancelled while it waits out the window (a shutdown), the writer fails the orders it holds
    instead of leaving their requests to their 4 s deadline."""
    store = Store()
    w = writer(store, window_s=60.0)
    await asyncio.gather(w.place(order(), None), w.place(order(), None))  # busy: the window applies
    pending = asyncio.ensure_future(w.place(order(), None))
    await asyncio.sleep(0)  # `pending` has queued its order
    await until_taken(w)
    assert w._task is not None
    w._task.cancel()
    async with asyncio.timeout(BOUND_S):
        with pytest.raises(StoreUnavailableError, match="shutting down"):
            await pending
    assert store.batches == [2]


class StuckStore(Store):
    """A write model that never answers (a partition)."""

    async def place_batch(self, orders: Sequence[Any]) -> list[PlaceResult]:
        self.batches.append(len(orders))
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_stop_waits_for_a_write_model_that_does_not_answer_only_so_long() -> None:
    """Stopping with orders queued behind a batch that never commits: the stop returns after its
    drain bound, and every order still held fails as unavailable instead of waiting."""
    store = StuckStore()
    w = BatchingOrderWriter(cast(WriteStore, store), max_batch=2)
    w.start()
    placed = [asyncio.ensure_future(w.place(order(), None)) for _ in range(5)]
    async with asyncio.timeout(BOUND_S):
        while not store.batches:  # the first batch is in the stuck commit
            await asyncio.sleep(0.001)
        await w.stop(drain_s=0.05)
        results = await asyncio.gather(*placed, return_exceptions=True)
    assert store.batches == [2]
    assert all(isinstance(r, StoreUnavailableError) and "shutting down" in str(r) for r in results)
    assert w._queue.qsize() == 0
