"""The write model: the source of truth for orders, the cap and the outbox.

Each call on the create path is one statement (its own transaction, one round trip): the
idempotency-key lookups of all concurrent requests together (pydist/shared_rounds.py), and
place_orders() for a batch of orders (adapters/order_writer.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal

import orjson

from pydist.adapters.db import ORDER_COLUMNS, Database, order_from_row, within_deadline
from pydist.domain.order import BuyOrder, CapRefused, Placed, PlaceResult, PricedOrder
from pydist.shared_rounds import SharedRounds

_FIND_KEYS = f"SELECT {ORDER_COLUMNS} FROM buy_orders WHERE idempotence_key = ANY($1::uuid[])"
# place_orders() names two order columns differently: renamed back for order_from_row().
_PLACE = "SELECT *, order_id AS id, key AS idempotence_key FROM place_orders($1::jsonb) ORDER BY idx"


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
    def __init__(self, db: Database) -> None:
        self.db = db
        self._lookups = SharedRounds(self._find_keys, name="order-lookups")

    async def find_by_key(self, key: uuid.UUID) -> BuyOrder | None:
        """The order stored under `key`, if any, within STORE_DEADLINE_S. Concurrent calls share
        one query."""
        return await within_deadline(self._lookups.ask(key))

    async def _find_keys(self, keys: list[uuid.UUID]) -> dict[uuid.UUID, BuyOrder | None]:
        found = {r["idempotence_key"]: order_from_row(r) for r in await self.db.fetch(_FIND_KEYS, keys)}
        return {key: found.get(key) for key in keys}

    async def place_batch(
        self, orders: Sequence[tuple[PricedOrder, str | None, str | None]]
    ) -> list[PlaceResult]:
        """Store a batch with one statement (its own transaction): the cap stays exact per order.
        Each order comes with its request id and traceparent (None: tracing off), which go into
        its outbox row."""
        items = [
            {
                "key": str(p.request.idempotence_key),
                "currency": p.request.currency.value,
                "amount": str(p.request.amount),
                "rate": str(p.btc_rate),
                "btc": str(p.btc_amount),
                "request_id": request_id,
                "traceparent": traceparent,
            }
            for p, request_id, traceparent in orders
        ]
        rows = await self.db.fetch(_PLACE, orjson.dumps(items).decode())
        return [
            CapRefused(row["available_btc"])
            if row["outcome"] == "cap_exceeded"
            else Placed(order_from_row(row), created=row["outcome"] == "created")
            for row in rows
        ]

    async def status(self) -> WriteModelStatus:
        row = (await self.db.fetch(_STATUS))[0]
        return WriteModelStatus(row["limit_btc"], row["used_btc"], int(row["backlog"]), float(row["age"]))

    async def ping(self) -> None:
        await self.db.ping()
