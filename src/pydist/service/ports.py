"""The ports the use cases need (adapters implement them, tests may fake them), and the errors
raised through them, which the use cases and the edge handle. They are about infrastructure (a
price or a store out of reach, data a read model cannot hold, an unknown listing reference), so they live
here rather than among the domain's rules."""

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
    """Where the relay hands events: the broker, or (direct mode) the projector directly."""

    async def publish(self, events: Sequence[BuyOrderCreated]) -> None: ...


@dataclass(frozen=True, slots=True)
class Projected:
    """Rows newly inserted (duplicates are not listed) and how long each took to arrive."""

    order_id: uuid.UUID
    created_at: datetime
    projected_at: datetime


class OrderRows(Protocol):
    """One model's buy_orders as the read-model admin walks them."""

    async def after(self, cursor: tuple[datetime, uuid.UUID] | None, limit: int) -> list[BuyOrder]:
        """The next `limit` orders in (created_at, id) order after `cursor` (None: from the start)."""
        ...

    async def find(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, BuyOrder]: ...

    async def count(self) -> int: ...


class ReadModelRows(OrderRows, Protocol):
    """The read model's rows, with the two repairs a rebuild makes."""

    async def upsert(self, orders: list[BuyOrder]) -> None:
        """Insert each order, or rewrite its row where its served form differs."""
        ...

    async def delete(self, ids: list[uuid.UUID]) -> None: ...


class PriceUnavailableError(Exception):
    """No price younger than the allowed age can be had right now (Coinbase or btc_price is down,
    slow, or answers nonsense); nothing was stored, retry with the key."""


class StoreUnavailableError(Exception):
    """The write or read model cannot be reached; the outcome of a write is unknown, retry with the key."""


class UnknownReferenceError(Exception):
    """A listing's `last_reference` names no order."""


class EventRejectedError(Exception):
    """The read model refuses the data of these events (a value it cannot store): retrying the
    same events can never succeed, unlike a connection failure. A consumer isolates and
    dead-letters the offending ones instead of redelivering them for ever."""
