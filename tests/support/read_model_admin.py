"""The read-model admin use cases over two databases, as the tests call them (the CLI goes through
bootstrap.admin), and the read model's rows as a dict (only the tests need that)."""

from __future__ import annotations

import uuid
from typing import Any

from pydist.adapters.db import Database
from pydist.adapters.order_tables import OrderTable, ReadModelTable
from pydist.domain.order import BuyOrder
from pydist.service import read_model_admin
from pydist.service.read_model_admin import CheckReport


async def check(write: Database, read: Database, **options: Any) -> CheckReport:
    return await read_model_admin.check(OrderTable(write), OrderTable(read), **options)


async def rebuild(write: Database, read: Database, **options: Any) -> int:
    return await read_model_admin.rebuild(OrderTable(write), ReadModelTable(read), **options)


async def all_orders(db: Database) -> dict[uuid.UUID, BuyOrder]:
    """Every order of one model, by id."""
    table = OrderTable(db)
    found: dict[uuid.UUID, BuyOrder] = {}
    chunk = await table.after(None, 5000)
    while chunk:
        found.update((o.id, o) for o in chunk)
        chunk = await table.after((chunk[-1].created_at, chunk[-1].id), 5000)
    return found
