"""Micro-batching in front of place_orders(): many concurrent orders share one transaction.

Requests that arrive while a batch is being committed wait for the next one, as in a database's
group commit. Each order still gets its own cap check and idempotency outcome.

Under load the writer also holds a short commit window (WRITE_WINDOW_S) after a batch's first
order, like Postgres' commit_delay with commit_siblings: the orders whose key lookups finish a
moment later share the transaction instead of each opening the next one. Measured in
docs/benchmarks.md ("The commit window"). After a batch of one (an idle service) it does not wait,
so a lone order pays nothing for it.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from pydist import telemetry
from pydist.adapters.db import within_deadline
from pydist.adapters.write_store import WriteStore
from pydist.domain.order import Placed, PlaceResult, PricedOrder
from pydist.metrics import WRITE_BATCH_SIZE
from pydist.service.ports import StoreUnavailableError

log = structlog.get_logger()

DRAIN_S = 2.0
"""The longest a stop waits for the queued orders' batches: a write model that does not answer
(a partition) must not hold the shutdown until the orchestrator kills the process."""
_Item = tuple[PricedOrder, str | None, str | None, "asyncio.Future[PlaceResult]"]
"""An order, its request id, the traceparent of its request (None: tracing off), its outcome."""


class BatchingOrderWriter:
    def __init__(self, store: WriteStore, *, max_batch: int, window_s: float = 0.0) -> None:
        self._store = store
        self._max_batch = max_batch
        self._window_s = window_s
        self._busy = False
        """Whether the last batch had company: the window applies only then."""
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="order-writer")

    async def stop(self, drain_s: float = DRAIN_S) -> None:
        """Finish what was queued, for at most `drain_s`, then stop: an order still waiting fails
        as unavailable (its request, if it still waits, gets the 503 a retry with its key heals)."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), drain_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        while not self._queue.empty():
            self._fail([self._queue.get_nowait()], StoreUnavailableError("shutting down"))
            self._queue.task_done()

    async def place(self, order: PricedOrder, request_id: str | None) -> PlaceResult:
        if self._task is None:
            raise StoreUnavailableError("order writer is not running")
        future: asyncio.Future[PlaceResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((order, request_id, telemetry.current_traceparent(), future))
        # A caller that gives up (deadline, cancellation) leaves the order in its batch; the writer
        # skips settling a future that is already done.
        return await within_deadline(future)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            try:
                await self._fill(batch)
                await self._commit(batch)
            except asyncio.CancelledError:  # in the window or the commit: no order is left waiting
                self._fail(batch, StoreUnavailableError("shutting down"))
                raise
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _fill(self, batch: list[_Item]) -> None:
        """The orders queued behind the first, after the commit window if the writer is busy."""
        if self._busy and self._window_s > 0:
            await asyncio.sleep(self._window_s)
        while len(batch) < self._max_batch and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        self._busy = len(batch) > 1

    async def _commit(self, batch: list[_Item]) -> None:
        """Store one batch with place_orders() and settle every one of its futures (a failure fails
        them all). With tracing on, inside the write-transaction span (in the first order's trace,
        linked to every order's), which names the orders it created."""
        WRITE_BATCH_SIZE.observe(len(batch))
        orders = [(o, rid, tp) for o, rid, tp, _ in batch]
        attrs = {"db.system.name": "postgresql", "db.operation.name": "place_orders"}
        traceparents = [tp for *_, tp in orders]
        try:
            with telemetry.batch_span(
                "write_transaction place_orders", "INTERNAL", traceparents, attrs, first_order_parent=True
            ) as span:
                results = await self._store.place_batch(orders)
                if span is not None:
                    created = [r.order.id for r in results if isinstance(r, Placed)]
                    span.set_attributes(telemetry.order_attributes(created))
        except StoreUnavailableError as exc:
            self._fail(batch, exc)
            return
        except Exception as exc:
            log.exception("order_batch_failed", size=len(batch))
            self._fail(batch, StoreUnavailableError(f"write failed: {type(exc).__name__}"))
            return
        for (_, _, _, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    def _fail(self, batch: list[_Item], exc: Exception) -> None:
        for *_, future in batch:
            if not future.done():
                future.set_exception(exc)
