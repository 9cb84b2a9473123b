"""Direct SQL for test set-up and verification (reset state, set the cap, compare models)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg


async def fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def reset(write_url: str, read_url: str, used_btc: Decimal = Decimal(0)) -> None:
    """Empty both models and set the cap's used amount (TRUNCATE skips the append-only trigger)."""
    conn = await asyncpg.connect(write_url, timeout=5)
    try:
        await conn.execute("TRUNCATE outbox, buy_orders")
        await conn.execute("UPDATE btc_cap SET used_btc = $1 WHERE id = 1", used_btc)
    finally:
        await conn.close()
    conn = await asyncpg.connect(read_url, timeout=5)
    try:
        await conn.execute("TRUNCATE buy_orders")
    finally:
        await conn.close()


async def cap_used(write_url: str) -> Decimal:
    rows = await fetch(write_url, "SELECT used_btc FROM btc_cap WHERE id = 1")
    return Decimal(rows[0]["used_btc"])


async def order_sum(write_url: str) -> Decimal:
    rows = await fetch(write_url, "SELECT coalesce(sum(btc_amount), 0) AS s FROM buy_orders")
    return Decimal(rows[0]["s"])


async def reset_cap_only(write_url: str, used_btc: Decimal) -> None:
    """Pretend `used_btc` is already taken (orders made before the test)."""
    conn = await asyncpg.connect(write_url, timeout=5)
    try:
        await conn.execute("UPDATE btc_cap SET used_btc = $1 WHERE id = 1", used_btc)
    finally:
        await conn.close()
