"""The projector: applies events to the read model. read_model_sync, the relay in direct mode and
`dlq replay` share it."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import orjson
import structlog

from pydist.adapters.db import ORDER_COLUMNS, ORDER_RECORD, Database
from pydist.domain.events import BuyOrderCreated
from pydist.metrics import EVENTS_PROJECTED, READ_MODEL_LAG
from pydist.service.ports import EventRejectedError, Projected

log = structlog.get_logger()

# One statement, its own transaction: no BEGIN/COMMIT round trips.
_INSERT = f"""
    INSERT INTO buy_orders ({ORDER_COLUMNS}, event_id)
    SELECT r.*
    FROM jsonb_to_recordset($1::jsonb) AS r({ORDER_RECORD}, event_id uuid)
    ORDER BY r.id
    ON CONFLICT (id) DO NOTHING
    RETURNING id, created_at, projected_at
"""


class ProjectionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def publish(self, events: Sequence[BuyOrderCreated]) -> None:
        """Apply `events`, then record their lag and log each order projected. Same signature as
        the broker publisher: in direct mode the relay calls this directly."""
        projected = await self.apply(events)
        for row in projected:
            READ_MODEL_LAG.observe(max((row.projected_at - row.created_at).total_seconds(), 0.0))
        EVENTS_PROJECTED.inc(len(projected))
        if len(projected) < len(events):
            log.info("duplicate_events_ignored", count=len(events) - len(projected))
        new = {row.order_id for row in projected}
        for event in events:  # in the order they came; each new row once, even if repeated
            if event.order.id in new:
                new.discard(event.order.id)
                log.info("order_projected", order_id=str(event.order.id), request_id=event.request_id)

    async def apply(self, events: Sequence[BuyOrderCreated]) -> list[Projected]:
        """Idempotent: an order already present is left as it is (ON CONFLICT DO NOTHING), and
        an event repeated within the batch is inserted once. Rows go in in id order, so two
        appliers with overlapping batches (redeliveries, two relays) never deadlock.

        Raises EventRejectedError when the database refuses the data itself (SQLSTATE class 22
        data exception / 23 constraint): the same events would fail again. Any other database
        failure (connection, timeout, …) is a StoreUnavailableError, worth a retry."""
        ordered = sorted(events, key=lambda e: e.order.id)
        payload = orjson.dumps(
            [{**e.order.to_record(), "event_id": str(e.event_id)} for e in ordered]
        ).decode()
        try:
            rows = await self.db.fetch(_INSERT, payload)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise EventRejectedError(f"read model refused the data (SQLSTATE {exc.sqlstate})") from exc
        return [Projected(r["id"], r["created_at"], r["projected_at"]) for r in rows]
