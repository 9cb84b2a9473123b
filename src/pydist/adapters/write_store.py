"""The write model: the source of truth for orders, the cap and the outbox.

The two calls on the create path talk to asyncpg directly, on a connection borrowed from the
SQLAlchemy pool, and send one statement each, with no BEGIN/COMMIT around it (a single statement is
its own transaction):

- `find_by_key` coalesces the lookups of all concurrent requests into one `= ANY($1)` query, and
  keeps one connection for as long as lookups keep coming;
- `place_batch` runs place_orders() as one statement; `BatchingOrderWriter` keeps its connection
  for as long as orders keep coming (`writer_connection`).

Measured in docs/benchmarks.md: through SQLAlchemy each of these cost a checkout ping (BEGIN, `;`,
ROLLBACK), BEGIN, the statement and ROLLBACK/COMMIT: six round trips instead of one, and under load a
lookup per request exhausted the pool and opened and closed overflow connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from pydist.adapters.db import (
    RAW_ERRORS,
    STORE_ERRORS,
    RawConnection,
    order_from_row,
    raw_connection,
    unavailable,
    within_deadline,
)
from pydist.domain.order import BuyOrder, CapRefused, Placed, PlaceResult, PricedOrder
from pydist.service.errors import StoreUnavailableError

_ORDER_COLUMNS = "id, idempotence_key, created_at, currency, currency_amount, btc_rate, btc_amount"
_FIND_KEYS = f"SELECT {_ORDER_COLUMNS} FROM buy_orders WHERE idempotence_key = ANY($1::uuid[])"
_PLACE = "SELECT * FROM place_orders($1::jsonb)"
# Driver-level failures: the connection is then thrown away, and the caller gets a 503.
MAX_KEYS_PER_LOOKUP = 1000
# How long an idle hot-path connection is kept before it goes back to the pool. Borrowing one costs
# the pool's pre-ping (three round trips), so under load it is kept between bursts; a short linger
# keeps small the window in which a connection killed while idle fails a request instead of the ping.
LINGER_S = 0.25


@dataclass(frozen=True, slots=True)
class WriteModelStatus:
    """The cap row, and the outbox's unpublished head: what the create process reports in
    /metrics. The outbox is measured here, by a writer of the outbox, rather than by the relay
    that drains it: a relay that is stopped or frozen cannot report its own backlog."""

    limit_btc: Decimal
    used_btc: Decimal
    outbox_backlog: int = 0
    outbox_oldest_age_s: float = 0.0

    @property
    def available_btc(self) -> Decimal:
        return self.limit_btc - self.used_btc


# The backlog count reads the partial index outbox_unpublished (w0001), so its cost follows the
# backlog, not the table.
_STATUS = """
    SELECT c.limit_btc, c.used_btc, o.backlog, o.age
    FROM btc_cap c,
         (SELECT count(*) AS backlog,
                 COALESCE(EXTRACT(EPOCH FROM clock_timestamp() - min(created_at)), 0) AS age
          FROM outbox WHERE published_at IS NULL) o
    WHERE c.id = 1
"""


class WriteStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._waiting: dict[uuid.UUID, list[asyncio.Future[BuyOrder | None]]] = {}
        self._lookups: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None  # made by each lookup task, in its own loop

    def raw_connection(self) -> contextlib.AbstractAsyncContextManager[RawConnection]:
        return raw_connection(self.engine)

    # ------------------------------------------------------------ idempotency lookups

    async def find_by_key(self, key: uuid.UUID) -> BuyOrder | None:
        """The order stored under `key`, if any. Concurrent calls share one query."""
        future: asyncio.Future[BuyOrder | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._wake is not None:
            self._wake.set()
        if self._lookups is None or self._lookups.done():
            self._lookups = self._start_lookups()
        return await within_deadline(future)

    async def _lookup_while_busy(self) -> None:
        """Answer waiting lookups, one query per round, until none has come for LINGER_S:
        lookups that arrive during a query share the next one."""
        self._wake = wake = asyncio.Event()
        try:
            async with self.raw_connection() as conn:
                while self._waiting or await _woken(wake, LINGER_S):
                    keys = list(self._waiting)[:MAX_KEYS_PER_LOOKUP]
                    waiters = {k: self._waiting.pop(k) for k in keys}
                    try:
                        rows = await conn.fetch(_FIND_KEYS, keys)
                    except BaseException as exc:
                        _fail(waiters, _as_unavailable(exc))
                        raise
                    found = {row["idempotence_key"]: order_from_row(row) for row in rows}
                    for key, futures in waiters.items():
                        for f in futures:
                            if not f.done():
                                f.set_result(found.get(key))
        except BaseException as exc:
            waiting, self._waiting = self._waiting, {}
            _fail(waiting, _as_unavailable(exc))
            if not isinstance(exc, Exception):
                raise
        finally:
            if self._waiting:  # arrived while the connection was being given back
                self._lookups = self._start_lookups()

    def _start_lookups(self) -> asyncio.Task[None]:
        """The lookup task serves every request that arrives while it runs: it starts in a
        context of its own, not the first caller's, so its statement spans (tracing on) and log
        fields are no one request's."""
        return asyncio.create_task(
            self._lookup_while_busy(), name="order-lookups", context=contextvars.Context()
        )

    # ------------------------------------------------------------ placing orders

    async def place_batch(
        self,
        orders: Sequence[tuple[PricedOrder, str | None]],
        conn: RawConnection | None = None,
        traceparents: Sequence[str | None] | None = None,
    ) -> list[PlaceResult]:
        """Store a batch with one statement (its own transaction): the cap stays exact per order.
        `conn` is a connection the caller keeps between batches; without it one is borrowed.
        `traceparents`, one per order, go into each order's outbox row (tracing on)."""
        items = [
            {
                "key": str(p.request.idempotence_key),
                "currency": p.request.currency.value,
                "amount": str(p.request.amount),
                "rate": str(p.btc_rate),
                "btc": str(p.btc_amount),
                "request_id": request_id,
            }
            for p, request_id in orders
        ]
        if traceparents is not None:
            for item, traceparent in zip(items, traceparents, strict=True):
                if traceparent is not None:
                    item["traceparent"] = traceparent
        payload = orjson.dumps(items).decode()
        if conn is None:
            async with self.raw_connection() as borrowed:
                rows = await _place(borrowed, payload)
        else:
            rows = await _place(conn, payload)
        results: list[PlaceResult | None] = [None] * len(orders)
        for row in rows:
            if row["outcome"] == "cap_exceeded":
                results[row["idx"]] = CapRefused(row["available_btc"])
            else:
                order = order_from_row(row, id_column="order_id", key_column="key")
                results[row["idx"]] = Placed(order, created=row["outcome"] == "created")
        assert all(r is not None for r in results), "place_orders answered every order"
        return [r for r in results if r is not None]

    # ------------------------------------------------------------ the rest (not on the hot path)

    async def status(self) -> WriteModelStatus:
        try:
            async with self.engine.connect() as conn:
                row = (await conn.execute(text(_STATUS))).one()
        except STORE_ERRORS as exc:
            raise unavailable(exc) from exc
        return WriteModelStatus(row.limit_btc, row.used_btc, int(row.backlog), float(row.age))

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))


async def _woken(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to `timeout` for `event`; True if it was set (and clear it for next time)."""
    event.clear()
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def _place(conn: RawConnection, payload: str) -> list[Any]:
    try:
        return await conn.fetch(_PLACE, payload)
    except RAW_ERRORS as exc:
        raise unavailable(exc) from exc


def _fail(waiters: dict[uuid.UUID, list[asyncio.Future[BuyOrder | None]]], exc: Exception) -> None:
    for futures in waiters.values():
        for f in futures:
            if not f.done():
                f.set_exception(exc)


def _as_unavailable(exc: BaseException) -> Exception:
    if isinstance(exc, StoreUnavailableError):
        return exc
    if isinstance(exc, Exception):
        return unavailable(exc)
    return StoreUnavailableError("shutting down")
