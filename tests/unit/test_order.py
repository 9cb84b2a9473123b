"""The buy order (domain/order.py) and its event (domain/events.py): replay rules, wire shape, and a
message round trip that refuses anything it does not fully understand."""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pydist.domain.events import BUY_ORDER_CREATED, EVENT_VERSION, BuyOrderCreated, order_from_message
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder, IdempotencyKeyReusedError, OrderRequest

KEY = uuid.UUID("0b6f3c5e-8d1a-4f5e-9c7b-2a4d6e8f0a1b")
ORDER_ID = uuid.UUID("5d1c9a9e-1f0b-4c55-8a0e-6c1f2b3d4e5f")
EVENT_ID = uuid.UUID("9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a")
CREATED = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)


def make_order(**changes: Any) -> BuyOrder:
    fields: dict[str, Any] = {
        "id": ORDER_ID,
        "idempotence_key": KEY,
        "created_at": CREATED,
        "currency": Currency.USD,
        "currency_amount": Decimal("123.45"),
        "btc_rate": Decimal("97000.00"),
        "btc_amount": Decimal("0.00127269"),
    }
    fields.update(changes)
    return BuyOrder(**fields)


def request(currency: Currency = Currency.USD, amount: str = "123.45", key: uuid.UUID = KEY) -> OrderRequest:
    return OrderRequest(idempotence_key=key, currency=currency, amount=Decimal(amount))


# --- answers / replay_for --------------------------------------------------------------------


def test_same_key_currency_and_amount_is_answered_by_the_stored_order() -> None:
    order = make_order()
    assert order.answers(request())
    assert order.replay_for(request()) is order


@pytest.mark.parametrize("amount", ["123.450", "123.4500", "0123.45"])
def test_amounts_equal_as_decimals_are_the_same_request(amount: str) -> None:
    order = make_order()
    assert order.answers(request(amount=amount))
    assert order.replay_for(request(amount=amount)) is order


def test_ten_point_zero_answers_ten_point_zero_zero() -> None:
    order = make_order(currency_amount=Decimal("10.00"), btc_amount=Decimal("0.00010310"))
    assert order.answers(request(amount="10.0"))
    assert order.answers(request(amount="10"))


@pytest.mark.parametrize(
    ("currency", "amount"),
    [
        (Currency.EUR, "123.45"),
        (Currency.GBP, "123.45"),
        (Currency.USD, "123.46"),
        (Currency.USD, "123.44"),
        (Currency.USD, "12.345"),
        (Currency.EUR, "1.00"),
    ],
)
def test_other_currency_or_amount_under_the_same_key_is_refused(currency: Currency, amount: str) -> None:
    order = make_order()
    assert not order.answers(request(currency, amount))
    with pytest.raises(IdempotencyKeyReusedError, match="different request"):
        order.replay_for(request(currency, amount))


def test_another_key_is_not_answered() -> None:
    order = make_order()
    other = request(key=uuid.UUID("11111111-2222-4333-8444-555555555555"))
    assert not order.answers(other)
    with pytest.raises(IdempotencyKeyReusedError):
        order.replay_for(other)


# --- to_public -------------------------------------------------------------------------------


def test_to_public_is_all_strings_in_the_documented_shape() -> None:
    public = make_order().to_public()
    assert public == {
        "id": "5d1c9a9e-1f0b-4c55-8a0e-6c1f2b3d4e5f",
        "created_at": "2026-11-30T12:00:00.123456Z",
        "currency": "USD",
        "currency_amount": "123.45",
        "btc_rate": "97000.00",
        "btc_amount": "0.00127269",
    }
    assert all(type(v) is str for v in public.values())
    # Serialises with no float anywhere.
    assert b"123.45" in orjson.dumps(public)
    assert orjson.loads(orjson.dumps(public)) == public


def test_to_public_writes_small_and_large_amounts_in_plain_notation() -> None:
    public = make_order(
        btc_amount=Decimal("1E-8"), btc_rate=Decimal("1E+5"), currency_amount=Decimal("1E+2")
    ).to_public()
    assert public["btc_amount"] == "0.00000001"
    assert public["btc_rate"] == "100000"
    assert public["currency_amount"] == "100"


@pytest.mark.parametrize(
    ("created_at", "expected"),
    [
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05Z"),
        (datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC), "2026-01-02T03:04:05.000006Z"),
        # The same instant written from another zone still leaves as UTC with a Z.
        (datetime(2026, 1, 2, 4, 4, 5, tzinfo=timezone(timedelta(hours=1))), "2026-01-02T03:04:05Z"),
        (datetime(2026, 1, 1, 22, 4, 5, tzinfo=timezone(timedelta(hours=-5))), "2026-01-02T03:04:05Z"),
    ],
)
def test_created_at_is_iso_8601_utc_with_z(created_at: datetime, expected: str) -> None:
    text = make_order(created_at=created_at).to_public()["created_at"]
    assert text == expected
    assert datetime.fromisoformat(text.replace("Z", "+00:00")) == created_at


# --- events ----------------------------------------------------------------------------------


def message(order: BuyOrder | None = None, request_id: str | None = "req-1") -> dict[str, Any]:
    """A message as it travels: built by the producer, then through JSON bytes."""
    event = BuyOrderCreated(EVENT_ID, order or make_order(), request_id)
    return dict(orjson.loads(orjson.dumps(event.to_message())))


def test_message_carries_id_type_version_request_id_and_string_amounts() -> None:
    msg = message()
    assert msg["event_id"] == str(EVENT_ID)
    assert msg["event_type"] == BUY_ORDER_CREATED == "buy_order.created"
    assert msg["event_version"] == EVENT_VERSION == 1
    assert msg["request_id"] == "req-1"
    assert msg["data"] == {**make_order().to_public(), "idempotence_key": str(KEY)}


def test_round_trip_gives_the_same_order() -> None:
    event_id, order = order_from_message(message())
    assert event_id == EVENT_ID
    assert order == make_order()
    assert order.created_at.utcoffset() == timedelta(0)
    assert f"{order.btc_rate:f}" == "97000.00"  # the rate as received, trailing zeros kept


decimals_2 = st.integers(min_value=1, max_value=99_999_999_999).map(
    lambda c: Decimal(f"{c // 100}.{c % 100:02d}")
)
satoshis = st.integers(min_value=1, max_value=10**18 - 1).map(lambda s: Decimal(f"{s}E-8"))
rates = st.builds(
    lambda units, scale: Decimal(f"{units}E-{scale}"),
    st.integers(min_value=1, max_value=10**15),
    st.integers(min_value=0, max_value=12),
)
orders = st.builds(
    BuyOrder,
    id=st.uuids(),
    idempotence_key=st.uuids(),
    created_at=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    currency=st.sampled_from(Currency),
    currency_amount=decimals_2,
    btc_rate=rates,
    btc_amount=satoshis,
)


@given(order=orders, event_id=st.uuids(), request_id=st.none() | st.text(max_size=20))
def test_round_trip_property(order: BuyOrder, event_id: uuid.UUID, request_id: str | None) -> None:
    raw = orjson.dumps(BuyOrderCreated(event_id, order, request_id).to_message())
    parsed_id, parsed = order_from_message(orjson.loads(raw))
    assert parsed_id == event_id
    assert parsed == order
    assert parsed.to_public() == order.to_public()


PARSE_ERRORS = (ValueError, KeyError, TypeError)


def _without(msg: dict[str, Any], *path: str) -> dict[str, Any]:
    out = copy.deepcopy(msg)
    target = out
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return out


def _with(msg: dict[str, Any], value: Any, *path: str) -> dict[str, Any]:
    out = copy.deepcopy(msg)
    target = out
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return out


BAD_MESSAGES: dict[str, dict[str, Any]] = {
    "wrong type": _with(message(), "buy_order.deleted", "event_type"),
    "no type": _without(message(), "event_type"),
    "version 2": _with(message(), 2, "event_version"),
    "version as text": _with(message(), "1", "event_version"),
    "version true": _with(message(), True, "event_version"),
    "no version": _without(message(), "event_version"),
    "no event id": _without(message(), "event_id"),
    "bad event id": _with(message(), "not-a-uuid", "event_id"),
    "no data": _without(message(), "data"),
    "data is a list": _with(message(), [], "data"),
    "data is text": _with(message(), "x", "data"),
    "data is null": _with(message(), None, "data"),
    **{f"no {field}": _without(message(), "data", field) for field in message()["data"]},
    "naive created_at": _with(message(), "2026-11-30T12:00:00", "data", "created_at"),
    "garbage created_at": _with(message(), "yesterday", "data", "created_at"),
    "bad id": _with(message(), "123", "data", "id"),
    "bad key": _with(message(), "", "data", "idempotence_key"),
    "unknown currency": _with(message(), "JPY", "data", "currency"),
    **{
        f"{field} {value}": _with(message(), value, "data", field)
        for field in ("currency_amount", "btc_rate", "btc_amount")
        for value in (
            *("0", "0.00", "-1", "-0.00000001", "NaN", "-NaN", "sNaN"),
            *("Infinity", "-Infinity", "abc", ""),
        )
    },
}


@pytest.mark.parametrize("msg", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_order_from_message_refuses(msg: dict[str, Any]) -> None:
    # The consumer dead-letters exactly these exception types; anything else would escape it.
    with pytest.raises(PARSE_ERRORS):
        order_from_message(msg)


def test_non_utc_offsets_are_accepted_and_mean_the_same_instant() -> None:
    msg = _with(message(), "2026-11-30T13:00:00.123456+01:00", "data", "created_at")
    _, order = order_from_message(msg)
    assert order.created_at == CREATED
    assert order.to_public()["created_at"] == "2026-11-30T12:00:00.123456Z"
