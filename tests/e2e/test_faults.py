"""Fault injection over real processes (issue 6): faults happen while orders arrive at a steady rate.

One topology per module: btc_price, two create_buy_order processes, fetch_buy_orders, relay and
read_model_sync, on private throw-away databases and a private RabbitMQ vhost. The write database
and the broker are reached through TcpProxy instances, so a test can cut them without touching
the machine's shared Postgres or RabbitMQ. Each scenario records its measured figures (see
tests/support/faults.report and docs/reliability.md). PYDIST_LONG=1 also runs the `long` variants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from pydist.adapters.db import Database
from pydist.adapters.listing import ListingStore as ReadStore
from pydist.devtools.coinbase_stub import CoinbaseStub
from pydist.service.ports import StoreUnavailableError
from tests.support import db as testdb
from tests.support.faults import (
    LONG,
    SHORT,
    Attempt,
    OrderLoad,
    Profile,
    Topology,
    all_poised,
    bad_answers,
    compare_models,
    count,
    put_order,
    report,
    settle_and_reset,
    tally,
    terminate_backends,
    topology,
    wait_converged,
    wait_for,
    wait_priced,
)
from tests.support.procs import Proc

# A safety net over each test's own bounded waits: the module's six processes start in the first
# test's set-up, which takes tens of seconds on a busy 2-core machine.
pytestmark = pytest.mark.timeout(300)

PROFILES = [
    pytest.param(SHORT, id="short"),
    pytest.param(LONG, id="long", marks=[pytest.mark.long, pytest.mark.timeout(900)]),
]
PRICE_MAX_AGE_S = 2.0  # base_env's PRICE_MAX_AGE_S
PRICE_MIN_INTERVAL_S = 0.2  # base_env's PRICE_MIN_INTERVAL_S
RELAY_BATCH = 10
"""Small, so the kill -9 test's backlog (~150 events) takes ~15 claims: at 50 a restarted relay
once drained all three before the test saw the first one marked (relay_backlog_at_kill 0)."""


@pytest.fixture(scope="module")
def topo(coinbase: CoinbaseStub) -> Iterator[Topology]:
    with topology(coinbase.url, f"f{os.getpid()}", RELAY_BATCH=str(RELAY_BATCH)) as t:
        yield t


@pytest.fixture
async def ready(topo: Topology, stub: CoinbaseStub) -> AsyncIterator[Topology]:
    """Every link up, every process alive, empty models and cap, fresh prices."""
    topo.healthy()
    await settle_and_reset(topo)
    await wait_priced(topo.system.url("price"), timeout=10)
    stub.configure(reset_hits=True)
    yield topo
    dead = [p.name for p in topo.all_procs() if not p.alive()]
    assert not dead, f"processes died during the test: {dead}\n{topo.logs()}"


def figures(load: OrderLoad, **extra: Any) -> dict[str, Any]:
    return {**tally(load.attempts), **extra}


# ------------------------------------------------------------------------------------------------
# 1. Broker down


@pytest.mark.parametrize("profile", PROFILES)
async def test_broker_outage_loses_and_duplicates_nothing(ready: Topology, profile: Profile) -> None:
    dbs = ready.dbs
    async with OrderLoad(ready.create_urls, rate=profile.rate) as load:
        await asyncio.sleep(2)
        load.phase = "outage"
        links_lost = _events(ready.proc("sync"), "consumer_link_lost")
        ready.amqp_proxy.down()
        outage_started = time.monotonic()
        # read_model_sync projects what it already holds, then notices the cut and says so; from
        # then on nothing reaches the read model until up(). Measured under this load: 0.48 s to
        # 0.54 s after the cut (it checks its channel every 0.5 s); bound 15 s.
        sync_noticed_s = await wait_for(
            lambda: _logged_more(ready.proc("sync"), "consumer_link_lost", links_lost),
            timeout=15,
            interval=0.02,
            what="read_model_sync logged consumer_link_lost after the broker link was cut",
        )
        read_at_cut = await count(dbs.read_url, "SELECT count(*) FROM buy_orders")
        await asyncio.sleep(max(0.0, profile.broker_outage_s - (time.monotonic() - outage_started)))
        read_before_up = await count(dbs.read_url, "SELECT count(*) FROM buy_orders")
        backlog_at_up = await count(dbs.write_url, "SELECT count(*) FROM outbox WHERE published_at IS NULL")
        ready.amqp_proxy.up()
        outage_s = time.monotonic() - outage_started
        load.phase = "after"
        await asyncio.sleep(3)
    recovered_s = await wait_converged(dbs, profile.converge_s)
    diff = await compare_models(dbs, load.accepted())
    during = load.in_phase("outage")
    report(
        "broker_down",
        profile,
        figures(
            load,
            outage_s=round(outage_s, 1),
            sync_noticed_cut_s=round(sync_noticed_s, 2),
            accepted_during_outage=sum(a.status == 200 for a in during),
            sent_during_outage=len(during),
            projected_while_cut=read_before_up - read_at_cut,
            outbox_backlog_at_up=backlog_at_up,
            converged_after_load_s=round(recovered_s, 1),
            **diff.figures(),
        ),
    )
    assert bad_answers(load.attempts, frozenset({200})) == []
    assert len(during) >= profile.rate * (profile.broker_outage_s - 1)
    assert read_before_up == read_at_cut, "the read model grew while the broker was cut: no real outage"
    assert backlog_at_up > 0
    assert diff.write_orders == len(load.accepted())
    assert diff.clean(), diff.examples


# ------------------------------------------------------------------------------------------------
# 2. Crash: kill -9 the relay and read_model_sync mid-stream


@pytest.mark.timeout(300)  # four process start-ups, slow on a busy 2-core machine
@pytest.mark.parametrize("profile", PROFILES)
async def test_kill9_relay_and_sync_mid_stream(ready: Topology, profile: Profile) -> None:
    dbs = ready.dbs
    backlog_sql = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
    published_sql = "SELECT count(*) FROM outbox WHERE published_at IS NOT NULL"
    read_sql = "SELECT count(*) FROM buy_orders"
    kills: dict[str, Any] = {}
    timeline: list[tuple[str, float]] = []

    def mark(event: str) -> None:
        timeline.append((event, round(load.now(), 1)))

    async with OrderLoad(ready.create_urls, rate=profile.rate) as load:
        await asyncio.sleep(1.5)
        load.phase = "crash"
        ready.kill9("sync")
        mark("kill9 sync")
        await asyncio.sleep(1)
        ready.kill9("relay")
        mark("kill9 relay")
        await asyncio.sleep(profile.crash_backlog_s)

        # relay: restart on a backlog of several batches (RELAY_BATCH), kill -9 as soon as its
        # first batch is marked published, while the next one is claimed and in flight.
        # One kept connection for the watch, so seeing the first mark costs a query, not a connect.
        watch = await asyncpg.connect(dbs.write_url)
        try:
            published = await watch.fetchval(published_sql)
            await ready.astart("relay", wait=False)
            mark("start relay")
            await wait_for(
                lambda: _fetched_above(watch, published_sql, published),
                timeout=90,
                interval=0.001,
                what="relay started publishing",
            )
            kills["relay_backlog_at_kill"] = await watch.fetchval(backlog_sql)
            ready.kill9("relay")
            mark("kill9 relay")
        finally:
            await watch.close()
        kills["relay_batches_marked_before_kill"] = (
            await count(dbs.write_url, published_sql) - published
        ) / RELAY_BATCH

        # read_model_sync: the queue holds what the killed relay confirmed; restart it together with
        # the relay (which drains the rest into the queue meanwhile); kill -9 the sync as soon as
        # the read model grows: one batch committed, more delivered and unacked.
        before = await count(dbs.read_url, read_sql)
        await ready.astart("relay", wait=False)
        await ready.astart("sync", wait=False)
        mark("start relay+sync")
        await wait_for(
            lambda: _above(dbs.read_url, read_sql, before),
            timeout=90,
            interval=0.005,
            what="read_model_sync started projecting",
        )
        kills["sync_read_rows_at_kill"] = await count(dbs.read_url, read_sql)
        kills["write_rows_at_sync_kill"] = await count(dbs.write_url, read_sql)
        ready.kill9("sync")
        mark("kill9 sync")
        await ready.astart("sync")
        mark("sync ready")
        load.phase = "after"
        await asyncio.sleep(2)
    recovered_s = await wait_converged(dbs, profile.converge_s)
    diff = await compare_models(dbs, load.accepted())
    report(
        "kill9_relay_sync",
        profile,
        figures(
            load,
            **kills,
            timeline=timeline,
            converged_after_load_s=round(recovered_s, 1),
            **diff.figures(),
        ),
    )
    assert bad_answers(load.attempts, frozenset({200})) == []
    assert kills["relay_backlog_at_kill"] > 0, "the relay was killed after it had drained everything"
    assert kills["sync_read_rows_at_kill"] < kills["write_rows_at_sync_kill"]
    assert diff.write_orders == len(load.accepted())
    assert diff.clean(), diff.examples


async def _fetched_above(conn: asyncpg.Connection, sql: str, value: int) -> bool:
    return int(await conn.fetchval(sql)) > value


async def _above(url: str, sql: str, value: int) -> bool:
    return await count(url, sql) > value


def _events(proc: Proc, event: str) -> int:
    """How many times `proc` has logged `event` (its log is one JSON object per line)."""
    n = 0
    for line in proc.log().splitlines():
        if event in line:
            with contextlib.suppress(ValueError):
                n += json.loads(line).get("event") == event
    return n


async def _logged_more(proc: Proc, event: str, before: int) -> bool:
    return _events(proc, event) > before


# ------------------------------------------------------------------------------------------------
# 3. Database blips


STORE_503 = frozenset({200, 503})


def _store_problems(attempts: list[Attempt]) -> list[str]:
    return [
        f"{a.status} {a.body}"
        for a in attempts
        if a.status == 503 and (a.body or {}).get("type") != "/problems/store-unavailable"
    ]


async def _retry_failed(load: OrderLoad) -> Counter[str]:
    """Retry every 503 with its own key, as a client should: each must now be 200, created
    (nothing had been written) or replayed (the commit happened but its answer was lost)."""
    outcome: Counter[str] = Counter()
    async with httpx.AsyncClient(timeout=10) as client:
        for a in [a for a in load.attempts if a.status != 200]:
            again = Attempt(a.key, a.currency, a.amount, "retry", a.url, 0.0)
            await put_order(client, again)
            outcome[f"{again.status}:{'replayed' if again.replayed else 'created'}"] += 1
            load.attempts.append(again)
    return outcome


@pytest.mark.parametrize("profile", PROFILES)
async def test_write_db_backends_terminated_during_load(ready: Topology, profile: Profile) -> None:
    dbs = ready.dbs
    terminated = []
    async with OrderLoad(ready.create_urls, rate=profile.rate) as load:
        await asyncio.sleep(1.5)
        load.phase = "blips"
        for _ in range(3 if profile is SHORT else 8):
            terminated.append(await terminate_backends(dbs.write_url))
            await asyncio.sleep(0.7)
        load.phase = "after"
        after_started = load.now()
        await asyncio.sleep(3)
    after = load.in_phase("after")
    failed_after = [a for a in after if a.status != 200]
    last_failure_after_s = max((a.started - after_started for a in failed_after), default=0.0)
    retried = await _retry_failed(load)
    recovered_s = await wait_converged(dbs, profile.converge_s)
    diff = await compare_models(dbs, load.accepted())
    report(
        "write_db_terminate_backends",
        profile,
        figures(
            load,
            backends_terminated=terminated,
            failed_after_last_blip=len(failed_after),
            retries=dict(retried),
            converged_s=round(recovered_s, 1),
            **diff.figures(),
        ),
    )
    assert sum(terminated) > 0
    first = [a for a in load.attempts if a.phase != "retry"]
    assert bad_answers(first, STORE_503) == []
    assert _store_problems(first) == []
    assert last_failure_after_s < 1.0, "still failing a second after the last blip: no recovery"
    assert after
    assert after[-1].status == 200
    assert all(k.startswith("200:") for k in retried), retried
    assert diff.clean(), diff.examples  # every 200 stored with its one outbox row, all projected


@pytest.mark.parametrize("profile", PROFILES)
async def test_read_db_backends_terminated_during_load(ready: Topology, profile: Profile) -> None:
    dbs = ready.dbs
    terminated = []
    fetch_url = ready.system.url("fetch") + "/buy_orders?page_size=20"
    fetches: list[tuple[str, int | None, str]] = []
    stop = asyncio.Event()

    async def poll_fetch(phase: list[str]) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = await client.get(fetch_url)
                    fetches.append((phase[0], r.status_code, r.headers.get("content-type", "")))
                except httpx.HTTPError as exc:
                    fetches.append((phase[0], None, type(exc).__name__))
                await asyncio.sleep(0.05)

    phase = ["before"]
    async with OrderLoad(ready.create_urls, rate=profile.rate) as load:
        poller = asyncio.create_task(poll_fetch(phase))
        await asyncio.sleep(1.5)
        load.phase = phase[0] = "blips"
        for _ in range(3 if profile is SHORT else 8):
            terminated.append(await terminate_backends(dbs.read_url))
            await asyncio.sleep(0.7)
        load.phase = phase[0] = "after"
        await asyncio.sleep(3)
        stop.set()
        await asyncio.wait_for(poller, timeout=15)
    recovered_s = await wait_converged(dbs, profile.converge_s)
    diff = await compare_models(dbs, load.accepted())
    fetch_codes = Counter(str(code) for _, code, _ in fetches)
    fetch_after = [code for p, code, _ in fetches if p == "after"]
    report(
        "read_db_terminate_backends",
        profile,
        figures(
            load,
            backends_terminated=terminated,
            fetch_answers=dict(fetch_codes),
            fetch_failed_after_blips=sum(c != 200 for c in fetch_after[5:]),
            converged_s=round(recovered_s, 1),
            **diff.figures(),
        ),
    )
    assert sum(terminated) > 0
    assert bad_answers(load.attempts, frozenset({200})) == []  # the create path never reads it
    assert set(fetch_codes) <= {"200", "503"}, fetches
    assert all(ct.startswith("application/problem+json") for _, c, ct in fetches if c == 503)
    assert fetch_after
    assert all(c == 200 for c in fetch_after[5:]), fetch_after
    assert diff.clean(), diff.examples


@pytest.mark.parametrize("profile", PROFILES)
async def test_write_db_unreachable_for_seconds(ready: Topology, profile: Profile) -> None:
    dbs = ready.dbs
    async with OrderLoad(ready.create_urls, rate=profile.rate) as load:
        await asyncio.sleep(1.5)
        load.phase = "outage"
        ready.pg_proxy.down()
        down_at = load.now()
        await asyncio.sleep(profile.db_outage_s)
        ready.pg_proxy.up()
        up_at = load.now()
        load.phase = "after"
        await asyncio.sleep(3)
    sent_down = [a for a in load.in_phase("outage") if a.started > down_at + 0.2]
    # answered while the database was unreachable; one sent just before `up()` may legitimately
    # reach it on its retry and get a 200, so the 503 claim is about answers given while down
    during = [a for a in sent_down if a.finished < up_at]
    after = load.in_phase("after")
    first_ok_after = min((a.finished - up_at for a in after if a.status == 200), default=None)
    failed_late = [a for a in after if a.status != 200 and a.started > up_at + 1.5]
    retried = await _retry_failed(load)
    recovered_s = await wait_converged(dbs, profile.converge_s)
    diff = await compare_models(dbs, load.accepted())
    report(
        "write_db_proxy_down",
        profile,
        figures(
            load,
            outage_s=round(up_at - down_at, 1),
            answered_503_during=sum(a.status == 503 for a in during),
            sent_during=len(during),
            first_200_after_up_s=None if first_ok_after is None else round(first_ok_after, 2),
            failed_1_5s_after_up=len(failed_late),
            retries=dict(retried),
            converged_s=round(recovered_s, 1),
            **diff.figures(),
        ),
    )
    first = [a for a in load.attempts if a.phase != "retry"]
    assert bad_answers(first, STORE_503) == []
    assert _store_problems(first) == []
    assert during
    assert all(a.status == 503 for a in during), [(a.status, a.started, a.finished) for a in during]
    assert all(a.status == 503 or a.finished >= up_at for a in sent_down)
    assert max(a.elapsed for a in sent_down) < 5.0, "a request hung on the dead database"
    assert first_ok_after is not None
    assert failed_late == []
    assert all(k.startswith("200:") for k in retried), retried
    assert diff.clean(), diff.examples


@pytest.mark.parametrize("profile", PROFILES)
async def test_write_db_partition_without_resets(ready: Topology, profile: Profile) -> None:
    """Packets to the write database vanish (no RST, no FIN): links hang instead of failing fast.
    Shorter than the driver's command timeout (10 s) it only delays; longer, it must end in 503s,
    each bounded by the timeouts, never a 500 or a hang, and recover when the network heals."""
    dbs = ready.dbs
    async with OrderLoad(ready.create_urls, rate=profile.rate, timeout_s=40) as load:
        await asyncio.sleep(1.5)
        load.phase = "partition"
        ready.pg_proxy.blackhole()
        cut_at = load.now()
        await asyncio.sleep(profile.partition_s)
        ready.pg_proxy.flow()
        healed_at = load.now()
        load.phase = "after"
        await asyncio.sleep(4)
    during = load.in_phase("partition")
    after = load.in_phase("after")
    failed_late = [a for a in after if a.status != 200 and a.started > healed_at + 2]
    retried = await _retry_failed(load)
    recovered_s = await wait_converged(dbs, profile.converge_s)
    diff = await compare_models(dbs, load.accepted())
    report(
        "write_db_partition",
        profile,
        figures(
            load,
            partition_s=round(healed_at - cut_at, 1),
            during=dict(Counter(str(a.status) for a in during)),
            max_latency_during_s=round(max(a.elapsed for a in during), 2),
            failed_2s_after_heal=len(failed_late),
            retries=dict(retried),
            converged_s=round(recovered_s, 1),
            **diff.figures(),
        ),
    )
    first = [a for a in load.attempts if a.phase != "retry"]
    assert bad_answers(first, STORE_503) == []
    assert _store_problems(first) == []
    # bounded by command timeout (10 s) + connect timeout (5 s) + pool timeout (5 s), with slack
    assert max(a.elapsed for a in first) < 25
    assert failed_late == []
    assert all(k.startswith("200:") for k in retried), retried
    assert diff.clean(), diff.examples


async def test_exhausted_pool_is_unavailable_not_a_crash(topo: Topology) -> None:
    """Every pooled connection busy past the pool timeout: the store says 'unavailable' (503),
    it does not raise the pool's own TimeoutError (which the edge would turn into a 500)."""
    db = Database(topo.dbs.read_url, 1, "pydist-fault-pool", acquire_timeout_s=0.5)
    store = ReadStore(db)
    async with contextlib.AsyncExitStack() as held:
        await held.enter_async_context(db.connection())  # the pool's only connection
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError):
            await store.page(10, None)
        waited = time.monotonic() - started
    page = await store.page(10, None)  # and it serves again once a connection is free
    await db.close()
    report("pool_exhausted", SHORT, {"waited_s": round(waited, 2), "rows_after": len(page.public_rows)})
    assert waited < 5


# ------------------------------------------------------------------------------------------------
# 4. Price feed faults


@pytest.mark.parametrize("mode", ["down", "slow", "garbage", "negative", "zero"])
@pytest.mark.parametrize("profile", PROFILES)
async def test_price_feed_fault_during_load(
    ready: Topology, stub: CoinbaseStub, profile: Profile, mode: str
) -> None:
    dbs = ready.dbs
    async with OrderLoad(ready.create_urls, rate=profile.rate) as load:
        await asyncio.sleep(1)
        load.phase = "fault"
        hits_before = sum(stub.hits.values())
        stub.configure(mode=mode, delay_s=10.0)
        fault_at = load.now()
        await asyncio.sleep(profile.price_fault_s)
        upstream_calls = sum(stub.hits.values()) - hits_before
        stub.configure(mode="ok")
        ok_at = load.now()
        load.phase = "after"
        await asyncio.sleep(4)
    fault = load.in_phase("fault")
    after = load.in_phase("after")
    first_ok_after = min((a.finished - ok_at for a in after if a.status == 200), default=None)
    # A 200 sent after the last good quote expired and answered before the feed came back can
    # only have been priced with a stale quote.
    stale_200 = [
        a
        for a in fault
        if a.status == 200 and a.started > fault_at + PRICE_MAX_AGE_S + 0.5 and a.finished < ok_at
    ]
    late_fail = [a for a in after if a.status != 200 and a.started > ok_at + 2.5]
    refused = [a for a in load.attempts if a.status != 200]
    refused_keys = {a.key for a in refused}
    written = await testdb.fetch(dbs.write_url, "SELECT idempotence_key FROM buy_orders")
    written_keys = {r["idempotence_key"] for r in written}
    report(
        f"price_{mode}",
        profile,
        figures(
            load,
            fault_s=round(ok_at - fault_at, 1),
            upstream_calls_during_fault=upstream_calls,
            accepted_during_fault=sum(a.status == 200 for a in fault),
            max_latency_during_fault_s=round(max(a.elapsed for a in fault), 3),
            first_200_after_feed_back_s=None if first_ok_after is None else round(first_ok_after, 2),
            written=len(written_keys),
            refused_but_written=len(refused_keys & written_keys),
        ),
    )
    assert bad_answers(load.attempts, frozenset({200, 503})) == []
    assert all(a.body["type"] == "/problems/price-unavailable" for a in refused), refused[:3]
    # The requirement's bound. That no order queues behind another order's failed call (which
    # took the slowest to 6.99 s once) is proven without timing, in tests/unit/test_prices.py.
    assert max(a.elapsed for a in load.attempts) < 5.0, "a 503 took 5 s or more"
    assert sum(a.status == 503 for a in fault) > 0, "the fault never reached the create path"
    assert stale_200 == [], [
        (round(a.started - fault_at, 2), round(a.elapsed, 2), a.url, a.body) for a in stale_200[:5]
    ]
    assert refused_keys.isdisjoint(written_keys), "a refused order was written"
    assert written_keys == {a.key for a in load.accepted()}
    assert first_ok_after is not None, "did not recover by itself"
    assert late_fail == [], "still failing 2.5 s after the feed came back"
    # The upstream call rate stays bounded however many orders arrive: one in flight per currency,
    # none sooner than PRICE_MIN_INTERVAL_S after the last.
    assert upstream_calls <= 3 * (profile.price_fault_s / PRICE_MIN_INTERVAL_S + 2)


@pytest.mark.parametrize("profile", PROFILES)
async def test_upstream_calls_stay_few_during_an_order_burst(
    ready: Topology, stub: CoinbaseStub, profile: Profile
) -> None:
    burst_s = 5.0
    hits_before = Counter(stub.hits)
    async with OrderLoad(ready.create_urls, rate=profile.price_burst_rate) as load:
        await asyncio.sleep(burst_s)
        hits = {c: stub.hits[c] - hits_before[c] for c in ("USD", "EUR", "GBP")}  # over burst_s
    report("price_burst", profile, figures(load, burst_s=burst_s, upstream_calls=hits))
    assert bad_answers(load.attempts, frozenset({200})) == []
    assert len(load.attempts) >= 300, "not a burst of hundreds of orders"
    # btc_price refreshes each currency about once per PRICE_MAX_AGE_S / 2 whatever the load: 4-5
    # calls in the 5 s here, against 100 or more orders per currency. The bound is 3x that.
    for currency, n in hits.items():
        assert n <= 3 * (burst_s / (PRICE_MAX_AGE_S / 2) + 1), (currency, n)


# ------------------------------------------------------------------------------------------------
# 5. Cap storm from two create processes


@pytest.mark.parametrize("profile", PROFILES)
async def test_cap_storm_at_the_last_btc(ready: Topology, profile: Profile) -> None:
    dbs = ready.dbs
    n, clients = profile.cap_storm_orders, profile.cap_storm_clients
    # USD 400.00 to 599.99 at 97000 USD/BTC: 0.0041 to 0.0062 BTC each; about two thirds of them fit.
    available = (Decimal(n) * Decimal("0.0052") * 2 / 3).quantize(Decimal("0.00000001"))
    await testdb.reset_cap_only(dbs.write_url, Decimal(100) - available)
    go = asyncio.Event()
    attempts: list[Attempt] = []

    async def client_task(c: int) -> None:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as client:
            mine = [
                Attempt(
                    uuid.uuid4(),
                    "USD",
                    f"{400 + (i * 7919) % 20000 / 100:.2f}",
                    "storm",
                    ready.create_urls[i % 2],
                    0.0,
                )
                for i in range(c, n, clients)
            ]
            attempts.extend(mine)
            poised.append(c)
            await go.wait()
            await asyncio.gather(*(put_order(client, a) for a in mine))

    poised: list[int] = []
    tasks = [asyncio.create_task(client_task(c)) for c in range(clients)]
    # Every client holds its orders, waiting for `go`. Measured (8 clients): 0.22-0.30 s.
    await all_poised(poised, tasks, clients)
    started = time.monotonic()
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    storm_s = time.monotonic() - started
    used = await testdb.cap_used(dbs.write_url)
    stored = await testdb.order_sum(dbs.write_url)
    refused = [a for a in attempts if a.status == 409]
    accepted = [a for a in attempts if a.status == 200]
    left = Decimal(100) - used
    smallest_refused = min((Decimal(a.body["requested_btc"]) for a in refused), default=None)
    await wait_converged(dbs, profile.converge_s)
    diff = await compare_models(dbs, accepted)
    report(
        "cap_storm",
        profile,
        {
            **tally(attempts),
            "clients": clients,
            "create_processes": 2,
            "storm_s": round(storm_s, 2),
            "available_before_btc": str(available),
            "used_after_btc": str(used),
            "left_unused_btc": str(left),
            "smallest_refused_btc": str(smallest_refused),
            **diff.figures(),
        },
    )
    assert bad_answers(attempts, frozenset({200, 409})) == []
    assert len(attempts) >= 150
    assert accepted
    assert refused
    assert used <= Decimal(100)
    assert used == Decimal(100) - available + stored, "cap row and orders disagree"
    assert stored == sum(Decimal(a.body["buy_order"]["btc_amount"]) for a in accepted)
    assert smallest_refused is not None
    assert left < smallest_refused, "refused an order that fit"
    for a in refused:
        assert a.body["type"] == "/problems/cap-exceeded"
        # each refusal names what was available then: at least what is left now, less than asked
        assert left <= Decimal(a.body["available_btc"]) < Decimal(a.body["requested_btc"])
    assert diff.clean(), diff.examples


# ------------------------------------------------------------------------------------------------
# 6. Idempotency storm


@pytest.mark.parametrize("profile", PROFILES)
async def test_idempotency_storm_one_key_many_clients(ready: Topology, profile: Profile) -> None:
    dbs = ready.dbs
    key = uuid.uuid4()
    n = profile.idem_clients
    go = asyncio.Event()
    attempts: list[Attempt] = []

    async def one(i: int) -> None:
        # every fourth client sends another amount (and every seventh another currency)
        amount = "100.01" if i % 4 == 3 else "100.00"
        currency = "EUR" if i % 7 == 6 else "USD"
        a = Attempt(key, currency, amount, "storm", ready.create_urls[i % 2], 0.0)
        attempts.append(a)
        async with httpx.AsyncClient(timeout=30) as client:
            poised.append(i)
            await go.wait()
            await put_order(client, a)

    poised: list[int] = []
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    # Every client has its request ready, waiting for `go`. Measured (60 clients): 1.4-2.0 s,
    # about 30 ms a client (each builds its own httpx client).
    await all_poised(poised, tasks, n)
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    rows = await testdb.fetch(
        dbs.write_url,
        "SELECT currency, currency_amount FROM buy_orders WHERE idempotence_key = $1",
        key,
    )
    all_orders = await count(dbs.write_url, "SELECT count(*) FROM buy_orders")
    await wait_converged(dbs, profile.converge_s)
    ok = [a for a in attempts if a.status == 200]
    diff = await compare_models(dbs, ok)
    stored = (rows[0]["currency"], rows[0]["currency_amount"]) if rows else None
    report(
        "idempotency_storm",
        profile,
        {
            **tally(attempts),
            "clients": n,
            "mismatching_requests": sum((a.currency, Decimal(a.amount)) != stored for a in attempts),
            "orders_with_key": len(rows),
            "created_answers": sum(not a.replayed for a in ok),
            "distinct_200_bodies": len({str(a.body) for a in ok}),
            **diff.figures(),
        },
    )
    assert bad_answers(attempts, frozenset({200, 422})) == []
    assert len(rows) == 1
    assert all_orders == 1
    assert len({str(a.body) for a in ok}) == 1, "replays differ"
    assert sum(not a.replayed for a in ok) == 1
    for a in attempts:
        matches = (a.currency, Decimal(a.amount)) == stored
        assert (a.status == 200) == matches, (a.currency, a.amount, stored, a.status, a.body)
        if a.status == 422:
            assert a.body["type"] == "/problems/idempotency-key-reused"
    assert diff.clean(), diff.examples
