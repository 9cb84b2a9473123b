"""Engines, migrations and the bounded wait for a database at start-up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
import structlog
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from pydist.config import async_url
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder
from pydist.service.errors import StoreUnavailableError

if TYPE_CHECKING:
    from alembic.config import Config

log = structlog.get_logger()
T = TypeVar("T")
WRITE = "write"
READ = "read"
POOL_TIMEOUT_S = 5.0


def make_engine(
    url: str,
    pool_size: int = 10,
    application_name: str = "pydist",
    *,
    pool_timeout_s: float = POOL_TIMEOUT_S,
    pre_ping: bool = True,
    max_overflow: int | None = None,
    server_settings: dict[str, str] | None = None,
) -> AsyncEngine:
    """`pre_ping=False` saves the checkout round trips on a read-only hot path; a connection found
    dead then fails one call (503) and is thrown away by raw_connection(). `server_settings` are
    Postgres settings for every connection of the pool."""
    return create_async_engine(
        async_url(url),
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        # Waiting longer than this for a pooled connection fails the call (503, STORE_ERRORS)
        # instead of holding the client for SQLAlchemy's default 30 s.
        pool_timeout=pool_timeout_s,
        connect_args={
            "server_settings": {"application_name": application_name, **(server_settings or {})},
            "command_timeout": 10,
            "timeout": 5,
        },
    )


async def ping(engine: AsyncEngine) -> None:
    """One round trip: what readiness and start-up waits ask of a database."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


def alembic_config(model: str, url: str) -> Config:
    from alembic.config import Config  # imported here: Alembic costs ~0.4 s at every start

    cfg = Config()
    location = resources.files("pydist") / "migrations" / model
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["url"] = async_url(url)
    return cfg


def migrate(model: str, url: str, revision: str = "head") -> None:
    """Bring one database to `revision` (sync: Alembic runs its own event loop)."""
    from alembic import command

    command.upgrade(alembic_config(model, url), revision)


def unavailable(exc: Exception) -> StoreUnavailableError:
    return StoreUnavailableError(f"database unavailable: {type(exc).__name__}")


# What "the database is unavailable right now" looks like from here: the driver's and SQLAlchemy's
# connection errors, timeouts, and the pool's own checkout timeout (sqlalchemy.exc.TimeoutError is
# not a builtin TimeoutError: without it an exhausted pool surfaced as a 500).
STORE_DEADLINE_S = 4.0
"""The longest a request waits on the write model (a partition can hold a connection silently for
much longer): past it the client gets a 503 and retries with its key, which is safe either way."""


async def within_deadline(future: asyncio.Future[T]) -> T:
    """Await `future` for at most STORE_DEADLINE_S. The future is shielded: the batch it belongs to
    still settles it later, for nobody, if the deadline passes first."""
    try:
        return await asyncio.wait_for(asyncio.shield(future), STORE_DEADLINE_S)
    except TimeoutError:
        future.add_done_callback(_consume)  # its late outcome is nobody's: do not warn about it
        raise StoreUnavailableError(f"no answer from the database within {STORE_DEADLINE_S:g} s") from None


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


STORE_ERRORS = (
    OSError,
    OperationalError,
    InterfaceError,
    DBAPIError,
    TimeoutError,
    PoolTimeoutError,
)


def order_from_row(row: Any, id_column: str = "id", key_column: str = "idempotence_key") -> BuyOrder:
    """From a SQLAlchemy row or an asyncpg record (place_orders() names two columns differently)."""
    m = row if isinstance(row, asyncpg.Record) else row._mapping
    return BuyOrder(
        id=m[id_column],
        idempotence_key=m[key_column],
        created_at=m["created_at"],
        currency=Currency(m["currency"]),
        currency_amount=m["currency_amount"],
        btc_rate=m["btc_rate"],
        btc_amount=m["btc_amount"],
    )


RAW_ERRORS = (*STORE_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
"""Driver-level failures on a raw connection: it is then thrown away, and the caller gets a 503.
InternalClientError is how asyncpg sometimes reports a connection whose backend was terminated
while it sat idle in the pool ("cannot switch to state 12; another operation (2) is in progress",
seen in the read-model fault test): the connection is unusable, not the request wrong."""


class RawConnection:
    """One pooled connection, used through its asyncpg driver connection. `broken` is set when a
    call failed: the connection is then invalidated (closed, not returned to the pool)."""

    def __init__(self, sa: AsyncConnection, driver: Any) -> None:
        self.sa = sa
        self.driver = driver
        self.broken = False

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        try:
            return list(await self.driver.fetch(sql, *args))
        except BaseException:
            self.broken = True
            raise


@contextlib.asynccontextmanager
async def raw_connection(engine: AsyncEngine) -> AsyncIterator[RawConnection]:
    """Borrow a pool connection (checked by the pool's pre-ping) for direct asyncpg calls."""
    try:
        sa = await engine.connect()
    except RAW_ERRORS as exc:
        raise unavailable(exc) from exc
    conn: RawConnection | None = None
    try:
        pooled = await sa.get_raw_connection()
        conn = RawConnection(sa, pooled.driver_connection)
        yield conn
    finally:
        if conn is None or conn.broken:
            with contextlib.suppress(Exception):
                await sa.invalidate()
        with contextlib.suppress(Exception):
            await sa.close()


_DISCONNECTS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a terminated idle connection, see RAW_ERRORS
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
)


async def fetch_renewing(engine: AsyncEngine, sql: str, *args: object) -> list[asyncpg.Record]:
    """One statement on a pooled connection of a pool without pre-ping (three round trips per
    use). A dead connection shows here instead: its idle siblings are likely dead too (database
    restart, backends terminated), so the pool is renewed and the statement sent once more. Only
    for statements that are safe to repeat (the read model's page reads and idempotent upsert)."""
    try:
        return await _fetch_once(engine, sql, *args)
    except _DISCONNECTS as exc:
        log.warning("read_model_connection_lost", error=type(exc).__name__)
        await engine.dispose(close=False)
    return await _fetch_once(engine, sql, *args)


async def _fetch_once(engine: AsyncEngine, sql: str, *args: object) -> list[asyncpg.Record]:
    async with raw_connection(engine) as conn:
        return await conn.fetch(sql, *args)
