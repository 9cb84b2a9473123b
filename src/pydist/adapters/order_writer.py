"""Micro-batching in front of place_orders(): many concurrent orders share one transaction.

Requests that arrive while a batch is being committed wait for the next one, as in a database's
group commit. Each order still gets its own cap check and idempotency outcome.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from pydist.adapters.write_store import WriteStore
from pydist.domain.errors import StoreUnavailableError
from pydist.domain.order import PlaceResult, PricedOrder

log = structlog.get_logger()

_Item = tuple[PricedOrder, str | None, "asyncio.Future[PlaceResult]"]


class BatchingOrderWriter:
    def __init__(self, store: WriteStore, *, max_batch: int) -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.orders = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="order-writer")

    async def stop(self) -> None:
        """Finish what was queued, then stop."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def place(self, order: PricedOrder, request_id: str | None) -> PlaceResult:
        if self._task is None:
            raise StoreUnavailableError("order writer is not running")
        future: asyncio.Future[PlaceResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((order, request_id, future))
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await self._store.place_batch([(o, rid) for o, rid, _ in batch])
            except asyncio.CancelledError:
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(StoreUnavailableError("shutting down"))
                raise
            except Exception as exc:
                self._done(len(batch))
                if not isinstance(exc, StoreUnavailableError):
                    log.exception("order_batch_failed", size=len(batch))
                    exc = StoreUnavailableError(f"write failed: {type(exc).__name__}")
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches += 1
            self.orders += len(batch)
            for (_, _, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            self._done(len(batch))

    def _done(self, n: int) -> None:
        for _ in range(n):
            self._queue.task_done()
