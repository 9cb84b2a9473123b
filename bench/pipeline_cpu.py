"""CPU per event of the two pipeline workers, measured in-process (time.process_time):

- relay: outbox → RabbitMQ (claim, publish with confirms, mark), through `Relay.run`;
- sync: RabbitMQ → read model (consume, decode, apply, ack), through `EnvelopeConsumer.run`,

each built exactly as `entrypoints/workers.py` builds it, on throw-away databases and a private
vhost (dropped at the end), with the processes' JSON logging (to /dev/null) and gc.freeze().
The phases run one after the other (all events are published before the consumer starts), so
each figure is one side's own CPU. Claims are capped to stay near the sizes seen at the
benchmark's create rate (a few dozen events, so envelopes of that size) rather than the large
batches of a drain, since per-message costs are what the envelope changes.

    uv run python -m bench.pipeline_cpu [--n 20000] [--relay-batch 32] [--rounds 1]

To compare with another source tree (same bench): PYTHONPATH=OTHER/src uv run python -m bench.pipeline_cpu
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Sequence

import asyncpg
import uvloop
from tests.support.read_side import broker_probe
from tests.support.services import create_databases, create_vhost, delete_vhost, drop_databases

import pydist
from pydist.adapters.outbox import Outbox
from pydist.adapters.publisher import BrokerPublisher
from pydist.adapters.rabbit import QUEUE
from pydist.bootstrap import build_sync, relay_engine
from pydist.config import plain_url
from pydist.domain.events import BuyOrderCreated
from pydist.logs import configure_logging
from pydist.service.relay import Relay

# n orders and their outbox rows in one statement (request ids too, as the create path stores them).
_LOAD = """
WITH o AS (
    INSERT INTO buy_orders (idempotence_key, currency, currency_amount, btc_rate, btc_amount)
    SELECT gen_random_uuid(), 'USD', 10.00, 97000.00, 0.00010310 FROM generate_series(1, $1::int)
    RETURNING id
)
INSERT INTO outbox (order_id, request_id) SELECT id, 'req-' || md5(id::text) FROM o
"""


class _Counting:
    """The relay's sink: the real publisher, counting; sets `done` once `n` events are confirmed."""

    def __init__(self, inner: BrokerPublisher, n: int) -> None:
        self.inner = inner
        self.n = n
        self.published = 0
        self.done = asyncio.Event()

    async def publish(self, events: Sequence[BuyOrderCreated]) -> None:
        await self.inner.publish(events)
        self.published += len(events)
        if self.published >= self.n:
            self.done.set()


async def _load(write_url: str, n: int) -> None:
    conn = await asyncpg.connect(write_url, timeout=10)
    try:
        await conn.execute("TRUNCATE outbox, buy_orders")
        await conn.execute(_LOAD, n)
    finally:
        await conn.close()


async def _count(url: str, sql: str) -> int:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def relay_phase(write_url: str, amqp_url: str, n: int, batch: int) -> tuple[float, float]:
    """CPU µs per event and wall seconds for the relay to publish n outbox events."""
    engine = relay_engine(write_url)
    publisher = BrokerPublisher(amqp_url)
    sink = _Counting(publisher, n)
    relay = Relay(Outbox(engine, plain_url(write_url)), sink, batch=batch, idle_poll_s=0.2)
    await publisher.start()
    gc.collect()
    stop = asyncio.Event()
    cpu, wall = time.process_time(), time.perf_counter()
    task = asyncio.create_task(relay.run(stop))
    await asyncio.wait_for(sink.done.wait(), 120)
    stop.set()
    await task
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await publisher.close()
    await engine.dispose()
    left = await _count(write_url, "SELECT count(*) FROM outbox WHERE published_at IS NULL")
    assert left == 0, left
    assert sink.published == n, sink.published
    return cpu / n * 1e6, wall


async def sync_phase(read_url: str, amqp_url: str, n: int) -> tuple[float, float]:
    """CPU µs per event and wall seconds for read_model_sync to apply and ack n queued events."""
    done = asyncio.Event()
    handled = 0
    engine, consumer = build_sync(read_url, amqp_url, prefetch=8)
    real = consumer._handler

    async def counting(events: Sequence[BuyOrderCreated]) -> None:
        nonlocal handled
        await real(events)
        handled += len(events)
        if handled >= n:
            done.set()

    consumer._handler = counting
    await consumer.start()
    gc.collect()
    stop = asyncio.Event()
    cpu, wall = time.process_time(), time.perf_counter()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.wait_for(done.wait(), 120)
    stop.set()
    await task
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await consumer.close()
    await engine.dispose()
    rows = await _count(read_url, "SELECT count(*) FROM buy_orders")
    assert handled == n, handled
    assert rows == n, rows
    return cpu / n * 1e6, wall


async def rounds_of(
    write_url: str, read_url: str, amqp_url: str, n: int, relay_batch: int, rounds: int
) -> None:
    out = sys.stdout
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the processes' JSON log lines; restored below)
    try:
        configure_logging("bench", "INFO")
        print(f"pydist from {os.path.dirname(pydist.__file__)}", file=out)
        gc.collect()
        gc.freeze()  # as build_app does once start-up is done
        results: list[tuple[float, float, float, float]] = []
        for r in range(rounds):
            async with broker_probe(amqp_url) as probe:
                await _load(write_url, n)
                conn = await asyncpg.connect(read_url, timeout=10)
                await conn.execute("TRUNCATE buy_orders")
                await conn.close()
                relay_us, relay_s = await relay_phase(write_url, amqp_url, n, relay_batch)
                assert await probe.depth(QUEUE) == -(-n // relay_batch)  # one envelope per claim
                sync_us, sync_s = await sync_phase(read_url, amqp_url, n)
            results.append((relay_us, relay_s, sync_us, sync_s))
            print(
                f"round {r + 1}: relay {relay_us:6.1f} µs/event ({n / relay_s:,.0f} events/s), "
                f"sync {sync_us:6.1f} µs/event ({n / sync_s:,.0f} events/s)",
                file=out,
                flush=True,
            )
        relay_med = statistics.median(x[0] for x in results)
        sync_med = statistics.median(x[2] for x in results)
        print(
            f"median of {rounds}: relay {relay_med:.1f} µs/event, sync {sync_med:.1f} µs/event "
            f"(n={n:,}, relay batch {relay_batch})",
            file=out,
        )
    finally:
        sys.stdout.close()
        sys.stdout = out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="events per round")
    parser.add_argument("--relay-batch", type=int, default=32, help="events per outbox claim")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    dbs = create_databases("cpu")  # migrated; Alembic runs its own event loop, so not inside ours
    vhost, amqp_url = create_vhost("cpu")
    try:
        uvloop.run(rounds_of(dbs.write_url, dbs.read_url, amqp_url, args.n, args.relay_batch, args.rounds))
    finally:
        drop_databases(dbs)
        delete_vhost(vhost)


if __name__ == "__main__":
    main()
