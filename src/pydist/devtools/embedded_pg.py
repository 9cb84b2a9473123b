"""An embedded, real PostgreSQL for `./run.sh` on a machine with nothing but Python (pgserver ships
the binaries). Data lives under ./.data/pg; both models get their own database in it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

DATABASES = ("pydist_write", "pydist_read")


def start(data_dir: Path) -> dict[str, str]:
    """Start (or reuse) the server and make sure both databases exist; returns their URLs."""
    from pgserver.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(str(data_dir), cleanup_mode=None)  # outlives this process
    admin = server.get_uri()
    asyncio.run(_create_databases(admin))
    return {name: _with_database(admin, name) for name in DATABASES}


def stop(data_dir: Path) -> None:
    """Stop it through pgserver's own handle accounting (it stops when the last handle closes)."""
    from pgserver.postgres_server import get_server

    if (data_dir / "postmaster.pid").exists():
        get_server(str(data_dir), cleanup_mode="stop").cleanup()


def _with_database(uri: str, name: str) -> str:
    # pgserver answers postgresql://postgres:@/postgres?host=<socket dir>
    base, _, query = uri.partition("?")
    head, _, _ = base.rpartition("/")
    return f"{head}/{name}?{query}" if query else f"{head}/{name}"


async def _create_databases(admin_uri: str) -> None:
    conn = await asyncpg.connect(admin_uri)
    try:
        existing = {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in existing:
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
