"""Admin use cases for the read model: compare it with the write model, and rebuild it from there.

Both walk the models in keyset-ordered chunks, so memory stays flat at any size and the system
can keep running meanwhile: orders are append-only and their ids are never reused, so

- an order of the write model that is not (yet) in the read model is *missing*;
- a read row whose record (what GET /buy_orders would serve, and the idempotency key) differs
  from its order is *different* — compared as strings, so even a changed scale ("97000.0" vs
  "97000.00") counts;
- a read row whose id the write model does not have is *extra*. That is decided by looking the
  id up in the write model *after* reading the row, and a projected row always comes from an
  order committed earlier, so an order created during the check is never taken for an extra,
  and a rebuild never deletes one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pydist.domain.order import BuyOrder
from pydist.service.ports import OrderRows, ReadModelRows

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


async def _chunks(rows: OrderRows, chunk: int) -> AsyncIterator[list[BuyOrder]]:
    orders = await rows.after(None, chunk)
    while orders:
        yield orders
        orders = await rows.after((orders[-1].created_at, orders[-1].id), chunk)


async def _extras(write: OrderRows, read: OrderRows, chunk: int) -> AsyncIterator[list[uuid.UUID]]:
    """Read rows whose id the write model does not have, chunk by chunk."""
    async for rows in _chunks(read, chunk):
        ids = [o.id for o in rows]
        known = await write.find(ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            yield unknown


async def check(
    write: OrderRows,
    read: OrderRows,
    progress: Callable[[int], None] = lambda _: None,
    *,
    chunk: int = CHUNK,
) -> CheckReport:
    report = CheckReport()
    async for orders in _chunks(write, chunk):
        report.write_count += len(orders)
        present = await read.find([o.id for o in orders])
        for order in orders:
            projected = present.get(order.id)
            if projected is None:
                report.missing.append(order.id)
            elif projected.to_record() != order.to_record():
                report.different.append(order.id)
        progress(len(orders))
    report.read_count = await read.count()
    # Every walked order not missing has its read row; more read rows than that means extras, or
    # orders created (and projected) since the walk: only then is the read model walked too.
    if report.read_count > report.write_count - len(report.missing):
        async for ids in _extras(write, read, chunk):
            report.extra.extend(ids)
    return report


async def rebuild(
    write: OrderRows,
    read: ReadModelRows,
    progress: Callable[[int], None] = lambda _: None,
    *,
    chunk: int = CHUNK,
) -> int:
    """Upsert every order of the write model into the read model, then delete the read rows
    whose id the write model does not have. Safe while orders are created and projected.
    Returns the number of orders walked."""
    walked = 0
    async for orders in _chunks(write, chunk):
        await read.upsert(orders)
        walked += len(orders)
        progress(len(orders))
    # Every walked order now has its read row: more rows than that are extras or new orders.
    if await read.count() > walked:
        async for ids in _extras(write, read, chunk):
            await read.delete(ids)
    return walked
