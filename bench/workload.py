"""Data and broker work the benchmark does directly (not through the API): bulk-loading both models
with generate_series, outbox batches for the relay, the raw aio-pika baseline, backlog sampling and
read-model lag queries."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import aio_pika
import asyncpg
import orjson

from bench.harness import pg_exec, pg_fetch
from pydist.adapters.messages import single_event
from pydist.adapters.rabbit import QUEUE
from pydist.domain.events import BUY_ORDER_CREATED, BuyOrderCreated
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder

BULK_BTC = Decimal("0.00010310")  # 10.00 USD at 97000.00, rounded up to a satoshi

# Deterministic ids from the row number (b0000000-0000-0000-0000-<n>; version nibble 0, so never equal
# to a gen_random_uuid()), so both models get the very same orders, appended to the indexes in order
# (a 1M-row load takes seconds, not minutes); created_at is in the past, so API-made orders are
# always newer than bulk ones.
_WRITE_BULK = """
WITH o AS (
    INSERT INTO buy_orders (id, idempotence_key, created_at, currency, currency_amount, btc_rate,
                            btc_amount)
    SELECT ('b0000000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid,
           ('b1000000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid,
           timestamptz '2025-01-01 00:00:00+00' + g * interval '1 millisecond',
           'USD', 10.00, 97000.00, 0.00010310
    FROM generate_series($1::bigint, $2::bigint) AS g
    RETURNING id, created_at
)
INSERT INTO outbox (order_id, created_at, published_at) SELECT id, created_at, created_at FROM o
"""
_READ_BULK = """
INSERT INTO buy_orders (id, idempotence_key, created_at, currency, currency_amount, btc_rate,
                        btc_amount, event_id, projected_at)
SELECT ('b0000000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid,
       ('b1000000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid, ts, 'USD', 10.00, 97000.00,
       0.00010310, ('b2000000-0000-0000-0000-' || lpad(to_hex(g), 12, '0'))::uuid, ts
FROM generate_series($1::bigint, $2::bigint) AS g,
     LATERAL (SELECT timestamptz '2025-01-01 00:00:00+00' + g * interval '1 millisecond') AS t(ts)
"""


@dataclass
class BulkLoader:
    write_url: str
    read_url: str
    loaded: int = 0  # bulk rows so far (row numbers 1..loaded)

    async def counts(self) -> tuple[int, int]:
        w = await pg_fetch(self.write_url, "SELECT count(*) FROM buy_orders")
        r = await pg_fetch(self.read_url, "SELECT count(*) FROM buy_orders")
        return int(w[0][0]), int(r[0][0])

    async def load_to(self, target: int, chunk: int = 250_000) -> tuple[int, float]:
        """Add bulk rows to both models until the write model holds `target` orders; returns
        (rows added, seconds)."""
        started = time.monotonic()
        current, _ = await self.counts()
        missing = max(0, target - current)
        first = self.loaded + 1
        last = self.loaded + missing
        for lo in range(first, last + 1, chunk):
            hi = min(lo + chunk - 1, last)
            await asyncio.gather(
                pg_exec(self.write_url, _WRITE_BULK, lo, hi),
                pg_exec(self.read_url, _READ_BULK, lo, hi),
            )
        if missing:
            await pg_exec(
                self.write_url,
                "UPDATE btc_cap SET used_btc = used_btc + $1 WHERE id = 1",
                BULK_BTC * missing,
            )
            self.loaded = last
        await asyncio.gather(
            pg_exec(self.write_url, "VACUUM (ANALYZE) buy_orders"),
            pg_exec(self.write_url, "VACUUM (ANALYZE) outbox"),
            pg_exec(self.read_url, "VACUUM (ANALYZE) buy_orders"),
        )
        return missing, time.monotonic() - started

    async def reference_at_depth(self, depth: int) -> tuple[uuid.UUID, int]:
        """The id of the row `depth` rows down the newest-first listing (clamped to the table)."""
        total = int((await pg_fetch(self.read_url, "SELECT count(*) FROM buy_orders"))[0][0])
        depth = max(0, min(depth, total - 11))
        rows = await pg_fetch(
            self.read_url,
            "SELECT id FROM buy_orders ORDER BY created_at DESC, id DESC OFFSET $1 LIMIT 1",
            depth,
        )
        return rows[0][0], depth


# ---------------------------------------------------------------- read-model lag


@dataclass
class Lag:
    count: int
    written: int
    p50_ms: float
    p99_ms: float
    max_ms: float


async def outbox_mark(write_url: str) -> tuple[int, datetime]:
    """A point in the order stream: (highest outbox id, now), for wait_projected."""
    rows = await pg_fetch(write_url, "SELECT coalesce(max(id), 0), clock_timestamp() FROM outbox")
    return int(rows[0][0]), rows[0][1]


async def wait_projected(
    write_url: str, read_url: str, mark: tuple[int, datetime], timeout_s: float
) -> float:
    """Wait (bounded) until every order made after `mark` is published and in the read model.
    Returns the seconds waited, or NaN if the timeout passed first."""
    start_id, since = mark
    started = time.monotonic()
    while True:
        w = await pg_fetch(
            write_url,
            "SELECT count(*) FILTER (WHERE published_at IS NULL), count(*) FROM outbox WHERE id > $1",
            start_id,
        )
        r = await pg_fetch(read_url, "SELECT count(*) FROM buy_orders WHERE created_at >= $1", since)
        if int(w[0][0]) == 0 and int(r[0][0]) >= int(w[0][1]):
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            return float("nan")
        await asyncio.sleep(0.25)


async def lag_between(write_url: str, read_url: str, t0: float, t1: float) -> Lag:
    """Commit-to-visible lag (projected_at - created_at in the read model) of the orders created
    in [t0, t1) (wall-clock seconds)."""
    a = datetime.fromtimestamp(t0, UTC)
    b = datetime.fromtimestamp(t1, UTC)
    rows = await pg_fetch(
        read_url,
        """
        SELECT count(*) AS n,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS p50,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) AS p99,
               max(lag) AS mx
        FROM (SELECT extract(epoch FROM projected_at - created_at) * 1000 AS lag
              FROM buy_orders WHERE created_at >= $1 AND created_at < $2) AS l
        """,
        a,
        b,
    )
    written = await pg_fetch(
        write_url, "SELECT count(*) FROM buy_orders WHERE created_at >= $1 AND created_at < $2", a, b
    )
    r = rows[0]
    return Lag(
        count=int(r["n"]),
        written=int(written[0][0]),
        p50_ms=float(r["p50"] or "nan"),
        p99_ms=float(r["p99"] or "nan"),
        max_ms=float(r["mx"] or "nan"),
    )


# ---------------------------------------------------------------- backlog sampler


@dataclass
class BacklogSampler:
    """Samples, every `every_s`, the relay backlog (unpublished outbox rows) and the projector
    backlog (ready messages in pydist.read_model_sync), in a thread with its own loop."""

    write_url: str
    amqp_url: str
    every_s: float = 1.0
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> BacklogSampler:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._loop()), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    async def _loop(self) -> None:
        pg = await asyncpg.connect(self.write_url, timeout=10)
        amqp = await aio_pika.connect(self.amqp_url, timeout=10)
        try:
            channel = await amqp.channel()
            t0 = time.monotonic()
            while not self._stop.is_set():
                outbox = int(await pg.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL"))
                queue = await channel.declare_queue(QUEUE, passive=True)
                ready = int(queue.declaration_result.message_count or 0)
                self.samples.append((time.monotonic() - t0, outbox, ready))
                await asyncio.sleep(self.every_s)
        finally:
            await pg.close()
            await amqp.close()

    def slope_per_s(self) -> float:
        """Least-squares growth of the total backlog, rows per second (0 = steady)."""
        pts = [(t, o + q) for t, o, q in self.samples]
        if len(pts) < 3:
            return float("nan")
        n = len(pts)
        mt = sum(t for t, _ in pts) / n
        mv = sum(v for _, v in pts) / n
        den = sum((t - mt) ** 2 for t, _ in pts)
        return sum((t - mt) * (v - mv) for t, v in pts) / den if den else float("nan")

    def totals(self) -> list[int]:
        return [o + q for _, o, q in self.samples]


# ---------------------------------------------------------------- relay and its baseline

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
        committed = time.time()
        deadline = time.monotonic() + timeout_s
        while True:
            left = int(
                await conn.fetchval(
                    "SELECT count(*) FROM outbox WHERE published_at IS NULL AND id > $1", start_id
                )
            )
            if left == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"relay left {left} of {n} events unpublished after {timeout_s}s")
            await asyncio.sleep(0.02)
        last: datetime = await conn.fetchval("SELECT max(published_at) FROM outbox WHERE id > $1", start_id)
    finally:
        await conn.close()
    return float(n / max(last.timestamp() - committed, 1e-6))


def _sample_event() -> BuyOrderCreated:
    order = BuyOrder(
        id=uuid.uuid4(),
        idempotence_key=uuid.uuid4(),
        created_at=datetime.now(UTC),
        currency=Currency.USD,
        currency_amount=Decimal("10.00"),
        btc_rate=Decimal("97000.00"),
        btc_amount=BULK_BTC,
    )
    return BuyOrderCreated(uuid.uuid4(), order, uuid.uuid4().hex)


async def raw_publish(amqp_url: str, n: int, in_flight: int = 500) -> float:
    """The baseline: aio-pika alone, one event per message (the v1 message), publisher confirms,
    persistent, into a quorum queue like the relay's, at most `in_flight` unconfirmed at any
    time. Returns msgs/s (= events/s)."""
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange("bench.raw", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("bench.raw", durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, routing_key="#")
        template = _sample_event()
        window = asyncio.Semaphore(in_flight)

        async def one() -> None:
            async with window:
                event = BuyOrderCreated(uuid.uuid4(), template.order, template.request_id)
                await exchange.publish(single_event(event), routing_key=BUY_ORDER_CREATED, mandatory=True)

        started = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(n))), timeout=120)
        elapsed = time.perf_counter() - started
        await queue.purge()
        await queue.delete(if_unused=False, if_empty=False)
        await exchange.delete()
    finally:
        await connection.close()
    return n / elapsed


async def purge_sync_queue(amqp_url: str) -> int:
    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, passive=True)
        result = await queue.purge()
        return int(result.message_count or 0)
    finally:
        await connection.close()


# ---------------------------------------------------------------- place_orders() by batch size


async def place_orders_cost(url: str, sizes: tuple[int, ...], orders: int) -> dict[int, dict[str, float]]:
    """Call place_orders() directly (one connection, no HTTP) with batches of each size, `orders`
    orders per size: wall time per call and the backend's CPU per order (read from /proc, as the
    database runs on this machine). This is the time the cap row stays locked, per batch."""
    conn = await asyncpg.connect(url, timeout=10)
    out: dict[int, dict[str, float]] = {}
    try:
        pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
        for n in sizes:
            calls = max(10, orders // n)
            payloads = [
                orjson.dumps(
                    [
                        {
                            "key": str(uuid.uuid4()),
                            "currency": "USD",
                            "amount": "10.00",
                            "rate": "97000.00",
                            "btc": "0.00010310",
                            "request_id": None,
                        }
                        for _ in range(n)
                    ]
                ).decode()
                for _ in range(calls)
            ]
            await conn.fetch("SELECT * FROM place_orders($1::jsonb)", payloads[0])  # warm plan cache
            cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
            for payload in payloads[1:]:
                await conn.fetch("SELECT * FROM place_orders($1::jsonb)", payload)
            wall, cpu = time.perf_counter() - t0, _cpu_seconds(pid) - cpu0
            done = (calls - 1) * n
            out[n] = {
                "call_ms": 1000 * wall / (calls - 1),
                "cpu_us_per_order": 1e6 * cpu / done,
                "orders_per_s": done / wall,
            }
    finally:
        await conn.close()
    return out


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
