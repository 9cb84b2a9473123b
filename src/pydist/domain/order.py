"""The buy order, the request that asks for one, and the refusals of its rules (a key reused for
another request, an order past the cap)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from pydist.domain.money import Currency, btc_for_fiat


class IdempotencyKeyReusedError(Exception):
    def __init__(self) -> None:
        super().__init__("idempotency key reused with a different request")


class CapExceededError(Exception):
    def __init__(self, requested_btc: Decimal, available_btc: Decimal) -> None:
        self.requested_btc = requested_btc
        self.available_btc = available_btc
        super().__init__(
            f"order needs {requested_btc:f} BTC but only {available_btc:f} BTC "
            "is still available under the cap"
        )


@dataclass(frozen=True, slots=True)
class OrderRequest:
    """What a client asked for; the idempotency key names it for ever."""

    idempotence_key: uuid.UUID
    currency: Currency
    amount: Decimal

    def priced(self, rate: Decimal) -> PricedOrder:
        return PricedOrder(self, rate, btc_for_fiat(self.amount, rate))


@dataclass(frozen=True, slots=True)
class PricedOrder:
    """A request with the rate it will be stored at."""

    request: OrderRequest
    btc_rate: Decimal
    btc_amount: Decimal


@dataclass(frozen=True, slots=True)
class BuyOrder:
    id: uuid.UUID
    idempotence_key: uuid.UUID
    created_at: datetime
    currency: Currency
    currency_amount: Decimal
    btc_rate: Decimal
    btc_amount: Decimal

    def answers(self, request: OrderRequest) -> bool:
        """True when `request` is the one this order was made for (same currency and amount)."""
        return (
            self.idempotence_key == request.idempotence_key
            and self.currency == request.currency
            and self.currency_amount == request.amount
        )

    def replay_for(self, request: OrderRequest) -> BuyOrder:
        if not self.answers(request):
            raise IdempotencyKeyReusedError()
        return self

    def to_public(self) -> dict[str, str]:
        """The wire shape shared by PUT /buy_order, GET /buy_orders and the events: all strings."""
        created_at = self.created_at
        if created_at.utcoffset() is not None:  # the same instant, written in UTC
            created_at = created_at.astimezone(UTC)
        return {
            "id": str(self.id),
            "created_at": created_at.isoformat().replace("+00:00", "Z"),
            "currency": self.currency.value,
            "currency_amount": f"{self.currency_amount:f}",
            "btc_rate": f"{self.btc_rate:f}",
            "btc_amount": f"{self.btc_amount:f}",
        }

    def to_record(self) -> dict[str, str]:
        """The whole order, as the events carry it and the read model stores it: the wire shape
        plus the idempotency key (which the APIs never show)."""
        return {**self.to_public(), "idempotence_key": str(self.idempotence_key)}


@dataclass(frozen=True, slots=True)
class Placed:
    """The order now stored under the key: made by this request, or earlier by another."""

    order: BuyOrder
    created: bool


@dataclass(frozen=True, slots=True)
class CapRefused:
    """Nothing was written: the order would take the total past the cap."""

    available_btc: Decimal


PlaceResult = Placed | CapRefused
