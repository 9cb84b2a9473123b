"""The outbox side of the write model: claim unpublished events, mark them published, wake up.

A claim is one transaction of four round trips (BEGIN, the claim, the mark, COMMIT) around the
publish, on a pooled connection; the LISTEN has a connection of its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import asyncpg
import structlog
from tenacity import RetryCallState

from pydist.adapters.db import ERRORS, Database, order_from_row
from pydist.domain.events import BuyOrderCreated
from pydist.retrying import failure, sleep_unless_stopped, until_stopped

log = structlog.get_logger()
LISTENER = "pydist-relay-listen"
"""The listening connection's application_name: which backend it is, in pg_stat_activity."""
CHANNEL = "pydist_outbox"

# SKIP LOCKED: several relays share the backlog and never claim the same row at once.
_CLAIM = """
    SELECT o.id AS outbox_id, o.event_id, o.request_id, o.traceparent, b.*
    FROM outbox o JOIN buy_orders b ON b.id = o.order_id
    WHERE o.published_at IS NULL
    ORDER BY o.id
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED
"""
_MARK = "UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1::bigint[])"


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[list[BuyOrderCreated]]:
        """Yield up to `limit` unpublished events, locked; they are marked published only if the
        block exits cleanly, so a failed publish (or a lost connection) rolls the claim back and
        leaves them for the next attempt."""
        async with self.db.connection() as conn, conn.transaction():
            rows = await conn.fetch(_CLAIM, limit)
            yield [
                BuyOrderCreated(r["event_id"], order_from_row(r), r["request_id"], r["traceparent"])
                for r in rows
            ]
            if rows:
                await conn.execute(_MARK, [r["outbox_id"] for r in rows])

    async def listen(self, on_notify: Callable[[], None], stop: asyncio.Event) -> None:
        """Call `on_notify` on every NOTIFY from place_orders() until `stop`; reconnect (0.5 s,
        doubling up to 5 s) whenever the link drops. A lost NOTIFY costs nothing but time: the
        relay also polls every second."""
        with contextlib.suppress(*ERRORS):  # raised only once stopping
            async for attempt in until_stopped(
                stop, retry_on=ERRORS, first_s=0.5, max_s=5, on_retry=_listen_lost
            ):
                with attempt:
                    await self._listen_once(on_notify, stop)

    async def _listen_once(self, on_notify: Callable[[], None], stop: asyncio.Event) -> None:
        conn = await asyncpg.connect(self.db.dsn, timeout=5, server_settings={"application_name": LISTENER})
        try:
            await conn.add_listener(CHANNEL, lambda *_: on_notify())
            on_notify()  # catch up on anything committed while not listening
            while not stop.is_set() and not conn.is_closed():
                await sleep_unless_stopped(stop, 5)
                if not stop.is_set():
                    await conn.execute("SELECT 1", timeout=5)
            if not stop.is_set():
                raise ConnectionResetError("the listening connection closed")
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)


def _listen_lost(state: RetryCallState, wait_s: float) -> None:
    log.warning("outbox_listen_lost", error=type(failure(state)).__name__, retry_in_s=wait_s)
