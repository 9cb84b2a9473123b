"""What travels through RabbitMQ: batch envelopes (v2), and the single-event messages (v1) that
relays before the envelope still send during a rolling upgrade.

An envelope carries the events one relay claim produced, bounded by count and size, so the broker
makes one queue entry, one disk write and one confirm per batch instead of per order, and the
consumer one delivery, one statement and one ack. Each event inside keeps its own `event_id` and
`request_id`, exactly as a v1 message holds them, so an event can be checked, dead-lettered and
replayed on its own. Decoding never raises: what cannot be read is reported as poison with a reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractMessage

from pydist.domain.events import BUY_ORDER_CREATED, EVENT_VERSION, BuyOrderCreated, order_from_message
from pydist.domain.money import MAX_FIAT_AMOUNT
from pydist.telemetry import parse_traceparent

CONTENT_TYPE = "application/json"
ENVELOPE_TYPE = "buy_order.created.batch"
ENVELOPE_VERSION = 2
MAX_EVENTS = 256
"""Events per envelope. docs/benchmarks.md ("Envelope bounds") has the measurement behind it."""
MAX_BYTES = 256 * 1024
"""Body bytes per envelope: an event is ~420 bytes, so this bound only bites on unusual data."""
_NAMESPACE = uuid.UUID("6f1d1d1e-52a8-4c1e-9a43-2f5c3c7e0b9a")


@dataclass(frozen=True, slots=True)
class Poison:
    """What of a message cannot be projected (one event, or the whole message), and why."""

    index: int | None
    """Its position in the envelope, where known."""
    reason: str
    body: bytes
    event_id: str | None = None


@dataclass(frozen=True, slots=True)
class Decoded:
    """A readable message: its good events, and the bad ones to dead-letter on their own."""

    events: list[BuyOrderCreated]
    poison: list[Poison]
    sources: list[tuple[int | None, Any]]
    """For each event, its index in the envelope and the JSON it was read from (None: the whole
    message), so a refused event is dead-lettered as it arrived."""

    def poison_of(self, event: BuyOrderCreated, reason: str, body: bytes) -> Poison:
        index, item = self.sources[self.events.index(event)]
        return Poison(index, reason, body if item is None else orjson.dumps(item), str(event.event_id))


def envelope_id(events: Sequence[BuyOrderCreated]) -> str:
    """The same batch always gets the same id (a re-sent claim included), so duplicates show."""
    return str(uuid.uuid5(_NAMESPACE, ",".join(str(e.event_id) for e in events)))


Envelope = tuple[Sequence[BuyOrderCreated], aio_pika.Message]
"""A message, with the events it carries (the publisher's span links to their traces)."""


def _envelope(events: Sequence[BuyOrderCreated], items: list[dict[str, Any]]) -> Envelope:
    body = orjson.dumps({"message_type": ENVELOPE_TYPE, "schema_version": ENVELOPE_VERSION, "events": items})
    return events, aio_pika.Message(
        body=body,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=envelope_id(events),
        type=ENVELOPE_TYPE,
        headers={"schema_version": ENVELOPE_VERSION, "event_count": len(items)},
    )


def batches(
    events: Sequence[BuyOrderCreated], *, max_events: int = MAX_EVENTS, max_bytes: int = MAX_BYTES
) -> list[Envelope]:
    """A claim as envelopes of at most `max_events` events and about `max_bytes` body bytes (an
    event alone larger than `max_bytes` still travels, alone)."""
    out: list[Envelope] = []
    start, size = 0, 0
    items: list[dict[str, Any]] = []
    for i, event in enumerate(events):
        item = event.to_message()
        length = len(orjson.dumps(item)) + 1
        if items and (len(items) >= max_events or size + length > max_bytes):
            out.append(_envelope(events[start:i], items))
            start, items, size = i, [], 0
        items.append(item)
        size += length
    if items:
        out.append(_envelope(events[start:], items))
    return out


def decode(message: AbstractMessage) -> Decoded | str:
    """The message's events (and its poison), or why the whole message is not readable."""
    try:
        body: Any = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        return "malformed JSON"
    if not isinstance(body, dict):
        return "not a JSON object"
    if body.get("message_type") == ENVELOPE_TYPE:
        version = body.get("schema_version")
        if type(version) is not int or version != ENVELOPE_VERSION:  # 2.0 == 2, but is no version
            return f"unknown envelope schema_version {version!r:.20}"
        items = body.get("events")
        if not isinstance(items, list) or not items:
            return "an envelope needs a non-empty events list"
        decoded = Decoded([], [], [])
        for index, item in enumerate(items):
            event = parse_event(item)
            if isinstance(event, str):
                decoded.poison.append(Poison(index, event, orjson.dumps(item), _event_id_of(item)))
            else:
                decoded.events.append(event)
                decoded.sources.append((index, item))
        return decoded
    event = parse_event(body)  # a v1 message is one event
    if isinstance(event, str):
        return event
    return Decoded([event], [], [(None, None)])


# What the read model's columns hold exactly (NUMERIC(12,2) and NUMERIC(18,8)): a value that would
# be rounded or overflow there is refused here rather than stored differently from the write model.
_MAX_BTC = Decimal("1e10")


def parse_event(item: Any) -> BuyOrderCreated | str:
    """One `buy_order.created` v1 event, or why it is poison. Never raises."""
    try:
        event_id, order = order_from_message(item)
        if not _fits(order.currency_amount, 2, MAX_FIAT_AMOUNT) or not _fits(order.btc_amount, 8, _MAX_BTC):
            return "amount out of range or too precise"
        request_id = item.get("request_id")
        # Optional, and never a reason to refuse an event: an invalid one is dropped.
        traceparent = item.get("traceparent")
        if parse_traceparent(traceparent) is None:
            traceparent = None
        return BuyOrderCreated(event_id, order, str(request_id) if request_id else None, traceparent)
    except Exception as exc:  # KeyError, TypeError, ValueError, decimal.InvalidOperation, ...
        return f"not a valid {BUY_ORDER_CREATED} v{EVENT_VERSION} event ({type(exc).__name__}: {exc})"[:300]


def _event_id_of(item: Any) -> str | None:
    value = item.get("event_id") if isinstance(item, dict) else None
    return str(value)[:64] if value is not None else None


def _fits(value: Decimal, places: int, limit: Decimal) -> bool:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or value >= limit:
        return False
    return exponent >= -places or value == round(value, places)
