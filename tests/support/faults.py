"""Fault-injection helpers for the e2e fault tests: a steady-rate order load, a whole topology of
real processes behind TCP proxies, the write-vs-read model comparison and the measured figures.

Nothing here is mocked: the load is real HTTP against real processes, the comparison reads the real
databases, and faults are real (dropped TCP links, killed processes, terminated backends)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import httpx

from pydist.adapters.rabbit import QUEUE
from tests.support import db as testdb
from tests.support.procs import Proc, System, base_env, wait_ready
from tests.support.services import (
    PG_ADMIN_URL,
    Databases,
    create_databases,
    create_vhost,
    delete_vhost,
    drop_databases,
)
from tests.support.tcp_proxy import TcpProxy

CURRENCIES = ("USD", "EUR", "GBP")
PROBLEM_JSON = "application/problem+json"


# --------------------------------------------------------------------------------------------
# How hard each scenario pushes: a short default, a long mode (PYDIST_LONG=1, `long` marker).


@dataclass(frozen=True)
class Profile:
    name: str
    rate: float  # orders per second from the load loop
    broker_outage_s: float
    crash_backlog_s: float
    db_outage_s: float
    partition_s: float
    price_fault_s: float
    price_burst_rate: float
    cap_storm_orders: int
    cap_storm_clients: int
    idem_clients: int
    converge_s: float


SHORT = Profile(
    name="short",
    rate=30,
    broker_outage_s=8,
    crash_backlog_s=3,
    db_outage_s=3,
    partition_s=4,
    price_fault_s=4.5,
    price_burst_rate=100,
    cap_storm_orders=160,
    cap_storm_clients=8,
    idem_clients=60,
    converge_s=60,
)
LONG = Profile(
    name="long",
    rate=50,
    broker_outage_s=20,
    crash_backlog_s=8,
    db_outage_s=10,
    partition_s=15,
    price_fault_s=8,
    price_burst_rate=200,
    cap_storm_orders=600,
    cap_storm_clients=24,
    idem_clients=200,
    converge_s=120,
)


# --------------------------------------------------------------------------------------------
# Bounded waiting


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.1, what: str = ""
) -> float:
    """Poll until `predicate` is true; returns the seconds it took, raises after `timeout`."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if await predicate():
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        await asyncio.sleep(interval)


async def wait_priced(price_url: str, *, timeout: float) -> float:
    """Wait until btc_price answers 200 for every currency (each test starts with fresh prices)."""
    async with httpx.AsyncClient(timeout=2) as client:

        async def priced() -> bool:
            for currency in CURRENCIES:
                try:
                    r = await client.get(f"{price_url}/prices/{currency}")
                except httpx.HTTPError:
                    return False
                if r.status_code != 200:
                    return False
            return True

        return await wait_for(priced, timeout=timeout, what="btc_price serves every currency")


async def all_poised(poised: Sequence[object], tasks: Sequence[asyncio.Task[Any]], n: int) -> float:
    """Wait until all `n` client tasks wait for the start signal (each appends to `poised` just
    before it waits); one that failed before getting there fails the test with its own error.
    Getting ready takes up to ~35 ms a client on a busy 2-core machine; the bound is 0.15 s a
    client (10 s at least): 60 clients 10 s, 200 30 s."""

    async def all_there() -> bool:
        for task in tasks:
            if task.done():
                task.result()  # raises what the client task raised
        return len(poised) == n

    return await wait_for(
        all_there, timeout=max(10.0, 0.15 * n), interval=0.005, what=f"{n} clients ready to start"
    )


# --------------------------------------------------------------------------------------------
# The steady-rate load


CLIENT_LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=200, keepalive_expiry=2)
"""The load clients' pool. Idle connections expire well before uvicorn's 5 s keep-alive timeout
(reusing one the server is closing at that instant is a transport error that says nothing about
pydist). As many may be kept alive as opened: httpcore 1.0.9 closes "surplus" idle connections
(its count includes the busy ones) in a pass that can reach a connection another request was just
given and has started using, and that request fails with ReadError(ClosedResourceError) whether
or not the server processed it (encode/httpcore#1110). Seen twice in the real-engine broker
restart, and once (1 in 3,491) in test_kill9_relay_and_sync_mid_stream[long], under bursts of the
load with max_keepalive_connections=50."""


@dataclass
class Attempt:
    key: uuid.UUID
    currency: str
    amount: str
    phase: str
    url: str
    started: float  # seconds since the load started
    elapsed: float = 0.0
    status: int | None = None  # None: no HTTP answer (transport error or client timeout)
    content_type: str = ""
    body: Any = None
    error: str | None = None  # the exception's type, for counting
    detail: str | None = None  # the exception in full, with its cause, for reading
    replayed: bool = False  # answered with Idempotent-Replayed: true

    @property
    def finished(self) -> float:
        return self.started + self.elapsed


def amount_for(i: int) -> str:
    """Small, varied fiat amounts (10.00 .. 109.99): far from the cap, different per order."""
    return f"{10 + (i * 7919) % 10000 / 100:.2f}"


class OrderLoad:
    """PUT /buy_order at a steady `rate` from an asyncio loop, each with a fresh key, spread over
    `urls` (several create processes); every answer is recorded with the phase it was sent in."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        rate: float,
        timeout_s: float = 15.0,
        amount: Callable[[int], str] = amount_for,
    ) -> None:
        self.urls = list(urls)
        self.rate = rate
        self.timeout_s = timeout_s
        self.amount = amount
        self.attempts: list[Attempt] = []
        self.phase = "before"
        self._t0 = 0.0
        self._client: httpx.AsyncClient | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[Attempt]] = set()
        self._stop = asyncio.Event()

    def now(self) -> float:
        return time.monotonic() - self._t0

    async def __aenter__(self) -> OrderLoad:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=CLIENT_LIMITS)
        self._t0 = time.monotonic()
        self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop sending; wait (bounded by the client timeout) for every request to be answered."""
        self._stop.set()
        if self._ticker is not None:
            await self._ticker
            self._ticker = None
        if self._inflight:
            await asyncio.wait(self._inflight, timeout=self.timeout_s + 5)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _tick(self) -> None:
        period = 1.0 / self.rate
        next_at = time.monotonic()
        i = 0
        while not self._stop.is_set():
            task = asyncio.create_task(self.send(i))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)
            i += 1
            next_at += period
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=max(0.0, next_at - time.monotonic()))

    async def send(
        self,
        i: int,
        *,
        key: uuid.UUID | None = None,
        currency: str | None = None,
        amount: str | None = None,
        url: str | None = None,
    ) -> Attempt:
        assert self._client is not None, "use `async with OrderLoad(...)`"
        attempt = Attempt(
            key=key or uuid.uuid4(),
            currency=currency or CURRENCIES[i % len(CURRENCIES)],
            amount=amount or self.amount(i),
            phase=self.phase,
            url=url or self.urls[i % len(self.urls)],
            started=self.now(),
        )
        self.attempts.append(attempt)
        await put_order(self._client, attempt)
        return attempt

    # -- what happened

    def in_phase(self, *phases: str) -> list[Attempt]:
        return [a for a in self.attempts if a.phase in phases]

    def accepted(self) -> list[Attempt]:
        return [a for a in self.attempts if a.status == 200]


async def put_order(client: httpx.AsyncClient, attempt: Attempt) -> None:
    started = time.monotonic()
    try:
        response = await client.put(
            attempt.url + "/buy_order",
            json={
                "currency": attempt.currency,
                "amount": attempt.amount,
                "idempotence_key": str(attempt.key),
            },
        )
    except httpx.HTTPError as exc:
        attempt.error = type(exc).__name__
        attempt.detail = f"{exc!r} (cause: {exc.__cause__!r})"
    else:
        attempt.status = response.status_code
        attempt.content_type = response.headers.get("content-type", "")
        attempt.replayed = response.headers.get("idempotent-replayed") == "true"
        with contextlib.suppress(ValueError):
            attempt.body = response.json()
    attempt.elapsed = time.monotonic() - started


def tally(attempts: Sequence[Attempt]) -> dict[str, Any]:
    """sent / accepted / refused by code / 5xx / no answer, and the slowest answer."""
    codes = Counter(a.status for a in attempts if a.status is not None)
    return {
        "sent": len(attempts),
        "accepted_200": codes.get(200, 0),
        "refused_4xx": {str(c): n for c, n in sorted(codes.items()) if 400 <= c < 500},
        "5xx": {str(c): n for c, n in sorted(codes.items()) if c >= 500},
        "no_answer": sum(a.status is None for a in attempts),
        "no_answer_errors": dict(Counter(a.error for a in attempts if a.status is None)),
        "max_latency_s": round(max((a.elapsed for a in attempts), default=0.0), 3),
        "slowest_at_s": [
            round(a.started, 1) for a in sorted(attempts, key=lambda a: -a.elapsed)[:3] if a.elapsed > 1
        ],
    }


def bad_answers(attempts: Sequence[Attempt], allowed: frozenset[int]) -> list[str]:
    """Every answer not in `allowed`, and every error that is not problem+json, described."""
    bad = []
    for a in attempts:
        if a.status not in allowed:
            bad.append(f"{a.status} {a.error or ''} {str(a.body)[:200]} at t={a.started:.2f}")
        elif a.status is not None and a.status != 200 and not a.content_type.startswith(PROBLEM_JSON):
            bad.append(f"{a.status} not problem+json ({a.content_type}) at t={a.started:.2f}")
    return bad


# --------------------------------------------------------------------------------------------
# The models, compared


async def _rows(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


_ORDER_SQL = (
    "SELECT id, idempotence_key, created_at, currency, currency_amount, btc_rate, btc_amount FROM buy_orders"
)


@dataclass
class ModelDiff:
    write_orders: int
    read_orders: int
    lost: int  # in the write model, not in the read model
    extra: int  # in the read model, not in the write model
    duplicated: int  # read rows beyond the first for one idempotency key
    field_mismatches: int  # same id, other values
    orders_without_one_outbox_row: int
    unpublished_outbox: int
    accepted_missing_from_write: int  # a 200 whose key is not in the write model
    accepted_body_mismatches: int  # a 200 whose body is not what the write model holds
    examples: list[str] = field(default_factory=list)

    def clean(self) -> bool:
        return (
            self.lost
            == self.extra
            == self.duplicated
            == self.field_mismatches
            == self.orders_without_one_outbox_row
            == self.unpublished_outbox
            == self.accepted_missing_from_write
            == self.accepted_body_mismatches
            == 0
        )

    def figures(self) -> dict[str, int]:
        d = asdict(self)
        d.pop("examples")
        return d


def _values(r: asyncpg.Record) -> tuple[Any, ...]:
    return (
        r["idempotence_key"],
        r["created_at"],
        r["currency"],
        Decimal(r["currency_amount"]),
        Decimal(r["btc_rate"]),
        Decimal(r["btc_amount"]),
    )


def _body_matches(body: Any, r: asyncpg.Record) -> bool:
    try:
        order = body["buy_order"]
        return bool(
            uuid.UUID(body["idempotence_key"]) == r["idempotence_key"]
            and uuid.UUID(order["id"]) == r["id"]
            and order["currency"] == r["currency"]
            and Decimal(order["currency_amount"]) == r["currency_amount"]
            and Decimal(order["btc_rate"]) == r["btc_rate"]
            and Decimal(order["btc_amount"]) == r["btc_amount"]
        )
    except (KeyError, TypeError, ValueError):
        return False


async def compare_models(dbs: Databases, accepted: Sequence[Attempt] = ()) -> ModelDiff:
    write = await _rows(dbs.write_url, _ORDER_SQL)
    outbox = await _rows(dbs.write_url, "SELECT order_id, published_at FROM outbox")
    read = await _rows(dbs.read_url, _ORDER_SQL)
    by_id = {r["id"]: r for r in write}
    by_key = {r["idempotence_key"]: r for r in write}
    read_by_id = {r["id"]: r for r in read}
    outbox_per_order = Counter(r["order_id"] for r in outbox)
    read_keys = Counter(r["idempotence_key"] for r in read)
    examples: list[str] = []

    lost = [i for i in by_id if i not in read_by_id]
    extra = [i for i in read_by_id if i not in by_id]
    mismatched = [i for i, r in read_by_id.items() if i in by_id and _values(r) != _values(by_id[i])]
    no_outbox = [i for i in by_id if outbox_per_order.get(i, 0) != 1]
    missing = [a for a in accepted if a.key not in by_key]
    wrong_body = [a for a in accepted if a.key in by_key and not _body_matches(a.body, by_key[a.key])]
    for label, items in (
        ("lost", lost),
        ("extra", extra),
        ("mismatched", mismatched),
        ("outbox", no_outbox),
        ("missing", [a.key for a in missing]),
        ("body", [a.key for a in wrong_body]),
    ):
        examples += [f"{label}: {x}" for x in items[:3]]
    return ModelDiff(
        write_orders=len(write),
        read_orders=len(read),
        lost=len(lost),
        extra=len(extra),
        duplicated=sum(n - 1 for n in read_keys.values()),
        field_mismatches=len(mismatched),
        orders_without_one_outbox_row=len(no_outbox) + sum(1 for o in outbox_per_order if o not in by_id),
        unpublished_outbox=sum(1 for r in outbox if r["published_at"] is None),
        accepted_missing_from_write=len(missing),
        accepted_body_mismatches=len(wrong_body),
        examples=examples,
    )


async def wait_converged(dbs: Databases, timeout: float) -> float:
    """Wait until every outbox row is published and the read model holds every written order."""

    async def done() -> bool:
        w = await _rows(
            dbs.write_url,
            "SELECT (SELECT count(*) FROM buy_orders) AS n,"
            " (SELECT count(*) FROM outbox WHERE published_at IS NULL) AS u",
        )
        r = await _rows(dbs.read_url, "SELECT count(*) AS n FROM buy_orders")
        return bool(w[0]["u"] == 0 and r[0]["n"] >= w[0]["n"])

    return await wait_for(done, timeout=timeout, interval=0.25, what="read model caught up with writes")


async def queue_depth(amqp_url: str) -> int:
    """Messages ready in read_model_sync's queue (delivered-but-unacked ones are not counted)."""
    connection = await aio_pika.connect(amqp_url, timeout=5)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def settle_and_reset(topo: Topology, timeout: float = 30) -> None:
    """Before a test: let whatever a previous test left in flight arrive (bounded), then empty
    both models, the cap and the queue, so no stray event lands in the next test's read model."""

    async def quiet() -> bool:
        return await queue_depth(topo.amqp_url) == 0

    with contextlib.suppress(AssertionError):
        await wait_converged(topo.dbs, timeout)
        await wait_for(quiet, timeout=timeout, what="queue empty")
    await testdb.reset(topo.dbs.write_url, topo.dbs.read_url)
    connection = await aio_pika.connect(topo.amqp_url, timeout=5)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, passive=True)
        await queue.purge()
    finally:
        await connection.close()


async def count(url: str, sql: str) -> int:
    return int((await _rows(url, sql))[0][0])


async def terminate_backends(db_url: str) -> int:
    """Drop every connection to one of *our* throw-away databases (never anyone else's)."""
    dbname = urlsplit(db_url).path.lstrip("/")
    assert dbname.startswith("pydist_t_"), f"refusing to terminate backends of {dbname}"
    rows = await _rows(
        PG_ADMIN_URL,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        dbname,
    )
    return int(rows[0][0])


@dataclass
class Topology:
    """price, two create processes, fetch, relay and read_model_sync; the write database and the
    broker are reached through TcpProxy instances the test can cut. Private databases and vhost."""

    dbs: Databases
    amqp_url: str
    pg_proxy: TcpProxy
    amqp_proxy: TcpProxy
    system: System
    extra: System

    @property
    def create_urls(self) -> list[str]:
        return [self.system.url("create"), self.extra.url("create")]

    def proc(self, name: str) -> Proc:
        return self.system.procs[name]

    def all_procs(self) -> list[Proc]:
        return [*self.system.procs.values(), *self.extra.procs.values()]

    def kill9(self, name: str) -> None:
        self.system.procs.pop(name).kill9()

    async def astart(self, name: str, *, wait: bool = True) -> Proc:
        """Start a process from a thread: waiting for it must not stall the test's load loop."""
        await asyncio.to_thread(self.system.start, name, wait=wait)
        return self.system.procs[name]

    def healthy(self) -> None:
        """Between tests: links up, every process alive (restarted if a test left one dead)."""
        self.pg_proxy.up()
        self.pg_proxy.flow()
        self.amqp_proxy.up()
        for name in ("price", "create", "fetch", "relay", "sync"):
            proc = self.system.procs.get(name)
            if proc is None or not proc.alive():
                self.system.start(name)
        if not self.extra.procs["create"].alive():
            self.extra.start("create")

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path})\n{p.log()[-tail:]}" for p in self.all_procs())


@contextlib.contextmanager
def topology(coinbase_url: str, tag: str, **env_overrides: str) -> Iterator[Topology]:
    dbs = create_databases(tag)
    vhost, amqp_url = create_vhost(tag)
    pg_host, pg_port = _host_port(dbs.write_url, 5432)
    amqp_host, amqp_port = _host_port(amqp_url, 5672)
    pg_proxy = TcpProxy(pg_host, pg_port)
    pg_proxy.start()
    amqp_proxy = TcpProxy(amqp_host, amqp_port).start()
    env = base_env(pg_proxy.url_for(dbs.write_url), dbs.read_url, coinbase_url, amqp_proxy.url_for(amqp_url))
    env.update(env_overrides)
    system = System(env)
    extra = System(env, log_dir=system.log_dir)
    try:
        # Start all six at once (imports dominate start-up), then wait for each.
        system.start("price", "create", "fetch", "relay", "sync", wait=False)
        extra.env = {**env, "BTC_PRICE_URL": system.url("price")}
        extra.start("create", wait=False)
        for proc in [*system.procs.values(), *extra.procs.values()]:
            wait_ready(proc, timeout=90)
        yield Topology(dbs, amqp_url, pg_proxy, amqp_proxy, system, extra)
    finally:
        stop_together([*extra.procs.values(), *system.procs.values()])
        pg_proxy.stop()
        amqp_proxy.stop()
        drop_databases(dbs)
        delete_vhost(vhost)


def stop_together(procs: Sequence[Proc], timeout: float = 15) -> None:
    """SIGTERM every process at once, then wait for each (kill -9 after `timeout`)."""
    for proc in procs:
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{proc.name} ignored SIGTERM for {timeout}s: kill -9\n{proc.log()[-2000:]}")
            proc.kill9()


def _host_port(url: str, default: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default


# --------------------------------------------------------------------------------------------
# Measured figures: printed, and appended as JSON lines to $PYDIST_FAULT_REPORT when set.


def report(scenario: str, profile: Profile, figures: dict[str, Any]) -> None:
    line = json.dumps({"scenario": scenario, "profile": profile.name, **figures}, default=str)
    print(f"FAULT-REPORT {line}")
    target = os.environ.get("PYDIST_FAULT_REPORT")
    if target:
        with Path(target).open("a") as out:
            out.write(line + "\n")
