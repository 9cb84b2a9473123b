"""Real-process stacks shared by test_api, test_cli, test_listing, test_logs and test_processes.

Two stacks, each on its own throw-away write and read databases:

- direct: btc_price, create_buy_order, fetch_buy_orders and relay with no BROKER_URL (the relay
  projects straight into the read model);
- brokered: create_buy_order, fetch_buy_orders, relay and read_model_sync on a private RabbitMQ
  vhost, priced by the direct stack's btc_price.

They are started once for the package, all processes at once, and only if a selected test asks
for them (the `direct` / `brokered` fixtures). Between tests the databases are reset while the
processes keep running; a test that stopped or froze a process leaves it to `healthy()` to restart
it (on the same port) for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pydist.adapters.prices import RETRY_AFTER_S
from pydist.devtools.coinbase_stub import DEFAULT_PRICES, CoinbaseStub
from tests.support import db as testdb
from tests.support.procs import READY_PATHS, System, base_env, running, wait_ready
from tests.support.services import (
    Databases,
    create_databases,
    create_vhost,
    delete_vhost,
    drop_databases,
)

PRICE_MAX_AGE_S = 2.0  # base_env's PRICE_MAX_AGE_S
PROBLEM_JSON = "application/problem+json"
CURRENCIES = ("USD", "EUR", "GBP")
DIRECT = ("price", "create", "fetch", "relay")
BROKERED = ("create", "fetch", "relay", "sync")
SERVICE_NAMES = {
    "price": "btc_price",
    "create": "create_buy_order",
    "fetch": "fetch_buy_orders",
    "relay": "relay",
    "sync": "read_model_sync",
}
PYDIST = str(Path(sys.executable).with_name("pydist"))  # the installed console script


# ------------------------------------------------------------------------------ bounded waits


def wait_until(predicate: Callable[[], Any], *, timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r:.300})")
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], Awaitable[Any]], *, timeout: float, what: str, interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = await predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r:.300})")
        await asyncio.sleep(interval)


# ------------------------------------------------------------------------------ HTTP helpers


def assert_problem(response: httpx.Response, status: int, slug: str | None = None) -> dict[str, Any]:
    """RFC 9457: the status, the media type and the four members; returns the document."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == PROBLEM_JSON, response.headers
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    for member in ("type", "title", "detail"):
        assert isinstance(body[member], str), body
        assert body[member], body
    if slug is not None:
        assert body["type"] == f"/problems/{slug}", body
    return body


def order_body(currency: str, amount: str, key: str | None) -> dict[str, str]:
    body = {"currency": currency, "amount": amount}
    if key is not None:
        body["idempotence_key"] = key
    return body


Sample = tuple[str, frozenset[tuple[str, str]]]


def scrape(url: str) -> dict[Sample, float]:
    """GET /metrics and parse it with Prometheus' own parser: {(sample name, labels): value}."""
    response = httpx.get(f"{url}/metrics", timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def metric(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """Sum of every sample called `name` whose labels include `labels` (0 if there is none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def has_series(samples: dict[Sample, float], name: str, **labels: str) -> bool:
    wanted = set(labels.items())
    return any(n == name and wanted <= ls for (n, ls) in samples)


# ------------------------------------------------------------------------------ logs


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a process's output as a JSON object; fails on the first line that is not one.
    A last line without its newline is still being written by a running process: left out."""
    lines = text.split("\n")[:-1]  # the part after the last newline is incomplete (or empty)
    events = []
    for number, line in enumerate(lines, 1):
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line!r:.500}") from None
        assert isinstance(event, dict), f"line {number} is not a JSON object: {line!r:.500}"
        events.append(event)
    return events


# ------------------------------------------------------------------------------ the stacks


@dataclass
class Stack:
    name: str
    dbs: Databases
    system: System
    names: tuple[str, ...]
    price: System  # the System whose "price" process prices this stack's orders
    env: dict[str, str] = field(default_factory=dict)

    def url(self, name: str) -> str:
        if name == "price":
            return self.price.url("price")
        return self.system.url(name)

    def procs(self) -> dict[str, Any]:
        found = {n: self.system.procs[n] for n in self.names if n in self.system.procs}
        if "price" in self.price.procs:
            found["price"] = self.price.procs["price"]
        return found

    def healthy(self) -> None:
        """Restart (on its old port) whatever an earlier test stopped; resume what it froze."""
        for system, names in ((self.price, ("price",)), (self.system, self.names)):
            dead = []
            for name in names:
                proc = system.procs.get(name)
                if proc is not None:
                    proc.resume()
                if proc is None or not proc.alive():
                    dead.append(name)
            if dead:
                system.procs = {n: p for n, p in system.procs.items() if n not in dead}
                system.start(*dead, ports={n: PORTS[id(system)][n] for n in dead})

    async def settled(self) -> bool:
        """Every committed order published and projected."""
        backlog = await testdb.fetch(
            self.dbs.write_url, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL"
        )
        written = await testdb.fetch(self.dbs.write_url, "SELECT count(*) AS n FROM buy_orders")
        read = await testdb.fetch(self.dbs.read_url, "SELECT count(*) AS n FROM buy_orders")
        return bool(backlog[0]["n"] == 0 and written[0]["n"] == read[0]["n"])

    async def reset(self) -> None:
        """Empty models and cap. Waits for the sync to settle first, so no event of the previous
        test lands in the read model after the reset."""
        with contextlib.suppress(AssertionError):
            await async_wait_until(self.settled, timeout=15, what=f"{self.name} settled")
        await testdb.reset(self.dbs.write_url, self.dbs.read_url)

    async def written(self) -> int:
        rows = await testdb.fetch(self.dbs.write_url, "SELECT count(*) AS n FROM buy_orders")
        return int(rows[0]["n"])

    async def cap_used(self) -> Decimal:
        return await testdb.cap_used(self.dbs.write_url)


def prices_served(price_url: str, expected: dict[str, str]) -> bool:
    try:
        for currency in CURRENCIES:
            r = httpx.get(f"{price_url}/prices/{currency}", timeout=3)
            if r.status_code != 200 or r.json()["amount"] != expected[currency]:
                return False
    except httpx.HTTPError:
        return False
    return True


PORTS: dict[int, dict[str, int]] = {}  # id(System) → the port each of its processes started on
_RUNNING: list[Stacks] = []


@dataclass
class Stacks:
    direct: Stack
    brokered: Stack | None

    def stop(self) -> None:
        """Stop every process (SIGTERM, in parallel); `Stack.healthy()` starts them again."""
        for stack in (self.brokered, self.direct):
            if stack is not None:
                stack.system.stop_all()


def _start(*systems: tuple[System, tuple[str, ...]]) -> None:
    """Launch every process first, then wait for each: the start-ups overlap."""
    for system, names in systems:
        system.start(*(n for n in names if n not in system.procs), wait=False)
    for system, names in systems:
        for name in names:
            wait_ready(system.procs[name], timeout=90, path=READY_PATHS.get(name, "/readyz"))
        PORTS[id(system)] = {n: p.port for n, p in system.procs.items()}


@pytest.fixture(scope="package")
def feed_stub() -> Iterator[CoinbaseStub]:
    """The stacks' own Coinbase-compatible stub: their background price refreshes never show up
    in the hit counts of another module's stub."""
    stub = CoinbaseStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def feed(feed_stub: CoinbaseStub) -> CoinbaseStub:
    """The stacks' stub, healthy, default prices, hit counts reset."""
    feed_stub.reset()
    return feed_stub


@pytest.fixture(scope="package")
def stacks(request: pytest.FixtureRequest, feed_stub: CoinbaseStub) -> Iterator[Stacks]:
    items = request.session.items
    want_broker = any({"brokered", "broker_stack"} & set(getattr(item, "fixturenames", ())) for item in items)
    tag = f"e{os.getpid()}"
    # The vhost (rabbitmqctl is slow) in a thread meanwhile; the databases one after the other:
    # Alembic's migration context is process-global, so two migrations must not overlap.
    with ThreadPoolExecutor(1) as pool:
        vhost_f = pool.submit(create_vhost, tag) if want_broker else None
        emb_dbs = create_databases(f"{tag}e")
        brk_dbs = create_databases(f"{tag}b") if want_broker else None
        vhost, amqp_url = vhost_f.result(timeout=90) if vhost_f else (None, None)
    emb_env = base_env(emb_dbs.write_url, emb_dbs.read_url, feed_stub.url, None)
    emb_system = System(emb_env)
    brk_system: System | None = None
    started: Stacks | None = None
    try:
        # btc_price first (without waiting): the brokered create needs its URL.
        emb_system.start("price", wait=False)
        direct = Stack("direct", emb_dbs, emb_system, DIRECT, emb_system, emb_env)
        brokered = None
        systems = [(emb_system, DIRECT)]
        if brk_dbs is not None and amqp_url is not None:
            brk_env = base_env(brk_dbs.write_url, brk_dbs.read_url, feed_stub.url, amqp_url)
            brk_env["BTC_PRICE_URL"] = emb_system.url("price")
            brk_system = System(brk_env, log_dir=emb_system.log_dir)
            systems.append((brk_system, BROKERED))
            brokered = Stack("brokered", brk_dbs, brk_system, BROKERED, emb_system, brk_env)
        started = Stacks(direct, brokered)
        _RUNNING.append(started)
        _start(*systems)
        yield started
    finally:
        if started is not None:
            _RUNNING.remove(started)
        if brk_system is not None:
            brk_system.stop_all()
        emb_system.stop_all()
        if not os.environ.get("PYDIST_KEEP_LOGS"):
            shutil.rmtree(emb_system.log_dir, ignore_errors=True)
        drop_databases(emb_dbs)
        if brk_dbs is not None:
            drop_databases(brk_dbs)
        if vhost is not None:
            delete_vhost(vhost)


# ------------------------------------------------------------------------------ test order
# The modules that use the stacks run one after the other (their relative order kept), and the
# processes stop as soon as the last of them is done: they never idle through other modules.

STACK_MODULES = frozenset({"test_api", "test_cli", "test_listing", "test_logs", "test_processes"})


HERE = Path(__file__).parent


def _uses_stacks(item: pytest.Item) -> bool:
    path = Path(str(item.fspath))
    return path.parent == HERE and path.stem in STACK_MODULES


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    first = next((i for i, item in enumerate(items) if _uses_stacks(item)), None)
    if first is None:
        return
    ours = [item for item in items if _uses_stacks(item)]
    rest = [item for item in items[first:] if not _uses_stacks(item)]
    items[first:] = [*ours, *rest]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _RUNNING and _uses_stacks(item) and (nextitem is None or not _uses_stacks(nextitem)):
        for running in _RUNNING:
            running.stop()


CREATE_PRICE_TIMEOUT_S = 1.5  # base_env's PRICE_TIMEOUT_S + 0.5: create's bound on one price call


def _last_price_refusal(stack: Stack) -> float | None:
    """When (epoch seconds) create last logged a 503 for want of a price, if ever."""
    create = stack.system.procs.get("create")
    text = "" if create is None else create.log()
    end = len(text)
    while (at := text.rfind('"event":"upstream_unavailable"', 0, end)) >= 0:
        start, end = text.rfind("\n", 0, at) + 1, text.find("\n", at)
        event = json.loads(text[start:end])
        if str(event.get("error", "")).startswith("btc_price"):  # not a store 503
            return datetime.fromisoformat(event["timestamp"]).timestamp()
        end = start
    return None


async def create_pricing_again(stack: Stack) -> None:
    """Once btc_price serves fresh prices again: wait until create's last price 503 is older than
    one price call's bound plus its refusal window. A call in flight when btc_price turned fresh
    fails (and its orders log their 503s) within its bound; after a failure create refuses that
    currency from memory for RETRY_AFTER_S. Past both, the next order is priced."""
    quiet_s = CREATE_PRICE_TIMEOUT_S + RETRY_AFTER_S + 0.1

    def quiet() -> bool:
        refused_at = _last_price_refusal(stack)
        return refused_at is None or time.time() - refused_at > quiet_s

    await asyncio.to_thread(
        wait_until, quiet, timeout=30, what="create past its price refusals", interval=0.05
    )


async def _ready(stack: Stack, feed: CoinbaseStub, *, fresh_prices: bool = True) -> Stack:
    stack.healthy()
    await stack.reset()
    if not fresh_prices:
        return stack
    price_url = stack.url("price")
    # Every test starts from the stub's default prices, served fresh (a test may have changed them
    # or let them go stale).
    await asyncio.to_thread(
        wait_until,
        lambda: prices_served(price_url, DEFAULT_PRICES),
        timeout=15,
        what="btc_price serving the default prices",
        interval=0.1,
    )
    await create_pricing_again(stack)
    feed.configure(reset_hits=True)
    return stack


@pytest.fixture
async def direct(stacks: Stacks, feed: CoinbaseStub) -> Stack:
    """The direct stack, every process alive, empty models and cap, fresh default prices."""
    return await _ready(stacks.direct, feed)


@pytest.fixture
async def direct_any_price(stacks: Stacks, feed: CoinbaseStub) -> Stack:
    """Like `direct` but without waiting for fresh prices: for tests that break the feed anyway
    (consecutive ones then need not wait for a fresh quote to expire again)."""
    return await _ready(stacks.direct, feed, fresh_prices=False)


@pytest.fixture
def broker_stack(stacks: Stacks) -> Stack:
    """The brokered stack as it is: no reset, no restart (for tests that stop its processes)."""
    assert stacks.brokered is not None
    return stacks.brokered


@pytest.fixture
async def brokered(stacks: Stacks, feed: CoinbaseStub) -> Stack:
    """The brokered stack, every process alive, empty models and cap, fresh default prices."""
    assert stacks.brokered is not None
    return await _ready(stacks.brokered, feed)


# ------------------------------------------------------------------------------ the CLI


def run_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed `pydist` console script with the stack's environment."""
    return subprocess.run(
        [PYDIST, *args],
        env={**env, "COLUMNS": "200", "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def api_system(databases: Databases, coinbase: CoinbaseStub) -> Iterator[System]:
    """price, create and fetch on the session's databases and healthy stub, for one module."""
    coinbase.reset()
    asyncio.run(testdb.reset(databases.write_url, databases.read_url))
    env = base_env(databases.write_url, databases.read_url, coinbase.url, None)
    with running(env, "price", "create", "fetch") as started:
        yield started
