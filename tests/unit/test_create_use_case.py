"""CreateBuyOrder (service/create_order.py) against in-memory fakes of its three ports: the one
key first, then replay (no price call), then price, then place; and what each refusal becomes."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from pydist.domain.money import Currency
from pydist.domain.order import (
    BuyOrder,
    CapExceededError,
    CapRefused,
    IdempotencyKeyReusedError,
    OrderRequest,
    Placed,
    PlaceResult,
    PricedOrder,
)
from pydist.service.create_order import (
    CreateBuyOrder,
    CreateBuyOrderCommand,
    IdempotencyKeyMissingError,
    IdempotencyKeysDifferError,
    Outcome,
)
from pydist.service.ports import OrderLookup, OrderPlacer, PriceSource, PriceUnavailableError

KEY = uuid.UUID("0b6f3c5e-8d1a-4f5e-9c7b-2a4d6e8f0a1b")
T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def stored(currency: Currency = Currency.USD, amount: str = "123.45", key: uuid.UUID = KEY) -> BuyOrder:
    """An order as if stored earlier: its own rate (90000), so a replay is distinguishable."""
    return BuyOrder(
        id=uuid.uuid4(),
        idempotence_key=key,
        created_at=T0,
        currency=currency,
        currency_amount=Decimal(amount),
        btc_rate=Decimal("90000.00"),
        btc_amount=Decimal("0.00137167"),  # 123.45 / 90000 = 0.0013716666… → ceiling
    )


@dataclass
class FakeLookup:
    orders: dict[uuid.UUID, BuyOrder] = field(default_factory=dict)
    calls: int = 0

    async def find_by_key(self, key: uuid.UUID) -> BuyOrder | None:
        self.calls += 1
        return self.orders.get(key)


@dataclass
class FakePrices:
    rates: dict[Currency, Decimal] = field(
        default_factory=lambda: {
            Currency.USD: Decimal("97000.00"),
            Currency.EUR: Decimal("89000.50"),
            Currency.GBP: Decimal("76000"),
        }
    )
    down: bool = False
    calls: list[Currency] = field(default_factory=list)

    async def price(self, currency: Currency) -> Decimal:
        self.calls.append(currency)
        if self.down:
            raise PriceUnavailableError("feed down")
        return self.rates[currency]


@dataclass
class FakePlacer:
    """Stores what it is given, unless told to refuse for the cap or to lose a race."""

    available_btc: Decimal = Decimal("100")
    race_winner: BuyOrder | None = None
    placed: list[tuple[PricedOrder, str | None]] = field(default_factory=list)
    stored: list[BuyOrder] = field(default_factory=list)  # what it answered Placed(created=True) with

    async def place(self, order: PricedOrder, request_id: str | None) -> PlaceResult:
        self.placed.append((order, request_id))
        if self.race_winner is not None:
            return Placed(self.race_winner, created=False)
        if order.btc_amount > self.available_btc:
            return CapRefused(available_btc=self.available_btc)
        self.available_btc -= order.btc_amount
        self.stored.append(
            BuyOrder(
                id=uuid.uuid4(),
                idempotence_key=order.request.idempotence_key,
                created_at=T0,
                currency=order.request.currency,
                currency_amount=order.request.amount,
                btc_rate=order.btc_rate,
                btc_amount=order.btc_amount,
            )
        )
        return Placed(self.stored[-1], created=True)


def wire(
    lookup: FakeLookup | None = None, prices: FakePrices | None = None, placer: FakePlacer | None = None
) -> tuple[CreateBuyOrder, FakeLookup, FakePrices, FakePlacer]:
    lookup = lookup or FakeLookup()
    prices = prices or FakePrices()
    placer = placer or FakePlacer()
    # Typed as the ports: mypy checks the fakes really implement them.
    ports: tuple[OrderLookup, PriceSource, OrderPlacer] = (lookup, prices, placer)
    return CreateBuyOrder(*ports), lookup, prices, placer


def request(currency: Currency = Currency.USD, amount: str = "123.45", key: uuid.UUID = KEY) -> OrderRequest:
    return OrderRequest(idempotence_key=key, currency=currency, amount=Decimal(amount))


def command(
    currency: Currency = Currency.USD, amount: str = "123.45", key: uuid.UUID = KEY
) -> CreateBuyOrderCommand:
    """The command with the key in the body, as most clients send it."""
    return CreateBuyOrderCommand(currency, Decimal(amount), body_key=key)


async def test_a_new_order_is_priced_and_placed_once() -> None:
    create, lookup, prices, placer = wire()
    outcome = await create(command(), "req-1")
    assert lookup.calls == 1
    assert prices.calls == [Currency.USD]
    assert len(placer.placed) == 1
    priced, request_id = placer.placed[0]
    assert request_id == "req-1"
    assert priced.request == request()
    assert priced.btc_rate == Decimal("97000.00")
    assert priced.btc_amount == Decimal("0.00127269")  # 123.45 / 97000, rounded up (by hand)
    assert not outcome.replayed
    assert outcome.order.btc_amount == Decimal("0.00127269")
    assert outcome.order.idempotence_key == KEY


async def test_each_currency_is_priced_in_its_own_rate() -> None:
    create, _, prices, _ = wire()
    outcome = await create(command(Currency.GBP, "76000.00", key=uuid.uuid4()))
    assert prices.calls == [Currency.GBP]
    assert outcome.order.btc_amount == Decimal("1")  # 76000 / 76000


async def test_a_replay_is_answered_without_price_or_place() -> None:
    existing = stored()
    # The feed is down and the cap is full: a replay must not care.
    create, _, prices, placer = wire(
        FakeLookup({KEY: existing}), FakePrices(down=True), FakePlacer(available_btc=Decimal(0))
    )
    outcome = await create(command())
    assert outcome == Outcome(existing, replayed=True)
    assert outcome.order is existing  # the stored order itself: same id, rate and created_at
    assert prices.calls == []
    assert placer.placed == []


async def test_a_replay_with_an_equal_decimal_amount_is_still_a_replay() -> None:
    existing = stored(amount="10.00")
    create, _, prices, placer = wire(FakeLookup({KEY: existing}))
    outcome = await create(command(amount="10.0"))
    assert outcome.replayed
    assert outcome.order is existing
    assert prices.calls == []
    assert placer.placed == []


@pytest.mark.parametrize(("currency", "amount"), [(Currency.EUR, "123.45"), (Currency.USD, "123.46")])
async def test_same_key_other_request_is_refused_without_price_or_place(
    currency: Currency, amount: str
) -> None:
    create, _, prices, placer = wire(FakeLookup({KEY: stored()}))
    with pytest.raises(IdempotencyKeyReusedError):
        await create(command(currency, amount))
    assert prices.calls == []
    assert placer.placed == []


async def test_cap_refusal_says_how_much_is_left() -> None:
    create, _, _, placer = wire(placer=FakePlacer(available_btc=Decimal("0.00127268")))
    with pytest.raises(CapExceededError) as caught:
        await create(command())
    assert caught.value.available_btc == Decimal("0.00127268")
    assert caught.value.requested_btc == Decimal("0.00127269")
    assert "0.00127268" in str(caught.value)
    assert len(placer.placed) == 1  # it was asked, and refused


async def test_the_cap_is_left_to_the_placer_even_at_exactly_the_remaining_btc() -> None:
    """The use case does not judge the cap itself: an order costing exactly what is left goes to
    the placer once, with the exact priced amount, and the placer's stored order is the answer."""
    create, _, _, placer = wire(placer=FakePlacer(available_btc=Decimal("0.00127269")))
    outcome = await create(command(), "req-cap")
    [(priced, request_id)] = placer.placed
    assert priced.btc_amount == Decimal("0.00127269")  # not rounded, not trimmed to fit
    assert request_id == "req-cap"
    [stored_order] = placer.stored
    assert outcome == Outcome(stored_order, replayed=False)
    assert outcome.order is stored_order  # the store's id and created_at, not a copy of its own


async def test_a_lost_race_is_answered_as_a_replay_of_the_winner() -> None:
    # Between our lookup (nothing) and our place, a concurrent request with the same key won.
    winner = stored()
    create, _, _, placer = wire(placer=FakePlacer(race_winner=winner))
    outcome = await create(command())
    assert outcome == Outcome(winner, replayed=True)
    assert len(placer.placed) == 1


async def test_a_lost_race_to_a_different_request_is_a_key_reuse() -> None:
    create, _, _, _ = wire(placer=FakePlacer(race_winner=stored(amount="999.99")))
    with pytest.raises(IdempotencyKeyReusedError):
        await create(command())


async def test_price_down_places_nothing() -> None:
    create, _, prices, placer = wire(prices=FakePrices(down=True))
    with pytest.raises(PriceUnavailableError):
        await create(command())
    assert prices.calls == [Currency.USD]
    assert placer.placed == []


async def test_two_keys_make_two_orders_and_a_retry_replays_the_first() -> None:
    lookup = FakeLookup()
    create, _, prices, placer = wire(lookup=lookup)
    first = await create(command())
    lookup.orders[KEY] = first.order  # what the store would now find
    second = await create(command(key=uuid.uuid4()))
    retry = await create(command())
    assert not first.replayed
    assert not second.replayed
    assert first.order.id != second.order.id
    assert retry == Outcome(first.order, replayed=True)
    assert len(placer.placed) == 2
    assert len(prices.calls) == 2


# --- the one key: the body's, the header's, or both when they agree ----------------------------


@pytest.mark.parametrize(
    ("body_key", "header_key"), [(KEY, None), (None, KEY), (KEY, KEY)], ids=["body", "header", "both"]
)
async def test_the_key_comes_from_the_body_or_the_header(
    body_key: uuid.UUID | None, header_key: uuid.UUID | None
) -> None:
    create, _, _, placer = wire()
    outcome = await create(CreateBuyOrderCommand(Currency.USD, Decimal("123.45"), body_key, header_key))
    assert outcome.order.idempotence_key == KEY
    assert placer.placed[0][0].request == request()


@pytest.mark.parametrize(
    ("body_key", "header_key", "error"),
    [(KEY, uuid.uuid4(), IdempotencyKeysDifferError), (None, None, IdempotencyKeyMissingError)],
    ids=["differ", "missing"],
)
async def test_keys_that_differ_or_no_key_are_refused_before_any_port_is_called(
    body_key: uuid.UUID | None, header_key: uuid.UUID | None, error: type[Exception]
) -> None:
    create, lookup, prices, placer = wire()
    with pytest.raises(error):
        await create(CreateBuyOrderCommand(Currency.USD, Decimal("123.45"), body_key, header_key))
    assert (lookup.calls, prices.calls, placer.placed) == (0, [], [])
