"""The broker's wire format, without a broker: envelopes and their bounds, v1 messages, decoding."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal

import aio_pika
import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pydist.adapters.messages import ENVELOPE_TYPE, Decoded, batches, decode, envelope_id
from pydist.domain.events import BuyOrderCreated
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder
from tests.support.messages import single_event


def _event(i: int, request_id: str | None = "req") -> BuyOrderCreated:
    order = BuyOrder(
        id=uuid.uuid4(),
        idempotence_key=uuid.uuid4(),
        created_at=datetime(2026, 12, 1, 12, 0, i % 60, 1000 * i % 1_000_000, tzinfo=UTC),
        currency=Currency.EUR,
        currency_amount=Decimal(f"{1 + i % 999}.{i % 100:02d}"),
        btc_rate=Decimal("90000.00"),
        btc_amount=Decimal("0.00100000"),
    )
    return BuyOrderCreated(uuid.uuid4(), order, request_id)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=120),
    max_events=st.integers(min_value=1, max_value=50),
    max_bytes=st.integers(min_value=1, max_value=20_000),
)
def test_envelopes_keep_every_event_once_in_order_within_their_bounds(
    n: int, max_events: int, max_bytes: int
):
    events = [_event(i, request_id=None if i % 7 == 0 else f"req-{i}" * (1 + i % 5)) for i in range(n)]
    out = batches(events, max_events=max_events, max_bytes=max_bytes)
    decoded = [decode(m) for _, m in out]
    assert all(isinstance(d, Decoded) and not d.poison for d in decoded)
    assert [e for d in decoded if isinstance(d, Decoded) for e in d.events] == events
    for (carried, message), d in zip(out, decoded, strict=True):
        assert isinstance(d, Decoded)
        assert list(carried) == d.events
        assert 1 <= len(d.events) <= max_events
        assert message.headers["event_count"] == len(d.events)
        assert message.message_id == envelope_id(d.events)
        items = orjson.loads(message.body)["events"]
        # over the byte bound only when one event alone is larger than it
        assert sum(len(orjson.dumps(i)) + 1 for i in items) <= max_bytes or len(items) == 1


def test_an_envelope_is_self_describing():
    ((_, message),) = batches([_event(1), _event(2)])
    assert message.type == ENVELOPE_TYPE
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.headers == {"schema_version": 2, "event_count": 2}
    body = orjson.loads(message.body)
    assert (body["message_type"], body["schema_version"]) == (ENVELOPE_TYPE, 2)


def test_the_same_batch_always_gets_the_same_message_id():
    events = [_event(i) for i in range(5)]
    assert envelope_id(events) == envelope_id(list(events))
    assert envelope_id(events) != envelope_id(events[:4])


def test_a_v1_message_decodes_to_its_one_event():
    event = _event(3)
    decoded = decode(single_event(event))
    assert isinstance(decoded, Decoded)
    assert decoded.events == [event]
    assert decoded.sources == [(None, None)]


def test_invalid_events_inside_an_envelope_are_poison_alone_with_their_index():
    good = [_event(i).to_message() for i in range(3)]
    bad_version = {**good[0], "event_id": str(uuid.uuid4()), "event_version": 3}
    items = [good[0], bad_version, good[1], "not an object", good[2]]
    message = aio_pika.Message(
        orjson.dumps({"message_type": ENVELOPE_TYPE, "schema_version": 2, "events": items})
    )
    decoded = decode(message)
    assert isinstance(decoded, Decoded)
    assert [str(e.event_id) for e in decoded.events] == [g["event_id"] for g in good]
    assert [(p.index, p.event_id) for p in decoded.poison] == [(1, bad_version["event_id"]), (3, None)]
    assert all(p.reason for p in decoded.poison)
    refused = decoded.poison_of(decoded.events[2], "refused", message.body)
    assert refused.index == 4
    assert orjson.loads(refused.body) == good[2]


def test_what_is_no_envelope_nor_event_is_rejected_whole_with_a_reason():
    for body in (
        b"{",
        b"[]",
        orjson.dumps({"message_type": ENVELOPE_TYPE, "schema_version": 3, "events": []}),
        orjson.dumps({"message_type": ENVELOPE_TYPE, "schema_version": 2, "events": []}),
        orjson.dumps({"message_type": ENVELOPE_TYPE, "schema_version": True, "events": [{}]}),
        orjson.dumps({"event_type": "buy_order.created", "event_version": 1}),
    ):
        reason = decode(aio_pika.Message(body))
        assert isinstance(reason, str)
        assert reason
