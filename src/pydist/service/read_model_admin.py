"""Admin use cases for the read model: compare it with the write model, and rebuild it from there.

Both walk the models in keyset-ordered chunks, so memory stays flat at any size and the system
can keep running meanwhile: orders are append-only and their ids are never reused, so

- an order of the write model that is not (yet) in the read model is *missing*;
- a read row whose wire form (what GET /buy_orders would serve) differs from its order is
  *different* — compared as strings, so even a changed scale ("97000.0" vs "97000.00") counts;
- a read row whose id the write model does not have is *extra*. That is decided by looking the
  id up in the write model *after* reading the row, and a projected row always comes from an
  order committed earlier, so an order created during the check is never taken for an extra,
  and a rebuild never deletes one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
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


def _wire(order: BuyOrder) -> tuple[dict[str, str], uuid.UUID]:
    return order.to_public(), order.idempotence_key


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


async def _existing(write: AsyncEngine, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    async with write.connect() as conn:
        rows = (
            await conn.execute(text("SELECT id FROM buy_orders WHERE id = ANY(:ids)"), {"ids": ids})
        ).all()
    return {r.id for r in rows}


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM buy_orders"))).scalar_one())


async def _extras(write: AsyncEngine, read: AsyncEngine, chunk: int) -> AsyncIterator[list[uuid.UUID]]:
    """Read rows whose id the write model does not have, chunk by chunk."""
    async for rows in _chunks(read, chunk):
        ids = [o.id for o in rows]
        known = await _existing(write, ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            yield unknown


async def check(
    write: AsyncEngine,
    read: AsyncEngine,
    progress: Callable[[int], None] = lambda _: None,
    *,
    chunk: int = CHUNK,
) -> CheckReport:
    report = CheckReport()
    async for orders in _chunks(write, chunk):
        report.write_count += len(orders)
        present = await _read_rows(read, [o.id for o in orders])
        for order in orders:
            projected = present.get(order.id)
            if projected is None:
                report.missing.append(order.id)
            elif _wire(projected) != _wire(order):
                report.different.append(order.id)
        progress(len(orders))
    report.read_count = await _count(read)
    # Every walked order not missing has its read row; more read rows than that means extras, or
    # orders created (and projected) since the walk: only then is the read model walked too.
    if report.read_count > report.write_count - len(report.missing):
        async for ids in _extras(write, read, chunk):
            report.extra.extend(ids)
    return report


# Rows go in in id order (like the projector's), so a rebuild and the projector writing the same
# new rows at once never deadlock. A row is rewritten only if its served form differs: btc_rate is
# an unconstrained NUMERIC, compared as text so that its scale counts too. Rows the rebuild adds
# get a fresh event_id (the outbox has no index by order to look the original up cheaply).
_REBUILD = text(
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


def _payload(orders: list[BuyOrder]) -> str:
    rows: list[dict[str, Any]] = [
        {**o.to_public(), "idempotence_key": str(o.idempotence_key)} for o in orders
    ]
    return orjson.dumps(rows).decode()


async def rebuild(
    write: AsyncEngine,
    read: AsyncEngine,
    progress: Callable[[int], None] = lambda _: None,
    *,
    chunk: int = CHUNK,
) -> int:
    """Upsert every order of the write model into the read model, then delete the read rows
    whose id the write model does not have. Safe while orders are created and projected.
    Returns the number of orders walked."""
    walked = 0
    async for orders in _chunks(write, chunk):
        async with read.begin() as conn:
            await conn.execute(_REBUILD, {"rows": _payload(orders)})
        walked += len(orders)
        progress(len(orders))
    # Every walked order now has its read row: more rows than that are extras or new orders.
    if await _count(read) > walked:
        async for ids in _extras(write, read, chunk):
            async with read.begin() as conn:
                await conn.execute(text("DELETE FROM buy_orders WHERE id = ANY(:ids)"), {"ids": ids})
    return walked


async def write_count(write: AsyncEngine) -> int:
    return await _count(write)
