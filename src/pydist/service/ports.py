"""The ports the use cases need; adapters implement them, tests may fake them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Protocol

from pydist.domain.events import BuyOrderCreated
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder, PlaceResult, PricedOrder


class OrderLookup(Protocol):
    async def find_by_key(self, key: uuid.UUID) -> BuyOrder | None: ...


class OrderPlacer(Protocol):
    async def place(self, order: PricedOrder, request_id: str | None) -> PlaceResult: ...


class PriceSource(Protocol):
    async def price(self, currency: Currency) -> Decimal: ...


class EventSink(Protocol):
    """Where the relay hands events: the broker, or (embedded mode) the projector directly."""

    async def publish(self, events: Sequence[BuyOrderCreated]) -> None: ...


@dataclass(frozen=True, slots=True)
class Projected:
    """Rows newly inserted (duplicates are not listed) and how long each took to arrive."""

    order_id: uuid.UUID
    created_at: datetime
    projected_at: datetime
