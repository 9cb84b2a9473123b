"""Admin use cases for the read model: compare it with the write model, and rebuild it from there.

Both walk the write model in keyset-ordered chunks, so memory stays flat at any size and the
system can keep running meanwhile (orders are append-only; a rebuild only adds or corrects rows).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from pydist.adapters.db import order_from_row
from pydist.domain.order import BuyOrder

_COLS = "id, idempotence_key, created_at, currency, currency_amount, btc_rate, btc_amount"
CHUNK = 5000


@dataclass
class CheckReport:
    write_count: int = 0
    read_count: int = 0
    missing: list[uuid.UUID] = field(default_factory=list)
    different: list[uuid.UUID] = field(default_factory=list)
    extra: list[uuid.UUID] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.different or self.extra)


async def _chunks(engine: AsyncEngine, chunk: int = CHUNK) -> AsyncIterator[list[BuyOrder]]:
    after: tuple[datetime, uuid.UUID] | None = None
    while True:
        async with engine.connect() as conn:
            if after is None:
                sql = f"SELECT {_COLS} FROM buy_orders ORDER BY created_at, id LIMIT :n"
                rows = (await conn.execute(text(sql), {"n": chunk})).all()
            else:
                sql = (
                    f"SELECT {_COLS} FROM buy_orders WHERE (created_at, id) > (:ca, :id) "
                    "ORDER BY created_at, id LIMIT :n"
                )
                rows = (await conn.execute(text(sql), {"ca": after[0], "id": after[1], "n": chunk})).all()
        if not rows:
            return
        orders = [order_from_row(r) for r in rows]
        yield orders
        after = (orders[-1].created_at, orders[-1].id)


async def _read_rows(read: AsyncEngine, ids: list[uuid.UUID]) -> dict[uuid.UUID, BuyOrder]:
    async with read.connect() as conn:
        rows = (
            await conn.execute(text(f"SELECT {_COLS} FROM buy_orders WHERE id = ANY(:ids)"), {"ids": ids})
        ).all()
    return {r.id: order_from_row(r) for r in rows}


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM buy_orders"))).scalar_one())


async def check(
    write: AsyncEngine, read: AsyncEngine, progress: Callable[[int], None] = lambda _: None
) -> CheckReport:
    report = CheckReport()
    seen: set[uuid.UUID] = set()
    horizon: datetime | None = None
    async for orders in _chunks(write):
        horizon = orders[-1].created_at
        report.write_count += len(orders)
        present = await _read_rows(read, [o.id for o in orders])
        for order in orders:
            seen.add(order.id)
            projected = present.get(order.id)
            if projected is None:
                report.missing.append(order.id)
            elif projected != order:
                report.different.append(order.id)
        progress(len(orders))
    report.read_count = await _count(read)
    if report.read_count > report.write_count - len(report.missing):
        # Only rows no newer than the last order walked: later ones may be new, not extra.
        async for orders in _chunks(read):
            report.extra.extend(
                o.id for o in orders if o.id not in seen and (horizon is None or o.created_at <= horizon)
            )
    return report


_REBUILD = text(
    """
    INSERT INTO buy_orders (id, idempotence_key, created_at, currency, currency_amount, btc_rate,
                            btc_amount, event_id)
    SELECT r.id, r.idempotence_key, r.created_at, r.currency, r.currency_amount, r.btc_rate,
           r.btc_amount, gen_random_uuid()
    FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS r(
        id uuid, idempotence_key uuid, created_at timestamptz, currency text,
        currency_amount numeric, btc_rate numeric, btc_amount numeric)
    ON CONFLICT (id) DO UPDATE SET
        idempotence_key = EXCLUDED.idempotence_key, created_at = EXCLUDED.created_at,
        currency = EXCLUDED.currency, currency_amount = EXCLUDED.currency_amount,
        btc_rate = EXCLUDED.btc_rate, btc_amount = EXCLUDED.btc_amount
    WHERE (buy_orders.idempotence_key, buy_orders.created_at, buy_orders.currency,
           buy_orders.currency_amount, buy_orders.btc_rate, buy_orders.btc_amount)
          IS DISTINCT FROM
          (EXCLUDED.idempotence_key, EXCLUDED.created_at, EXCLUDED.currency,
           EXCLUDED.currency_amount, EXCLUDED.btc_rate, EXCLUDED.btc_amount)
    """
)


async def rebuild(
    write: AsyncEngine, read: AsyncEngine, progress: Callable[[int], None] = lambda _: None
) -> int:
    """Upsert every order of the write model into the read model, then drop rows the write model
    does not have. Returns the number of orders walked."""
    import orjson

    walked = 0
    async for orders in _chunks(write):
        payload = orjson.dumps(
            [{**o.to_public(), "idempotence_key": str(o.idempotence_key)} for o in orders]
        ).decode()
        async with read.begin() as conn:
            await conn.execute(_REBUILD, {"rows": payload})
        walked += len(orders)
        progress(len(orders))
    report = await check(write, read)
    if report.extra:
        async with read.begin() as conn:
            await conn.execute(text("DELETE FROM buy_orders WHERE id = ANY(:ids)"), {"ids": report.extra})
    return walked


async def write_count(write: AsyncEngine) -> int:
    return await _count(write)
