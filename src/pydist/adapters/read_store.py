"""The read model: a separate database with one table, shaped for the newest-first listing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import asyncpg
import orjson
import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from pydist.adapters.db import (
    RAW_ERRORS,
    order_from_row,
    ping,
    raw_connection,
    unavailable,
)
from pydist.domain.events import BuyOrderCreated
from pydist.domain.order import BuyOrder
from pydist.service.errors import EventRejectedError, UnknownReferenceError
from pydist.service.ports import Projected

log = structlog.get_logger()
_DISCONNECTS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a terminated idle connection, see db.RAW_ERRORS
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
)

_COLUMNS = "id, idempotence_key, created_at, currency, currency_amount, btc_rate, btc_amount"

# Each row in its wire form, exactly as BuyOrder.to_public() writes it (tests/integration/
# test_keyset.py compares the two over edge values): uuid and numerics as Postgres prints them (no
# exponent, the stored scale), the instant in UTC with microseconds only when there are any, and Z.
# Rendering in the query spares the fetch process the decoding into uuid/datetime/Decimal and the
# formatting back to text: two thirds of its CPU per page (docs/benchmarks.md).
_PUBLIC = """
    o.id::text AS id,
    to_char(o.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN date_part('microseconds', o.created_at)::int % 1000000 = 0 THEN ''
                ELSE to_char(o.created_at AT TIME ZONE 'UTC', '.US') END
        || 'Z' AS created_at,
    o.currency, o.currency_amount::text AS currency_amount, o.btc_rate::text AS btc_rate,
    o.btc_amount::text AS btc_amount
"""
# One round trip for any page. With a reference: the LEFT JOIN yields no row at all when the
# reference is unknown, and one all-NULL row when it is known but nothing is older.
# Sent with asyncpg directly (one round trip, a prepared statement per connection).
_FIRST_PAGE = f"SELECT {_PUBLIC} FROM buy_orders o ORDER BY o.created_at DESC, o.id DESC LIMIT $1"
_NEXT_PAGE = f"""
    SELECT b.*
    FROM (SELECT created_at, id FROM buy_orders WHERE id = $2) AS ref
    LEFT JOIN LATERAL (
        SELECT {_PUBLIC} FROM buy_orders o
        WHERE (o.created_at, o.id) < (ref.created_at, ref.id)
        ORDER BY o.created_at DESC, o.id DESC
        LIMIT $1
    ) AS b ON true
    """
# One statement, its own transaction, sent on the raw connection: no BEGIN/COMMIT round trips.
_UPSERT = """
    INSERT INTO buy_orders (id, idempotence_key, created_at, currency, currency_amount, btc_rate,
                            btc_amount, event_id)
    SELECT r.id, r.idempotence_key, r.created_at, r.currency, r.currency_amount, r.btc_rate,
           r.btc_amount, r.event_id
    FROM jsonb_to_recordset($1::jsonb) AS r(
        id uuid, idempotence_key uuid, created_at timestamptz, currency text,
        currency_amount numeric, btc_rate numeric, btc_amount numeric, event_id uuid)
    ORDER BY r.id
    ON CONFLICT (id) DO NOTHING
    RETURNING id, created_at, projected_at
"""


PageKey = tuple[int, uuid.UUID | None]


@dataclass(frozen=True)
class Page:
    public_rows: list[dict[str, str]]
    """The rows in their wire form (BuyOrder.to_public()), newest first."""
    has_more: bool

    @cached_property
    def public_json(self) -> bytes:
        """`public_rows` as a JSON array, serialised once for all the requests sharing the page."""
        return orjson.dumps(self.public_rows)


class ReadStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        # Page reads by (page_size, last_reference): the round still open to newcomers, and the
        # newest round (open or running), which the next round waits for.
        self._open: dict[PageKey, asyncio.Task[Page]] = {}
        self._newest: dict[PageKey, asyncio.Task[Page]] = {}

    async def page(self, page_size: int, last_reference: uuid.UUID | None) -> Page:
        """Newest first, after `last_reference`. Identical concurrent requests share one query:
        those that arrive while it runs share the next one, so every answer is still read after
        its request arrived (never an older snapshot), and a hot page at c=64 costs one query per
        round instead of 64. A client that goes away does not cancel the others' query."""
        key = (page_size, last_reference)
        task = self._open.get(key)
        if task is None or task.done():  # done while still open only if cancelled at shutdown
            task = asyncio.create_task(self._round(key, self._newest.get(key)), name="page-read")
            task.add_done_callback(_retrieve)
            self._open[key] = self._newest[key] = task
        return await asyncio.shield(task)

    async def _round(self, key: PageKey, previous: asyncio.Task[Page] | None) -> Page:
        me = asyncio.current_task()
        try:
            if previous is not None:
                await asyncio.wait([previous])  # its outcome is its waiters'; only the order matters
        finally:
            if self._open.get(key) is me:
                del self._open[key]  # from here on, newcomers start the next round
        try:
            return await self._read_page(*key)
        finally:
            if self._newest.get(key) is me:
                del self._newest[key]

    async def _read_page(self, page_size: int, last_reference: uuid.UUID | None) -> Page:
        try:
            if last_reference is None:
                rows = await self._fetch(_FIRST_PAGE, page_size + 1)
            else:
                rows = await self._fetch(_NEXT_PAGE, page_size + 1, last_reference)
        except RAW_ERRORS as exc:
            raise unavailable(exc) from exc
        if last_reference is not None and not rows:
            raise UnknownReferenceError(f"no buy order with id {last_reference}")
        public = [dict(r) for r in rows if r["id"] is not None]
        return Page(public[:page_size], has_more=len(public) > page_size)

    async def apply(self, events: Sequence[BuyOrderCreated]) -> list[Projected]:
        """Idempotent: an order already present is left as it is (ON CONFLICT DO NOTHING), and
        an event repeated within the batch is inserted once. Rows go in in id order, so two
        appliers with overlapping batches (redeliveries, two relays) never deadlock.

        Raises EventRejectedError when the database refuses the data itself (SQLSTATE class 22
        data exception / 23 constraint): the same events would fail again. Any other database
        failure (connection, timeout, …) is a StoreUnavailableError, worth a retry."""
        if not events:
            return []
        payload = orjson.dumps(
            [
                {
                    **e.order.to_public(),
                    "idempotence_key": str(e.order.idempotence_key),
                    "event_id": str(e.event_id),
                }
                for e in sorted(events, key=lambda e: e.order.id)
            ]
        ).decode()
        try:
            rows = await self._fetch(_UPSERT, payload)
        except RAW_ERRORS as exc:
            sqlstate = str(getattr(exc, "sqlstate", "") or "")
            if sqlstate[:2] in ("22", "23"):
                raise EventRejectedError(f"read model refused the data (SQLSTATE {sqlstate})") from exc
            raise unavailable(exc) from exc
        return [Projected(r["id"], r["created_at"], r["projected_at"]) for r in rows]

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """One statement on a pooled connection, without the pool's pre-ping (three round trips
        per use). A dead connection shows here instead: its idle siblings are likely dead too
        (database restart, backends terminated), so the pool is renewed and the statement sent
        once more, which is safe for both callers (a read; an idempotent upsert)."""
        try:
            return await self._fetch_once(sql, *args)
        except _DISCONNECTS as exc:
            log.warning("read_model_connection_lost", error=type(exc).__name__)
            await self.engine.dispose(close=False)
        return await self._fetch_once(sql, *args)

    async def _fetch_once(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async with raw_connection(self.engine) as conn:
            return await conn.fetch(sql, *args)

    async def all_orders(self) -> dict[uuid.UUID, BuyOrder]:
        async with self.engine.connect() as conn:
            rows = (await conn.execute(text(f"SELECT {_COLUMNS} FROM buy_orders"))).all()
        return {r.id: order_from_row(r) for r in rows}

    async def ping(self) -> None:
        await ping(self.engine)


def _retrieve(task: asyncio.Task[Page]) -> None:
    """Mark a round's failure as seen even when every waiter has gone (no 'never retrieved')."""
    if not task.cancelled():
        task.exception()
