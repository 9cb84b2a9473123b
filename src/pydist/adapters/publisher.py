"""The relay's side of RabbitMQ (an `EventSink`): a claim of outbox events goes out as a few batch
envelopes, persistent and `mandatory`, and `publish` returns only once the broker has confirmed
every one. A message the broker cannot route (its queue was deleted, say) comes back before its
confirm, which `on_return_raises` makes an error: the relay does not mark the rows. Any failure
drops the connection; the next attempt declares the topology again, on the next node that answers."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aio_pika
import structlog
from aio_pika.abc import AbstractExchange

from pydist import telemetry
from pydist.adapters.messages import MAX_BYTES, MAX_EVENTS, batches
from pydist.adapters.rabbit import EXCHANGE, ROUTING_KEY, BrokerLink, declare_topology
from pydist.domain.events import BuyOrderCreated
from pydist.metrics import EVENTS_PER_MESSAGE

log = structlog.get_logger()
TIMEOUT_S = 30.0
"""One bound for a publish's (re)connect, topology and confirms: a node that accepts the connection
and then stalls must not hold the claim's locks for ever."""


class BrokerPublisher:
    def __init__(
        self, urls: str | Sequence[str], *, max_events: int = MAX_EVENTS, max_bytes: int = MAX_BYTES
    ) -> None:
        self._link = BrokerLink(urls, name="pydist relay")
        self._max_events = max_events
        self._max_bytes = max_bytes
        self._exchange: AbstractExchange | None = None

    async def start(self) -> AbstractExchange:
        """Connect and declare the topology (what readiness waits for)."""
        self._exchange, _ = await declare_topology(await self._link.channel())
        return self._exchange

    async def publish(self, events: Sequence[BuyOrderCreated]) -> None:
        envelopes = batches(events, max_events=self._max_events, max_bytes=self._max_bytes)
        try:
            async with asyncio.timeout(TIMEOUT_S):
                exchange = self._exchange
                if exchange is None or not self._link.is_open:
                    exchange = await self.start()
                results = await asyncio.gather(
                    *(_publish(exchange, batch, message) for batch, message in envelopes),
                    return_exceptions=True,  # every publish settles before this returns or raises
                )
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
        except BaseException as exc:
            self._exchange = None
            await self._link.reset()
            log.warning("publish_unconfirmed", messages=len(envelopes), error=type(exc).__name__)
            raise
        for batch, _ in envelopes:
            EVENTS_PER_MESSAGE.observe(len(batch))

    async def close(self) -> None:
        await self._link.close()


async def _publish(
    exchange: AbstractExchange, events: Sequence[BuyOrderCreated], message: aio_pika.Message
) -> None:
    """One envelope, confirmed. With tracing on, inside its PRODUCER span: a new trace linked to
    every order's trace (the messaging conventions for a batch), whose own traceparent goes in
    the AMQP headers so the consumer's span is its child."""
    if not telemetry.ENABLED:
        await exchange.publish(message, routing_key=ROUTING_KEY, mandatory=True)
        return
    attrs = telemetry.messaging_attributes(("send", "publish"), EXCHANGE, message.message_id, events)
    attrs["messaging.rabbitmq.destination.routing_key"] = ROUTING_KEY
    traceparents = [e.traceparent for e in events]
    with telemetry.batch_span(f"publish {EXCHANGE}", "PRODUCER", traceparents, attrs):
        traceparent = telemetry.current_traceparent()
        if traceparent is not None:
            message.headers["traceparent"] = traceparent
        await exchange.publish(message, routing_key=ROUTING_KEY, mandatory=True)
