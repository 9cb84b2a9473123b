"""Fault tests on the real engines (issue 11, item 3): pydist's own processes on a private 3-node
RabbitMQ cluster and two private PostgreSQL servers (tests/support/real_stack.py), faults done
to the engines themselves while orders arrive at a steady rate.

Every test keeps the client's own record of its 200s (idempotency key and order id) and counts
lost and duplicated orders against the write model and the read model by direct SQL
(tests/support/real_stack.books), never through `pydist read-model check`. Each prints a
``SUMMARY`` line (sent, accepted, write model, read model, lost, duplicated, time to recover)
and a ``FIGURES`` JSON line, also appended to $PYDIST_FAULT_REPORT when set.

Bounds: the ones the requirements name (a pipeline working again within 10 s of the leader's
kill, a 503 within 5 s) are asserted as given; every other bound is at least 3x the typical value
measured on the 2-core test machine under the test's own load (the figures are in the comments
and in docs/reliability.md, "Real engines"). Waits are for conditions; the load generator and the
fault's own duration are the only sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest

from pydist.adapters.rabbit import DEAD_LETTER_QUEUE, QUEUE
from pydist.devtools.coinbase_stub import CoinbaseStub
from tests.faults.conftest import Timings
from tests.support import db as testdb
from tests.support.faults import (
    CLIENT_LIMITS,
    PROBLEM_JSON,
    Attempt,
    OrderLoad,
    all_poised,
    bad_answers,
    compare_models,
    put_order,
    tally,
    wait_converged,
    wait_for,
    wait_priced,
)
from tests.support.private_services import (
    MissingBinaryError,
    PrivatePostgres,
    RabbitCluster,
)
from tests.support.private_services import wait_for as wait_for_sync
from tests.support.real_stack import (
    Books,
    RealStack,
    books,
    no_answers,
    real_stack,
    scalar,
    summary,
)

T = TypeVar("T")

pytestmark = pytest.mark.timeout(300)

RATE = 30.0  # orders per second from the steady load, spread over the four create processes
WARM_S = 2.0  # steady load before each fault
AFTER_S = 3.0  # steady load after recovery
PG_OUTAGE_S = 3.0  # how long a crashed PostgreSQL stays down
BROKER_DOWN_S = 3.0  # how long every RabbitMQ node stays down
PRICE_OUTAGE_S = 4.0  # how long btc_price stays killed / frozen (> PRICE_MAX_AGE_S: quotes expire)
PRICE_MAX_AGE_S = 2.0  # base_env's PRICE_MAX_AGE_S: a create process may use its cached quote that long

# Required by issue 11 (asserted as given, whatever is measured):
PIPELINE_BACK_S = 10.0  # leader killed -> first order created after the kill in the read model
ANSWER_S = 5.0  # a request during an outage is answered (503) within this

# Measured here (typical, under the test's own load, 2 shared cores) -> the bound used, >= 3x:
CONVERGE_S = 60.0  # read model caught up after the load: typical 0.03-1.2 s
BROKER_BOOT_S = 450.0  # start_all called -> first new order in the read model: 17-31 s, but RabbitMQ's
# own boot dominates it (start_all took 19-139 s here depending on the machine's load)
BROKER_CATCHUP_S = 20.0  # start_all returned -> the outage's backlog in the read model: 0.04-0.5 s
# (the relay's retry backoff is capped at 5 s)
PG_BACK_S = 15.0  # PostgreSQL started again -> first 200 / fetch 200 / sync projecting: 0.03-3.2 s
PRICE_BACK_S = 15.0  # btc_price up again (restarted or resumed) -> first 200: 0.02-0.5 s
QUEUE_WHOLE_S = 120.0  # killed node restarted -> the queue back on 3 online members: 11-24 s


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def read_pg(service_timings: Timings) -> Iterator[PrivatePostgres]:
    """The read model's own private PostgreSQL server (the write model is on `private_pg`), so
    either can crash alone."""
    try:
        pg = PrivatePostgres.create()
    except MissingBinaryError as exc:
        pytest.fail(f"fault tests need the machine's real engines: {exc}", pytrace=False)
    try:
        service_timings.record("private_pg_read_startup_s", round(pg.startup_seconds or 0.0, 3))
        yield pg
    finally:
        service_timings.record("private_pg_read_timings_s", pg.timings)
        pg.close()
        assert not pg.leaked_processes()


@pytest.fixture(scope="module")
def stack(
    rabbit_cluster: RabbitCluster,
    private_pg: PrivatePostgres,
    read_pg: PrivatePostgres,
    coinbase: CoinbaseStub,
    service_timings: Timings,
) -> Iterator[RealStack]:
    _heal(rabbit_cluster)
    if not private_pg.running():
        private_pg.start()
    with real_stack(rabbit_cluster, private_pg, read_pg, coinbase.url) as s:
        service_timings.record("real_stack_startup_s", round(s.startup_s, 3))
        yield s


def _heal(cluster: RabbitCluster) -> None:
    down = [n for n in cluster.names if n not in cluster.running()]
    if down and len(down) == len(cluster.names):
        cluster.start_all()
    else:
        for node in down:
            cluster.start(node)
    if down:
        cluster.wait_running(cluster.names)


@pytest.fixture
async def ready(stack: RealStack, stub: CoinbaseStub) -> AsyncIterator[RealStack]:
    """Every node, server and process up, empty models, cap and queues, every price served."""
    await asyncio.to_thread(_heal, stack.cluster)
    await asyncio.to_thread(stack.healthy)
    await stack.settle_and_reset()
    await wait_priced(stack.url("price"), timeout=30)
    yield stack
    assert not stack.dead(), f"processes died during the test: {stack.dead()}\n{stack.logs()}"


@pytest.fixture
def emit(capsys: pytest.CaptureFixture[str]) -> Callable[..., dict[str, Any]]:
    """Print a test's SUMMARY and FIGURES lines on the terminal, whatever pytest's capture mode."""

    def _emit(
        test: str, b: Books, recover_s: float | None, attempts: list[Attempt], **extra: Any
    ) -> dict[str, Any]:
        extra["no_answers"] = no_answers(attempts)
        s = summary(test, b, None if recover_s is None else round(recover_s, 3), **extra)
        with capsys.disabled():
            print(f"\n{s['line']}\nFIGURES {json.dumps(s['record'], default=str)}")
        return s["record"]

    return _emit


# ------------------------------------------------------------------------------------ helpers


async def blocking(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking engine operation off the event loop, so the load keeps its pace meanwhile."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    t0 = time.monotonic()
    result = await blocking(fn, *args)
    return result, time.monotonic() - t0


def _utc(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, tz=UTC)


async def first_created_after(
    url: str, since_wall: float, *, origin_wall: float | None = None, timeout: float, what: str
) -> float:
    """Seconds from wall-clock `origin_wall` (default `since_wall`) until an order created after
    `since_wall` is seen in `url`'s buy_orders (polled every 20 ms; connection failures while the
    server is down are retried)."""
    since = _utc(since_wall)
    origin = since_wall if origin_wall is None else origin_wall
    deadline = time.monotonic() + timeout
    conn: asyncpg.Connection | None = None
    try:
        while time.monotonic() < deadline:
            try:
                if conn is None:
                    conn = await asyncpg.connect(url, timeout=2)
                if await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM buy_orders WHERE created_at > $1)", since
                ):
                    return time.time() - origin
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                if conn is not None:
                    conn.terminate()
                conn = None
            await asyncio.sleep(0.02)  # polling pace
    finally:
        if conn is not None:
            await conn.close()
    raise AssertionError(f"{what}: no order created after the fault in the read model within {timeout}s")


async def first_200_after(load: OrderLoad, at: float, *, timeout: float, what: str) -> float:
    """Seconds from load time `at` until a new order sent after it was answered 200."""

    async def answered() -> bool:
        return any(a.status == 200 and a.started >= at and a.phase != "replay" for a in load.attempts)

    await wait_for(answered, timeout=timeout, interval=0.02, what=what)
    return min(a.finished for a in load.attempts if a.status == 200 and a.started >= at) - at


async def retry_refused(load: OrderLoad) -> Counter[str]:
    """Retry every non-200 with its own key, as the 503 says a client should: each must now be a
    200, created (nothing had been written) or replayed (the commit happened, its answer was lost)."""
    outcome: Counter[str] = Counter()
    async with httpx.AsyncClient(timeout=15) as client:
        for a in [a for a in load.attempts if a.status != 200 and a.phase != "retry"]:
            again = Attempt(a.key, a.currency, a.amount, "retry", a.url, load.now())
            await put_order(client, again)
            outcome[f"{again.status}:{'replayed' if again.replayed else 'created'}"] += 1
            load.attempts.append(again)
    return outcome


def not_store_503(attempts: list[Attempt]) -> list[str]:
    return [
        f"{a.status} {a.body}"
        for a in attempts
        if a.status == 503 and (a.body or {}).get("type") != "/problems/store-unavailable"
    ]


def queue_whole(cluster: RabbitCluster, via: str | None = None) -> dict[str, Any] | None:
    """The sync queue's state once it has its 3 members online and a leader, else None."""
    try:
        info = cluster.queue_info(QUEUE, via=via)
    except Exception:  # a node still booting may not answer the CLI yet
        return None
    members, online = sorted(info.get("members") or []), sorted(info.get("online") or [])
    whole = members == online == sorted(cluster.names) and info.get("leader") in cluster.names
    return info if whole else None


def connected_nodes(stack: RealStack, label: str, since: float) -> list[int]:
    """The AMQP ports `label` (relay or sync) connected to after wall-clock time `since`."""
    return [int(e["node"].rsplit(":", 1)[1]) for e in stack.events(label, "broker_connected", since)]


@dataclass
class Fetches:
    """GET /buy_orders polled every 50 ms: when each was sent (load time), took, and answered."""

    url: str
    load: OrderLoad
    answers: list[tuple[float, float, int | None, str]]

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while not stop.is_set():
                started = self.load.now()
                t0 = time.monotonic()
                try:
                    r = await client.get(self.url)
                    status, ctype = r.status_code, r.headers.get("content-type", "")
                except httpx.HTTPError as exc:
                    status, ctype = None, type(exc).__name__
                self.answers.append((started, time.monotonic() - t0, status, ctype))
                await asyncio.sleep(0.05)  # polling pace


# ------------------------------------------------------------------------------------ 1. leader


@pytest.mark.timeout(600)  # the first test also starts the cluster (28-51 s) and the stack (23-95 s)
async def test_quorum_leader_killed(
    ready: RealStack, cluster_all_up: RabbitCluster, emit: Callable[..., dict[str, Any]]
) -> None:
    """kill -9 of the node leading pydist.read_model_sync during load: nothing lost or duplicated,
    the pipeline working again on the surviving nodes within 10 s. The node is started again."""
    stack, cluster = ready, cluster_all_up
    info = await blocking(
        wait_for_sync, lambda: queue_whole(cluster), timeout=QUEUE_WHOLE_S, what="queue whole"
    )
    leader = info["leader"]
    survivors = [n for n in cluster.names if n != leader]
    survivor_ports = {cluster.node(n).amqp_port for n in survivors}
    on_leader = {
        label: (connected_nodes(stack, label, 0.0) or [0])[-1] == cluster.node(leader).amqp_port
        for label in ("relay", "sync")
    }
    pids = stack.pids("relay", "sync")

    async with OrderLoad(stack.create_urls, rate=RATE) as load:
        await asyncio.sleep(WARM_S)
        load.phase = "fault"
        kill_wall = time.time()
        killed_pid, kill_s = await timed(cluster.kill, leader)
        # Orders created once the node is gone can only reach the read model through the others.
        back_s = await first_created_after(
            stack.dbs.read_url,
            kill_wall + kill_s,
            origin_wall=kill_wall,
            timeout=PIPELINE_BACK_S * 3,
            what="pipeline after leader kill",
        )
        load.phase = "after"
        await asyncio.sleep(AFTER_S)
    converge_s = await wait_converged(stack.dbs, CONVERGE_S)
    b = await books(stack.dbs, load.attempts)
    diff = await compare_models(stack.dbs, load.accepted())
    new_leader = await blocking(cluster.quorum_leader, QUEUE, via=survivors[0])
    dlq = await blocking(lambda: int(cluster.queue_info(DEAD_LETTER_QUEUE, via=survivors[0])["messages"]))
    reconnected = {label: connected_nodes(stack, label, kill_wall) for label in ("relay", "sync")}

    # The node comes back (for the next test): restart, rejoin, the queue whole again.
    t0 = time.monotonic()
    await blocking(cluster.start, leader)
    await blocking(cluster.wait_running, cluster.names)
    await blocking(
        wait_for_sync, lambda: queue_whole(cluster), timeout=QUEUE_WHOLE_S, what="queue whole again"
    )
    rejoin_s = time.monotonic() - t0

    emit(
        "queue_leader_killed",
        b,
        back_s,
        load.attempts,
        injected=f"kill -9 {leader} (beam pid {killed_pid}), the leader of {QUEUE}",
        relay_sync_were_on_leader=on_leader,
        new_leader=new_leader,
        reconnected_to_ports=reconnected,
        kill_s=round(kill_s, 3),
        converged_after_load_s=round(converge_s, 2),
        node_back_and_queue_whole_s=round(rejoin_s, 1),
        dlq_messages=dlq,
        **tally(load.attempts),
        **diff.figures(),
    )
    assert bad_answers(load.attempts, frozenset({200})) == [], "the create path does not use the broker"
    assert len(load.in_phase("after")) > 0
    assert back_s < PIPELINE_BACK_S, f"pipeline back after {back_s:.1f}s"
    assert new_leader in survivors
    assert stack.pids("relay", "sync") == pids, "relay and sync recover without a restart"
    for label, ports in reconnected.items():
        assert set(ports) <= survivor_ports, (label, ports, survivor_ports)
        if on_leader[label]:
            assert ports, f"{label} was on the killed node and never reconnected"
    assert dlq == 0, "healthy events were dead-lettered"
    assert b.clean(), (b, b.examples)
    assert b.lost == b.duplicated == 0
    assert b.accepted == b.write == b.read
    assert diff.clean(), diff.examples


# ------------------------------------------------------------------------------------ 2. broker


# Long: 50-207 s here, stop_all + start_all alone 26-160 s (RabbitMQ's own boot dominates); with it
# the tests/faults run took 5-10 minutes on the shared 2 cores, past the ~6 minutes the default
# run should take. PYDIST_LONG=1 runs it.
@pytest.mark.long
@pytest.mark.timeout(900)
async def test_whole_broker_restarted(
    ready: RealStack, cluster_all_up: RabbitCluster, emit: Callable[..., dict[str, Any]]
) -> None:
    """Every node stopped, then every node started again, during load: relay and sync come back by
    themselves (same PIDs), nothing lost or duplicated."""
    stack, cluster = ready, cluster_all_up
    pids = stack.pids("relay", "sync")
    async with OrderLoad(stack.create_urls, rate=RATE) as load:
        await asyncio.sleep(WARM_S)
        load.phase = "stopping"
        _, stop_s = await timed(cluster.stop_all)
        load.phase = "down"
        read_down = await scalar(stack.dbs.read_url, "SELECT count(*) FROM buy_orders")
        down_wall = time.time()
        await asyncio.sleep(BROKER_DOWN_S)  # the outage itself, every node down
        read_before_start = await scalar(stack.dbs.read_url, "SELECT count(*) FROM buy_orders")
        backlog_at_start = await scalar(
            stack.dbs.write_url, "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )
        load.phase = "starting"
        start_wall = time.time()
        # From the moment the nodes are started: the first order created after that (hence after
        # the outage) in the read model, watched while start_all waits for the whole cluster.
        back = asyncio.create_task(
            first_created_after(
                stack.dbs.read_url, start_wall, timeout=BROKER_BOOT_S, what="pipeline after broker restart"
            )
        )
        _, start_s = await timed(cluster.start_all)
        up_wall = time.time()
        load.phase = "after"
        back_s = await back

        async def backlog_drained() -> bool:
            at = _utc(start_wall)  # every order created before the nodes were started again
            sql = "SELECT count(*) FROM buy_orders WHERE created_at <= $1"
            w = await scalar(stack.dbs.write_url, sql, at)
            return bool(w == await scalar(stack.dbs.read_url, sql, at))

        await wait_for(backlog_drained, timeout=BROKER_CATCHUP_S * 2, interval=0.05, what="backlog drained")
        drained_s = time.time() - start_wall
        drained_after_up_s = max(0.0, time.time() - up_wall)
        await asyncio.sleep(AFTER_S)
    converge_s = await wait_converged(stack.dbs, CONVERGE_S)
    b = await books(stack.dbs, load.attempts)
    diff = await compare_models(stack.dbs, load.accepted())
    dlq = await blocking(lambda: int(cluster.queue_info(DEAD_LETTER_QUEUE)["messages"]))
    ready_after = {label: httpx.get(stack.url(label) + "/readyz", timeout=5).status_code for label in pids}
    emit(
        "whole_broker_restarted",
        b,
        back_s,
        load.attempts,
        injected="rabbitmqctl stop of the 3 nodes one after the other, then all 3 started again",
        stop_all_s=round(stop_s, 1),
        all_down_s=round(start_wall - down_wall, 1),
        start_all_s=round(start_s, 1),
        pipeline_back_before_start_all_returned=back_s < up_wall - start_wall,
        read_model_growth_while_down=read_before_start - read_down,
        outbox_backlog_at_start=backlog_at_start,
        backlog_drained_after_start_s=round(drained_s, 2),
        backlog_drained_after_start_all_returned_s=round(drained_after_up_s, 2),
        converged_after_load_s=round(converge_s, 2),
        same_pids=stack.pids("relay", "sync") == pids,
        dlq_messages=dlq,
        **tally(load.attempts),
        **diff.figures(),
    )
    assert bad_answers(load.attempts, frozenset({200})) == []
    assert read_before_start == read_down, "the read model grew while every node was down"
    assert backlog_at_start > 0, "no backlog: the broker was not really down under load"
    assert drained_after_up_s < BROKER_CATCHUP_S, "relay and sync slow to catch up once the broker is back"
    assert stack.pids("relay", "sync") == pids, "relay or sync was restarted"
    assert all(p.alive() for label, p in stack.procs.items() if label in pids)
    assert ready_after == {"relay": 200, "sync": 200}
    assert dlq == 0
    assert b.clean(), (b, b.examples)
    assert b.accepted == b.write == b.read
    assert diff.clean(), diff.examples


# ------------------------------------------------------------------------------------ 3. Postgres


async def test_write_model_postgres_crash(ready: RealStack, emit: Callable[..., dict[str, Any]]) -> None:
    """`pg_ctl stop -m immediate` of the write model's server during load, started again after
    3 s: requests meanwhile get a 503 within 5 s, every 200 is in both models afterwards, and the
    create processes and the relay recover by themselves."""
    stack = ready
    pids = stack.pids()
    async with OrderLoad(stack.create_urls, rate=RATE) as load:
        await asyncio.sleep(WARM_S)
        load.phase = "crash"
        crash_at = load.now()
        _, crash_s = await timed(stack.write_pg.crash)
        down_at = load.now()
        await asyncio.sleep(PG_OUTAGE_S)  # the outage itself
        up_from = load.now()
        _, start_s = await timed(stack.write_pg.start)
        up_at = load.now()
        load.phase = "after"
        back_s = await first_200_after(
            load, up_at, timeout=PG_BACK_S, what="a 200 after the write model restarted"
        )
        await asyncio.sleep(AFTER_S)
    first = list(load.attempts)  # before the retries
    during = [a for a in first if a.started >= down_at and a.finished <= up_from]
    sent_down = [a for a in first if down_at <= a.started < up_at]
    late_failures = [a for a in first if a.status != 200 and a.started > up_at + PG_BACK_S / 3]
    unacked_before_retry = (await books(stack.dbs, load.attempts)).written_unacknowledged
    retried = await retry_refused(load)
    converge_s = await wait_converged(stack.dbs, CONVERGE_S)
    b = await books(stack.dbs, load.attempts)
    diff = await compare_models(stack.dbs, load.accepted())
    emit(
        "write_model_postgres_crash",
        b,
        back_s,
        load.attempts,
        injected=f"pg_ctl stop -m immediate of the write model's server, {PG_OUTAGE_S:g} s down, then start",
        crash_s=round(crash_s, 3),
        restart_s=round(start_s, 3),
        outage_s=round(up_at - crash_at, 2),
        sent_while_down=len(sent_down),
        answered_503_while_down=sum(a.status == 503 for a in during),
        max_latency_while_down_s=round(max((a.elapsed for a in sent_down), default=0.0), 3),
        committed_without_a_200_before_retry=unacked_before_retry,
        retries=dict(retried),
        converged_s=round(converge_s, 2),
        **tally(first),
        **diff.figures(),
    )
    assert bad_answers(first, frozenset({200, 503})) == []
    # btc_price stays healthy here: a price-unavailable 503 is spurious. Seen once in three runs,
    # "btc_price unreachable: RemoteProtocolError" just after the restart: create's pooled
    # connection to btc_price, idle ~5 s during the outage, reused as uvicorn's 5 s keep-alive
    # timeout closed it (httpx's keepalive_expiry is also 5 s). A product bug, reported.
    assert not_store_503(first) == [], (
        "spurious 503 from the price path (create -> btc_price keep-alive race?)"
    )
    assert during, "no request was answered while the write model was down"
    assert all(a.status == 503 for a in during), [
        (a.status, round(a.started, 2)) for a in during if a.status != 503
    ]
    assert max(a.elapsed for a in sent_down) < ANSWER_S, "a request hung on the crashed write model"
    assert late_failures == [], [(a.status, round(a.started - up_at, 2)) for a in late_failures]
    assert all(k.startswith("200:") for k in retried), retried
    assert stack.pids() == pids, "a process was restarted"
    assert b.clean(), (b, b.examples)
    assert b.lost_from_write == 0
    assert b.lost_from_read == 0
    assert b.written_unacknowledged == 0  # after the retries every committed order has its 200
    assert b.accepted == b.write == b.read
    assert diff.clean(), diff.examples


async def test_read_model_postgres_crash(ready: RealStack, emit: Callable[..., dict[str, Any]]) -> None:
    """The read model's own server crashed during load and started again after 3 s: fetch answers
    503 within 5 s meanwhile, orders keep being accepted, read_model_sync resumes by itself."""
    stack = ready
    pids = stack.pids()
    stop = asyncio.Event()
    async with OrderLoad(stack.create_urls, rate=RATE) as load:
        fetches = Fetches(stack.url("fetch") + "/buy_orders?page_size=20", load, [])
        poller = asyncio.create_task(fetches.run(stop))
        await asyncio.sleep(WARM_S)
        load.phase = "crash"
        crash_at = load.now()
        _, crash_s = await timed(stack.read_pg.crash)
        down_at = load.now()
        down_wall = time.time()
        await asyncio.sleep(PG_OUTAGE_S)
        up_from = load.now()
        _, start_s = await timed(stack.read_pg.start)
        up_at = load.now()
        up_wall = time.time()
        load.phase = "after"

        async def fetch_back() -> bool:
            return any(s == 200 and t >= up_at for t, _, s, _ in fetches.answers)

        await wait_for(fetch_back, timeout=PG_BACK_S, interval=0.02, what="fetch answering again")
        fetch_back_s = min(t + e for t, e, s, _ in fetches.answers if s == 200 and t >= up_at) - up_at
        # sync resumes: an order created while the read model was down shows up in it
        sync_back_s = await first_created_after(
            stack.dbs.read_url,
            down_wall,
            origin_wall=up_wall,
            timeout=PG_BACK_S,
            what="sync projecting again",
        )
        await asyncio.sleep(AFTER_S)
        stop.set()
        await asyncio.wait_for(poller, timeout=15)
    converge_s = await wait_converged(stack.dbs, CONVERGE_S)
    b = await books(stack.dbs, load.attempts)
    diff = await compare_models(stack.dbs, load.accepted())
    answers = fetches.answers
    during = [(t, e, s, c) for t, e, s, c in answers if t >= down_at and t + e <= up_from]
    sent_down = [(t, e, s, c) for t, e, s, c in answers if down_at <= t < up_at]
    late = [(t, s) for t, e, s, c in answers if s != 200 and t > up_at + PG_BACK_S / 3]
    emit(
        "read_model_postgres_crash",
        b,
        max(fetch_back_s, sync_back_s),
        load.attempts,
        injected=f"pg_ctl stop -m immediate of the read model's server, {PG_OUTAGE_S:g} s down, pg_ctl start",
        crash_s=round(crash_s, 3),
        restart_s=round(start_s, 3),
        outage_s=round(up_at - crash_at, 2),
        fetches=dict(Counter(str(s) for _, _, s, _ in answers)),
        fetches_answered_while_down=len(during),
        max_fetch_latency_while_down_s=round(max((e for _, e, _, _ in sent_down), default=0.0), 3),
        fetch_back_s=round(fetch_back_s, 3),
        sync_back_s=round(sync_back_s, 3),
        converged_s=round(converge_s, 2),
        **tally(load.attempts),
        **diff.figures(),
    )
    assert bad_answers(load.attempts, frozenset({200})) == [], "the create path never reads the read model"
    assert {s for _, _, s, _ in answers} <= {200, 503}, Counter(s for _, _, s, _ in answers)
    assert during, "no fetch was answered while the read model was down"
    assert all(s == 503 and c.startswith(PROBLEM_JSON) for _, _, s, c in during), during
    assert max(e for _, e, _, _ in sent_down) < ANSWER_S
    assert late == []
    assert stack.pids() == pids
    assert b.clean(), (b, b.examples)
    assert b.accepted == b.write == b.read
    assert diff.clean(), diff.examples


# ------------------------------------------------------------------------------------ 4. btc_price


async def test_btc_price_killed_then_frozen(ready: RealStack, emit: Callable[..., dict[str, Any]]) -> None:
    """btc_price kill -9 (then restarted), later SIGSTOP (then SIGCONT), during load: new orders
    get a 503 within 5 s and nothing is written for them, replays of earlier orders are still
    answered 200 with their original body, and orders are accepted again once btc_price is back."""
    stack = ready
    price = stack.procs["price"]
    figures: dict[str, Any] = {}
    replays: list[tuple[str, Attempt]] = []

    async def replay_while(phase: str, originals: list[Attempt], until: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=15) as client:
            i = 0
            while not until.is_set():
                o = originals[i % len(originals)]
                again = Attempt(o.key, o.currency, o.amount, "replay", o.url, load.now())
                await put_order(client, again)
                replays.append((phase, again))
                i += 1
                await asyncio.sleep(0.1)  # 10 replays/s: pacing

    async with OrderLoad(stack.create_urls, rate=RATE) as load:
        await asyncio.sleep(WARM_S)
        for fault in ("killed", "frozen"):
            originals = [a for a in load.attempts if a.status == 200 and a.phase != "replay"][-20:]
            assert originals, "nothing accepted before the fault"
            load.phase = fault
            at = load.now()
            if fault == "killed":
                price.kill9()
            else:
                price = stack.procs["price"]
                price.pause()
            done = asyncio.Event()
            replayer = asyncio.create_task(replay_while(fault, originals, done))
            await asyncio.sleep(PRICE_OUTAGE_S)
            done.set()
            await replayer
            load.phase = f"after_{fault}"
            back_from = load.now()
            if fault == "killed":
                await blocking(stack.start, "price")
            else:
                price.resume()
            back_at = load.now()
            back_s = await first_200_after(
                load, back_at, timeout=PRICE_BACK_S, what=f"a 200 after btc_price {fault}"
            )
            figures[fault] = {"at": at, "back_from": back_from, "back_at": back_at, "back_s": back_s}
            await asyncio.sleep(AFTER_S)
    written = {
        r["idempotence_key"]
        for r in await testdb.fetch(stack.dbs.write_url, "SELECT idempotence_key FROM buy_orders")
    }
    converge_s = await wait_converged(stack.dbs, CONVERGE_S)
    new = [a for a in load.attempts if a.phase != "replay"]
    b = await books(stack.dbs, new)
    diff = await compare_models(stack.dbs, load.accepted())
    originals_by_key = {a.key: a for a in new if a.status == 200}
    per_fault: dict[str, Any] = {}
    for fault, f in figures.items():
        during = [a for a in new if a.phase == fault]
        # Sent once every cached quote had expired and answered before btc_price was back: these
        # can only be refused (an order waiting on a frozen btc_price that is resumed within its
        # timeout gets a fresh price, and a 200, legitimately).
        expired = [
            a for a in during if a.started > f["at"] + PRICE_MAX_AGE_S + 0.5 and a.finished < f["back_from"]
        ]
        late = [
            a
            for a in load.in_phase(f"after_{fault}")
            if a.status != 200 and a.started > f["back_at"] + PRICE_BACK_S / 3
        ]
        rs = [a for p, a in replays if p == fault]
        per_fault[fault] = {
            "sent": len(during),
            "answers": dict(Counter(str(a.status) for a in during)),
            "accepted_on_cached_quote": sum(a.status == 200 for a in during),
            "max_latency_s": round(max(a.elapsed for a in during), 3),
            "replays": dict(Counter(str(a.status) for a in rs)),
            "recover_s": round(f["back_s"], 3),
            "restart_or_resume_s": round(f["back_at"] - f["back_from"], 2),
            "_expired": expired,
            "_late": late,
            "_replays": rs,
        }
    refused_keys = {a.key for a in new if a.status != 200}
    emit(
        "btc_price_killed_then_frozen",
        b,
        max(f["back_s"] for f in figures.values()),
        load.attempts,
        injected=f"kill -9 btc_price, {PRICE_OUTAGE_S:g} s, restart; "
        f"SIGSTOP btc_price, {PRICE_OUTAGE_S:g} s, SIGCONT",
        per_fault={k: {n: v for n, v in d.items() if not n.startswith("_")} for k, d in per_fault.items()},
        refused_but_written=len(refused_keys & written),
        converged_s=round(converge_s, 2),
        **tally(new),
        **diff.figures(),
    )
    assert bad_answers(new, frozenset({200, 503})) == []
    assert all(a.body["type"] == "/problems/price-unavailable" for a in new if a.status == 503)
    assert refused_keys.isdisjoint(written), "an order refused with a 503 was written"
    for fault, d in per_fault.items():
        assert d["max_latency_s"] < ANSWER_S, (fault, d["max_latency_s"])
        assert d["_expired"], f"{fault}: no order sent once the cached quotes had expired"
        assert all(a.status == 503 for a in d["_expired"]), (fault, [a.status for a in d["_expired"]])
        assert d["_late"] == [], fault
        assert d["_replays"], fault
        for r in d["_replays"]:
            assert r.status == 200, (fault, r.status, r.body)
            assert r.replayed, (fault, r.body)
            assert r.body == originals_by_key[r.key].body
            assert r.elapsed < ANSWER_S
    assert b.clean(), (b, b.examples)
    assert b.accepted == b.write == b.read
    assert diff.clean(), diff.examples


# ------------------------------------------------------------------------------------ 5. listing


async def test_listing_walk_during_inserts(ready: RealStack, emit: Callable[..., dict[str, Any]]) -> None:
    """A client walks the whole listing (keyset pages, following Link rel=next) while orders keep
    arriving: every order visible when the walk started is seen exactly once, no row twice."""
    stack = ready
    preload, page_size = 600, 10
    fetch = stack.url("fetch")
    async with OrderLoad(stack.create_urls, rate=RATE) as load:
        # A listing long enough for many pages: a burst of orders on top of the steady load.
        gate = asyncio.Semaphore(24)

        async def one(i: int) -> None:
            async with gate:
                await load.send(10_000 + i)

        await asyncio.gather(*(one(i) for i in range(preload)))

        async def listed() -> bool:
            return int(await scalar(stack.dbs.read_url, "SELECT count(*) FROM buy_orders")) >= preload

        await wait_for(listed, timeout=CONVERGE_S, what="the preload in the read model")
        load.phase = "walk"
        visible = {r["id"] for r in await testdb.fetch(stack.dbs.read_url, "SELECT id FROM buy_orders")}
        walk_started = load.now()
        seen: list[dict[str, Any]] = []
        pages = 0
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"{fetch}/buy_orders", params={"page_size": page_size})
            while True:
                assert response.status_code == 200, response.text
                seen += response.json()["rows"]
                pages += 1
                if "next" not in response.links:
                    break
                assert pages < 10 * (preload // page_size), "the Link rel=next chain does not end"
                await asyncio.sleep(0.05)  # a client reading at its own pace, 20 pages/s
                response = await client.get(fetch + response.links["next"]["url"])
        walk_s = load.now() - walk_started
        arrived_during_walk = sum(1 for a in load.attempts if a.status == 200 and a.started >= walk_started)
        load.phase = "after"
    converge_s = await wait_converged(stack.dbs, CONVERGE_S)
    b = await books(stack.dbs, load.attempts)
    diff = await compare_models(stack.dbs, load.accepted())
    ids = [uuid.UUID(r["id"]) for r in seen]
    counts = Counter(ids)
    keys = [
        (datetime.fromisoformat(r["created_at"].replace("Z", "+00:00")), uuid.UUID(r["id"])) for r in seen
    ]
    missed = visible - set(ids)
    emit(
        "listing_walk_during_inserts",
        b,
        None,
        load.attempts,
        injected=f"a walk of every page (page_size {page_size}, 20 pages/s) while {RATE:g} orders/s arrive",
        visible_at_start=len(visible),
        pages=pages,
        rows_seen=len(ids),
        walk_s=round(walk_s, 2),
        accepted_during_walk=arrived_during_walk,
        missed_visible=len(missed),
        seen_twice=sum(n - 1 for n in counts.values()),
        converged_s=round(converge_s, 2),
        **tally(load.attempts),
        **diff.figures(),
    )
    assert bad_answers(load.attempts, frozenset({200})) == []
    assert arrived_during_walk > 0, "no order arrived during the walk"
    assert missed == set(), list(missed)[:5]
    assert all(n == 1 for n in counts.values()), [i for i, n in counts.items() if n > 1][:5]
    assert all(a > b_ for a, b_ in itertools.pairwise(keys)), "not strictly newest first"
    assert b.clean(), (b, b.examples)
    assert diff.clean(), diff.examples


# ------------------------------------------------------------------------------------ 6. races


@dataclass
class Raced:
    key: uuid.UUID
    currency: str
    amount: str
    url: str
    status: int | None = None
    content: bytes = b""
    body: Any = None
    replayed: bool = False
    error: str | None = None


async def test_races_across_four_create_processes(
    ready: RealStack, emit: Callable[..., dict[str, Any]]
) -> None:
    """240 requests at once over 4 create processes, 4 per idempotency key (one of each four
    with another amount or currency), near the last BTC of the cap, while the steady load goes
    on: one order per key, byte-identical replays, 422 for mismatches, the cap never passed and
    less than one order's worth left unused, no 5xx."""
    stack = ready
    keys, per_key = 60, 4
    # USD 400.00 .. 599.99 at 97000 USD/BTC: 0.0041 .. 0.0062 BTC; about two thirds of the keys fit.
    available = (Decimal(keys) * Decimal("0.0052") * 2 / 3).quantize(Decimal("0.00000001"))
    await testdb.reset_cap_only(stack.dbs.write_url, Decimal(100) - available)
    raced: list[Raced] = []
    for k in range(keys):
        key = uuid.uuid4()
        amount = f"{400 + (k * 7919) % 20000 / 100:.2f}"
        for j in range(per_key):
            currency, amt = "USD", amount
            if j == per_key - 1:  # the odd one out: another amount, or (every third key) another currency
                currency, amt = (
                    ("EUR", amount) if k % 3 == 0 else ("USD", f"{Decimal(amount) + Decimal('0.01')}")
                )
            raced.append(Raced(key, currency, amt, stack.create_urls[(k + j) % len(stack.create_urls)]))
    go = asyncio.Event()
    poised: list[Raced] = []

    async def fire(client: httpx.AsyncClient, r: Raced) -> None:
        poised.append(r)
        await go.wait()
        try:
            resp = await client.put(
                r.url + "/buy_order",
                json={"currency": r.currency, "amount": r.amount, "idempotence_key": str(r.key)},
            )
        except httpx.HTTPError as exc:
            r.error = type(exc).__name__
            return
        r.status, r.content = resp.status_code, resp.content
        r.replayed = resp.headers.get("idempotent-replayed") == "true"
        with contextlib.suppress(ValueError):
            r.body = resp.json()

    async with OrderLoad(stack.create_urls, rate=RATE) as load:
        await asyncio.sleep(WARM_S)
        load.phase = "race"
        clients = [httpx.AsyncClient(timeout=30, limits=CLIENT_LIMITS) for _ in range(8)]
        try:
            tasks = [asyncio.create_task(fire(clients[i % 8], r)) for i, r in enumerate(raced)]
            await all_poised(poised, tasks, len(raced))  # every task parked on the gate: they go at once
            t0 = time.monotonic()
            go.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
            race_s = time.monotonic() - t0
        finally:
            for c in clients:
                await c.aclose()
        load.phase = "after"
        await asyncio.sleep(1)  # the load's "after" phase: 1 s more of steady orders, not a wait
    converge_s = await wait_converged(stack.dbs, CONVERGE_S)
    stored = {
        r["idempotence_key"]: r
        for r in await testdb.fetch(
            stack.dbs.write_url,
            "SELECT idempotence_key, currency, currency_amount, btc_amount FROM buy_orders",
        )
    }
    used = await testdb.cap_used(stack.dbs.write_url)
    total = await testdb.order_sum(stack.dbs.write_url)
    everything = [*raced, *load.attempts]
    refused = [x for x in everything if x.status == 409]
    smallest_refused = min((Decimal(x.body["requested_btc"]) for x in refused), default=None)
    left = Decimal(100) - used
    # the client's own record, for the books: the race's 200s next to the load's
    as_attempts = [
        Attempt(r.key, r.currency, r.amount, "race", r.url, 0.0, status=r.status, body=r.body) for r in raced
    ]
    b = await books(stack.dbs, [*load.attempts, *as_attempts])
    diff = await compare_models(stack.dbs, [a for a in as_attempts if a.status == 200] + load.accepted())

    by_key: dict[uuid.UUID, list[Raced]] = {}
    for r in raced:
        by_key.setdefault(r.key, []).append(r)
    wrong: list[str] = []
    mismatch_answers: Counter[str] = Counter()
    for key, rs in by_key.items():
        s = stored.get(key)
        if s is None:  # no order for the key: every request was refused by the cap
            wrong += [f"{key}: {r.status} without an order" for r in rs if r.status != 409]
            continue
        same = [r for r in rs if (r.currency, Decimal(r.amount)) == (s["currency"], s["currency_amount"])]
        other = [r for r in rs if r not in same]
        wrong += [f"{key}: matching request got {r.status}" for r in same if r.status != 200]
        if len({r.content for r in same}) != 1:
            wrong.append(f"{key}: {len({r.content for r in same})} different 200 bodies")
        created = sum(r.status == 200 and not r.replayed for r in same)
        if created != 1:
            wrong.append(f"{key}: {created} answers 'created' (not replayed)")
        for r in other:
            mismatch_answers[str(r.status)] += 1
            if r.status == 422:
                if r.body.get("type") != "/problems/idempotency-key-reused":
                    wrong.append(f"{key}: 422 {r.body}")
            # a 409 is right only for a request evaluated before the key's order existed that
            # needed more than what was left then, which the stored (smaller) order then used
            elif not (r.status == 409 and Decimal(r.body["requested_btc"]) > s["btc_amount"]):
                wrong.append(f"{key}: mismatching request got {r.status} {r.body}")
    statuses = Counter(str(r.status) for r in raced)
    emit(
        "races_across_four_create_processes",
        b,
        None,
        load.attempts,
        injected=f"{len(raced)} requests at once, {per_key} per key over 4 create processes, "
        f"{available} BTC left under the cap",
        race_answers=dict(statuses),
        mismatching_requests=sum(mismatch_answers.values()),
        mismatching_answers=dict(mismatch_answers),
        keys_with_an_order=sum(1 for k in by_key if k in stored),
        race_s=round(race_s, 2),
        used_after_btc=str(used),
        left_unused_btc=str(left),
        smallest_refused_btc=str(smallest_refused),
        wrong=wrong[:10],
        converged_s=round(converge_s, 2),
        load=tally(load.attempts),
        **diff.figures(),
    )
    assert len(raced) >= 200
    assert all(r.error is None for r in raced), Counter(r.error for r in raced)
    assert not [x for x in everything if x.status is None or x.status >= 500], "a 5xx or no answer"
    assert set(statuses) <= {"200", "409", "422"}, statuses
    assert wrong == [], wrong[:10]
    assert mismatch_answers.get("422", 0) > 0, "no mismatching request met a stored order"
    assert used <= Decimal(100)
    assert used == Decimal(100) - available + total, "the cap row and the orders disagree"
    assert smallest_refused is not None, "nothing was refused: not near the cap"
    assert left < smallest_refused, "an order that fitted was refused"
    assert b.clean(), (b, b.examples)
    assert diff.clean(), diff.examples
