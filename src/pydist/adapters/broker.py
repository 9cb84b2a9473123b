"""RabbitMQ: one durable topology, a confirming publisher and a batching consumer (aio-pika)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import orjson
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from pydist.domain.events import BUY_ORDER_CREATED, BuyOrderCreated, order_from_message
from pydist.metrics import EVENTS_DEAD_LETTERED

log = structlog.get_logger()

EXCHANGE = "pydist.events"
DEAD_LETTER_EXCHANGE = "pydist.events.dlx"
QUEUE = "pydist.read_model_sync"
DEAD_LETTER_QUEUE = "pydist.read_model_sync.dlq"


async def connect(url: str, *, wait_s: float = 60.0) -> AbstractRobustConnection:
    """A robust connection re-opens itself, its channels and its consumers after a broker restart.
    A broker still starting is waited for (bounded), rather than crash-looping."""
    async for attempt in AsyncRetrying(
        stop=stop_after_delay(wait_s),
        wait=wait_exponential(multiplier=0.2, max=3),
        retry=retry_if_exception_type((OSError, ConnectionError, aio_pika.exceptions.AMQPError)),
        reraise=True,
    ):
        with attempt:
            return await aio_pika.connect_robust(url, timeout=5, reconnect_interval=1)
    raise AssertionError("unreachable")


async def declare_topology(channel: AbstractChannel) -> tuple[AbstractExchange, AbstractQueue]:
    """Both sides declare everything, so no message is unroutable whichever starts first."""
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dlq = await channel.declare_queue(DEAD_LETTER_QUEUE, durable=True)
    await dlq.bind(dlx)
    queue = await channel.declare_queue(
        QUEUE, durable=True, arguments={"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
    )
    await queue.bind(exchange, routing_key="buy_order.#")
    return exchange, queue


def to_amqp(event: BuyOrderCreated) -> aio_pika.Message:
    return aio_pika.Message(
        body=orjson.dumps(event.to_message()),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=str(event.event_id),
        type=BUY_ORDER_CREATED,
        correlation_id=event.request_id,
        headers={"event_version": 1},
    )


class BrokerPublisher:
    """Publishes a batch with all messages in flight at once; returns only when every one of them
    is confirmed by the broker (publisher confirms), and raises if any is not."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None

    async def start(self) -> None:
        self._connection = await connect(self._url)
        channel = await self._connection.channel(publisher_confirms=True)
        self._exchange, _ = await declare_topology(channel)

    async def publish(self, events: Sequence[BuyOrderCreated]) -> None:
        if self._exchange is None:
            await self.start()
        assert self._exchange is not None
        exchange = self._exchange
        await asyncio.wait_for(
            asyncio.gather(
                *(exchange.publish(to_amqp(e), routing_key=BUY_ORDER_CREATED, mandatory=True) for e in events)
            ),
            timeout=30,
        )

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()


Handler = Callable[[Sequence[BuyOrderCreated]], Awaitable[None]]


class BatchingConsumer:
    """Consumes with a prefetch window, applies what has arrived as one batch, and acks each
    message only after the batch is committed. Unparseable messages go to the dead-letter queue."""

    def __init__(self, url: str, handler: Handler, *, prefetch: int, max_batch: int = 500) -> None:
        self._url = url
        self._handler = handler
        self._prefetch = prefetch
        self._max_batch = max_batch
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None

    async def start(self) -> None:
        self._connection = await connect(self._url)
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        _, self._queue = await declare_topology(channel)
        self._consumer_tag = await self._queue.consume(self._inbox.put, no_ack=False)

    async def stop_consuming(self) -> None:
        if self._queue is not None and self._consumer_tag is not None:
            try:
                await self._queue.cancel(self._consumer_tag)
            except Exception as exc:  # the channel may already be gone; unacked get redelivered
                log.warning("consumer_cancel_failed", error=type(exc).__name__)
            self._consumer_tag = None

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    def idle(self) -> bool:
        return self._inbox.empty()

    async def run_once(self, timeout: float = 1.0) -> int:
        """Handle one batch of whatever has arrived; returns how many messages were settled."""
        try:
            first = await asyncio.wait_for(self._inbox.get(), timeout=timeout)
        except TimeoutError:
            return 0
        messages = [first]
        while len(messages) < self._max_batch and not self._inbox.empty():
            messages.append(self._inbox.get_nowait())
        events: list[BuyOrderCreated] = []
        good: list[AbstractIncomingMessage] = []
        for message in messages:
            event = _parse(message)
            if event is None:
                EVENTS_DEAD_LETTERED.inc()
                log.error(
                    "message_dead_lettered",
                    message_id=message.message_id,
                    reason="malformed or unknown event",
                    body_prefix=message.body[:200].decode("utf-8", "replace"),
                )
                await _settle(message.reject(requeue=False))
            else:
                events.append(event)
                good.append(message)
        if events:
            try:
                await self._handler(events)
            except Exception as exc:
                log.warning("projection_failed", error=type(exc).__name__, count=len(events))
                for message in good:
                    await _settle(message.nack(requeue=True))
                await asyncio.sleep(0.5)
                return 0
            for message in good:
                await _settle(message.ack())
        return len(messages)


def _parse(message: AbstractIncomingMessage) -> BuyOrderCreated | None:
    try:
        body: Any = orjson.loads(message.body)
        if not isinstance(body, dict):
            return None
        event_id, order = order_from_message(body)
        request_id = body.get("request_id")
        return BuyOrderCreated(event_id, order, str(request_id) if request_id else None)
    except (orjson.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return None


async def _settle(awaitable: Awaitable[Any]) -> None:
    """Ack/nack on a channel that died is harmless: the broker redelivers, and applying is idempotent."""
    try:
        await awaitable
    except Exception as exc:
        log.warning("settle_failed", error=type(exc).__name__)
