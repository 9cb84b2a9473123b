"""The broker path under faults, on the real RabbitMQ (private vhost): the link to the broker cut
through a TCP proxy mid-stream, poison messages, an unroutable publish; and the consumer's acks
(one ack(multiple=True) per batch where safe), checked against a model of the broker's per-channel
delivery tags and on the real broker."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest
import structlog

from pydist.adapters.broker import DEAD_LETTER_QUEUE, QUEUE, BatchingConsumer, BrokerPublisher
from pydist.adapters.outbox import Outbox
from pydist.domain.errors import EventRejectedError
from pydist.domain.events import BuyOrderCreated
from pydist.service import read_model_admin
from pydist.service.projector import Projector
from pydist.service.relay import Relay
from tests.integration.conftest import Stores
from tests.support.read_side import (
    CountingHandler,
    background,
    backlog,
    broker_probe,
    consume_loop,
    count,
    create_orders,
    outbox_events,
    wait_until,
)
from tests.support.services import Databases
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
def rabbit_proxy(amqp_url: str):  # type: ignore[no-untyped-def]
    parts = urlsplit(amqp_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672).start()
    yield proxy
    proxy.stop()


async def test_broker_link_cut_mid_stream_loses_and_duplicates_nothing(
    stores: Stores, clean: Databases, amqp_url: str, rabbit_proxy: TcpProxy
):
    """Orders keep coming while the relay's and the consumer's links to RabbitMQ are down for a
    few seconds: creation never waits for the broker, and after up() the robust connections come
    back by themselves (the consumer included) and every order reaches the read model once."""
    url = rabbit_proxy.url_for(amqp_url)
    assert url != amqp_url
    async with broker_probe(amqp_url) as probe:
        publisher = BrokerPublisher(url)
        handler = CountingHandler(Projector(stores.read).publish)
        consumer = BatchingConsumer(url, handler, prefetch=100)
        relay = Relay(
            Outbox(stores.write.engine, clean.write_url),
            publisher,
            batch=50,
            idle_poll_s=0.1,
            max_backoff_s=0.5,
        )
        await consumer.start()
        created: list[int] = []
        try:
            async with background() as bg:
                bg.start(relay.run, "relay")
                bg.start(consume_loop(consumer), "consumer")

                async def steady(stop: asyncio.Event) -> None:
                    i = 0
                    while not stop.is_set():
                        await create_orders(stores, 5, start=i)
                        created.append(5)
                        i += 5
                        await asyncio.sleep(0.05)

                async with background() as load:
                    load.start(steady, "orders")
                    await wait_until(lambda: _has(clean.read_url, 50), timeout=30, what="flow", bg=bg)
                    connections_before = rabbit_proxy.connections

                    rabbit_proxy.down()
                    before_down = sum(created)
                    await asyncio.sleep(3)
                    load.check()
                    during_down = sum(created) - before_down
                    stuck = await count(clean.read_url)
                    rabbit_proxy.up()

                    # after up: new orders still flow, which needs the consumer to be back
                    target = sum(created) + 50
                    await wait_until(lambda: _has(clean.read_url, target), timeout=60, what="catch-up", bg=bg)
                total = await count(clean.write_url)
                await wait_until(lambda: _has(clean.read_url, total), timeout=60, what="drain", bg=bg)
                await wait_until(lambda: _backlog_zero(clean.write_url), timeout=30, what="backlog")
        finally:
            await consumer.close()
            await publisher.close()
        assert await probe.depth(QUEUE) == 0
        assert await probe.depth(DEAD_LETTER_QUEUE) == 0

    total = await count(clean.write_url)
    print(
        f"orders: {total} total, {during_down} accepted while the broker link was down; "
        f"read rows when link came back: {stuck}; events handled {handler.events} "
        f"(redeliveries/republishes {handler.events - total}); "
        f"proxy connections {connections_before} → {rabbit_proxy.connections}"
    )
    assert during_down > 0, "orders must be accepted while the broker is unreachable"
    assert rabbit_proxy.connections >= connections_before + 2  # relay and consumer reconnected
    report = await read_model_admin.check(stores.write.engine, stores.read.engine)
    assert report.clean, report  # 0 lost, 0 different, 0 extra
    assert report.write_count == report.read_count == total  # 0 duplicated


async def test_consumer_reconnects_after_its_connection_is_reset(
    stores: Stores, clean: Databases, amqp_url: str, rabbit_proxy: TcpProxy
):
    """Only the consumer goes through the proxy; its connection is reset twice (cut: RST, new
    connections allowed) and messages published afterwards are still consumed."""
    await create_orders(stores, 20)
    events = await outbox_events(clean.write_url)
    async with broker_probe(amqp_url) as probe:
        publisher = BrokerPublisher(amqp_url)
        handler = CountingHandler(Projector(stores.read).publish)
        consumer = BatchingConsumer(rabbit_proxy.url_for(amqp_url), handler, prefetch=10)
        await consumer.start()
        try:
            async with background() as bg:
                bg.start(consume_loop(consumer), "consumer")
                await publisher.publish(events[:5])
                await wait_until(lambda: _has(clean.read_url, 5), timeout=20, what="5 rows", bg=bg)
                for k, chunk in enumerate((events[5:12], events[12:])):
                    rabbit_proxy.cut()
                    await asyncio.sleep(0.5)
                    await publisher.publish(chunk)
                    want = 12 if k == 0 else 20
                    await wait_until(lambda w=want: _has(clean.read_url, w), timeout=30, what="rows", bg=bg)
        finally:
            await consumer.close()
            await publisher.close()
        assert await probe.depth(QUEUE) == 0
    assert rabbit_proxy.connections >= 3
    report = await read_model_admin.check(stores.write.engine, stores.read.engine)
    assert report.clean, report


def _good_message(event_id: uuid.UUID | None = None, **data_overrides: object) -> dict[str, object]:
    return {
        "event_id": str(event_id or uuid.uuid4()),
        "event_type": "buy_order.created",
        "event_version": 1,
        "request_id": "req-poison",
        "data": {
            "id": str(uuid.uuid4()),
            "idempotence_key": str(uuid.uuid4()),
            "created_at": "2024-05-01T12:00:00.123456Z",
            "currency": "USD",
            "currency_amount": "12.34",
            "btc_rate": "97000.00",
            "btc_amount": "0.00012722",
            **data_overrides,
        },
    }


POISON: dict[str, bytes] = {
    "malformed json": b'{"event_id": "x", ',
    "not an object": b'["buy_order.created"]',
    "unknown event_type": orjson.dumps({**_good_message(), "event_type": "buy_order.deleted"}),
    "wrong version": orjson.dumps({**_good_message(), "event_version": 2}),
    "boolean version": orjson.dumps({**_good_message(), "event_version": True}),
    "NaN literal": orjson.dumps(_good_message()).replace(b'"12.34"', b"NaN"),
    "NaN amount": orjson.dumps(_good_message(currency_amount="NaN")),
    "not a number": orjson.dumps(_good_message(btc_amount="abc")),
    "negative amount": orjson.dumps(_good_message(btc_amount="-1")),
    "unknown currency": orjson.dumps(_good_message(currency="XBT")),
    "naive created_at": orjson.dumps(_good_message(created_at="2024-05-01T12:00:00")),
    "data missing": orjson.dumps({k: v for k, v in _good_message().items() if k != "data"}),
    "bad uuid": orjson.dumps(_good_message(id="not-a-uuid")),
    "amount too big for the read model": orjson.dumps(_good_message(currency_amount="1e20")),
    "too many decimals": orjson.dumps(_good_message(btc_amount="0.000000001")),
    "rate beyond Postgres numeric": orjson.dumps(_good_message(btc_rate="1e200000")),
    "invalid utf-8": b'{"event_id": "\xff\xfe"}',
}


async def test_poison_messages_go_to_the_dlq_and_consumption_continues(
    stores: Stores, clean: Databases, amqp_url: str
):
    """Each kind of bad message is dead-lettered with a log event; good messages published
    before, among and after them are all projected, and the consumer keeps running."""
    await create_orders(stores, 6)
    events = await outbox_events(clean.write_url)
    async with broker_probe(amqp_url) as probe:
        publisher = BrokerPublisher(amqp_url)
        handler = CountingHandler(Projector(stores.read).publish)
        consumer = BatchingConsumer(amqp_url, handler, prefetch=50)
        await consumer.start()
        try:
            with structlog.testing.capture_logs() as logs:
                async with background() as bg:
                    bg.start(consume_loop(consumer), "consumer")
                    await publisher.publish(events[:2])
                    for body in POISON.values():
                        await probe.publish_raw(body)
                    await publisher.publish(events[2:4])
                    await wait_until(
                        lambda: _depth_at_least(probe, DEAD_LETTER_QUEUE, len(POISON)),
                        timeout=30,
                        what="poison in the DLQ",
                        bg=bg,
                    )
                    await publisher.publish(events[4:])
                    await wait_until(lambda: _has(clean.read_url, 6), timeout=30, what="6 rows", bg=bg)
                    await wait_until(lambda: _depth_zero(probe, QUEUE), timeout=10, what="queue drained")
        finally:
            await consumer.close()
            await publisher.close()
        dead = await probe.get_all(DEAD_LETTER_QUEUE, len(POISON) + 1, timeout=2)
    assert sorted(m.body for m in dead) == sorted(POISON.values())
    assert all((m.headers or {}).get("x-death") for m in dead)  # dead-lettered by the broker
    lettered = [e for e in logs if e["event"] == "message_dead_lettered"]
    assert len(lettered) == len(POISON)
    assert all(e["log_level"] == "error" for e in lettered)
    report = await read_model_admin.check(stores.write.engine, stores.read.engine)
    assert report.clean, report
    assert await count(clean.read_url) == 6


async def test_unroutable_publish_is_not_confirmed_as_sent(stores: Stores, clean: Databases, amqp_url: str):
    """If the queue is gone (deleted by an operator), a publish is returned by the broker: the
    relay must not mark the rows published. It re-declares the topology and delivers them."""
    await create_orders(stores, 3)
    async with broker_probe(amqp_url) as probe:
        publisher = BrokerPublisher(amqp_url)
        relay = Relay(Outbox(stores.write.engine, clean.write_url), publisher, batch=10)
        try:
            await publisher.start()
            await probe.channel.queue_delete(QUEUE)
            with pytest.raises(aio_pika.exceptions.PublishError):
                await relay.relay_once()
            assert await backlog(clean.write_url) == 3
            assert await relay.relay_once() == 3  # topology re-declared, delivered this time
        finally:
            await publisher.close()
        assert await probe.depth(QUEUE) == 3


async def _has(url: str, n: int) -> bool:
    return await count(url) >= n


async def _backlog_zero(write_url: str) -> bool:
    return await backlog(write_url) == 0


async def _depth_zero(probe, name: str) -> bool:  # type: ignore[no-untyped-def]
    return await probe.depth(name) == 0


async def _depth_at_least(probe, name: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await probe.depth(name) >= n


# ------------------------------------------------------------------ acks: a model of the broker


@dataclass(eq=False)
class FakeChannel:
    """One AMQP channel as RabbitMQ keeps it: delivery tags 1, 2, 3, ... and the set of unacked
    ones. An ack (multiple or not) of a delivery whose event the handler has not applied yet is
    recorded as a violation; so is settling a tag twice (RabbitMQ closes the channel for that)."""

    applied: set[str]
    next_tag: int = 0
    unacked: dict[int, str] = field(default_factory=dict)  # tag → event_id (or the body for poison)
    frames: list[tuple[str, int, bool]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    is_closed: bool = False

    def deliver(self, body: bytes, event_id: str) -> FakeMessage:
        self.next_tag += 1
        self.unacked[self.next_tag] = event_id
        return FakeMessage(self, self.next_tag, body, event_id)

    def settle(self, kind: str, tag: int, multiple: bool) -> None:
        if self.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError("closed")
        self.frames.append((kind, tag, multiple))
        if tag not in self.unacked:
            self.violations.append(f"{kind} of unknown or settled tag {tag}")
        tags = [t for t in self.unacked if t <= tag] if multiple else [tag]
        for t in tags:
            event_id = self.unacked.pop(t, None)
            if kind == "ack" and event_id not in self.applied:
                self.violations.append(f"tag {t} acked but its event was never applied")


@dataclass
class FakeMessage:
    """What BatchingConsumer uses of an aio-pika IncomingMessage."""

    _channel: FakeChannel
    delivery_tag: int
    body: bytes
    message_id: str

    @property
    def channel(self) -> FakeChannel:
        if self._channel.is_closed:
            raise aio_pika.exceptions.ChannelInvalidStateError("closed")
        return self._channel

    async def ack(self, multiple: bool = False) -> None:
        self.channel.settle("ack", self.delivery_tag, multiple)

    async def reject(self, requeue: bool = False) -> None:
        self.channel.settle("reject", self.delivery_tag, False)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self.channel.settle("nack", self.delivery_tag, multiple)


class Applier:
    """The consumer's handler: records what it applied; can fail, refuse or hang on demand."""

    def __init__(self) -> None:
        self.applied: set[str] = set()
        self.calls = 0
        self.fail_next: Exception | None = None
        self.refuse: set[str] = set()
        self.hang: asyncio.Event | None = None

    async def __call__(self, events: Sequence[BuyOrderCreated]) -> None:
        self.calls += 1
        if self.hang is not None:
            await self.hang.wait()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        if any(str(e.event_id) in self.refuse for e in events):
            raise EventRejectedError("refused")
        self.applied.update(str(e.event_id) for e in events)


def _deliver(consumer: BatchingConsumer, channel: FakeChannel, n: int, *, poison_at: int = -1) -> list[str]:
    ids = []
    for i in range(n):
        event_id = str(uuid.uuid4())
        body = b'{"event_id": ' if i == poison_at else orjson.dumps(_good_message(uuid.UUID(event_id)))
        consumer._inbox.put_nowait(channel.deliver(body, event_id))  # type: ignore[arg-type]
        ids.append(event_id)
    return ids


def _fake_consumer(max_batch: int = 500) -> tuple[BatchingConsumer, Applier]:
    applier = Applier()
    return BatchingConsumer("amqp://unused", applier, prefetch=100, max_batch=max_batch), applier


async def test_a_batch_is_acked_with_one_multiple_ack_after_its_poison_is_rejected():
    consumer, applier = _fake_consumer()
    channel = FakeChannel(applier.applied)
    _deliver(consumer, channel, 6, poison_at=2)
    assert await consumer.run_once(timeout=1) == 6
    assert channel.frames == [("reject", 3, False), ("ack", 6, True)]
    assert channel.unacked == {}
    assert channel.violations == []
    # the next batch continues from there: one frame again
    _deliver(consumer, channel, 4)
    await consumer.run_once(timeout=1)
    assert channel.frames[-1] == ("ack", 10, True)
    assert channel.violations == []


async def test_a_batch_cut_short_is_never_covered_by_a_later_multiple_ack():
    """The first batch is cancelled while its handler runs (shutdown, say): its messages are
    neither applied nor settled. Later batches on the same channel must not ack past them."""
    consumer, applier = _fake_consumer(max_batch=3)
    channel = FakeChannel(applier.applied)
    first = _deliver(consumer, channel, 3)
    applier.hang = asyncio.Event()
    task = asyncio.create_task(consumer.run_once(timeout=1))
    while applier.calls == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    applier.hang = None
    for _ in range(3):
        _deliver(consumer, channel, 3)
        await consumer.run_once(timeout=1)
    assert channel.violations == []
    assert sorted(channel.unacked) == [1, 2, 3]  # still the broker's, redelivered when the channel closes
    assert not applier.applied & set(first)
    assert all(not multiple for _, _, multiple in channel.frames)  # one by one above the gap


async def test_a_failed_batch_is_requeued_one_by_one_and_never_acked():
    consumer, applier = _fake_consumer()
    channel = FakeChannel(applier.applied)
    _deliver(consumer, channel, 3)
    applier.fail_next = ConnectionError("read model down")
    await consumer.run_once(timeout=1)
    assert channel.frames == [("nack", 1, False), ("nack", 2, False), ("nack", 3, False)]
    _deliver(consumer, channel, 3)  # the redeliveries come with new tags
    await consumer.run_once(timeout=1)
    assert channel.frames[-1] == ("ack", 6, True)  # passes over the requeued tags: they are settled
    assert channel.unacked == {}
    assert channel.violations == []


async def test_a_refused_batch_acks_only_what_was_applied():
    """The read model refuses the batch: it is applied one event at a time, the refused event is
    dead-lettered, and a failure half-way requeues the rest: none of those is acked."""
    consumer, applier = _fake_consumer()
    channel = FakeChannel(applier.applied)
    ids = _deliver(consumer, channel, 6)
    applier.refuse = {ids[1]}
    await consumer.run_once(timeout=1)
    assert channel.frames == [("reject", 2, False), ("ack", 6, True)]
    assert channel.violations == []

    ids = _deliver(consumer, channel, 4)  # tags 7..10: 8 refused, 9 fails with the database down

    async def fail_on_third_single(events: Sequence[BuyOrderCreated]) -> None:
        if len(events) == 1 and str(events[0].event_id) == ids[2]:
            raise ConnectionError("read model down")
        await applier(events)

    applier.refuse = {ids[1]}
    consumer._handler = fail_on_third_single
    await consumer.run_once(timeout=1)
    assert channel.frames[2:] == [
        ("reject", 8, False),
        ("ack", 7, False),  # alone: 8 is settled, but a multiple ack of one message saves nothing
        ("nack", 9, False),
        ("nack", 10, False),
    ]
    assert channel.unacked == {}
    assert channel.violations == []


async def test_messages_of_a_closed_channel_are_never_acked_through_the_new_one():
    """After a reconnect the inbox may still hold messages of the old channel: their tags mean
    nothing on the new one (which numbers from 1 again). They are left to the broker, which
    redelivers them; the new channel's own messages get their multiple ack."""
    consumer, applier = _fake_consumer()
    old, new = FakeChannel(applier.applied), FakeChannel(applier.applied)
    _deliver(consumer, old, 3)
    old.is_closed = True
    _deliver(consumer, new, 2)
    await consumer.run_once(timeout=1)
    assert old.frames == []
    assert new.frames == [("ack", 2, True)]
    assert new.violations == []
    assert new.unacked == {}


async def test_the_real_broker_redelivers_a_batch_cut_short_after_later_batches_were_acked(
    stores: Stores, clean: Databases, amqp_url: str
):
    """On RabbitMQ: a batch cancelled mid-apply, then later batches on the same channel applied and
    acked. Closing the consumer must return exactly the cut batch to the queue (a multiple ack that
    passed over it would have lost it), and a new consumer then completes the read model."""
    await create_orders(stores, 30)
    events = await outbox_events(clean.write_url)
    projector = Projector(stores.read)
    gate = asyncio.Event()
    calls = 0

    async def handler(batch: Sequence[BuyOrderCreated]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()  # never set: this batch is cancelled
        await projector.publish(batch)

    async with broker_probe(amqp_url) as probe:
        publisher = BrokerPublisher(amqp_url)
        consumer = BatchingConsumer(amqp_url, handler, prefetch=100, max_batch=10)
        second = BatchingConsumer(amqp_url, projector.publish, prefetch=100)
        closed = False
        try:
            await consumer.start()
            await publisher.publish(events[:10])
            await wait_until(lambda: _true(consumer._inbox.qsize() == 10), timeout=10, what="10 delivered")
            cut = asyncio.create_task(consumer.run_once(timeout=5))
            await wait_until(lambda: _true(calls == 1), timeout=10, what="first batch in the handler")
            cut.cancel()
            await asyncio.gather(cut, return_exceptions=True)

            await publisher.publish(events[10:])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while await count(clean.read_url) < 20 and loop.time() < deadline:
                await consumer.run_once(timeout=0.2)
            assert await count(clean.read_url) == 20
            await consumer.close()
            closed = True
            await wait_until(lambda: _depth_is(probe, QUEUE, 10), timeout=10, what="the cut batch requeued")

            await second.start()
            deadline = loop.time() + 30
            while await count(clean.read_url) < 30 and loop.time() < deadline:
                await second.run_once(timeout=0.2)
        finally:
            if not closed:
                await consumer.close()
            await second.close()
            await publisher.close()
        assert await probe.depth(QUEUE) == 0
    report = await read_model_admin.check(stores.write.engine, stores.read.engine)
    assert report.clean, report
    assert report.read_count == 30


async def _true(value: bool) -> bool:
    return value


async def _depth_is(probe, name: str, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await probe.depth(name) == n
