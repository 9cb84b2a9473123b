"""The read model as fetch_buy_orders lists it: keyset pages, newest first, in their wire form."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from functools import cached_property

import orjson

from pydist.adapters.db import Database
from pydist.service.errors import UnknownReferenceError

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
# One round trip, a prepared statement per connection.
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


class ListingStore:
    def __init__(self, db: Database) -> None:
        self.db = db
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
        if last_reference is None:
            rows = await self.db.fetch(_FIRST_PAGE, page_size + 1)
        else:
            rows = await self.db.fetch(_NEXT_PAGE, page_size + 1, last_reference)
        if last_reference is not None and not rows:
            raise UnknownReferenceError(f"no buy order with id {last_reference}")
        public = [dict(r) for r in rows if r["id"] is not None]
        return Page(public[:page_size], has_more=len(public) > page_size)

    async def ping(self) -> None:
        await self.db.ping()


def _retrieve(task: asyncio.Task[Page]) -> None:
    """Mark a round's failure as seen even when every waiter has gone (no 'never retrieved')."""
    if not task.cancelled():
        task.exception()
