"""Work done directly, not through the API: bulk-loading both models with generate_series, outbox
batches for the relay, the raw aio-pika baseline, and the read model's lag and backlog."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import aio_pika
import asyncpg
from tests.support.messages import single_event

from bench.harness import Resources, log, pg_fetch
from pydist.adapters.rabbit import QUEUE
from pydist.domain.events import BUY_ORDER_CREATED, BuyOrderCreated
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder

BULK_BTC = Decimal("0.00010310")  # 10.00 USD at 97000.00, rounded up to a satoshi
DRAIN_S = 90  # the longest drained() waits for a backlog to be projected

# Deterministic ids from the row number (b0000000-0000-0000-0000-<n>; version nibble 0, so never equal
# to a gen_random_uuid()), so both models get the very same orders, appended to the indexes in order
# (a 1M-row load takes seconds, not minutes); created_at is in the past, so API-made orders are
# always newer than bulk ones.
_IDS = """('b0000000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid,
          ('b1000000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid,
          timestamptz '2025-01-01 00:00:00+00' + g * interval '1 millisecond' AS ts"""
_WRITE_BULK = f"""
WITH o AS (
    INSERT INTO buy_orders (id, idempotence_key, created_at, currency, currency_amount, btc_rate, btc_amount)
    SELECT {_IDS}, 'USD', 10.00, 97000.00, 0.00010310 FROM generate_series($1::bigint, $2::bigint) AS g
    RETURNING id, created_at
)
INSERT INTO outbox (order_id, created_at, published_at) SELECT id, created_at, created_at FROM o
"""
_READ_BULK = f"""
INSERT INTO buy_orders (id, idempotence_key, created_at, currency, currency_amount, btc_rate,
                        btc_amount, event_id, projected_at)
SELECT i.*, 'USD', 10.00, 97000.00, 0.00010310,
       ('b2000000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid, i.ts
FROM generate_series($1::bigint, $2::bigint) AS g, LATERAL (SELECT {_IDS}) AS i
"""


@dataclass
class BulkLoader:
    write_url: str
    read_url: str
    loaded: int = 0  # bulk rows so far (row numbers 1..loaded)

    async def counts(self) -> tuple[int, int]:
        count = "SELECT count(*) FROM buy_orders"
        write, read = [(await pg_fetch(url, count))[0][0] for url in (self.write_url, self.read_url)]
        return int(write), int(read)

    async def load_to(self, target: int) -> tuple[int, float]:
        """Add bulk rows to both models, 250,000 at a time, until the write model holds `target`
        orders; returns (rows added, seconds)."""
        chunk = 250_000
        started = time.monotonic()
        missing = max(0, target - (await self.counts())[0])
        first, last = self.loaded + 1, self.loaded + missing
        for lo in range(first, last + 1, chunk):
            hi = min(lo + chunk - 1, last)
            await asyncio.gather(
                pg_fetch(self.write_url, _WRITE_BULK, lo, hi), pg_fetch(self.read_url, _READ_BULK, lo, hi)
            )
        cap = "UPDATE btc_cap SET used_btc = used_btc + $1 WHERE id = 1"
        await pg_fetch(self.write_url, cap, BULK_BTC * missing)
        self.loaded = last
        await asyncio.gather(
            pg_fetch(self.write_url, "VACUUM (ANALYZE) buy_orders, outbox"),
            pg_fetch(self.read_url, "VACUUM (ANALYZE) buy_orders"),
        )
        return missing, time.monotonic() - started

    async def reference_at_depth(self, depth: int) -> tuple[uuid.UUID, int]:
        """The id of the row `depth` rows down the newest-first listing (clamped to the table)."""
        depth = max(0, min(depth, (await self.counts())[1] - 11))
        newest_first = "SELECT id FROM buy_orders ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1"
        return (await pg_fetch(self.read_url, newest_first, depth))[0][0], depth


@contextlib.contextmanager
def drained(res: Resources) -> Iterator[None]:
    """Afterwards, wait (bounded: DRAIN_S) until every order made inside is published and in the
    read model; a backlog still there then is logged, not raised."""
    mark = "SELECT coalesce(max(id), 0), clock_timestamp() FROM outbox"
    (first_id, now), *_ = asyncio.run(pg_fetch(res.write_url, mark))
    yield
    waited = asyncio.run(_projected(res, first_id, now))
    log(f"  backlog left after {DRAIN_S:.0f}s" if waited is None else f"  backlog projected in {waited:.1f}s")


async def _projected(res: Resources, first_id: int, now: datetime) -> float | None:
    """Seconds until every outbox row after `first_id` is published and its order (made since
    `now`) is in the read model; None if DRAIN_S passed first."""
    outbox = "SELECT count(*) FILTER (WHERE published_at IS NULL), count(*) FROM outbox WHERE id > $1"
    read = "SELECT count(*) FROM buy_orders WHERE created_at >= $1"
    started = time.monotonic()
    while time.monotonic() - started < DRAIN_S:
        (unpublished, made), *_ = await pg_fetch(res.write_url, outbox, first_id)
        if unpublished == 0 and (await pg_fetch(res.read_url, read, now))[0][0] >= made:
            return time.monotonic() - started
        await asyncio.sleep(0.25)  # paces the polling of a condition
    return None


_LAG = """
SELECT count(*) AS projected, percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS lag_p50_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) AS lag_p99_ms, max(lag) AS lag_max_ms
FROM (SELECT extract(epoch FROM projected_at - created_at) * 1000 AS lag
      FROM buy_orders WHERE created_at >= $1 AND created_at < $2) AS l
"""
# The first leg of that lag, from the write model: created_at to published_at, which the relay
# sets after the broker confirmed the envelope (so it also counts the relay's mark statement).
_PUBLISHED = """
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS published_p50_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS published_p99_ms
FROM (SELECT extract(epoch FROM o.published_at - b.created_at) * 1000 AS ms
      FROM buy_orders b JOIN outbox o ON o.order_id = b.id
      WHERE b.created_at >= $1 AND b.created_at < $2) AS p
"""
# The backlog at each second s of [t0, t1]: orders made but not yet projected (unpublished outbox
# rows, messages in the queue and in read_model_sync's hands), from the read model once drained.
_BACKLOG = """
WITH o AS (SELECT created_at, projected_at FROM buy_orders
           WHERE created_at > $1::timestamptz - interval '10 minutes'),
     b AS (SELECT extract(epoch FROM s)::float8 AS t,
                  (SELECT count(*) FROM o WHERE created_at <= s AND projected_at > s)::float8 AS n
           FROM generate_series($1::timestamptz, $2::timestamptz, interval '1 second') AS s)
SELECT regr_slope(n, t) AS backlog_slope_per_s, (array_agg(n ORDER BY t))[1] AS backlog_first,
       (array_agg(n ORDER BY t DESC))[1] AS backlog_last, max(n) AS backlog_max
FROM b
"""


async def lag_between(res: Resources, t0: float, t1: float) -> dict[str, float]:
    """Of the orders created in [t0, t1) (wall-clock seconds), once all are projected: how many
    were written and projected, their commit-to-visible lag (projected_at - created_at) and the
    backlog second by second, with its least-squares trend (orders per second; 0 = steady), and
    the lag's first leg (created to confirmed by the broker)."""
    a, b = datetime.fromtimestamp(t0, UTC), datetime.fromtimestamp(t1, UTC)
    made = "SELECT count(*) FROM buy_orders WHERE created_at >= $1 AND created_at < $2"
    write, read = res.write_url, res.read_url
    queries = ((read, _LAG), (read, _BACKLOG), (write, _PUBLISHED), (write, made))
    *rows, written = [(await pg_fetch(url, sql, a, b))[0] for url, sql in queries]
    out = {k: float("nan") if v is None else float(v) for row in rows for k, v in row.items()}
    return out | {"written": float(written[0])}


def lag_text(lag: dict[str, float]) -> str:
    """A lag_between() reading for the log: the lag and its first leg, to the broker's confirm."""
    confirmed = f"(confirmed p50 {lag['published_p50_ms']:.0f} p99 {lag['published_p99_ms']:.0f})"
    return f"lag p50 {lag['lag_p50_ms']:.0f} p99 {lag['lag_p99_ms']:.0f} ms {confirmed}"


_OUTBOX_BATCH = """
WITH o AS (
    INSERT INTO buy_orders (idempotence_key, currency, currency_amount, btc_rate, btc_amount)
    SELECT gen_random_uuid(), 'USD', 10.00, 97000.00, 0.00010310 FROM generate_series(1, $1::int)
    RETURNING id
)
INSERT INTO outbox (order_id) SELECT id FROM o
"""


async def relay_run(write_url: str, n: int, timeout_s: float = 120) -> float:
    """Commit n orders with unpublished outbox rows in one transaction (with the NOTIFY that
    place_orders() sends), then time the running relay until all are confirmed by the broker.
    Returns events per second, from the commit to the last published_at."""
    conn = await asyncpg.connect(write_url, timeout=10)
    try:
        start_id = int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM outbox"))
        async with conn.transaction():
            await conn.execute(_OUTBOX_BATCH, n)
            await conn.execute("UPDATE btc_cap SET used_btc = used_btc + $1 WHERE id = 1", BULK_BTC * n)
            await conn.execute("SELECT pg_notify('pydist_outbox', '')")
        committed, deadline = time.time(), time.monotonic() + timeout_s
        left = "SELECT count(*) FROM outbox WHERE published_at IS NULL AND id > $1"
        while await conn.fetchval(left, start_id):
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay left events unpublished after {timeout_s}s")
            await asyncio.sleep(0.02)
        last: datetime = await conn.fetchval("SELECT max(published_at) FROM outbox WHERE id > $1", start_id)
    finally:
        await conn.close()
    return n / max(last.timestamp() - committed, 1e-6)


async def raw_publish(amqp_url: str, n: int, in_flight: int = 500) -> float:
    """The baseline: aio-pika alone, one event per message (the v1 message), publisher confirms,
    persistent, into a quorum queue like the relay's, at most `in_flight` unconfirmed at any
    time. Returns msgs/s (= events/s)."""
    ids, amounts = (uuid.uuid4(), uuid.uuid4(), datetime.now(UTC)), (Decimal("10.00"), Decimal("97000.00"))
    order, request_id = BuyOrder(*ids, Currency.USD, *amounts, BULK_BTC), uuid.uuid4().hex
    async with await aio_pika.connect(amqp_url, timeout=10) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange("bench.raw", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("bench.raw", durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, routing_key="#")
        window = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with window:
                message = single_event(BuyOrderCreated(uuid.uuid4(), order, request_id))
                await exchange.publish(message, routing_key=BUY_ORDER_CREATED, mandatory=True)

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout=120)
        elapsed = time.perf_counter() - started
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
    return n / elapsed


async def purge_sync_queue(amqp_url: str) -> None:
    async with await aio_pika.connect(amqp_url, timeout=10) as connection:
        await (await (await connection.channel()).declare_queue(QUEUE, passive=True)).purge()
