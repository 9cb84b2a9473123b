"""read_model_sync through a RabbitMQ memory alarm, on the private cluster.

During a memory or disk alarm RabbitMQ stops reading from every connection that publishes.
A consumer that dead-letters on its consuming connection therefore stops its own acks with its
first dead letter, and then waits for ever for that publish's confirm: the queue it should drain
(the usual way out of a memory alarm) stops draining. This test puts a message to dead-letter
between two good ones, raises the alarm (`set_vm_memory_high_watermark 0` on one node: the whole
cluster blocks its publishers), and checks that during the alarm the consumer projects and acks
both good messages and the poison leaves the sync queue for the DLQ (at the delivery limit, by the
broker itself), and that the DLQ holds nothing but the poison afterwards.

Each of the two halves of the fix alone fails it: dead letters on the consuming connection (with
the bound), or on their own connection without the bound (both timed out at 40 s).

Typical here (3-node private cluster, 2 cores): the alarm is seen in under 1 s; the queue drained
9 s after the consumer started: 6 deliveries, each waiting the 1 s bound. Bounds are 3x or more.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import pytest
import structlog

from pydist.adapters.consumer import EnvelopeConsumer
from pydist.adapters.db import Database
from pydist.adapters.projection import ProjectionStore
from pydist.adapters.rabbit import DEAD_LETTER_QUEUE, DELIVERY_LIMIT, QUEUE, ROUTING_KEY
from pydist.domain.events import BuyOrderCreated
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder
from tests.support import db as testdb
from tests.support.messages import single_event
from tests.support.private_services import RabbitCluster, wait_for
from tests.support.read_side import background, broker_probe, wait_until
from tests.support.services import Databases

pytestmark = pytest.mark.timeout(300)

DEAD_LETTER_TIMEOUT_S = 1.0
ALARM_SEEN_S = 30.0
DRAINED_S = 60.0  # measured 9.0 s
DLQ_READ_S = 5.0
POISON = b"not json at all"
CONSUMING = "pydist sync: consume"  # the consumer's connection, by its name on the broker


def _event(i: int) -> BuyOrderCreated:
    order = BuyOrder(
        uuid.uuid4(),
        uuid.uuid4(),
        datetime.now(UTC),
        Currency.EUR,
        Decimal(f"{10 + i}.00"),
        Decimal("91234.56"),
        Decimal("0.00010961"),
    )
    return BuyOrderCreated(uuid.uuid4(), order, f"alarm-{i}")


@pytest.fixture
def alarm_vhost(cluster_all_up: RabbitCluster) -> Iterator[tuple[RabbitCluster, str, str]]:
    """A vhost of its own on the cluster (node 1's URL), and no alarm left behind."""
    cluster, node = cluster_all_up, cluster_all_up.names[0]
    vhost = f"pydist_t_alarm_{uuid.uuid4().hex[:8]}"
    cluster.ctl(node, "add_vhost", vhost)
    cluster.ctl(node, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield cluster, vhost, cluster.amqp_url(node) + vhost
    finally:
        _clear_alarm(cluster)
        wait_for(lambda: not _alarmed(cluster), timeout=ALARM_SEEN_S, what="the memory alarm off")
        cluster.ctl(node, "delete_vhost", vhost)


def _clear_alarm(cluster: RabbitCluster) -> None:
    cluster.ctl(cluster.names[0], "set_vm_memory_high_watermark", "0.4")  # RabbitMQ's default


def _alarmed(cluster: RabbitCluster) -> bool:
    out = cluster.ctl(cluster.names[0], "alarms", tool="rabbitmq-diagnostics")
    return "memory" in out.lower()


async def _read_rows(read_url: str) -> int:
    return int((await testdb.fetch(read_url, "SELECT count(*) AS n FROM buy_orders"))[0]["n"])


async def test_the_consumer_drains_its_queue_through_a_memory_alarm(
    alarm_vhost: tuple[RabbitCluster, str, str], clean: Databases
) -> None:
    cluster, vhost, url = alarm_vhost
    read_db = Database(clean.read_url, 2, "pydist-test")
    handler = ProjectionStore(read_db).publish
    consumer = EnvelopeConsumer(url, handler, prefetch=10, dead_letter_timeout_s=DEAD_LETTER_TIMEOUT_S)
    async with broker_probe(url) as probe:
        await probe.exchange.publish(single_event(_event(1)), ROUTING_KEY)
        await probe.publish_raw(POISON)
        await probe.exchange.publish(single_event(_event(2)), ROUTING_KEY)
        await asyncio.to_thread(cluster.ctl, cluster.names[0], "set_vm_memory_high_watermark", "0")
        await _wait_alarm(cluster, True)
        try:
            with structlog.testing.capture_logs() as logs:
                async with background() as bg:
                    bg.start(consumer.run, "consumer")
                    took = await wait_until(
                        lambda: _drained(cluster, vhost, clean.read_url),
                        timeout=DRAINED_S,
                        what="the queue drained",
                        bg=bg,
                    )
                    assert await asyncio.to_thread(_alarmed, cluster), "the alarm ended too soon"
                    states = await asyncio.to_thread(_connection_states, cluster)
                    # "blocking": blocked if it published, still read meanwhile (acks included)
                    assert states.get(CONSUMING) in ({"running"}, {"blocking"}), states
                    await asyncio.to_thread(_clear_alarm, cluster)
                    await _wait_alarm(cluster, False)
        finally:
            await consumer.close()
            await read_db.close()
        # Each attempt's dead letter, sent during the alarm, may land now: copies, not losses.
        dead = await probe.get_all(DEAD_LETTER_QUEUE, DELIVERY_LIMIT + 2, timeout=DLQ_READ_S)
    failed = [e for e in logs if e["event"] == "dead_letter_failed"]
    print(f"alarm: drained in {took:.1f}s; {len(failed)} dead letters timed out; {len(dead)} in the DLQ")
    assert 1 <= len(failed) <= DELIVERY_LIMIT + 1, failed  # the broker takes it at the 6th delivery
    assert {m.body for m in dead} == {POISON}, [m.body[:40] for m in dead]
    assert await _read_rows(clean.read_url) == 2


def _connection_states(cluster: RabbitCluster) -> dict[str, set[str]]:
    """The state of every connection (running, blocking, blocked), by its name."""
    out = cluster.ctl(
        cluster.names[0], "list_connections", "client_properties", "state", "--formatter", "json"
    )
    states: dict[str, set[str]] = {}
    for connection in json.loads(out):
        props = {key: value for key, _, value in connection["client_properties"]}
        states.setdefault(str(props.get("connection_name")), set()).add(connection["state"])
    return states


async def _drained(cluster: RabbitCluster, vhost: str, read_url: str) -> bool:
    """Both orders projected and acked, and the poison in the DLQ: during the alarm only the
    broker itself can have put it there (at the delivery limit), so it has left the sync queue."""
    messages = {q["name"]: q["messages"] for q in await asyncio.to_thread(cluster.queues, vhost)}
    drained = messages.get(QUEUE) == 0 and messages.get(DEAD_LETTER_QUEUE, 0) >= 1  # ready + unacked
    return drained and await _read_rows(read_url) == 2


async def _wait_alarm(cluster: RabbitCluster, on: bool) -> None:
    async def seen() -> bool:
        return await asyncio.to_thread(_alarmed, cluster) is on

    await wait_until(seen, timeout=ALARM_SEEN_S, what=f"the memory alarm {'on' if on else 'off'}")
