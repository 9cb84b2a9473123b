"""Shared helpers for the read-side integration tests (this module holds no tests).

Everything here drives the real adapters against the session's real Postgres databases and
private RabbitMQ vhost; the only wrappers are recorders/fault injectors around a real sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue

from pydist.adapters.consumer import EnvelopeConsumer
from pydist.adapters.db import order_from_row
from pydist.adapters.listing import Page
from pydist.adapters.rabbit import DEAD_LETTER_QUEUE, QUEUE, declare_topology
from pydist.domain.events import BuyOrderCreated
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder
from pydist.service.create_order import CreateBuyOrder, CreateBuyOrderCommand
from pydist.service.ports import EventSink
from tests.integration.conftest import Stores
from tests.support import db as testdb

RATE = Decimal("97000.00")
CURRENCIES = (Currency.USD, Currency.EUR, Currency.GBP)


class FixedPrice:
    async def price(self, currency: Currency) -> Decimal:
        return RATE


def order_request(i: int) -> CreateBuyOrderCommand:
    amount = Decimal(f"{10 + i % 89}.{i % 100:02d}")
    return CreateBuyOrderCommand(CURRENCIES[i % 3], amount, body_key=uuid.uuid4())


async def create_orders(stores: Stores, n: int, *, concurrency: int = 50, start: int = 0) -> list[BuyOrder]:
    """n new orders through the real use case (writer → place_orders(): order + outbox row)."""
    use_case = CreateBuyOrder(stores.write, FixedPrice(), stores.writer)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> BuyOrder:
        async with gate:
            outcome = await use_case(order_request(i), f"req-{i}")
            assert not outcome.replayed
            return outcome.order

    return list(await asyncio.gather(*(one(start + i) for i in range(n))))


def page_ids(page: Page) -> list[uuid.UUID]:
    """The ids of a listing page's rows, in order."""
    return [uuid.UUID(r["id"]) for r in page.public_rows]


async def count(url: str, sql: str = "SELECT count(*) AS n FROM buy_orders") -> int:
    rows = await testdb.fetch(url, sql)
    return int(rows[0]["n"])


async def backlog(write_url: str) -> int:
    return await count(write_url, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL")


async def outbox_events(write_url: str) -> list[BuyOrderCreated]:
    """Every event of the outbox, rebuilt from the write model exactly as the relay claims it."""
    rows = await testdb.fetch(
        write_url,
        """SELECT o.event_id, o.request_id, b.id, b.idempotence_key, b.created_at, b.currency,
                  b.currency_amount, b.btc_rate, b.btc_amount
           FROM outbox o JOIN buy_orders b ON b.id = o.order_id ORDER BY o.id""",
    )
    return [BuyOrderCreated(r["event_id"], order_from_row(r), r["request_id"]) for r in rows]


async def read_snapshot(read_url: str) -> list[tuple[Any, ...]]:
    """Every column of every read row, projected_at and event_id included."""
    rows = await testdb.fetch(read_url, "SELECT * FROM buy_orders ORDER BY id")
    return [tuple(r.values()) for r in rows]


class Background:
    """Runs worker loops until the block ends; a worker that dies is reported, never hidden."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, run: Callable[[asyncio.Event], Awaitable[None]], name: str) -> None:
        async def wrapped() -> None:
            await run(self.stop)

        self.tasks.append(asyncio.create_task(wrapped(), name=name))

    def check(self) -> None:
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise AssertionError(f"worker {task.get_name()} died") from task.exception()
            if task.done() and not self.stop.is_set():
                raise AssertionError(f"worker {task.get_name()} stopped on its own")

    async def close(self) -> None:
        self.stop.set()
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=15)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


@asynccontextmanager
async def background() -> AsyncIterator[Background]:
    bg = Background()
    try:
        yield bg
        bg.check()
    finally:
        await bg.close()


async def wait_until(
    cond: Callable[[], Awaitable[bool]], *, timeout: float, what: str, bg: Background | None = None
) -> float:
    """Poll `cond` (bounded); returns the seconds it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        if bg is not None:
            bg.check()
        if await cond():
            return loop.time() - started
        if loop.time() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def consume_loop(consumer: EnvelopeConsumer) -> Callable[[asyncio.Event], Awaitable[None]]:
    return consumer.run


@dataclass
class RecordingSink:
    """Delegates to a real sink and records what was handed over (per call), for assertions."""

    inner: EventSink
    calls: list[list[uuid.UUID]] = field(default_factory=list)

    async def publish(self, events: Sequence[BuyOrderCreated]) -> None:
        await self.inner.publish(events)
        self.calls.append([e.event_id for e in events])

    @property
    def event_ids(self) -> list[uuid.UUID]:
        return [i for call in self.calls for i in call]


@dataclass
class CountingHandler:
    """Wraps the consumer's handler (the real projector) to count events it was given."""

    inner: Callable[[Sequence[BuyOrderCreated]], Awaitable[None]]
    events: int = 0

    async def __call__(self, events: Sequence[BuyOrderCreated]) -> None:
        await self.inner(events)
        self.events += len(events)


@dataclass
class BrokerProbe:
    """A plain (non-robust) connection on the test vhost: publish raw messages, inspect queues."""

    channel: AbstractChannel
    exchange: AbstractExchange
    queue: AbstractQueue

    async def publish_raw(self, body: bytes, routing_key: str = "buy_order.created", **props: Any) -> None:
        await self.exchange.publish(
            aio_pika.Message(body=body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props),
            routing_key=routing_key,
        )

    async def depth(self, name: str) -> int:
        q = await self.channel.declare_queue(name, passive=True)
        result = q.declaration_result
        return int(result.message_count or 0)

    async def get_all(self, name: str, expected: int, timeout: float = 10) -> list[AbstractIncomingMessage]:
        """Take `expected` messages off a queue (bounded wait), acking them."""
        q = await self.channel.declare_queue(name, passive=True)
        got: list[AbstractIncomingMessage] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(got) < expected and loop.time() < deadline:
            message = await q.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                got.append(message)
        return got


@asynccontextmanager
async def broker_probe(amqp_url: str) -> AsyncIterator[BrokerProbe]:
    """Declares the topology and empties both queues, so each test starts from nothing."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        events, queue = await declare_topology(channel)
        await queue.purge()
        dlq = await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)
        await dlq.purge()
        yield BrokerProbe(channel, events, queue)
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


__all__ = ["DEAD_LETTER_QUEUE", "QUEUE"]
