"""The metrics registry wiring: single-process and multiprocess (WEB_CONCURRENCY > 1) exposition,
the per-run directory, marking dead workers, and the names' conventions.

Multiprocess mode is fixed when prometheus_client is imported, so the "workers" here are real
child interpreters importing pydist.metrics with PROMETHEUS_MULTIPROC_DIR set; this process then
reads their files as a worker's /metrics would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from uvicorn.supervisors import Multiprocess

from pydist import metrics
from pydist.config import MULTIPROC_DIR_ENV, Settings
from pydist.entrypoints import fetch_api, serve

LATENCY = "pydist_http_request_duration_seconds"
LABELS = ("create_buy_order", "PUT", "/buy_order", "200")
BOUNDED_LABELS = {"service", "method", "route", "status", "currency", "reason", "outcome"}
"""Every label name pydist uses: each has a small, fixed set of values (no ids, keys or paths)."""

# A create_buy_order worker: records `n` requests and one cap reading, then prints its /metrics.
WORKER = """
import os, sys
from pydist import metrics as m
assert m.multiprocess_dir() == os.environ["PROMETHEUS_MULTIPROC_DIR"]
m.expose(*m.CREATE_METRICS)
n, used = int(sys.argv[1]), float(sys.argv[2])
for _ in range(n):
    m.HTTP_LATENCY.labels("create_buy_order", "PUT", "/buy_order", "200").observe(0.004)
m.ORDERS_CREATED.labels("USD").inc(n)
m.CAP_USED.set(used)
m.CAP_REMAINING.set(100 - used)
sys.stdout.write(m.render().decode())
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def names(samples: Samples) -> set[str]:
    return {n for n, _ in samples}


def run_worker(directory: Path, n: int, used: float) -> str:
    env = {k: v for k, v in os.environ.items() if k.upper() != MULTIPROC_DIR_ENV}
    env[MULTIPROC_DIR_ENV] = str(directory)
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(n), str(used)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def promtool_lint(exposition: bytes) -> None:
    """`promtool check metrics`: Prometheus' own linter of names, suffixes, units and help."""
    done = subprocess.run(
        ["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30, check=False
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


@pytest.fixture
def as_worker(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Make this process read a multiprocess directory as one of the workers would."""

    class Files:
        _multiprocess = True

    def use(directory: Path, exposed: set[str]) -> None:
        monkeypatch.setattr(values, "ValueClass", Files)
        monkeypatch.setenv(MULTIPROC_DIR_ENV, str(directory))
        monkeypatch.setattr(metrics, "_EXPOSED", exposed)

    return use


def exposed_by(*collectors: Any) -> set[str]:
    return {f.name for c in (metrics.HTTP_LATENCY, *collectors) for f in c.describe()}


# ------------------------------------------------------------------------------ exposition


def test_one_process_exposes_its_registry() -> None:
    assert metrics.multiprocess_dir() is None  # no PROMETHEUS_MULTIPROC_DIR when imported
    metrics.HTTP_LATENCY.labels(*LABELS).observe(0.004)
    samples = parse(metrics.render().decode())
    assert value(samples, f"{LATENCY}_count", route="/buy_order") >= 1
    assert "process_cpu_seconds_total" in names(samples)  # the per-process collectors stay


def test_several_workers_any_one_answers_the_totals(tmp_path: Path, as_worker: Any) -> None:
    run_worker(tmp_path, 3, 1.0)
    second = parse(run_worker(tmp_path, 5, 2.5))  # the second worker's own /metrics: both
    as_worker(tmp_path, exposed_by(*metrics.CREATE_METRICS))
    mine = parse(metrics.render().decode())  # any other worker's: the same
    for samples in (second, mine):
        assert value(samples, f"{LATENCY}_count", route="/buy_order", status="200") == 8
        assert value(samples, f"{LATENCY}_bucket", route="/buy_order", le="0.005") == 8
        assert value(samples, f"{LATENCY}_sum", route="/buy_order") == pytest.approx(8 * 0.004)
        assert value(samples, "pydist_orders_created_total", currency="USD") == 8
        # "mostrecent": one series, the newest reading of the cap row, whichever worker made it.
        assert [v for (n, _), v in samples.items() if n == "pydist_cap_used_btc"] == [2.5]
        assert [v for (n, _), v in samples.items() if n == "pydist_cap_remaining_btc"] == [97.5]
        assert all("pid" not in dict(labels) for _, labels in samples)
        # Only what this service exposes: the workers' files also hold every other unlabelled
        # metric of pydist.metrics (at 0), and no per-process collector is aggregated.
        for absent in (
            "pydist_events_published_total",
            "pydist_read_model_lag_seconds_count",
            "process_cpu_seconds_total",
            "python_gc_objects_collected_total",
        ):
            assert absent not in names(samples), absent
    assert value(mine, "pydist_orders_replayed_total") == 0
    assert "pydist_orders_replayed_total" in names(mine)  # exposed by create, 0 until a replay

    # fetch_buy_orders exposes only the HTTP latency: none of create's series, from the same files.
    as_worker(tmp_path, exposed_by())
    fetch = parse(metrics.render().decode())
    assert names(fetch)
    assert all(n.startswith(LATENCY) for n in names(fetch)), names(fetch)


def test_exposition_follows_prometheus_conventions(tmp_path: Path, as_worker: Any) -> None:
    every = [v for v in vars(metrics).values() if isinstance(v, MetricWrapperBase)]
    registry = CollectorRegistry()
    for collector in every:
        registry.register(collector)
        labelnames = collector._labelnames
        assert set(labelnames) <= BOUNDED_LABELS, (collector, labelnames)
        if labelnames:
            collector.labels(*("x" for _ in labelnames))  # a child, so the family has samples
    promtool_lint(generate_latest(registry))
    run_worker(tmp_path, 2, 1.0)
    as_worker(tmp_path, exposed_by(*every))
    promtool_lint(metrics.render())


def test_gauges_of_multi_worker_services_aggregate_to_one_series() -> None:
    """A gauge in "all"/"liveall" mode shows one series per worker pid; those of create_buy_order
    (the only multi-worker service with gauges) must not."""
    gauges = [c for c in metrics.CREATE_METRICS if getattr(c, "_type", None) == "gauge"]
    assert gauges
    for gauge in gauges:
        assert getattr(gauge, "_multiprocess_mode", None) == "mostrecent", gauge


# ------------------------------------------------------------------------------ the HTTP edge


async def test_unusual_methods_share_one_label_value() -> None:
    settings = Settings(read_database_url=SecretStr("postgresql://u@127.0.0.1:9/never"), log_level="WARNING")
    app = fetch_api.create_app(settings)

    def count(method: str) -> float:
        return sum(
            s.value
            for family in REGISTRY.collect()
            if family.name == LATENCY
            for s in family.samples
            if s.name == f"{LATENCY}_count"
            and s.labels["service"] == "fetch_buy_orders"
            and s.labels["method"] == method
        )

    before = count("other"), count("PROPFIND")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://unit") as client:
        assert (await client.request("PROPFIND", "/buy_orders")).status_code == 405
        assert (await client.request("PURGE", "/nowhere")).status_code == 404
    assert (count("other"), count("PROPFIND")) == (before[0] + 2, before[1])


# ------------------------------------------------------------------------------ serve


def test_multiprocess_directory_fresh_per_run() -> None:
    first, owned = serve.multiprocess_directory(None, "create_buy_order")
    second, _ = serve.multiprocess_directory(None, "create_buy_order")
    try:
        assert owned
        assert first != second
        assert first.is_dir()
        assert list(first.iterdir()) == []
        assert "create_buy_order" in first.name
    finally:
        first.rmdir()
        second.rmdir()


def test_operator_directory_is_used_and_wiped_of_metric_files(tmp_path: Path) -> None:
    configured = tmp_path / "metrics"
    configured.mkdir()
    (configured / "counter_123.db").write_bytes(b"stale")
    (configured / "histogram_124.db").write_bytes(b"stale")
    (configured / "README").write_text("not ours")
    path, owned = serve.multiprocess_directory(str(configured), "fetch_buy_orders")
    assert (path, owned) == (configured, False)
    assert sorted(p.name for p in configured.iterdir()) == ["README"]
    missing = tmp_path / "new" / "dir"
    assert serve.multiprocess_directory(str(missing), "fetch_buy_orders") == (missing, False)
    assert missing.is_dir()


@pytest.fixture
def quiet_serve(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """serve() without its signal handlers, a server, or touching this process's environment."""
    seen: dict[str, Any] = {}
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.setattr(signal, "signal", lambda *_: None)
    monkeypatch.setattr(serve, "get_settings", lambda: Settings())

    def run(app: Any, **kwargs: Any) -> None:
        seen["run"] = (app, kwargs, os.environ.get(MULTIPROC_DIR_ENV))

    def workers(name: str, service: str, n: int, settings: Settings, config: dict[str, Any]) -> None:
        seen["workers"] = (name, service, n)

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setattr(serve, "serve_workers", workers)
    return seen


def test_one_worker_runs_in_process_without_a_multiprocess_dir(
    quiet_serve: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    os.environ[MULTIPROC_DIR_ENV] = "/somewhere/an/operator/chose"
    monkeypatch.delitem(sys.modules, "prometheus_client")  # as in `pydist serve`: not imported yet
    serve.serve("create", workers=1)
    factory, kwargs, directory = quiet_serve["run"]
    assert (factory.func, factory.args) == (serve.process_app, ("create",))
    assert kwargs["workers"] == 1
    assert directory is None
    assert "workers" not in quiet_serve


def test_several_workers_go_through_the_metrics_supervisor(quiet_serve: dict[str, Any]) -> None:
    serve.serve("fetch", workers=2)
    assert quiet_serve["workers"] == ("fetch", "fetch_buy_orders", 2)
    assert "run" not in quiet_serve


@pytest.mark.parametrize(
    ("name", "absent"),
    [("price", ("asyncpg", "aio_pika")), ("fetch", ("aio_pika",)), ("create", ("aio_pika",))],
)
def test_a_process_imports_only_its_own_app(name: str, absent: tuple[str, ...]) -> None:
    """btc_price needs neither the database driver nor the broker client (~20 MB of RSS)."""
    script = (
        "import sys\nfrom pydist.entrypoints.serve import process_app\n"
        f"app = process_app({name!r})\nprint(app.title)\n"
        f"print(*[m for m in {absent!r} if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    title, loaded = out.stdout.splitlines()
    assert title.startswith("pydist")
    assert loaded == ""


def test_an_unknown_process_is_refused() -> None:
    with pytest.raises(ValueError, match="no process 'nope'"):
        serve.process_app("nope")


@pytest.mark.parametrize("name", ["price", "relay", "sync"])
def test_single_process_services_refuse_workers(quiet_serve: dict[str, Any], name: str) -> None:
    with pytest.raises(SystemExit, match="runs as one process"):
        serve.serve(name, workers=2)


def test_serve_workers_sets_the_directory_before_the_workers_and_removes_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.setattr("pydist.logs.configure_logging", lambda *_, **__: None)
    seen: dict[str, Any] = {}

    class Supervisor:
        def __init__(self, config: Any, sockets: list[Any], directory: Path) -> None:
            seen.update(workers=config.workers, directory=directory, app=config.app)
            for sock in sockets:
                sock.close()

        def run(self) -> None:
            seen["env"] = os.environ[MULTIPROC_DIR_ENV]
            seen["existed"] = seen["directory"].is_dir()

    monkeypatch.setattr(serve, "MetricsSupervisor", Supervisor)
    config = {"factory": True, "host": "127.0.0.1", "port": 0, "log_config": None}
    serve.serve_workers("fetch", "fetch_buy_orders", 2, Settings(), config)
    assert seen["workers"] == 2
    assert (seen["app"].func, seen["app"].args) == (serve.process_app, ("fetch",))  # built in each worker
    assert seen["existed"]
    assert seen["env"] == str(seen["directory"])
    assert not seen["directory"].exists()  # the run's own directory goes with it

    operator = tmp_path / "operator"
    settings = Settings(prometheus_multiproc_dir=str(operator))
    serve.serve_workers("fetch", "fetch_buy_orders", 2, settings, config)
    assert seen["env"] == str(operator)
    assert operator.is_dir()  # the operator's stays


# ------------------------------------------------------------------------------ dead workers


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def write_files(directory: Path, pid: int) -> None:
    for prefix in ("counter", "histogram", "gauge_mostrecent", "gauge_liveall", "gauge_livesum"):
        f = MmapedDict(str(directory / f"{prefix}_{pid}.db"))
        f.write_value(mmap_key("m", "m", [], [], "h"), 1.0, 0.0)
        f.close()


def files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_supervisor_marks_every_exited_worker_dead(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # uvicorn's handlers stay out of pytest
    replaced: list[tuple[int, int]] = []

    def init_processes(self: Multiprocess) -> None:
        self.processes = [FakeProcess(101), FakeProcess(102)]  # type: ignore[list-item]

    def keep_subprocess_alive(self: Multiprocess) -> None:  # uvicorn replaces a dead worker
        for i, process in enumerate(self.processes):
            for old, new in replaced:
                if process.pid == old:
                    self.processes[i] = FakeProcess(new)  # type: ignore[call-overload]

    monkeypatch.setattr(Multiprocess, "init_processes", init_processes)
    monkeypatch.setattr(Multiprocess, "keep_subprocess_alive", keep_subprocess_alive)
    monkeypatch.setattr(Multiprocess, "join_all", lambda self: None)
    config = uvicorn.Config("pydist.entrypoints.fetch_api:create_app", workers=2, log_config=None)
    supervisor = serve.MetricsSupervisor(config, sockets=[], directory=tmp_path)
    supervisor.init_processes()
    for pid in (101, 102, 103):
        write_files(tmp_path, pid)
    everything = files(tmp_path)

    supervisor.keep_subprocess_alive()
    assert files(tmp_path) == everything  # nobody exited

    replaced.append((101, 103))
    supervisor.keep_subprocess_alive()
    # 101's "live" gauges are gone; its counters, histograms and other gauges stay in the totals.
    assert files(tmp_path) == everything - {"gauge_liveall_101.db", "gauge_livesum_101.db"}

    supervisor.join_all()
    live = {f"gauge_{mode}_{pid}.db" for mode in ("liveall", "livesum") for pid in (101, 102, 103)}
    assert files(tmp_path) == everything - live
