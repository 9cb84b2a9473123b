"""The buy_orders table of either model as the read-model admin walks it (`pydist read-model
check|rebuild`): chunks in keyset order, lookups by id, the count, and the read model's repairs.
Both models have the table under the same name with the same order columns."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson

from pydist.adapters.db import ORDER_COLUMNS, ORDER_RECORD, Database, order_from_row
from pydist.domain.order import BuyOrder

_FIRST = f"SELECT {ORDER_COLUMNS} FROM buy_orders ORDER BY created_at, id LIMIT $1"
_AFTER = f"""
    SELECT {ORDER_COLUMNS} FROM buy_orders WHERE (created_at, id) > ($2, $3)
    ORDER BY created_at, id LIMIT $1
"""
_BY_ID = f"SELECT {ORDER_COLUMNS} FROM buy_orders WHERE id = ANY($1::uuid[])"
_COUNT = "SELECT count(*) FROM buy_orders"
_DELETE = "DELETE FROM buy_orders WHERE id = ANY($1::uuid[])"
# Rows go in in id order (like the projector's), so a rebuild and the projector writing the same
# new rows at once never deadlock. A row is rewritten only if its served form differs: btc_rate is
# an unconstrained NUMERIC, compared as text so that its scale counts too. Rows the rebuild adds
# get a fresh event_id (the outbox has no index by order to look the original up cheaply).
_UPSERT = f"""
    INSERT INTO buy_orders ({ORDER_COLUMNS}, event_id)
    SELECT r.*, gen_random_uuid()
    FROM jsonb_to_recordset($1::jsonb) AS r({ORDER_RECORD})
    ORDER BY r.id
    ON CONFLICT (id) DO UPDATE SET
        idempotence_key = EXCLUDED.idempotence_key, created_at = EXCLUDED.created_at,
        currency = EXCLUDED.currency, currency_amount = EXCLUDED.currency_amount,
        btc_rate = EXCLUDED.btc_rate, btc_amount = EXCLUDED.btc_amount
    WHERE (buy_orders.idempotence_key, buy_orders.created_at, buy_orders.currency,
           buy_orders.currency_amount::text, buy_orders.btc_rate::text, buy_orders.btc_amount::text)
          IS DISTINCT FROM
          (EXCLUDED.idempotence_key, EXCLUDED.created_at, EXCLUDED.currency,
           EXCLUDED.currency_amount::text, EXCLUDED.btc_rate::text, EXCLUDED.btc_amount::text)
"""


class OrderTable:
    """One model's buy_orders (implements service.ports.OrderRows)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def after(self, cursor: tuple[datetime, uuid.UUID] | None, limit: int) -> list[BuyOrder]:
        if cursor is None:
            return await self._orders(_FIRST, limit)
        return await self._orders(_AFTER, limit, *cursor)

    async def find(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, BuyOrder]:
        return {o.id: o for o in await self._orders(_BY_ID, ids)}

    async def count(self) -> int:
        return int((await self.db.fetch(_COUNT))[0][0])

    async def _orders(self, sql: str, *args: Any) -> list[BuyOrder]:
        return [order_from_row(r) for r in await self.db.fetch(sql, *args)]


class ReadModelTable(OrderTable):
    """The read model's buy_orders, with the repairs a rebuild makes (service.ports.ReadModelRows)."""

    async def upsert(self, orders: list[BuyOrder]) -> None:
        rows = [o.to_record() for o in orders]
        await self.db.fetch(_UPSERT, orjson.dumps(rows).decode())

    async def delete(self, ids: list[uuid.UUID]) -> None:
        await self.db.fetch(_DELETE, ids)
