"""The private engines behind the fault tests do what the fault tests will rely on: a real
3-node RabbitMQ cluster whose quorum queues keep a confirmed message through the kill -9 of their
leader and through a whole-broker restart, and a PostgreSQL server that keeps a committed row (and
only that) through a crash. Every wait is for a condition, bounded by a deadline at least 3x the
time it typically takes here (measured on the 2-core test machine, printed with each step)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import aio_pika
import asyncpg
import pytest

from pydist.adapters.rabbit import BrokerLink
from tests.faults.conftest import Timings
from tests.support.private_services import PrivatePostgres, RabbitCluster, wait_for

T = TypeVar("T")

# Typical values measured here (2 shared cores): cluster start 30-43s (in the first cluster test's
# setup), restart of a killed node 8-10s, quorum leader failover 1-1.5s, stop_all 6-9s + start_all
# 20-30s, Postgres initdb + start ~1.5s, crash + restart < 0.5s. Every bound is >= 3x those.
CLUSTER_TEST_TIMEOUT = 300
FAILOVER_TIMEOUT = 60
REJOIN_TIMEOUT = 120


async def _blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking cluster/server operation off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def _timed(timings: Timings, key: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    t0 = time.monotonic()
    result = await _blocking(fn, *args, **kwargs)
    timings.record(key, round(time.monotonic() - t0, 3))
    return result


async def _publish_persistent(url: str, queue: str, body: bytes) -> None:
    """Declare the quorum queue and publish to it, confirmed (aio-pika channels confirm by default)."""
    connection = await aio_pika.connect(url, timeout=30)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue,
            timeout=30,
        )


async def _get_one(url: str, queue: str, *, timeout: float) -> bytes:
    """The queue's next message, acked, read through the node at ``url`` (retried until the
    deadline: just after a failover the queue may still be electing its leader)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        link = BrokerLink([url], name="test-get-one")  # closes a failed attempt, unlike aio_pika.connect
        try:
            q = await (await link.channel()).declare_queue(queue, passive=True)
            message = await q.get(fail=False, timeout=10)
            if message is not None:
                await message.ack()
                return message.body
            last = None
        except (TimeoutError, aio_pika.exceptions.AMQPError, OSError) as exc:
            last = exc
        finally:
            await link.close()
        await asyncio.sleep(0.2)  # polling pace, not synchronisation
    raise TimeoutError(f"no message from {queue} via {url} within {timeout}s (last error: {last!r})")


async def _delete_queue(url: str, queue: str) -> None:
    connection = await aio_pika.connect(url, timeout=30)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


def _quorum_state(cluster: RabbitCluster, queue: str, via: str) -> dict[str, Any] | None:
    info = cluster.queue_info(queue, via=via)
    return info if info.get("type") == "quorum" else None


@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT)
async def test_cluster_has_three_running_nodes(cluster_all_up: RabbitCluster) -> None:
    cluster = cluster_all_up
    status = cluster.cluster_status()
    assert set(status["running_nodes"]) == set(cluster.names), status["running_nodes"]
    assert set(status["disk_nodes"]) == set(cluster.names)
    assert not status["partitions"]
    # Private: own ports, never the machine's broker.
    ports = [int(url.rsplit(":", 1)[1].strip("/")) for url in cluster.amqp_urls()]
    assert len(set(ports)) == 3
    assert 5672 not in ports
    assert cluster.broker_url() == ",".join(cluster.amqp_urls())
    for name in cluster.names:  # each node answers the CLI (which has the private cookie) as itself
        assert cluster.ctl(name, "eval", "node().").strip() == f"'{name}'"
    for url in cluster.amqp_urls():  # ...and AMQP on its own port
        connection = await aio_pika.connect(url, timeout=30)
        await connection.close()


@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT)
async def test_quorum_message_survives_leader_kill(
    cluster_all_up: RabbitCluster, service_timings: Timings
) -> None:
    cluster = cluster_all_up
    queue = f"pydist-fault-{uuid.uuid4().hex[:8]}"
    body = f"survives {queue}".encode()
    await _publish_persistent(cluster.amqp_url(cluster.names[0]), queue, body)

    def placed() -> dict[str, Any] | None:
        info = _quorum_state(cluster, queue, via=cluster.names[0])
        ok = info and sorted(info["members"]) == sorted(cluster.names) and info["leader"] in cluster.names
        return info if ok else None

    info = await _blocking(wait_for, placed, timeout=30, what=f"{queue} on 3 members with a leader")
    leader = info["leader"]
    survivors = [n for n in cluster.names if n != leader]

    pid = await _timed(service_timings, "kill_leader_s", cluster.kill, leader)
    assert leader not in cluster.running()
    with pytest.raises(ConnectionRefusedError):  # a bare socket: a failed aio_pika.connect leaks its object
        await asyncio.open_connection("127.0.0.1", cluster.node(leader).amqp_port)

    def new_leader() -> str | None:
        try:
            found = cluster.quorum_leader(queue, via=survivors[0])
        except Exception:  # the survivors' CLI view may lag for a moment
            return None
        return found if found in survivors else None

    t0 = time.monotonic()
    elected = await _blocking(wait_for, new_leader, timeout=FAILOVER_TIMEOUT, what=f"new leader of {queue}")
    service_timings.record("leader_failover_s", round(time.monotonic() - t0, 3))
    print(f"killed leader {leader} (pid {pid}); new leader {elected}")

    t0 = time.monotonic()
    got = await _get_one(cluster.amqp_url(survivors[1]), queue, timeout=FAILOVER_TIMEOUT)
    service_timings.record("consume_after_failover_s", round(time.monotonic() - t0, 3))
    assert got == body

    await _timed(service_timings, "restart_killed_node_s", cluster.start, leader)
    await _blocking(cluster.wait_running, cluster.names, timeout=REJOIN_TIMEOUT)
    assert cluster.running_nodes(via=leader) == set(cluster.names)

    def back_online() -> bool:
        info = _quorum_state(cluster, queue, via=leader)
        return bool(info) and sorted(info["online"]) == sorted(cluster.names)

    await _blocking(wait_for, back_online, timeout=REJOIN_TIMEOUT, what=f"{leader} back in {queue}")
    await _delete_queue(cluster.amqp_url(leader), queue)


# Long mode (CI) only, with test_real_engines' whole-broker restart: 26 s of stopping and
# starting three nodes; the leader kill above keeps the cluster checked in the default run.
@pytest.mark.long
@pytest.mark.timeout(CLUSTER_TEST_TIMEOUT)
async def test_quorum_message_survives_whole_cluster_restart(
    cluster_all_up: RabbitCluster, service_timings: Timings
) -> None:
    cluster = cluster_all_up
    queue = f"pydist-restart-{uuid.uuid4().hex[:8]}"
    body = f"survives {queue}".encode()
    await _publish_persistent(cluster.amqp_url(cluster.names[1]), queue, body)
    await _timed(service_timings, "stop_all_s", cluster.stop_all)
    assert cluster.running() == []
    await _timed(service_timings, "start_all_s", cluster.start_all)
    assert cluster.running_nodes() == set(cluster.names)
    got = await _get_one(cluster.amqp_url(cluster.names[2]), queue, timeout=FAILOVER_TIMEOUT)
    assert got == body
    await _delete_queue(cluster.amqp_url(cluster.names[0]), queue)


@pytest.mark.timeout(120)
async def test_private_pg_keeps_committed_row_through_crash(
    private_pg: PrivatePostgres, service_timings: Timings
) -> None:
    pg = private_pg
    url = await _blocking(pg.create_database, f"crash_{uuid.uuid4().hex[:8]}")
    conn = await asyncpg.connect(url, timeout=10)
    try:
        assert await conn.fetchval("SHOW fsync") == "on"
        await conn.execute("CREATE TABLE t (id int PRIMARY KEY, note text NOT NULL)")
        await conn.execute("INSERT INTO t VALUES (1, 'committed')")
    finally:
        await conn.close()
    open_tx = await asyncpg.connect(url, timeout=10)
    await open_tx.execute("BEGIN; INSERT INTO t VALUES (2, 'never committed')")

    await _timed(service_timings, "pg_crash_s", pg.crash)
    open_tx.terminate()
    assert not pg.running()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(url, timeout=5)

    await _timed(service_timings, "pg_restart_after_crash_s", pg.start)
    assert "automatic recovery in progress" in pg.log.read_text()
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch("SELECT id, note FROM t ORDER BY id")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [(1, "committed")]


@pytest.mark.timeout(120)
def test_private_pg_close_leaves_nothing() -> None:
    """A second, throw-away server: after close() its processes and its directory are gone."""
    pg = PrivatePostgres.create()
    try:
        pids = pg.leaked_processes()
        assert pg.postmaster_pid() in pids
        assert len(pids) >= 4, pids  # postmaster + checkpointer, bgwriter, walwriter...
    finally:
        pg.close()
    assert pg.leaked_processes() == []
    assert not pg.base.exists()
