"""The buy_orders table of either model as the read-model admin walks it (`pydist read-model
check|rebuild`): chunks in keyset order, lookups by id, the count, and the read model's repairs.
Both models have the table under the same name with the same order columns."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from pydist.adapters.db import order_from_row
from pydist.domain.order import BuyOrder

_COLS = "id, idempotence_key, created_at, currency, currency_amount, btc_rate, btc_amount"
_FIRST = text(f"SELECT {_COLS} FROM buy_orders ORDER BY created_at, id LIMIT :n")
_AFTER = text(
    f"SELECT {_COLS} FROM buy_orders WHERE (created_at, id) > (:ca, :id) ORDER BY created_at, id LIMIT :n"
)
_BY_ID = text(f"SELECT {_COLS} FROM buy_orders WHERE id = ANY(:ids)")
_COUNT = text("SELECT count(*) FROM buy_orders")
_DELETE = text("DELETE FROM buy_orders WHERE id = ANY(:ids)")
# Rows go in in id order (like the projector's), so a rebuild and the projector writing the same
# new rows at once never deadlock. A row is rewritten only if its served form differs: btc_rate is
# an unconstrained NUMERIC, compared as text so that its scale counts too. Rows the rebuild adds
# get a fresh event_id (the outbox has no index by order to look the original up cheaply).
_UPSERT = text(
    """
    INSERT INTO buy_orders (id, idempotence_key, created_at, currency, currency_amount, btc_rate,
                            btc_amount, event_id)
    SELECT r.id, r.idempotence_key, r.created_at, r.currency, r.currency_amount, r.btc_rate,
           r.btc_amount, gen_random_uuid()
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(
        id uuid, idempotence_key uuid, created_at timestamptz, currency text,
        currency_amount numeric, btc_rate numeric, btc_amount numeric)
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
)


class OrderTable:
    """One model's buy_orders (implements service.ports.OrderRows)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def after(self, cursor: tuple[datetime, uuid.UUID] | None, limit: int) -> list[BuyOrder]:
        if cursor is None:
            return await self._orders(_FIRST, {"n": limit})
        return await self._orders(_AFTER, {"ca": cursor[0], "id": cursor[1], "n": limit})

    async def find(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, BuyOrder]:
        return {o.id: o for o in await self._orders(_BY_ID, {"ids": ids})}

    async def count(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(_COUNT)).scalar_one())

    async def _orders(self, sql: Any, params: dict[str, Any]) -> list[BuyOrder]:
        async with self.engine.connect() as conn:
            return [order_from_row(r) for r in (await conn.execute(sql, params)).all()]


class ReadModelTable(OrderTable):
    """The read model's buy_orders, with the repairs a rebuild makes (service.ports.ReadModelRows)."""

    async def upsert(self, orders: list[BuyOrder]) -> None:
        rows = [{**o.to_public(), "idempotence_key": str(o.idempotence_key)} for o in orders]
        async with self.engine.begin() as conn:
            await conn.execute(_UPSERT, {"rows": orjson.dumps(rows).decode()})

    async def delete(self, ids: list[uuid.UUID]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(_DELETE, {"ids": ids})
