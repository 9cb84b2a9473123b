"""The outbox side of the write model: claim unpublished events, mark them published, wake up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from pydist.adapters.db import order_from_row
from pydist.domain.events import BuyOrderCreated

log = structlog.get_logger()
CHANNEL = "pydist_outbox"

# SKIP LOCKED: several relays share the backlog and never claim the same row at once.
_CLAIM = text(
    """
    SELECT o.id AS outbox_id, o.event_id, o.request_id,
           b.id, b.idempotence_key, b.created_at, b.currency, b.currency_amount, b.btc_rate,
           b.btc_amount
    FROM outbox o JOIN buy_orders b ON b.id = o.order_id
    WHERE o.published_at IS NULL
    ORDER BY o.id
    LIMIT :n
    FOR UPDATE OF o SKIP LOCKED
    """
)
_MARK = text("UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY(:ids)")


class Outbox:
    def __init__(self, engine: AsyncEngine, dsn: str) -> None:
        self.engine = engine
        self._dsn = dsn

    @asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[list[BuyOrderCreated]]:
        """Yield up to `limit` unpublished events, locked; they are marked published only if the
        block exits cleanly, so a failed publish leaves them for the next attempt."""
        async with self.engine.begin() as conn:
            rows = (await conn.execute(_CLAIM, {"n": limit})).all()
            yield [BuyOrderCreated(r.event_id, order_from_row(r), r.request_id) for r in rows]
            if rows:
                await conn.execute(_MARK, {"ids": [r.outbox_id for r in rows]})

    async def backlog(self) -> int:
        async with self.engine.connect() as conn:
            return int(
                (
                    await conn.execute(text("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
                ).scalar_one()
            )

    async def listen(self, on_notify: Callable[[], None], stop: asyncio.Event) -> None:
        """Call `on_notify` on every NOTIFY from place_orders(); reconnect if the link drops."""
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn, timeout=5)
                await conn.add_listener(CHANNEL, lambda *_: on_notify())
                on_notify()  # catch up on anything committed while not listening
                while not stop.is_set() and not conn.is_closed():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=5)
                    if not stop.is_set():
                        await conn.execute("SELECT 1", timeout=5)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning("outbox_listen_lost", error=type(exc).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)
