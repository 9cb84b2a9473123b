"""Throw-away databases and RabbitMQ vhosts on the machine's real services (never mocks)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from urllib.parse import quote

import asyncpg

from pydist.adapters.db import READ, WRITE, migrate

PG_ADMIN_URL = os.environ.get("PYDIST_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_HOST_URL = os.environ.get("PYDIST_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass(frozen=True)
class Databases:
    write_url: str
    read_url: str
    names: tuple[str, str]


def _db_url(name: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_databases(tag: str) -> Databases:
    """Create and migrate a fresh write and read database; they are dropped by drop_databases.

    Not from parallel threads: Alembic's migration context is process-global."""
    suffix = f"{tag}_{uuid.uuid4().hex[:8]}"
    names = (f"pydist_t_{suffix}_w", f"pydist_t_{suffix}_r")
    for name in names:
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    dbs = Databases(_db_url(names[0]), _db_url(names[1]), names)
    migrate(WRITE, dbs.write_url)
    migrate(READ, dbs.read_url)
    return dbs


def drop_databases(dbs: Databases) -> None:
    for name in dbs.names:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _rabbitmqctl(*args: str) -> None:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl not found: RabbitMQ must be installed for the tests")
    subprocess.run([exe, "-q", *args], check=True, capture_output=True, timeout=60)


def create_vhost(tag: str) -> tuple[str, str]:
    """A private vhost per test session, so queues never leak between runs. Returns (name, url)."""
    vhost = f"pydist_t_{tag}_{uuid.uuid4().hex[:8]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return vhost, AMQP_HOST_URL.rstrip("/") + "/" + quote(vhost, safe="")


def delete_vhost(vhost: str) -> None:
    _rabbitmqctl("delete_vhost", vhost)
