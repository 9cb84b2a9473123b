"""Shared Alembic env: runs one history against the URL handed in by `pydist migrate`."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async(url: str) -> None:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        # Serialise concurrent `pydist migrate` runs (several containers may start at once).
        await connection.exec_driver_sql("SELECT pg_advisory_lock(736451)")
        await connection.commit()
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


def run() -> None:
    url = context.config.attributes["url"]
    if context.is_offline_mode():
        context.configure(url=url, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    asyncio.run(_run_async(url))
