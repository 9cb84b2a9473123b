"""Events the write model emits. Versioned; every amount travels as a string."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder

BUY_ORDER_CREATED = "buy_order.created"
EVENT_VERSION = 1


@dataclass(frozen=True, slots=True)
class BuyOrderCreated:
    event_id: uuid.UUID
    order: BuyOrder
    request_id: str | None = None
    traceparent: str | None = None
    """The W3C traceparent of the request that created the order (tracing on), so the spans
    that publish and project the event can link to the order's trace. Optional in v1: absent
    from messages of relays before it and when tracing is off."""

    def to_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {
            "event_id": str(self.event_id),
            "event_type": BUY_ORDER_CREATED,
            "event_version": EVENT_VERSION,
            "request_id": self.request_id,
            "data": self.order.to_record(),
        }
        if self.traceparent is not None:
            message["traceparent"] = self.traceparent
        return message


def _positive_decimal(value: object) -> Decimal:
    # Decimal("abc") raises decimal.InvalidOperation, an ArithmeticError: report it as a ValueError.
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError("amounts must be decimal numbers") from None
    if not amount.is_finite() or amount <= 0:
        raise ValueError("amounts must be finite and positive")
    return amount


def order_from_message(message: dict[str, Any]) -> tuple[uuid.UUID, BuyOrder]:
    """Parse a `buy_order.created` message; raises ValueError/KeyError/TypeError on anything else."""
    if not isinstance(message, dict):
        raise TypeError("a message must be a JSON object")
    version = message.get("event_version")
    # True == 1 and 1.0 == 1 in Python, but neither is version 1
    if message.get("event_type") != BUY_ORDER_CREATED or type(version) is not int or version != EVENT_VERSION:
        raise ValueError(f"unknown event {message.get('event_type')!r:.60} v{version!r:.20}")
    data = message["data"]
    created_at = datetime.fromisoformat(str(data["created_at"]).replace("Z", "+00:00"))
    if created_at.utcoffset() is None:
        raise ValueError("created_at must carry a time zone")
    order = BuyOrder(
        id=uuid.UUID(str(data["id"])),
        idempotence_key=uuid.UUID(str(data["idempotence_key"])),
        created_at=created_at.astimezone(UTC),
        currency=Currency(data["currency"]),
        currency_amount=_positive_decimal(data["currency_amount"]),
        btc_rate=_positive_decimal(data["btc_rate"]),
        btc_amount=_positive_decimal(data["btc_amount"]),
    )
    return uuid.UUID(str(message["event_id"])), order
