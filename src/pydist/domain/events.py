"""Events the write model emits. Versioned; every amount travels as a string."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pydist.domain.order import BuyOrder

BUY_ORDER_CREATED = "buy_order.created"
EVENT_VERSION = 1


@dataclass(frozen=True, slots=True)
class BuyOrderCreated:
    event_id: uuid.UUID
    order: BuyOrder
    request_id: str | None = None

    def to_message(self) -> dict[str, Any]:
        return {
            "event_id": str(self.event_id),
            "event_type": BUY_ORDER_CREATED,
            "event_version": EVENT_VERSION,
            "request_id": self.request_id,
            "data": {**self.order.to_public(), "idempotence_key": str(self.order.idempotence_key)},
        }


def order_from_message(message: dict[str, Any]) -> tuple[uuid.UUID, BuyOrder]:
    """Parse a `buy_order.created` message; raises ValueError/KeyError/TypeError on anything else."""
    from datetime import datetime
    from decimal import Decimal

    from pydist.domain.money import Currency

    if message.get("event_type") != BUY_ORDER_CREATED or message.get("event_version") != EVENT_VERSION:
        raise ValueError(f"unknown event {message.get('event_type')!r} v{message.get('event_version')!r}")
    data = message["data"]
    created_at = datetime.fromisoformat(str(data["created_at"]).replace("Z", "+00:00"))
    if created_at.tzinfo is None:
        raise ValueError("created_at must carry a time zone")
    order = BuyOrder(
        id=uuid.UUID(str(data["id"])),
        idempotence_key=uuid.UUID(str(data["idempotence_key"])),
        created_at=created_at,
        currency=Currency(data["currency"]),
        currency_amount=Decimal(str(data["currency_amount"])),
        btc_rate=Decimal(str(data["btc_rate"])),
        btc_amount=Decimal(str(data["btc_amount"])),
    )
    for value in (order.currency_amount, order.btc_rate, order.btc_amount):
        if not value.is_finite() or value <= 0:
            raise ValueError("amounts must be finite and positive")
    return uuid.UUID(str(message["event_id"])), order
