"""An embedded, real PostgreSQL for `./run.sh` on a machine with nothing but Python (pgserver ships
the binaries). Data lives under ./.data/pg; both models get their own database in it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from pgserver.postgres_server import get_server

DATABASES = ("pydist_write", "pydist_read")


def start(data_dir: Path) -> dict[str, str]:
    """Start (or reuse) the server and make sure both databases exist; returns their URLs."""
    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(str(data_dir), cleanup_mode=None)  # outlives this process
    asyncio.run(_create_databases(server.get_uri()))
    return {name: server.get_uri(database=name) for name in DATABASES}


def stop(data_dir: Path) -> None:
    """Stop it through pgserver's own handle accounting (it stops when the last handle closes)."""
    if (data_dir / "postmaster.pid").exists():
        get_server(str(data_dir), cleanup_mode="stop").cleanup()


async def _create_databases(admin_uri: str) -> None:
    conn = await asyncpg.connect(admin_uri)
    try:
        existing = {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in existing:
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
