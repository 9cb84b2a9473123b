"""The outbox side of the write model: claim unpublished events, mark them published, wake up.

The claim runs on asyncpg directly, on a connection borrowed from the SQLAlchemy pool and kept
while claims keep coming (as the create path's writer does, adapters/write_store.py): BEGIN, the
claim, the mark and COMMIT are four round trips, where SQLAlchemy added a checkout pre-ping
(three more) and its result processing to every batch (~8% of the relay's CPU)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import asyncpg
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine
from tenacity import RetryCallState

from pydist.adapters.db import RawConnection, order_from_row, raw_connection
from pydist.adapters.write_store import LINGER_S
from pydist.domain.events import BuyOrderCreated
from pydist.retrying import failure, until_stopped

log = structlog.get_logger()
CHANNEL = "pydist_outbox"

# SKIP LOCKED: several relays share the backlog and never claim the same row at once.
_CLAIM = """
    SELECT o.id AS outbox_id, o.event_id, o.request_id, o.traceparent,
           b.id, b.idempotence_key, b.created_at, b.currency, b.currency_amount, b.btc_rate,
           b.btc_amount
    FROM outbox o JOIN buy_orders b ON b.id = o.order_id
    WHERE o.published_at IS NULL
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
"""
_MARK = "UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1::bigint[])"


class Outbox:
    def __init__(self, engine: AsyncEngine, dsn: str) -> None:
        self.engine = engine
        self._dsn = dsn
        self._keep = False
        self._kept: RawConnection | None = None
        self._kept_stack: AsyncExitStack | None = None
        self._kept_busy = False
        self._kept_used_at = 0.0

    @asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[list[BuyOrderCreated]]:
        """Yield up to `limit` unpublished events, locked; they are marked published only if the
        block exits cleanly, so a failed publish leaves them for the next attempt."""
        if not self._keep or self._kept_busy:  # a claim alongside the relay's gets its own
            async with raw_connection(self.engine) as conn, _claimed(conn, limit) as events:
                yield events
            return
        conn = await self._keep_connection()
        self._kept_busy = True
        try:
            async with _claimed(conn, limit) as events:
                yield events
        finally:
            self._kept_busy = False
            self._kept_used_at = time.monotonic()
            if conn.broken:
                await self._release()

    @asynccontextmanager
    async def keeping_connection(self) -> AsyncIterator[None]:
        """Claims made within this block (the relay's loop) reuse one pooled connection: no
        checkout and pre-ping per batch. One left idle longer than LINGER_S goes back to the pool
        before the next claim, which borrows a fresh one, checked by the pool's pre-ping; one that
        failed is thrown away."""
        self._keep = True
        try:
            yield
        finally:
            self._keep = False
            await self._release()

    async def _keep_connection(self) -> RawConnection:
        if self._kept is not None and time.monotonic() - self._kept_used_at > LINGER_S:
            await self._release()
        if self._kept is None:
            stack = AsyncExitStack()
            self._kept = await stack.enter_async_context(raw_connection(self.engine))
            self._kept_stack = stack
        return self._kept

    async def _release(self) -> None:
        stack, self._kept_stack, self._kept = self._kept_stack, None, None
        if stack is not None:
            await stack.aclose()

    async def listen(self, on_notify: Callable[[], None], stop: asyncio.Event) -> None:
        """Call `on_notify` on every NOTIFY from place_orders() until `stop`; reconnect (0.5 s,
        doubling up to 5 s) whenever the link drops. A lost NOTIFY costs nothing but time: the
        relay also polls every second."""
        lost = (OSError, asyncpg.PostgresError, TimeoutError)
        with contextlib.suppress(*lost):  # raised only once stopping
            async for attempt in until_stopped(
                stop, retry_on=lost, first_s=0.5, max_s=5, on_retry=_listen_lost
            ):
                with attempt:
                    await self._listen_once(on_notify, stop)

    async def _listen_once(self, on_notify: Callable[[], None], stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=5)
        try:
            await conn.add_listener(CHANNEL, lambda *_: on_notify())
            on_notify()  # catch up on anything committed while not listening
            while not stop.is_set() and not conn.is_closed():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=5)
                if not stop.is_set():
                    await conn.execute("SELECT 1", timeout=5)
            if not stop.is_set():
                raise ConnectionResetError("the listening connection closed")
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)


def _listen_lost(state: RetryCallState, wait_s: float) -> None:
    log.warning("outbox_listen_lost", error=type(failure(state)).__name__, retry_in_s=wait_s)


@asynccontextmanager
async def _claimed(conn: RawConnection, limit: int) -> AsyncIterator[list[BuyOrderCreated]]:
    """One claim transaction on `conn`. The connection is never handed back inside it: a failed
    publish rolls it back; a failed statement or a cancellation marks it broken (thrown away, and
    the server rolls back)."""
    driver = conn.driver
    try:
        await driver.execute("BEGIN")
        rows = await driver.fetch(_CLAIM, limit)
    except BaseException:
        conn.broken = True
        raise
    try:
        yield [
            BuyOrderCreated(r["event_id"], order_from_row(r), r["request_id"], r["traceparent"]) for r in rows
        ]
    except Exception:
        try:
            await driver.execute("ROLLBACK")
        except BaseException:
            conn.broken = True
            raise
        raise
    except BaseException:
        conn.broken = True
        raise
    try:
        if rows:
            await driver.execute(_MARK, [r["outbox_id"] for r in rows])
        await driver.execute("COMMIT")
    except BaseException:
        conn.broken = True
        raise
