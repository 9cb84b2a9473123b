"""The create-buy-order use case: key, replay, price, place — in that order, for a reason each."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal

import structlog

from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder, CapExceededError, CapRefused, OrderRequest
from pydist.service.ports import OrderLookup, OrderPlacer, PriceSource

log = structlog.get_logger()


class IdempotencyKeyMissingError(Exception):
    def __init__(self) -> None:
        super().__init__(
            "an idempotency key is required: idempotence_key in the body or the Idempotency-Key header"
        )


class IdempotencyKeysDifferError(Exception):
    def __init__(self) -> None:
        super().__init__("idempotence_key in the body and the Idempotency-Key header differ")


@dataclass(frozen=True, slots=True)
class CreateBuyOrderCommand:
    """What the client sent, validated but not yet decided on: the idempotency key may come as
    `idempotence_key` in the body, as the IETF Idempotency-Key header, or as both."""

    currency: Currency
    amount: Decimal
    body_key: uuid.UUID | None = None
    header_key: uuid.UUID | None = None

    def request(self) -> OrderRequest:
        """The order asked for, under its one key: both keys may be given only if they agree, and
        one of them must be."""
        key = self.body_key if self.body_key is not None else self.header_key
        if key is None:
            raise IdempotencyKeyMissingError()
        if self.header_key is not None and self.header_key != key:  # both given, and they differ
            raise IdempotencyKeysDifferError()
        return OrderRequest(key, self.currency, self.amount)


@dataclass(frozen=True, slots=True)
class Outcome:
    order: BuyOrder
    replayed: bool


class CreateBuyOrder:
    def __init__(self, lookup: OrderLookup, prices: PriceSource, placer: OrderPlacer) -> None:
        self._lookup = lookup
        self._prices = prices
        self._placer = placer

    async def __call__(self, command: CreateBuyOrderCommand, request_id: str | None = None) -> Outcome:
        request = command.request()
        structlog.contextvars.bind_contextvars(idempotence_key=str(request.idempotence_key))
        # 1. A replay is answered from the store alone: no price call, whatever the cap or feed.
        existing = await self._lookup.find_by_key(request.idempotence_key)
        if existing is not None:
            return Outcome(existing.replay_for(request), replayed=True)
        # 2. Price outside any transaction: the cap row is never held across an HTTP call.
        priced = request.priced(await self._prices.price(request.currency))
        # 3. One transaction stores order + outbox event under the cap, or refuses.
        result = await self._placer.place(priced, request_id)
        if isinstance(result, CapRefused):
            log.info(
                "buy_order_refused_cap",
                btc_amount=f"{priced.btc_amount:f}",  # never "5E-8": amounts are plain decimals
                available_btc=f"{result.available_btc:f}",
            )
            raise CapExceededError(priced.btc_amount, result.available_btc)
        if not result.created:  # a concurrent request with the same key won the race
            return Outcome(result.order.replay_for(request), replayed=True)
        log.info(
            "buy_order_created",
            order_id=str(result.order.id),
            currency=result.order.currency.value,
            btc_amount=str(result.order.btc_amount),
        )
        return Outcome(result.order, replayed=False)
