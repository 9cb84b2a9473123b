"""The projector: applies events to the read model. read_model_sync and the relay in direct mode share it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import structlog

from pydist.domain.events import BuyOrderCreated
from pydist.metrics import EVENTS_PROJECTED, READ_MODEL_LAG
from pydist.service.ports import Projected

log = structlog.get_logger()


class AppliesEvents(Protocol):
    async def apply(self, events: Sequence[BuyOrderCreated]) -> list[Projected]: ...


class Projector:
    def __init__(self, read_model: AppliesEvents) -> None:
        self._read_model = read_model

    async def publish(self, events: Sequence[BuyOrderCreated]) -> None:
        """Same signature as the broker publisher: in direct mode the relay calls this directly."""
        projected = await self._read_model.apply(events)
        for row in projected:
            READ_MODEL_LAG.observe(max((row.projected_at - row.created_at).total_seconds(), 0.0))
        EVENTS_PROJECTED.inc(len(projected))
        if len(projected) < len(events):
            log.info("duplicate_events_ignored", count=len(events) - len(projected))
        new = {row.order_id for row in projected}
        for event in events:
            if event.order.id in new:
                new.discard(event.order.id)  # once, even if the batch repeats the event
                log.info("order_projected", order_id=str(event.order.id), request_id=event.request_id)
