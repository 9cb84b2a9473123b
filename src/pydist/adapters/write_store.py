"""The write model: the source of truth for orders, the cap and the outbox."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from pydist.adapters.db import STORE_ERRORS, order_from_row, unavailable
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder, CapRefused, Placed, PlaceResult, PricedOrder

_ORDER_COLUMNS = "id, idempotence_key, created_at, currency, currency_amount, btc_rate, btc_amount"


@dataclass(frozen=True, slots=True)
class CapStatus:
    limit_btc: Decimal
    used_btc: Decimal

    @property
    def available_btc(self) -> Decimal:
        return self.limit_btc - self.used_btc


class WriteStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def find_by_key(self, key: uuid.UUID) -> BuyOrder | None:
        try:
            async with self.engine.connect() as conn:
                row = (
                    await conn.execute(
                        text(f"SELECT {_ORDER_COLUMNS} FROM buy_orders WHERE idempotence_key = :k"),
                        {"k": key},
                    )
                ).first()
        except STORE_ERRORS as exc:
            raise unavailable(exc) from exc
        return order_from_row(row) if row else None

    async def place_batch(self, orders: Sequence[tuple[PricedOrder, str | None]]) -> list[PlaceResult]:
        """Store a batch in one transaction, one round trip: the cap stays exact per order."""
        payload = orjson.dumps(
            [
                {
                    "key": str(p.request.idempotence_key),
                    "currency": p.request.currency.value,
                    "amount": str(p.request.amount),
                    "rate": str(p.btc_rate),
                    "btc": str(p.btc_amount),
                    "request_id": request_id,
                }
                for p, request_id in orders
            ]
        ).decode()
        try:
            async with self.engine.begin() as conn:
                rows = (
                    await conn.execute(
                        text("SELECT * FROM place_orders(CAST(:reqs AS jsonb))"), {"reqs": payload}
                    )
                ).all()
        except STORE_ERRORS as exc:
            raise unavailable(exc) from exc
        results: list[PlaceResult | None] = [None] * len(orders)
        for row in rows:
            if row.outcome == "cap_exceeded":
                results[row.idx] = CapRefused(row.available_btc)
            else:
                order = BuyOrder(
                    id=row.order_id,
                    idempotence_key=row.key,
                    created_at=row.created_at,
                    currency=Currency(row.currency),
                    currency_amount=row.currency_amount,
                    btc_rate=row.btc_rate,
                    btc_amount=row.btc_amount,
                )
                results[row.idx] = Placed(order, created=row.outcome == "created")
        assert all(r is not None for r in results), "place_orders answered every order"
        return [r for r in results if r is not None]

    async def cap_status(self) -> CapStatus:
        try:
            async with self.engine.connect() as conn:
                row = (await conn.execute(text("SELECT limit_btc, used_btc FROM btc_cap WHERE id = 1"))).one()
        except STORE_ERRORS as exc:
            raise unavailable(exc) from exc
        return CapStatus(row.limit_btc, row.used_btc)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
