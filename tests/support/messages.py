"""The v1 wire format as relays before the batch envelope sent it: one event per message."""

from __future__ import annotations

import aio_pika
import orjson

from pydist.adapters.messages import CONTENT_TYPE
from pydist.domain.events import BUY_ORDER_CREATED, EVENT_VERSION, BuyOrderCreated


def single_event(event: BuyOrderCreated) -> aio_pika.Message:
    """A v1 message, exactly as relays before the envelope sent it (the consumer still accepts
    it; the benchmark's one-event-per-message baseline and the rolling-upgrade test use this)."""
    return aio_pika.Message(
        body=orjson.dumps(event.to_message()),
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(event.event_id),
        type=BUY_ORDER_CREATED,
        correlation_id=event.request_id,
        headers={"event_version": EVENT_VERSION},
    )
