"""The read side on real Postgres (and RabbitMQ where the broker path is under test): relay,
projector, read model. Orders are made by the real create path (order + outbox row, one commit)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from decimal import Decimal

import orjson
import pytest
import structlog

from pydist.adapters.consumer import EnvelopeConsumer
from pydist.adapters.db import Database
from pydist.adapters.messages import envelope_id
from pydist.adapters.outbox import LISTENER, Outbox
from pydist.adapters.projection import ProjectionStore
from pydist.adapters.publisher import BrokerPublisher
from pydist.adapters.rabbit import QUEUE
from pydist.bootstrap import build_sync
from pydist.domain.events import BuyOrderCreated
from pydist.service.relay import Relay
from tests.integration.conftest import Stores
from tests.support import db as testdb
from tests.support import read_model_admin
from tests.support.read_model_admin import all_orders
from tests.support.read_side import (
    CountingHandler,
    RecordingSink,
    background,
    backlog,
    broker_probe,
    consume_loop,
    count,
    create_orders,
    outbox_events,
    read_snapshot,
    wait_until,
)
from tests.support.services import Databases


async def assert_models_agree(stores: Stores, expected: int) -> None:
    report = await read_model_admin.check(stores.write.db, stores.read.db)
    assert report.clean, report
    assert (report.write_count, report.read_count) == (expected, expected)


async def test_the_direct_relay_projects_every_order_identically(stores: Stores, clean: Databases):
    """No broker: relay → projector → read model. Each read row equals the order the create path
    returned, field for field, and in the wire form the listing serves."""
    orders = await create_orders(stores, 60)
    relay = Relay(Outbox(stores.write.db), stores.read, batch=25)
    async with background() as bg:
        bg.start(relay.run, "relay")
        await wait_until(lambda: _has(clean.read_url, 60), timeout=30, what="60 read rows", bg=bg)
        # rows are marked after the sink returns: projected first, marked a moment later
        await wait_until(lambda: _backlog_zero(clean.write_url), timeout=10, what="empty backlog", bg=bg)
    projected = await all_orders(stores.read.db)
    assert projected == {o.id: o for o in orders}
    assert {k: v.to_public() for k, v in projected.items()} == {o.id: o.to_public() for o in orders}
    assert await backlog(clean.write_url) == 0
    await assert_models_agree(stores, 60)


async def test_broker_mode_500_orders_all_arrive(stores: Stores, clean: Databases, amqp_url: str):
    """relay → RabbitMQ → EnvelopeConsumer → projector → read model, orders created meanwhile."""
    async with broker_probe(amqp_url) as probe:
        publisher = BrokerPublisher(amqp_url)
        consumer = EnvelopeConsumer(amqp_url, stores.read.publish, prefetch=200)
        relay = Relay(Outbox(stores.write.db), publisher, batch=100, idle_poll_s=0.2)
        await consumer.start()
        try:
            async with background() as bg:
                bg.start(relay.run, "relay")
                bg.start(consume_loop(consumer), "consumer")
                await create_orders(stores, 500)
                await wait_until(lambda: _has(clean.read_url, 500), timeout=60, what="500 rows", bg=bg)
                await wait_until(lambda: _depth_zero(probe, QUEUE), timeout=10, what="queue drained")
                await wait_until(
                    lambda: _backlog_zero(clean.write_url), timeout=10, what="empty backlog", bg=bg
                )
        finally:
            await consumer.close()
            await publisher.close()
        assert await probe.depth("pydist.read_model_sync.dlq") == 0
    assert await backlog(clean.write_url) == 0
    await assert_models_agree(stores, 500)


async def test_envelope_carries_ids_types_versions_and_string_amounts(
    stores: Stores, clean: Databases, amqp_url: str
):
    """One claim → one envelope: versioned and self-describing in its AMQP properties, each event
    with its own event_id, request_id and order data, every amount a string."""
    orders = await create_orders(stores, 3, concurrency=1)
    events = await outbox_events(clean.write_url)
    async with broker_probe(amqp_url) as probe:
        publisher = BrokerPublisher(amqp_url)
        try:
            await publisher.publish(events)
        finally:
            await publisher.close()
        (message,) = await probe.get_all(QUEUE, 1)
    assert message.type == "buy_order.created.batch"
    headers = dict(message.headers or {})
    assert headers.pop("x-delivery-count", 0) == 0  # added by the quorum queue
    assert headers == {"schema_version": 2, "event_count": 3}
    assert message.message_id == envelope_id(events)
    assert message.delivery_mode == 2  # persistent
    assert message.content_type == "application/json"
    body = orjson.loads(message.body)
    assert (body["message_type"], body["schema_version"]) == ("buy_order.created.batch", 2)
    by_id = {o.id: o for o in orders}
    for item, sent in zip(body["events"], events, strict=True):
        order = by_id[sent.order.id]
        assert item["event_id"] == str(sent.event_id)
        assert (item["event_type"], item["event_version"]) == ("buy_order.created", 1)
        assert item["request_id"] == sent.request_id
        assert item["request_id"].startswith("req-")
        assert item["data"] == {**order.to_public(), "idempotence_key": str(order.idempotence_key)}
        assert all(isinstance(v, str) for v in item["data"].values())


async def test_duplicate_deliveries_change_nothing(stores: Stores, clean: Databases, amqp_url: str):
    """The same events published twice, then the whole outbox re-relayed (published_at reset):
    same row count, same contents, projected_at and event_id of the first application."""
    await create_orders(stores, 30)
    async with broker_probe(amqp_url) as probe:
        publisher = BrokerPublisher(amqp_url)
        handler = CountingHandler(stores.read.publish)
        consumer = EnvelopeConsumer(amqp_url, handler, prefetch=50)
        relay = Relay(Outbox(stores.write.db), publisher, batch=10, idle_poll_s=0.1)
        await consumer.start()
        try:
            async with background() as bg:
                bg.start(relay.run, "relay")
                bg.start(consume_loop(consumer), "consumer")
                await wait_until(lambda: _has(clean.read_url, 30), timeout=30, what="30 rows", bg=bg)
                first = await read_snapshot(clean.read_url)
                events = await outbox_events(clean.write_url)

                # 1. the same events, twice more, straight to the broker
                await publisher.publish(events)
                await publisher.publish(events)
                await wait_until(lambda: _handled(handler, 90), timeout=30, what="90 events", bg=bg)
                assert await read_snapshot(clean.read_url) == first

                # 2. the relay re-publishes rows it had already published (lost mark, say)
                await testdb.fetch(clean.write_url, "UPDATE outbox SET published_at = NULL")
                relay.wake.set()
                await wait_until(lambda: _handled(handler, 120), timeout=30, what="120 events", bg=bg)
                # handled before confirmed: the relay marks its last batch a moment later
                await wait_until(
                    lambda: _backlog_zero(clean.write_url), timeout=10, what="empty backlog", bg=bg
                )
                assert await read_snapshot(clean.read_url) == first
        finally:
            await consumer.close()
            await publisher.close()
        assert await probe.depth(QUEUE) == 0

    # 3. direct mode, the projector applying a batch that repeats itself and what is stored
    projector = stores.read
    await projector.publish([*events[:5], *events[:5]])
    await projector.publish(events)
    assert await read_snapshot(clean.read_url) == first
    await assert_models_agree(stores, 30)


async def test_two_relays_share_the_outbox_without_double_publishing(stores: Stores, clean: Databases):
    """Two relays (own pools, like two processes) on one outbox while orders keep coming:
    the claimed sets are disjoint (SKIP LOCKED), every row is published once, each order is
    in the read model once."""
    await create_orders(stores, 150)
    dbs = [Database(clean.write_url, 4, f"relay-{i}") for i in range(2)]
    read_dbs = [Database(clean.read_url, 4, f"projector-{i}") for i in range(2)]
    sinks = [RecordingSink(ProjectionStore(d)) for d in read_dbs]
    outboxes = [Outbox(d) for d in dbs]
    relays = [Relay(o, s, batch=7, idle_poll_s=0.2) for o, s in zip(outboxes, sinks, strict=True)]
    try:
        async with background() as bg:
            for i, (outbox, relay) in enumerate(zip(outboxes, relays, strict=True)):
                bg.start(relay.run, f"relay-{i}")
                bg.start(lambda stop, o=outbox, r=relay: o.listen(r.wake.set, stop), f"listen-{i}")
            await create_orders(stores, 250, start=150, concurrency=10)
            await wait_until(lambda: _has(clean.read_url, 400), timeout=60, what="400 rows", bg=bg)
            await wait_until(lambda: _backlog_zero(clean.write_url), timeout=10, what="empty backlog")
    finally:
        for d in (*dbs, *read_dbs):
            await d.close()
    a, b = (set(s.event_ids) for s in sinks)
    all_events = {e.event_id for e in await outbox_events(clean.write_url)}
    assert len(sinks[0].event_ids) == len(a)  # no relay published a row twice …
    assert len(sinks[1].event_ids) == len(b)
    assert not a & b, "a row was claimed by both relays"
    assert a | b == all_events
    assert len(a) > 0, (len(a), len(b))  # both did work
    assert len(b) > 0, (len(a), len(b))
    print(f"relay A published {len(a)} in {len(sinks[0].calls)} batches, B {len(b)} in {len(sinks[1].calls)}")
    await assert_models_agree(stores, 400)


async def test_notify_wakes_an_idle_relay(stores: Stores, clean: Databases):
    """With a 30 s idle poll, an order still reaches the read model at once: the NOTIFY sent by
    place_orders() wakes the relay (< 5 s is a correctness bound, not a timing target)."""
    wakes = 0
    passes = CountingClaims(Outbox(stores.write.db))
    relay = Relay(passes, stores.read, batch=10, idle_poll_s=30)

    def on_notify() -> None:
        nonlocal wakes
        wakes += 1
        relay.wake.set()

    outbox = Outbox(stores.write.db)
    async with background() as bg:
        bg.start(relay.run, "relay")
        bg.start(lambda stop: outbox.listen(on_notify, stop), "listen")
        # The listener calls on_notify once right after LISTEN (catch-up); then the relay finds
        # nothing and settles into its 30 s wait.
        await wait_until(lambda: _true(wakes >= 1), timeout=10, what="listener up", bg=bg)
        # Idle: no wake pending (the relay cleared the last one and made its pass) and no pass
        # under way. From here only a NOTIFY can bring the order in within 30 s.
        await wait_until(
            lambda: _true(passes.idle() and not relay.wake.is_set()),
            timeout=10,
            what="relay idle after its catch-up pass",
            bg=bg,
        )
        before = wakes
        await create_orders(stores, 1)
        took = await wait_until(lambda: _has(clean.read_url, 1), timeout=10, what="order relayed", bg=bg)
        assert wakes > before, "the relay was not woken by NOTIFY"
    print(f"order relayed {took:.3f}s after commit (idle poll 30 s)")
    assert took < 5


async def test_the_listener_reconnects_after_its_backend_is_terminated(stores: Stores, clean: Databases):
    """A LISTEN connection the server closes while it idles (a restart, pg_terminate_backend) fails
    the listener's next keep-alive with the driver's InterfaceError ("connection is closed"): the
    listener reconnects, and NOTIFY wakes the relay again instead of leaving it to its idle poll."""
    calls = 0

    def on_notify() -> None:
        nonlocal calls
        calls += 1

    outbox = Outbox(stores.write.db)
    with structlog.testing.capture_logs() as logs:
        async with background() as bg:
            bg.start(lambda stop: outbox.listen(on_notify, stop), "listen")
            await wait_until(lambda: _true(calls >= 1), timeout=10, what="listener up", bg=bg)
            terminated = await testdb.fetch(
                clean.write_url,
                """SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity
                   WHERE datname = current_database() AND application_name = $1""",
                LISTENER,
            )
            assert [r["done"] for r in terminated] == [True]
            # Reconnected: its catch-up call after LISTEN.
            await wait_until(lambda: _true(calls >= 2), timeout=15, what="listener back", bg=bg)
            before = calls
            await create_orders(stores, 1)
            await wait_until(lambda: _true(calls > before), timeout=10, what="a NOTIFY", bg=bg)
    assert [e for e in logs if e["event"] == "outbox_listen_lost"], "the loss was not logged"


class CountingClaims:
    """An outbox that counts the relay's passes (claims begun and ended), to tell when it idles."""

    def __init__(self, inner: Outbox) -> None:
        self.inner = inner
        self.begun = 0
        self.ended = 0

    def idle(self) -> bool:
        return self.ended == self.begun >= 1

    @contextlib.asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[list[BuyOrderCreated]]:
        self.begun += 1  # synchronously after the relay cleared its wake: no pass goes unseen
        try:
            async with self.inner.claim(limit) as events:
                yield events
        finally:
            self.ended += 1


class FlakySink:
    """A real projector behind a fault: the first `fail_before` calls raise before projecting,
    the next `fail_after` raise after projecting (a publish whose confirm was lost)."""

    def __init__(self, inner: ProjectionStore, fail_before: int, fail_after: int) -> None:
        self.inner = inner
        self.fail_before = fail_before
        self.fail_after = fail_after
        self.calls = 0

    async def publish(self, events: Sequence[BuyOrderCreated]) -> None:
        self.calls += 1
        if self.fail_before > 0:
            self.fail_before -= 1
            raise ConnectionError("sink down")
        await self.inner.publish(events)
        if self.fail_after > 0:
            self.fail_after -= 1
            raise TimeoutError("confirm lost")


async def test_relay_marks_nothing_it_could_not_confirm(stores: Stores, clean: Databases):
    """Sink failures before and after the events got through: rows stay unpublished until a
    publish is confirmed, then each order is in the read model exactly once."""
    await create_orders(stores, 40)
    sink = FlakySink(stores.read, fail_before=2, fail_after=2)
    relay = Relay(Outbox(stores.write.db), sink, batch=40, max_backoff_s=0.2)
    for _ in range(4):
        with pytest.raises((ConnectionError, TimeoutError)):
            await relay.relay_once()
        assert await backlog(clean.write_url) == 40
    assert await relay.relay_once() == 40
    assert await backlog(clean.write_url) == 0
    assert await relay.relay_once() == 0
    await assert_models_agree(stores, 40)


async def test_relay_survives_losing_its_database_connection_after_publishing(
    stores: Stores, clean: Databases
):
    """The claim transaction is killed (pg_terminate_backend) after the sink confirmed: the
    mark is lost, so the rows are relayed again; the projector ignores the repeats."""
    await create_orders(stores, 30)
    db = Database(clean.write_url, 2, "relay-victim")

    class KillAfterPublish:
        def __init__(self) -> None:
            self.inner = stores.read
            self.kills = 0
            self.published = 0

        async def publish(self, events: Sequence[BuyOrderCreated]) -> None:
            await self.inner.publish(events)
            self.published += len(events)
            if self.kills == 0:
                rows = await testdb.fetch(
                    clean.write_url,
                    "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
                    "WHERE application_name = 'relay-victim' AND state = 'idle in transaction'",
                )
                self.kills += rows[0]["n"]

    sink = KillAfterPublish()
    relay = Relay(Outbox(db), sink, batch=50, idle_poll_s=0.1, max_backoff_s=0.2)
    await _relay_until_drained(relay, db, clean.write_url)
    assert sink.kills == 1
    assert sink.published == 60  # everything went out twice …
    await assert_models_agree(stores, 30)  # … and is in the read model once


async def test_projector_skips_duplicates_within_and_across_batches(stores: Stores, clean: Databases):
    await create_orders(stores, 3)
    events = await outbox_events(clean.write_url)
    projected = await stores.read.apply([events[0], events[0], events[1]])
    assert sorted(p.order_id for p in projected) == sorted([events[0].order.id, events[1].order.id])
    again = await stores.read.apply(events)
    assert [p.order_id for p in again] == [events[2].order.id]
    assert await count(clean.read_url) == 3
    assert Decimal(0) < min(e.order.btc_amount for e in events)


async def _backends(url: str, app: str) -> list[tuple[int, str]]:
    rows = await testdb.fetch(
        url, "SELECT pid, state FROM pg_stat_activity WHERE application_name = $1 ORDER BY pid", app
    )
    return [(r["pid"], r["state"]) for r in rows]


async def _terminate(url: str, app: str) -> int:
    rows = await testdb.fetch(
        url,
        "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity WHERE application_name = $1",
        app,
    )
    return int(rows[0]["n"])


async def test_a_failed_publish_rolls_back_and_keeps_the_connection(stores: Stores, clean: Databases):
    """The claim's transaction is rolled back when the publish fails (nothing marked, no session
    left idle in transaction) and the same pooled connection serves the next claim."""
    await create_orders(stores, 5)
    db = Database(clean.write_url, 2, "relay-rollback")
    outbox = Outbox(db)
    claimed: list[BuyOrderCreated] = []

    async def failed_publish() -> None:
        async with outbox.claim(10) as events:
            claimed.extend(events)
            raise ConnectionError("broker down")

    try:
        with pytest.raises(ConnectionError):
            await failed_publish()
        assert len(claimed) == 5
        before = await _backends(clean.write_url, "relay-rollback")
        assert [state for _, state in before] == ["idle"]
        assert await backlog(clean.write_url) == 5
        async with outbox.claim(10) as events:
            assert len(events) == 5  # the same rows again: they were not marked
        assert await _backends(clean.write_url, "relay-rollback") == before  # same backend
        assert await backlog(clean.write_url) == 0
    finally:
        await db.close()


async def test_relay_replaces_a_pooled_connection_killed_while_idle(stores: Stores, clean: Databases):
    """The relay's pooled connection is terminated between two claims: the pool replaces it (or
    the next claim fails on it and the relay retries), and nothing is lost."""
    await create_orders(stores, 20)
    db = Database(clean.write_url, 4, "relay-idle-victim")
    outbox = Outbox(db)
    relay = Relay(outbox, stores.read, batch=50, idle_poll_s=0.05, max_backoff_s=0.2)
    try:
        async with background() as bg:
            bg.start(relay.run, "relay")
            bg.start(lambda stop: outbox.listen(relay.wake.set, stop), "listen")
            await wait_until(lambda: _has(clean.read_url, 20), timeout=30, what="20 rows", bg=bg)
            assert await _terminate(clean.write_url, "relay-idle-victim") >= 1
            await create_orders(stores, 20, start=20)
            await wait_until(lambda: _has(clean.read_url, 40), timeout=30, what="40 rows", bg=bg)
            await wait_until(lambda: _backlog_zero(clean.write_url), timeout=10, what="backlog", bg=bg)
    finally:
        await db.close()
    await assert_models_agree(stores, 40)


async def test_sync_replaces_connections_that_died_while_idle(
    stores: Stores, clean: Databases, amqp_url: str
):
    """read_model_sync as the process builds it: its read-model connections are terminated
    between two batches; the pool sees them closed and opens new ones, so the next batch is
    applied at its first attempt (no projection_failed, nothing requeued), and every row arrives."""
    await create_orders(stores, 20)
    events = await outbox_events(clean.write_url)
    async with broker_probe(amqp_url) as probe:
        publisher = BrokerPublisher(amqp_url)
        db, consumer = build_sync(clean.read_url, amqp_url, prefetch=50)
        await consumer.start()
        try:
            with structlog.testing.capture_logs() as logs:
                async with background() as bg:
                    bg.start(consume_loop(consumer), "consumer")
                    await publisher.publish(events[:10])
                    await wait_until(lambda: _has(clean.read_url, 10), timeout=20, what="10 rows", bg=bg)
                    assert await _terminate(clean.read_url, "pydist-sync") >= 1
                    await publisher.publish(events[10:])
                    await wait_until(lambda: _has(clean.read_url, 20), timeout=20, what="20 rows", bg=bg)
                    await wait_until(lambda: _depth_zero(probe, QUEUE), timeout=10, what="queue drained")
        finally:
            await consumer.close()
            await publisher.close()
            await db.close()
    names = [e["event"] for e in logs]
    assert "projection_failed" not in names
    await assert_models_agree(stores, 20)


async def _has(read_url: str, n: int) -> bool:
    return await count(read_url) >= n


async def _handled(handler: CountingHandler, n: int) -> bool:
    return handler.events >= n


async def _depth_zero(probe, name: str) -> bool:  # type: ignore[no-untyped-def]
    return await probe.depth(name) == 0


async def _relay_until_drained(relay: Relay, db: Database, write_url: str) -> None:
    """Run `relay` until the outbox backlog is empty, then close its pool."""
    try:
        async with background() as bg:
            bg.start(relay.run, "relay")
            await wait_until(lambda: _backlog_zero(write_url), timeout=30, what="backlog", bg=bg)
    finally:
        await db.close()


async def _backlog_zero(write_url: str) -> bool:
    return await backlog(write_url) == 0


async def _true(value: bool) -> bool:
    return value
