"""RabbitMQ: one durable topology, a confirming publisher and a batching consumer (aio-pika)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from decimal import Decimal
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

from pydist.domain.errors import EventRejectedError
from pydist.domain.events import BUY_ORDER_CREATED, EVENT_VERSION, BuyOrderCreated, order_from_message
from pydist.domain.money import MAX_FIAT_AMOUNT
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
        headers={"event_version": EVENT_VERSION},
    )


class BrokerPublisher:
    """Publishes a batch with all messages in flight at once; returns only when every one of them
    is confirmed by the broker (publisher confirms), and raises if any is not.

    A message the broker cannot route (its queue was deleted, say) is *returned* before it is
    confirmed: with `on_return_raises` that is an error, not a success, so the relay does not mark
    the row published, and the topology is declared again before the next attempt."""

    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None

    async def start(self) -> None:
        if self._connection is None:
            self._connection = await connect(self._url)
        if self._channel is None or self._channel.is_closed:
            self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._exchange, _ = await declare_topology(self._channel)

    async def publish(self, events: Sequence[BuyOrderCreated]) -> None:
        if self._exchange is None:
            await self.start()
        assert self._exchange is not None
        exchange = self._exchange
        results = await asyncio.wait_for(
            asyncio.gather(
                *(
                    exchange.publish(to_amqp(e), routing_key=BUY_ORDER_CREATED, mandatory=True)
                    for e in events
                ),
                return_exceptions=True,  # every publish settles before this returns or raises
            ),
            timeout=self._timeout_s,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            if any(isinstance(f, aio_pika.exceptions.PublishError) for f in failures):
                self._exchange = None  # unroutable: declare exchange, queues and binding again first
            log.warning(
                "publish_unconfirmed",
                failed=len(failures),
                of=len(events),
                error=type(failures[0]).__name__,
            )
            raise failures[0]

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = self._channel = self._exchange = None


Handler = Callable[[Sequence[BuyOrderCreated]], Awaitable[None]]


class BatchingConsumer:
    """Consumes with a prefetch window, applies what has arrived as one batch, and acks the
    messages only after the batch is committed: one `ack(multiple=True)` per channel where that is
    safe (see `_Settled`), one ack per message otherwise. Poison goes to the dead-letter queue with
    a log event: a message that is not a valid event, or one the read model refuses to store."""

    def __init__(self, url: str, handler: Handler, *, prefetch: int, max_batch: int = 500) -> None:
        self._url = url
        self._handler = handler
        self._prefetch = prefetch
        self._max_batch = max_batch
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._connection: AbstractRobustConnection | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        # Settled tags per underlying (aiormq) channel: after a reconnect the robust connection
        # opens a new one whose tags start again at 1 (maybe with the old channel number), so it
        # is keyed by identity, id(), and holds the channel so that id cannot be reused meanwhile.
        self._settled: dict[int, tuple[object, _Settled]] = {}

    async def start(self) -> None:
        """Connect (robustly: after a broker restart the connection re-opens the channel, its
        QoS, the queue and this consumer by itself). Safe to call again after a failed attempt."""
        if self._consumer_tag is not None:
            return
        if self._connection is None:
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
        if not self._inbox.empty():  # under load: no wait_for (a task and a timer per batch)
            first = self._inbox.get_nowait()
        else:
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
            parsed = _parse(message)
            if isinstance(parsed, str):
                await self._dead_letter(message, parsed)
            else:
                events.append(parsed)
                good.append(message)
        if events:
            await self._apply(events, good)
        return len(messages)

    async def _apply(self, events: list[BuyOrderCreated], messages: list[AbstractIncomingMessage]) -> None:
        """Apply, then ack. A batch the read model refuses is applied one message at a time, so
        only the offending messages are dead-lettered; any other failure (the database is down,
        say) requeues them all for redelivery, after a pause. Nothing is acked before the handler
        has returned for it."""
        try:
            await self._handler(events)
        except EventRejectedError:
            if len(events) == 1:
                await self._dead_letter(messages[0], "refused by the read model")
                return
            applied: list[AbstractIncomingMessage] = []
            for i, (event, message) in enumerate(zip(events, messages, strict=True)):
                try:
                    await self._handler([event])
                except EventRejectedError:
                    await self._dead_letter(message, "refused by the read model")
                    continue
                except Exception as exc:
                    await self._ack(applied)
                    await self._requeue(messages[i:], exc)
                    return
                applied.append(message)
            await self._ack(applied)
            return
        except Exception as exc:
            await self._requeue(messages, exc)
            return
        await self._ack(messages)

    async def _ack(self, messages: Sequence[AbstractIncomingMessage]) -> None:
        """Ack applied messages, per channel one ack(multiple=True) up to the highest delivery tag
        below which every delivery of that channel is settled (in `messages` or before); any
        message above a gap (one not yet settled) is acked on its own."""
        groups: dict[int, tuple[object, list[AbstractIncomingMessage]]] = {}
        gone = 0
        for message in messages:
            channel = _channel_of(message)
            if channel is None:
                gone += 1
            else:
                groups.setdefault(id(channel), (channel, []))[1].append(message)
        if gone:  # their channel closed: the broker redelivers them (applying again is harmless)
            log.warning("settle_skipped_closed_channel", count=gone)
        for channel, group in groups.values():
            settled = self._settled_on(channel)
            upto = settled.reach({m.delivery_tag for m in group if m.delivery_tag is not None})
            covered = [m for m in group if m.delivery_tag is not None and m.delivery_tag <= upto]
            alone = [m for m in group if m.delivery_tag is None or m.delivery_tag > upto]
            if len(covered) > 1:
                if await _settle(max(covered, key=_tag).ack(multiple=True)):
                    for m in covered:
                        settled.add(_tag(m))
            else:
                alone = group
            for m in alone:
                await self._settle_one(m, m.ack())

    async def _settle_one(self, message: AbstractIncomingMessage, action: Awaitable[Any]) -> None:
        """Send one ack/nack/reject and record its tag as settled if it went out."""
        channel = _channel_of(message)
        if await _settle(action) and channel is not None and message.delivery_tag is not None:
            self._settled_on(channel).add(message.delivery_tag)

    def _settled_on(self, channel: object) -> _Settled:
        entry = self._settled.get(id(channel))
        if entry is None or entry[0] is not channel:
            for key in [k for k, (c, _) in self._settled.items() if getattr(c, "is_closed", False)]:
                del self._settled[key]  # a closed channel's tags are never acked again
            entry = self._settled[id(channel)] = (channel, _Settled())
        return entry[1]

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """reject(requeue=False): the queue's dead-letter exchange routes it to the DLQ."""
        EVENTS_DEAD_LETTERED.inc()
        log.error(
            "message_dead_lettered",
            message_id=message.message_id,
            reason=reason,
            body_prefix=message.body[:200].decode("utf-8", "replace"),
        )
        await self._settle_one(message, message.reject(requeue=False))

    async def _requeue(self, messages: Sequence[AbstractIncomingMessage], exc: Exception) -> None:
        log.warning("projection_failed", error=type(exc).__name__, count=len(messages))
        for message in messages:
            await self._settle_one(message, message.nack(requeue=True))
        await asyncio.sleep(0.5)


class _Settled:
    """The delivery tags settled on one channel: every tag up to `floor`, and those above it
    settled out of order. The broker numbers a channel's deliveries 1, 2, 3, ... and a multiple
    ack up to tag T settles every unacked delivery <= T of the channel, so T must never pass a
    delivery that is neither in the batch being acked nor settled already: a poison message
    rejected earlier is passed over, one whose batch failed or was cancelled stops it.

    Such a gap stays until the channel closes (nothing settles that delivery later), so past
    _MAX_ABOVE out-of-order tags the channel is marked `stuck` and acked one message at a time,
    as before, instead of remembering every tag above the gap."""

    __slots__ = ("above", "floor", "stuck")

    def __init__(self) -> None:
        self.floor = 0
        self.above: set[int] = set()
        self.stuck = False

    def add(self, tag: int) -> None:
        if tag == self.floor + 1:
            self.floor = tag
            while self.floor + 1 in self.above:
                self.floor += 1
                self.above.discard(self.floor)
        elif tag > self.floor and not self.stuck:
            self.above.add(tag)
            if len(self.above) > _MAX_ABOVE:
                self.stuck = True
                self.above.clear()
                log.warning("multiple_ack_disabled", unsettled_tag=self.floor + 1)

    def reach(self, tags: set[int]) -> int:
        """The highest tag T such that every tag <= T is settled or in `tags`."""
        upto = self.floor
        if self.stuck:
            return upto
        while upto + 1 in tags or upto + 1 in self.above:
            upto += 1
        return upto


_MAX_ABOVE = 10_000


def _channel_of(message: AbstractIncomingMessage) -> object | None:
    """The (aiormq) channel the message was delivered on, None once that channel is closed."""
    try:
        return message.channel
    except aio_pika.exceptions.ChannelInvalidStateError:
        return None


def _tag(message: AbstractIncomingMessage) -> int:
    assert message.delivery_tag is not None
    return message.delivery_tag


# What the read model's columns hold exactly (NUMERIC(12,2) and NUMERIC(18,8)): a value that would
# be rounded or overflow there is refused here rather than stored differently from the write model.
_MAX_FIAT = MAX_FIAT_AMOUNT
_MAX_BTC = Decimal("1e10")


def _parse(message: AbstractIncomingMessage) -> BuyOrderCreated | str:
    """The event, or why it is poison. Never raises: anything unreadable is poison."""
    try:
        body: Any = orjson.loads(message.body)
        if not isinstance(body, dict):
            return "not a JSON object"
        if type(body.get("event_version")) is not int:
            return "event_version is not an integer"
        event_id, order = order_from_message(body)
        if not _fits(order.currency_amount, 2, _MAX_FIAT) or not _fits(order.btc_amount, 8, _MAX_BTC):
            return "amount out of range or too precise"
        request_id = body.get("request_id")
        return BuyOrderCreated(event_id, order, str(request_id) if request_id else None)
    except orjson.JSONDecodeError:
        return "malformed JSON"
    except Exception as exc:  # KeyError, TypeError, ValueError, decimal.InvalidOperation, ...
        return f"not a valid {BUY_ORDER_CREATED} v{EVENT_VERSION} event ({type(exc).__name__}: {exc})"[:300]


def _fits(value: Decimal, places: int, limit: Decimal) -> bool:
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int) or value >= limit:
        return False
    return exponent >= -places or value == round(value, places)


async def _settle(awaitable: Awaitable[Any]) -> bool:
    """Ack/nack on a channel that died is harmless: the broker redelivers, and applying is idempotent.
    False if it could not be sent."""
    try:
        await awaitable
    except Exception as exc:
        log.warning("settle_failed", error=type(exc).__name__)
        return False
    return True
