"""Issue 12, item 2, on real processes: with WEB_CONCURRENCY=2 a scrape of /metrics answers the
totals of every worker, whichever worker takes it.

uvicorn's workers share one listening socket, so both the requests and the scrapes below land on
whichever worker accepts first (each on its own connection). Before multiprocess mode each worker
answered from its own registry: the scrapes disagreed with each other and none showed all N
requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from pydist.devtools.coinbase_stub import DEFAULT_PRICES, CoinbaseStub
from tests.e2e.conftest import Sample, metric, scrape, wait_until
from tests.support import db as testdb
from tests.support.procs import Proc, System, base_env, wait_ready
from tests.support.services import Databases

LATENCY = "pydist_http_request_duration_seconds"
N = 200
SCRAPES = 20
CONCURRENCY = 16
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Bounds of the polls below. Measured on the shared 2-core machine (load average 2-5): a 2-worker
# serve process answered /readyz 4-16 s after launch and a killed worker was replaced within 6 s;
# the cap gauges are refreshed every second. Each bound is at least 3 times the slowest of these.
WORKERS_UP_S = 60.0
CAP_POLL_S = 10.0
STALE_FILE = "histogram_4194000.db"  # a pid no live process has


# ------------------------------------------------------------------------------ helpers


def worker_pids(proc: Proc) -> set[int]:
    """uvicorn's workers: the children of the serve process started by multiprocessing's spawn."""
    workers = set()
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.popen.pid).children():
            with contextlib.suppress(psutil.Error):  # exited meanwhile
                if any("spawn_main" in arg for arg in child.cmdline()):
                    workers.add(child.pid)
    return workers


def started_workers(proc: Proc) -> int:
    """How many workers have logged that their application started (every start, since launch)."""
    return proc.log().count("Application startup complete")


def start(system: System, name: str) -> Proc:
    system.start(name, wait=False)
    proc = system.procs[name]
    wait_ready(proc, timeout=WORKERS_UP_S, path="/readyz")
    return proc


def wait_workers(proc: Proc, started: int) -> set[int]:
    """Wait until `started` worker start-ups have been logged and 2 workers run; their pids."""

    def up() -> set[int] | None:
        assert proc.alive(), proc.log()[-3000:]
        pids = worker_pids(proc)
        return pids if started_workers(proc) >= started and len(pids) == 2 else None

    pids: set[int] = wait_until(up, timeout=WORKERS_UP_S, what=f"{started} worker start-ups", interval=0.1)
    return pids


async def load(requests: list[httpx.Request]) -> list[httpx.Response]:
    """Send every request, CONCURRENCY at a time, each on a fresh connection: the kernel hands each
    connection to whichever worker accepts it first."""
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        return await asyncio.gather(*(client.send(r) for r in requests))


async def load_both_workers(
    requests: Callable[[int], list[httpx.Request]], directory: Path, route: str, pids: set[int]
) -> int:
    """Send N requests at a time (all must succeed) until each of the workers `pids` has served
    some (else a test of their totals would prove nothing; in practice the first N suffice).
    Returns how many were sent."""
    sent = 0
    for _ in range(5):
        responses = await load(requests(N))
        assert [r.status_code for r in responses] == [200] * N, {r.status_code for r in responses}
        sent += N
        served = requests_by_worker(directory, route, pids)
        assert sum(served.values()) == sent, served
        if len(served) == len(pids) and all(n > 0 for n in served.values()):
            return sent
    raise AssertionError(f"one worker served every request: {served}")


def route_samples(samples: dict[Sample, float], route: str) -> dict[Sample, float]:
    return {
        (name, labels): value
        for (name, labels), value in samples.items()
        if name.startswith(LATENCY) and ("route", route) in labels
    }


def requests_by_worker(directory: Path, route: str, pids: set[int]) -> dict[int, float]:
    """From the multiprocess files: how many requests to `route` each of the worker `pids` has
    counted."""
    counts: dict[int, float] = {}
    for path in glob.glob(str(directory / "histogram_*.db")):
        pid = int(Path(path).stem.rsplit("_", 1)[1])
        if pid not in pids:
            continue
        for family in MultiProcessCollector.merge([path]):
            for s in family.samples:
                if s.name == f"{LATENCY}_count" and s.labels.get("route") == route:
                    counts[pid] = counts.get(pid, 0) + s.value
    return counts


def assert_every_scrape_complete(url: str, route: str, expected: dict[tuple[str, str], float]) -> None:
    """SCRAPES scrapes, each on its own connection: every one shows the same samples for `route`,
    and `expected` ({(sample name, status): value}) among them."""
    first: dict[Sample, float] | None = None
    for i in range(SCRAPES):
        samples = route_samples(scrape(url), route)
        for (name, status), value in expected.items():
            assert metric(samples, name, route=route, status=status) == value, (i, name, status, samples)
        if first is None:
            first = samples
        assert samples == first, f"scrape {i} differs from scrape 0"


def assert_no_pid_labels(samples: dict[Sample, float]) -> None:
    for name, labels in samples:
        assert "pid" not in dict(labels), name


def events(proc: Proc) -> list[dict[str, object]]:
    out = []
    for line in proc.log().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line still being written
    return out


def plant_stale_file(directory: Path) -> None:
    """What a previous run of the service would have left: 1000 requests of a dead worker."""
    stale = MmapedDict(str(directory / STALE_FILE))
    labels = ["service", "method", "route", "status"]
    values = ["fetch_buy_orders", "GET", "/buy_orders", "200"]
    key = mmap_key(LATENCY, f"{LATENCY}_bucket", [*labels, "le"], [*values, "+Inf"], "stale")
    stale.write_value(key, 1000.0, 0.0)
    stale.close()


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(databases: Databases, coinbase: CoinbaseStub) -> dict[str, str]:
    coinbase.reset()
    asyncio.run(testdb.reset(databases.write_url, databases.read_url))
    env = base_env(databases.write_url, databases.read_url, coinbase.url, None)
    env.pop(MULTIPROC_ENV, None)
    env["WEB_CONCURRENCY"] = "2"
    return env


@pytest.fixture
def system(env: dict[str, str]) -> Iterator[System]:
    started = System(dict(env))
    yield started
    started.stop_all()


# ------------------------------------------------------------------------------ tests


async def test_fetch_with_two_workers_every_scrape_shows_every_request(
    system: System, tmp_path: Path
) -> None:
    # An operator-set directory is honoured, and wiped at start (the stale file would add 1000).
    directory = tmp_path / "multiproc"
    directory.mkdir()
    plant_stale_file(directory)
    system.env[MULTIPROC_ENV] = str(directory)
    proc = start(system, "fetch")
    pids = wait_workers(proc, started=2)

    url = proc.url

    def pages(n: int) -> list[httpx.Request]:
        return [httpx.Request("GET", f"{url}/buy_orders") for _ in range(n)]

    sent = await load_both_workers(pages, directory, "/buy_orders", pids)

    assert_every_scrape_complete(url, "/buy_orders", {(f"{LATENCY}_count", "200"): sent})
    assert not (directory / STALE_FILE).exists()
    samples = scrape(url)
    assert metric(samples, f"{LATENCY}_bucket", route="/buy_orders", status="200", le="+Inf") == sent
    assert_no_pid_labels(samples)
    # Each process exposes only its own series, in multiprocess mode too: the workers' files hold
    # every unlabelled metric pydist.metrics defines, at 0.
    names = {name for name, _ in samples}
    for foreign in (
        "pydist_cap_used_btc",
        "pydist_orders_replayed_total",
        "pydist_write_batch_orders_count",
        "pydist_outbox_backlog",
        "pydist_events_published_total",
        "pydist_read_model_lag_seconds_count",
    ):
        assert foreign not in names, foreign

    assert proc.stop() == 0
    assert directory.is_dir()  # the operator's directory stays; its files are the operator's


async def test_create_with_two_workers_counts_survive_a_dead_worker(
    system: System, stub: CoinbaseStub, databases: Databases
) -> None:
    system.start("price")
    proc = start(system, "create")
    first = wait_workers(proc, started=2)
    url = proc.url
    rate = Decimal(DEFAULT_PRICES["USD"])
    # The directory the serve process made for this run (and logged).
    made = [e for e in events(proc) if e.get("event") == "metrics_multiprocess"]
    assert len(made) == 1, made
    directory = Path(str(made[0]["directory"]))
    assert directory.is_dir()

    def orders(n: int) -> list[httpx.Request]:
        return [
            httpx.Request(
                "PUT",
                f"{url}/buy_order",
                json={"currency": "USD", "amount": "10.00", "idempotence_key": str(uuid.uuid4())},
            )
            for _ in range(n)
        ]

    sent = await load_both_workers(orders, directory, "/buy_order", first)
    btc = (Decimal("10.00") / rate).quantize(Decimal("0.00000001"), rounding="ROUND_UP")

    def totals_are(n: int) -> None:
        assert_every_scrape_complete(url, "/buy_order", {(f"{LATENCY}_count", "200"): n})
        samples = scrape(url)
        assert metric(samples, "pydist_orders_created_total", currency="USD") == n
        assert metric(samples, "pydist_write_batch_orders_sum") == n
        assert_no_pid_labels(samples)

    totals_are(sent)

    # The cap and outbox gauges (multiprocess_mode="mostrecent"): one series each, the write
    # model's figures. No relay runs here, so every order sent is still in the outbox.
    def cap_shown(n: int) -> bool:
        samples = scrape(url)
        used = [v for (name, _), v in samples.items() if name == "pydist_cap_used_btc"]
        remaining = [v for (name, _), v in samples.items() if name == "pydist_cap_remaining_btc"]
        backlog = [v for (name, _), v in samples.items() if name == "pydist_outbox_backlog"]
        return (
            used == [float(btc * n)]
            and remaining == [float(100 - btc * n)]
            and len(backlog) == 1
            and backlog[0] >= n
        )

    assert await testdb.cap_used(databases.write_url) == btc * sent
    wait_until(lambda: cap_shown(sent), timeout=CAP_POLL_S, what="the cap gauges to show the cap row")
    assert all(cap_shown(sent) for _ in range(SCRAPES))

    # A worker dies: uvicorn replaces it; the dead worker's counts stay in the totals, and the
    # supervisor marks it dead for prometheus-client.
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    second = wait_workers(proc, started=3)
    assert victim not in second
    wait_until(
        lambda: any(
            e.get("event") == "metrics_worker_exited" and e.get("pid") == victim for e in events(proc)
        ),
        timeout=WORKERS_UP_S,
        what="the supervisor to mark the dead worker",
    )
    totals_are(sent)
    responses = await load(orders(50))
    assert [r.status_code for r in responses] == [200] * 50
    totals_are(sent + 50)
    wait_until(lambda: cap_shown(sent + 50), timeout=CAP_POLL_S, what="the cap gauges after the restart")

    # The run's own directory goes when the serve process stops.
    assert proc.stop() == 0
    assert not directory.exists()

    # btc_price runs one process: its registry is the plain in-process one, price age included.
    samples = scrape(system.url("price"))
    assert metric(samples, "pydist_price_age_seconds", currency="USD") >= 0
