"""The one way to Postgres: an asyncpg pool per database, plus migrations and the row mapping.

Every statement is one round trip on a pooled connection. The pool sends no checkout ping and
no reset query on release: pydist sets no session state on pooled connections (no SET, LISTEN,
advisory lock or cursor; the outbox's LISTEN has a connection of its own). One the server closed
(a restart, a terminated backend) is replaced at the next checkout; one that dies under a
statement fails that statement, which the caller turns into a 503 or a retry.

SQLAlchemy stays for Alembic only: the migrations are the schema's one definition.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, TypeVar

import asyncpg

from pydist.config import async_url, plain_url
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder
from pydist.service.ports import StoreUnavailableError

T = TypeVar("T")
WRITE = "write"
READ = "read"
ACQUIRE_TIMEOUT_S = 5.0
"""Waiting longer than this for a pooled connection fails the call (503)."""
STORE_DEADLINE_S = 4.0
"""The longest a request waits on the write model (a partition can hold a connection silently for
much longer): past it the client gets a 503 and retries with its key, which is safe either way."""

_ORDER_TYPES = {
    "id": "uuid",
    "idempotence_key": "uuid",
    "created_at": "timestamptz",
    "currency": "text",
    "currency_amount": "numeric",
    "btc_rate": "numeric",
    "btc_amount": "numeric",
}
ORDER_COLUMNS = ", ".join(_ORDER_TYPES)
"""buy_orders' order columns, the same in both models; order_from_row() reads them back."""
ORDER_RECORD = ", ".join(f"{name} {kind}" for name, kind in _ORDER_TYPES.items())
"""ORDER_COLUMNS with their types, in the same order: the read model's batch writes unpack JSON
rows with jsonb_to_recordset(...) AS r(ORDER_RECORD) and insert `r.*` into ORDER_COLUMNS."""

ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
"""What "the database is unavailable right now" looks like: the network, a timeout, the server's
errors and the driver's. InternalClientError is how asyncpg may report a connection whose
backend was terminated while it sat idle ("cannot switch to state 12")."""


class Database:
    """One Postgres database through one asyncpg pool, opened on first use: a process starts,
    and builds its graph, with its database still down."""

    def __init__(
        self,
        url: str,
        size: int,
        application_name: str,
        *,
        settings: dict[str, str] | None = None,
        acquire_timeout_s: float = ACQUIRE_TIMEOUT_S,
    ) -> None:
        self.dsn = plain_url(url)
        self._size = size
        self._acquire_timeout_s = acquire_timeout_s
        self._server_settings = {"application_name": application_name, **(settings or {})}
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def _opened(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._opening:
                if self._pool is None:  # min_size 0: opening connects nothing yet
                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=0,
                        max_size=self._size,
                        reset=_keep_session,
                        server_settings=self._server_settings,
                        command_timeout=10,
                        timeout=5,
                    )
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection; failing to get one is a StoreUnavailableError."""
        try:
            pool = await self._opened()
            conn = await pool.acquire(timeout=self._acquire_timeout_s)
        except ERRORS as exc:
            raise unavailable(exc) from exc
        try:
            yield conn
        finally:
            # A connection that broke is terminated by the release: its error is the caller's.
            with contextlib.suppress(Exception):
                await pool.release(conn)

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """One statement, its own transaction. The server refusing the data itself (SQLSTATE
        class 22 or 23) is raised as it is; any other failure is a StoreUnavailableError."""
        async with self.connection() as conn:
            try:
                return list(await conn.fetch(sql, *args))
            except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError):
                raise
            except ERRORS as exc:
                raise unavailable(exc) from exc

    async def ping(self) -> None:
        """One round trip: what readiness and start-up waits ask of a database."""
        await self.fetch("SELECT 1")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


async def _keep_session(conn: Any) -> None:
    """The pool's reset: nothing to reset (see the module's docstring). asyncpg still rolls back
    a transaction left open before calling it."""


def unavailable(exc: BaseException) -> StoreUnavailableError:
    return StoreUnavailableError(f"database unavailable: {type(exc).__name__}")


def order_from_row(row: Any) -> BuyOrder:
    """A BuyOrder from a row with ORDER_COLUMNS."""
    return BuyOrder(
        id=row["id"],
        idempotence_key=row["idempotence_key"],
        created_at=row["created_at"],
        currency=Currency(row["currency"]),
        currency_amount=row["currency_amount"],
        btc_rate=row["btc_rate"],
        btc_amount=row["btc_amount"],
    )


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


def migrate(model: str, url: str) -> None:
    """Bring one database to head (sync: Alembic runs its own event loop)."""
    from alembic import command  # imported here: Alembic costs ~0.4 s at every start
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("pydist") / "migrations" / model))
    cfg.attributes["url"] = async_url(url)
    command.upgrade(cfg, "head")
