"""The broker path under faults, on the real RabbitMQ (private vhost): the link to the broker cut
through a TCP proxy mid-stream, poison messages, an unroutable publish."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest
import structlog

from pydist.adapters.broker import DEAD_LETTER_QUEUE, QUEUE, BatchingConsumer, BrokerPublisher
from pydist.adapters.outbox import Outbox
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
