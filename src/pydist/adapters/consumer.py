"""read_model_sync's side of RabbitMQ: one message at a time, its events projected in one
statement, then one ack, after the commit.

What cannot be projected goes to the dead-letter queue, with the reason in its headers, and the
consumer keeps running:

- a message that is not a readable envelope (nor a v1 event) goes there whole;
- an invalid event inside a valid envelope goes there alone, and the rest is projected;
- a batch the read model refuses is split in halves until the refused events are isolated;
- a message that makes the consumer fail in any other way is requeued, and after the queue's
  delivery limit the broker dead-letters it (adapters/rabbit.py).

A read model that is down is waited for with the message held: a requeue would count towards the
delivery limit and dead-letter healthy events during an outage. Dead letters are published with
confirms before the message is acked, so a crash in between only repeats them.

They go out on a connection of their own, within `DEAD_LETTER_TIMEOUT_S`: during a memory or disk
alarm RabbitMQ stops reading from every connection that publishes, and on the consuming one that
would stop the acks too, so the consumer (what drains the queues and ends the alarm) would wait
for ever. A dead letter that cannot go out in time requeues its message (the delivery limit holds).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage
from tenacity import RetryCallState

from pydist import telemetry
from pydist.adapters.messages import CONTENT_TYPE, Decoded, Poison, decode
from pydist.adapters.rabbit import (
    DEAD_LETTER_EXCHANGE,
    QUEUE,
    TRANSIENT,
    BrokerLink,
    declare_topology,
)
from pydist.domain.events import BUY_ORDER_CREATED, BuyOrderCreated
from pydist.metrics import EVENTS_DEAD_LETTERED
from pydist.retrying import failure, until_stopped
from pydist.service.ports import EventRejectedError, StoreUnavailableError

log = structlog.get_logger()

Handler = Callable[[Sequence[BuyOrderCreated]], Awaitable[None]]
REASON = "x-pydist-reason"
SOURCE_MESSAGE = "x-pydist-message-id"
EVENT_INDEX = "x-pydist-event-index"
DEAD_LETTER_TIMEOUT_S = 10.0
"""The bound on publishing one message's dead letters (a confirm takes milliseconds)."""


class EnvelopeConsumer:
    def __init__(
        self,
        urls: str | Sequence[str],
        handler: Handler,
        *,
        prefetch: int,
        dead_letter_timeout_s: float = DEAD_LETTER_TIMEOUT_S,
    ) -> None:
        self._link = BrokerLink(urls, name="pydist sync: consume")
        # publishes: never on the consuming connection (see the module's docstring)
        self._dead_letter_link = BrokerLink(urls, name="pydist sync: dead letters")
        self._handler = handler
        self._prefetch = prefetch
        self._dead_letter_timeout_s = dead_letter_timeout_s
        self.consuming = asyncio.Event()

    async def start(self) -> None:
        """Connect and declare the topology (what start-up waits for)."""
        await declare_topology(await self._link.channel())

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`, moving to another node whenever the link is lost: the consumer
        keeps running in every case (any exception is retried; once stopping, it ends)."""
        with contextlib.suppress(Exception):
            async for attempt in until_stopped(stop, first_s=0.1, max_s=3.0, on_retry=self._link_lost):
                with attempt:
                    try:
                        await self._consume(stop)
                    except Exception:
                        await self._link.reset()  # the next attempt starts on the next node
                        raise

    def _link_lost(self, state: RetryCallState, wait_s: float) -> None:
        error = type(failure(state)).__name__
        log.warning("consumer_link_lost", error=error, node=self._link.node, retry_in_s=wait_s)

    async def _consume(self, stop: asyncio.Event) -> None:
        channel = await self._link.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        _, queue = await declare_topology(channel)
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        tag = await queue.consume(inbox.put)
        self.consuming.set()
        try:
            while not stop.is_set():
                if channel.is_closed:
                    raise ConnectionError("channel closed")
                try:  # the wait is bounded so that a closed channel and a stop are noticed
                    message = await asyncio.wait_for(inbox.get(), timeout=0.5)
                except TimeoutError:
                    continue
                await self._handle(message, stop)  # its own TimeoutError is a failure
            with contextlib.suppress(*TRANSIENT):
                await queue.cancel(tag)
            while not inbox.empty():  # what was already delivered; the broker redelivers the rest
                await self._handle(inbox.get_nowait(), stop)
        finally:
            self.consuming.clear()

    async def _handle(self, message: AbstractIncomingMessage, stop: asyncio.Event) -> None:
        decoded = decode(message)
        if not telemetry.ENABLED:
            await self._settle(message, decoded, stop)
            return
        events = [] if isinstance(decoded, str) else decoded.events
        attrs = telemetry.messaging_attributes(("process", "process"), QUEUE, message.message_id, events)
        traceparents = [e.traceparent for e in events]
        header = (message.headers or {}).get("traceparent")  # the relay's publish span, the parent
        parent = header.decode("ascii", "replace") if isinstance(header, bytes) else header
        parent = parent if isinstance(parent, str) else None
        with telemetry.batch_span(f"process {QUEUE}", "CONSUMER", traceparents, attrs, parent=parent):
            await self._settle(message, decoded, stop)

    async def _settle(
        self, message: AbstractIncomingMessage, decoded: Decoded | str, stop: asyncio.Event
    ) -> None:
        """Project the message's events, dead-letter what cannot be, then ack (or requeue)."""
        if isinstance(decoded, str):
            poison, whole = [Poison(None, decoded, message.body)], True
        else:
            try:
                refused = await self._project(decoded.events, stop)
            except StoreUnavailableError:
                return  # stopping while the read model is down: left unacked, redelivered later
            except Exception as exc:  # neither the data nor the database: the delivery limit decides
                log.exception("projection_failed", message_id=message.message_id, error=type(exc).__name__)
                await message.nack(requeue=True)
                return
            refused_poison = [
                decoded.poison_of(e, "refused by the read model", message.body) for e in refused
            ]
            poison, whole = [*decoded.poison, *refused_poison], False
        if await self._dead_letter(message, poison, whole=whole):
            await message.ack()
        else:
            await message.nack(requeue=True)

    async def _project(self, events: list[BuyOrderCreated], stop: asyncio.Event) -> list[BuyOrderCreated]:
        """Project `events`, retried while the read model is unavailable (until `stop`); returns
        those the read model refuses, each isolated by bisection."""
        if not events:
            return []
        try:
            async for attempt in until_stopped(
                stop, retry_on=StoreUnavailableError, first_s=0.1, max_s=5, on_retry=_read_model_unavailable
            ):
                with attempt:
                    await self._handler(events)
        except EventRejectedError:
            if len(events) == 1:
                return events
            middle = len(events) // 2
            return await self._project(events[:middle], stop) + await self._project(events[middle:], stop)
        return []

    async def _dead_letter(
        self, source: AbstractIncomingMessage, poison: Sequence[Poison], *, whole: bool
    ) -> bool:
        """Publish each poison event (or the whole unreadable message) to the DLQ, confirmed, on
        the dead-letter connection; False if that failed or took over `dead_letter_timeout_s`."""
        if not poison:
            return True
        try:
            async with asyncio.timeout(self._dead_letter_timeout_s):
                channel = await self._dead_letter_link.channel()
                exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
                for one in poison:
                    await exchange.publish(_dead_letter_message(source, one, whole), "", mandatory=True)
                    EVENTS_DEAD_LETTERED.inc()
                    log.error(
                        "event_dead_lettered",
                        message_id=source.message_id,
                        event_id=one.event_id,
                        event_index=one.index,
                        reason=one.reason,
                        body_prefix=one.body[:200].decode("utf-8", "replace"),
                    )
        except Exception as exc:  # a lost node, a closed channel, the timeout: requeue it
            self._dead_letter_link.drop()
            log.warning("dead_letter_failed", message_id=source.message_id, error=type(exc).__name__)
            return False
        return True

    async def close(self) -> None:
        await self._link.close()
        await self._dead_letter_link.close()


def _read_model_unavailable(state: RetryCallState, _: float) -> None:
    log.warning("read_model_unavailable", attempt=state.attempt_number)


def _dead_letter_message(source: AbstractIncomingMessage, poison: Poison, whole: bool) -> aio_pika.Message:
    """One poison event as a v1 message of its own, so `pydist dlq replay` reads it like any
    other (or the unreadable message as it came), with why in its headers."""
    headers: dict[str, Any] = {REASON: poison.reason[:300], SOURCE_MESSAGE: source.message_id or ""}
    if poison.index is not None:
        headers[EVENT_INDEX] = poison.index
    return aio_pika.Message(
        body=poison.body,
        content_type=source.content_type or CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=poison.event_id or source.message_id,
        type=source.type if whole else BUY_ORDER_CREATED,
        headers=headers,
    )
