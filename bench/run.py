"""pydist benchmark: every figure of issue 5 as a ratio to a baseline measured in the same run.

    ./bench/run.sh            full run (< 10 min), writes the table into docs/benchmarks.md
    ./bench/run.sh --smoke    ~1 min check that everything runs; writes bench/out/smoke.md

Everything runs against 127.0.0.1 only: throw-away databases (pydist_bench_*), a private RabbitMQ
vhost, the Coinbase stub, and the real pydist processes. Every load loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.support.procs import System

from bench import report
from bench.harness import (
    BENCH_DIR,
    CpuMeter,
    Resources,
    WaitSampler,
    WrkResult,
    histogram_buckets,
    load_average,
    log,
    machine_info,
    make_log_dir,
    metric_sum,
    peak_rss_mb,
    pg_fetch,
    py_spy_profile,
    rabbitmq_pid,
    run_pgbench,
    run_wrk,
    sigterm_as_exit,
    start_hello,
    start_procs,
    stat,
    stop_procs,
    summarise_profile,
    system_env,
    tree,
    wait_for_quiet,
    wait_workers,
)
from bench.workload import (
    BacklogSampler,
    BulkLoader,
    lag_between,
    outbox_mark,
    place_orders_cost,
    purge_sync_queue,
    raw_publish,
    relay_run,
    wait_projected,
)
from pydist.devtools.coinbase_stub import CoinbaseStub

ROOT = BENCH_DIR.parent


@dataclass(frozen=True)
class Plan:
    smoke: bool
    runs: int
    create_s: float
    short_s: float
    latency_s: float
    lag_s: float
    profile_s: float
    pgbench_s: float
    stages: tuple[int, ...]
    deep_depth: int
    relay_n: int
    scale_fetch: bool = True
    create_c: int = 64
    pgbench_c: int = 32
    fetch_c: int = 64
    headroom_c: int = 8  # a second sustained run below saturation: the lag with CPU to spare
    headroom_s: float = 30
    open_loop_s: float = 20


FULL = Plan(
    smoke=False,
    runs=3,
    create_s=6,
    short_s=4,
    latency_s=2,
    lag_s=60,
    profile_s=8,
    pgbench_s=5,
    stages=(10_000, 100_000, 1_000_000),
    deep_depth=1_000_000,
    relay_n=10_000,
)
SMOKE = Plan(
    smoke=True,
    runs=1,
    create_s=2,
    short_s=1,
    latency_s=1,
    lag_s=4,
    profile_s=2,
    pgbench_s=1,
    stages=(5_000,),
    deep_depth=5_000,
    relay_n=1_000,
    headroom_s=2,
    open_loop_s=2,
    scale_fetch=False,  # one restart less: process start-up dominates a smoke run
)


class Bench:
    def __init__(self, plan: Plan, res: Resources, system: System, stub: CoinbaseStub) -> None:
        self.plan = plan
        self.res = res
        self.system = system
        self.stub = stub
        self.r: dict[str, Any] = {"plan": asdict(plan), "rss_mb": {}, "stages": []}
        self.loader = BulkLoader(res.write_url, res.read_url)
        self.labels: dict[str, str] = {}
        self.dbs = [res.write_db, res.read_db]

    # ------------------------------------------------------------ helpers

    def pids(self) -> dict[str, int]:
        pids = {n: p.popen.pid for n, p in self.system.procs.items() if p.alive()}
        broker = rabbitmq_pid()
        if broker:
            pids["rabbitmq"] = broker
        return pids

    def wrk_runs(
        self, url: str, script: str, connections: int, seconds: float, runs: int | None = None
    ) -> list[WrkResult]:
        """`runs` wrk runs of `seconds` each, with CPU per process and of our Postgres backends."""
        out = []
        for _ in range(runs or self.plan.runs):
            result = run_wrk(
                url, script, connections=connections, duration_s=seconds, meter=self.pids(), pg_dbs=self.dbs
            )
            if result.errors:
                log(f"  !! {result.errors} errors of {result.requests} requests on {url}")
            out.append(result)
            log(
                f"  {script} c={connections}: {result.rps:,.0f} req/s p50 {result.p50_ms:.1f} ms "
                f"p99 {result.p99_ms:.1f} ms (wrk {result.wrk_cpu:.2f} core, machine "
                f"{100 * result.cpu.get('machine_busy', 0):.0f}% busy)"
            )
        return out

    def snapshot_rss(self) -> None:
        """Peak RSS (VmHWM) of the busiest OS process of each service so far."""
        for name, proc in self.system.procs.items():
            if not proc.alive():
                continue
            peak = max((peak_rss_mb(p) for p in tree(proc.popen.pid)), default=0.0)
            key = self.labels.get(name, name)
            self.r["rss_mb"][key] = max(self.r["rss_mb"].get(key, 0.0), peak)

    def db_counters(self) -> dict[str, float]:
        rows = asyncio.run(
            pg_fetch(
                self.res.write_url,
                """
                SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
                       (SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'btc_cap'),
                       (SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'buy_orders')
                """,
            )
        )
        return {"commits": rows[0][0], "cap_updates": rows[0][1], "orders": rows[0][2]}

    # ------------------------------------------------------------ phases

    def baselines(self) -> None:
        plan = self.plan
        log(f"baseline: pgbench naive order transaction c={plan.pgbench_c}")
        script = BENCH_DIR / "naive_order.sql"
        run_pgbench(self.res.pgbench_url, script, clients=plan.pgbench_c, duration_s=1)  # warm-up
        pg = []
        for _ in range(plan.runs):
            result = run_pgbench(
                self.res.pgbench_url, script, clients=plan.pgbench_c, duration_s=plan.pgbench_s
            )
            log(f"  pgbench: {result.tps:,.0f} tps, {result.latency_ms:.1f} ms, {result.failed} failed")
            pg.append(result)
        self.r["pgbench"] = {
            "tps": stat([p.tps for p in pg]).to_json(),
            "latency_ms": stat([p.latency_ms for p in pg]).to_json(),
            "failed": sum(p.failed for p in pg),
        }
        log("place_orders() alone, by batch size (the time the cap row stays locked)")
        sizes = (1, 16, 64, 256)
        cost = asyncio.run(place_orders_cost(self.res.pgbench_url, sizes, 1_000 if plan.smoke else 4_000))
        self.r["place_orders"] = {str(n): v for n, v in cost.items()}
        for n, v in cost.items():
            log(
                f"  n={n}: {v['call_ms']:.2f} ms per call, {v['cpu_us_per_order']:.0f} µs backend CPU "
                f"per order, {v['orders_per_s']:,.0f} orders/s on one connection"
            )
        log("baseline: hello-world FastAPI, same uvicorn settings")
        hello = start_hello(self.system.log_dir)
        try:
            self.system.procs["hello"] = hello
            run_wrk(hello.url + "/hello", "post.lua", connections=plan.create_c, duration_s=1)  # warm-up
            post = self.wrk_runs(hello.url + "/hello", "post.lua", plan.create_c, plan.short_s)
            get = self.wrk_runs(hello.url + "/hello", "get.lua", plan.fetch_c, plan.short_s)
            self.snapshot_rss()
        finally:
            self.system.procs.pop("hello", None)
            hello.stop()
        self.r["hello_post"] = wrk_json(post, "hello")
        self.r["hello_get"] = wrk_json(get, "hello")

    @contextlib.contextmanager
    def pipeline_paused(self) -> Iterator[None]:
        """SIGSTOP relay and read_model_sync: the create figures measure HTTP → committed (order,
        cap, outbox) with the whole machine, as the issue defines them. Afterwards both resume
        and, if both run, the backlog is drained (bounded) before the next measurement."""
        procs = self.system.procs
        workers = [procs[n] for n in ("relay", "sync") if n in procs and procs[n].alive()]
        mark = asyncio.run(outbox_mark(self.res.write_url))
        for proc in workers:
            proc.popen.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for proc in workers:
                proc.popen.send_signal(signal.SIGCONT)
        if len(workers) < 2:
            return
        waited = asyncio.run(wait_projected(self.res.write_url, self.res.read_url, mark, 90))
        log(f"  pipeline resumed; backlog projected in {waited:.1f}s")

    def create_runs(self, runs: int | None = None, seconds: float | None = None) -> dict[str, Any]:
        """create at c=64 with the pipeline paused: throughput, latency, batch sizes, Postgres."""
        plan = self.plan
        create = self.system.url("create")
        with self.pipeline_paused():
            run_wrk(create + "/buy_order", "create.lua", connections=plan.create_c, duration_s=1)
            batches0 = metric_sum(create, "pydist_write_batch_orders")
            buckets0 = histogram_buckets(create, "pydist_write_batch_orders")
            db0 = self.db_counters()
            with WaitSampler([self.res.write_db]) as waits:
                results = self.wrk_runs(
                    create + "/buy_order", "create.lua", plan.create_c, seconds or plan.create_s, runs
                )
            db1 = self.db_counters()
            batches1 = metric_sum(create, "pydist_write_batch_orders")
            buckets1 = histogram_buckets(create, "pydist_write_batch_orders")
        out = wrk_json(results, "create")
        count, total = "pydist_write_batch_orders_count", "pydist_write_batch_orders_sum"
        n_batches = batches1.get(count, 0) - batches0.get(count, 0)
        n_orders = batches1.get(total, 0) - batches0.get(total, 0)
        cumulative = {k: buckets1.get(k, 0) - buckets0.get(k, 0) for k in buckets1}
        per_bucket, below = {}, 0.0
        for le, n in cumulative.items():  # Prometheus buckets are cumulative: make them per bucket
            per_bucket[le] = n - below
            below = n
        out["batches"] = {
            "count": n_batches,
            "orders": n_orders,
            "mean": n_orders / n_batches if n_batches else float("nan"),
            "buckets": per_bucket,
        }
        out["db"] = {k: db1[k] - db0[k] for k in db1}
        out["waits"] = waits.top(14)
        out["wait_queries"] = waits.top_queries(8)
        log(f"  batches: mean {out['batches']['mean']:.1f} orders per place_orders()")
        return out

    def profiled(
        self, name: str, url: str, script: str, connections: int, also: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """py-spy on process `name` (and the `also` processes, at the same time) for profile_s
        seconds while wrk loads `url`."""
        plan = self.plan
        proc_label = "create" if script == "create.lua" else "fetch"
        holder: dict[str, WrkResult] = {}

        def load() -> None:
            holder["w"] = run_wrk(
                url,
                script,
                connections=connections,
                duration_s=plan.profile_s + 2,
                meter=self.pids(),
                pg_dbs=self.dbs,
            )

        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(1)
        spies: dict[str, Path | None] = {}

        def spy(n: str) -> None:
            pid = self.system.procs[n].popen.pid
            spies[n] = py_spy_profile(pid, plan.profile_s, self.system.log_dir / f"{n}.pyspy.txt")

        spy_threads = [threading.Thread(target=spy, args=(n,)) for n in (name, *also)]
        for t in spy_threads:
            t.start()
        for t in spy_threads:
            t.join()
        thread.join()
        out: dict[str, Any] = {"under_profile": wrk_json([holder["w"]], proc_label)}
        for n, got in spies.items():
            key = "py_spy" if n == name else f"py_spy_{n}"
            out[key] = summarise_profile(got) if got else None
        return out

    def stage(self, target: int, last: bool) -> None:
        plan = self.plan
        added, seconds = asyncio.run(self.loader.load_to(target))
        w, r = asyncio.run(self.loader.counts())
        log(f"stage {target:,}: bulk-loaded {added:,} rows in {seconds:.1f}s; write {w:,}, read {r:,}")
        stage: dict[str, Any] = {"target": target, "write_rows": w, "read_rows": r, "load_s": seconds}
        fetch_url = self.system.url("fetch") + "/buy_orders"
        stage["create"] = self.create_runs()

        # page latency, one client: the first page and a page deep down the listing
        ref, depth = asyncio.run(self.loader.reference_at_depth(plan.deep_depth))
        deep_url = f"{fetch_url}?page_size=10&last_reference={ref}"
        first_url = f"{fetch_url}?page_size=10"
        for url in (first_url, deep_url):  # warm-up: each pooled connection prepares its statements
            run_wrk(url, "get.lua", connections=1, duration_s=1)
        first: list[WrkResult] = []
        deep: list[WrkResult] = []
        for _ in range(plan.runs):  # interleaved, so drift (autovacuum, neighbours) hits both alike
            first += self.wrk_runs(first_url, "get.lua", 1, plan.latency_s, runs=1)
            deep += self.wrk_runs(deep_url, "get.lua", 1, plan.latency_s, runs=1)
        stage["page_first"] = wrk_json(first, "fetch")
        stage["page_deep"] = wrk_json(deep, "fetch")
        stage["page_deep"]["depth"] = depth
        plan_rows = asyncio.run(
            pg_fetch(
                self.res.read_url,
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) "
                "SELECT b.id FROM (SELECT created_at, id FROM buy_orders WHERE id = $1) AS ref "
                "LEFT JOIN LATERAL (SELECT id FROM buy_orders o WHERE (o.created_at, o.id) < "
                "(ref.created_at, ref.id) ORDER BY o.created_at DESC, o.id DESC LIMIT 11) AS b ON true",
                ref,
            )
        )
        stage["page_deep"]["explain"] = [r[0] for r in plan_rows]
        if last:
            self.headline(stage, first_url)
        self.r["stages"].append(stage)
        self.snapshot_rss()

    def headline(self, stage: dict[str, Any], first_url: str) -> None:
        plan = self.plan
        create = self.system.procs["create"]
        create_url = create.url + "/buy_order"
        fetches = self.wrk_runs(first_url, "get.lua", plan.fetch_c, plan.short_s)
        stage["fetch"] = wrk_json(fetches, "fetch")
        log(f"profile: py-spy on fetch for {plan.profile_s:.0f}s under c={plan.fetch_c}")
        with WaitSampler([self.res.read_db]) as waits:
            stage["fetch_profile"] = self.profiled("fetch", first_url, "get.lua", plan.fetch_c)
        stage["fetch_profile"]["waits"] = waits.top(14)
        stage["fetch_profile"]["wait_queries"] = waits.top_queries(8)

        # profile the create process under the headline load, and sample Postgres wait events
        log(f"profile: py-spy on create for {plan.profile_s:.0f}s under c={plan.create_c}")
        with self.pipeline_paused(), WaitSampler([self.res.write_db]) as waits:
            stage["profile"] = self.profiled("create", create_url, "create.lua", plan.create_c)
        stage["profile"]["waits"] = waits.top(14)
        stage["profile"]["wait_queries"] = waits.top_queries(8)

        # the pipeline under the same load: where relay and read_model_sync spend their CPU
        log(f"profile: py-spy on relay and read_model_sync for {plan.profile_s:.0f}s, pipeline running")
        mark = asyncio.run(outbox_mark(self.res.write_url))
        stage["pipeline_profile"] = self.profiled("relay", create_url, "create.lua", plan.create_c, ("sync",))
        waited = asyncio.run(wait_projected(self.res.write_url, self.res.read_url, mark, 90))
        log(f"  backlog projected in {waited:.1f}s")

        # sustained create at the max rate with the whole pipeline running: lag and backlog;
        # then at a lower concurrency, where the pipeline has CPU to spare
        stage["sustained"] = self.sustained(plan.create_c, plan.lag_s)
        stage["sustained_headroom"] = self.sustained(plan.headroom_c, plan.headroom_s)
        max_rate = stage["create"]["rps"]["median"]
        stage["open_loop"] = [self.open_loop(share, max_rate) for share in (0.5, 0.8)]

    def open_loop(self, share: float, max_rate: float) -> dict[str, Any]:
        """Create at a constant arrival rate of `share` times the max create rate, pipeline running,
        from bench/open_loop.py (its own process): latency counted from each request's due time."""
        plan = self.plan
        rate = share * max_rate
        log(f"open loop: {rate:,.0f} orders/s ({share:.0%} of max) for {plan.open_loop_s:.0f}s")
        mark = asyncio.run(outbox_mark(self.res.write_url))
        meter = CpuMeter(self.pids(), self.dbs)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.open_loop",
                "--url",
                self.system.url("create"),
                "--rate",
                f"{rate:.1f}",
                "--seconds",
                str(plan.open_loop_s),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=plan.open_loop_s + 120,
        )
        cpu = meter.stop()
        result: dict[str, Any] = {**json.loads(done.stdout), "share": share, "cpu": cpu}
        asyncio.run(wait_projected(self.res.write_url, self.res.read_url, mark, 90))
        log(
            f"  p50 {result['p50_ms']:.1f} ms p99 {result['p99_ms']:.1f} ms max {result['max_ms']:.0f} ms; "
            f"{result['errors']} errors; generator {result['client_cpu']:.2f} core, fired late "
            f"p99 {result['late_p99_ms']:.1f} ms"
        )
        return result

    def sustained(self, connections: int, duration_s: float) -> dict[str, Any]:
        """Create at c=`connections` for `duration_s` with the whole pipeline running: the rate,
        the commit-to-visible lag of those orders and the backlog over time."""
        log(f"sustained create, c={connections}, {duration_s:.0f}s, pipeline running: lag and backlog")
        create_url = self.system.procs["create"].url + "/buy_order"
        mark = asyncio.run(outbox_mark(self.res.write_url))
        with BacklogSampler(self.res.write_url, self.res.amqp_url) as backlog:
            sustained = run_wrk(
                create_url,
                "create.lua",
                connections=connections,
                duration_s=duration_s,
                meter=self.pids(),
                pg_dbs=self.dbs,
            )
        drained = asyncio.run(wait_projected(self.res.write_url, self.res.read_url, mark, 90))
        lag = asyncio.run(lag_between(self.res.write_url, self.res.read_url, sustained.t0, sustained.t1))
        totals = backlog.totals()
        result = {
            **wrk_json([sustained], "create"),
            "connections": connections,
            "duration_s": duration_s,
            "lag_p50_ms": lag.p50_ms,
            "lag_p99_ms": lag.p99_ms,
            "lag_max_ms": lag.max_ms,
            "projected": lag.count,
            "written": lag.written,
            "backlog_slope_per_s": backlog.slope_per_s(),
            "backlog_first": totals[0] if totals else None,
            "backlog_last": totals[-1] if totals else None,
            "backlog_max": max(totals) if totals else None,
            "backlog_samples": backlog.samples,
            "drain_after_s": drained,
        }
        log(
            f"  {sustained.rps:,.0f} orders/s; lag p50 {lag.p50_ms:.0f} ms p99 {lag.p99_ms:.0f} ms; "
            f"backlog slope {backlog.slope_per_s():+.1f}/s, max {result['backlog_max']}"
        )
        return result

    def relay(self) -> None:
        """The relay alone (read_model_sync stopped, so both publish into a queue nobody reads)."""
        plan = self.plan
        log(f"relay: {plan.relay_n:,} outbox events vs raw aio-pika, 500 in flight (sync stopped)")
        self.snapshot_rss()
        self.system.procs["sync"].stop()
        relay_rates, raw_rates = [], []
        for _ in range(plan.runs):
            relay_rates.append(asyncio.run(relay_run(self.res.write_url, plan.relay_n)))
            raw_rates.append(asyncio.run(raw_publish(self.res.amqp_url, plan.relay_n, 500)))
            log(f"  relay {relay_rates[-1]:,.0f} events/s; raw aio-pika {raw_rates[-1]:,.0f} msgs/s")
        purged = asyncio.run(purge_sync_queue(self.res.amqp_url))
        self.r["relay"] = {
            "relay_eps": stat(relay_rates).to_json(),
            "raw_mps": stat(raw_rates).to_json(),
            "purged": purged,
            "n": plan.relay_n,
        }

    def scaling(self) -> None:
        """create and fetch again with WEB_CONCURRENCY=2. The relay is stopped too (read_model_sync
        already is, since the relay phase): create is measured without the pipeline, as in the
        1-worker runs, and nothing else competes with fetch."""
        plan = self.plan
        self.snapshot_rss()
        names = ("create", "fetch") if plan.scale_fetch else ("create",)
        log(f"scaling: WEB_CONCURRENCY=2 for {' and '.join(names)}")
        stop_procs(self.system, "relay", *names)
        self.system.env["WEB_CONCURRENCY"] = "2"
        start_procs(self.system, *names)
        for name in names:
            wait_workers(self.system.procs[name], 2)
            self.labels[name] = f"{name} (2 workers)"
        self.r["scaling"] = {"create_2w": self.create_runs(seconds=plan.short_s)}
        if plan.scale_fetch:
            first_url = self.system.url("fetch") + "/buy_orders?page_size=10"
            run_wrk(first_url, "get.lua", connections=plan.fetch_c, duration_s=1)  # warm-up
            fetches = self.wrk_runs(first_url, "get.lua", plan.fetch_c, plan.short_s)
            self.r["scaling"]["fetch_2w"] = wrk_json(fetches, "fetch")
        self.snapshot_rss()


def wrk_json(results: list[WrkResult], proc: str) -> dict[str, Any]:
    return {
        "rps": stat([x.rps for x in results]).to_json(),
        "p50_ms": stat([x.p50_ms for x in results]).to_json(),
        "p99_ms": stat([x.p99_ms for x in results]).to_json(),
        "mean_ms": stat([x.mean_ms for x in results]).to_json(),
        "errors": sum(x.errors for x in results),
        "requests": sum(x.requests for x in results),
        "wrk_cpu": stat([x.wrk_cpu for x in results]).to_json(),
        "proc_cpu": stat([x.cpu.get(f"{proc}_cpu", float("nan")) for x in results]).to_json(),
        "cpu": {k: stat([x.cpu.get(k, float("nan")) for x in results]).to_json() for k in results[0].cpu},
    }


def versions(res: Resources) -> dict[str, str]:
    import importlib.metadata as md
    import subprocess

    out = {"python": sys.version.split()[0]}
    for pkg in ("fastapi", "uvicorn", "starlette", "pydantic", "sqlalchemy", "asyncpg", "aio-pika", "uvloop"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    out["postgres"] = str(asyncio.run(pg_fetch(res.write_url, "SHOW server_version"))[0][0]).split()[0]
    for cmd, key, pattern in (
        (["wrk", "-v"], "wrk", r"wrk (?:debian/)?(\S+)"),
        (["pgbench", "--version"], "pgbench", r"\) (\S+)"),
    ):
        with contextlib.suppress(Exception):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            found = re.search(pattern, done.stdout + done.stderr)
            out[key] = found.group(1) if found else "?"
    with contextlib.suppress(Exception):
        done = subprocess.run(["rabbitmqctl", "-q", "version"], capture_output=True, text=True, timeout=30)
        out["rabbitmq"] = done.stdout.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a short run that checks everything works")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: see above)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--wait-load", type=float, default=0.0, help="first wait (bounded) for loadavg below this"
    )
    parser.add_argument("--wait-max", type=float, default=300.0, help="longest wait for --wait-load, s")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs directory")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only re-render the markdown from a --json result file"
    )
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        smoke = bool(results["plan"]["smoke"])
        out = args.out or (ROOT / ("bench/out/smoke.md" if smoke else "docs/benchmarks.md"))
        report.write(out, report.render(results), standalone=smoke or args.out is not None)
        log(f"rendered {args.render} into {out}")
        return 0
    plan = SMOKE if args.smoke else FULL
    out = args.out or (ROOT / ("bench/out/smoke.md" if plan.smoke else "docs/benchmarks.md"))
    command = " ".join(["./bench/run.sh", *(shlex.quote(a) for a in sys.argv[1:])])

    if args.wait_load:
        wait_for_quiet(args.wait_load, args.wait_max)
    started = time.monotonic()
    load_start = load_average()
    log(f"{'smoke' if plan.smoke else 'full'} run; load average {load_start:.2f}; writing {out}")
    stub = CoinbaseStub().start()
    res: Resources | None = None
    system: System | None = None
    ok = False
    try:
        with sigterm_as_exit():
            res = Resources.create()
            system = System(system_env(res, stub.url), log_dir=make_log_dir())
            log(f"databases {res.write_db}, {res.read_db}, {res.pgbench_db}; vhost {res.vhost}")
            log(f"process logs in {system.log_dir}")
            # price first in the list: create is given its URL when spawned (all start at once)
            start_procs(system, "price", "create", "fetch", "relay", "sync")
            bench = Bench(plan, res, system, stub)
            bench.r["versions"] = versions(res)
            bench.baselines()
            for i, target in enumerate(plan.stages):
                bench.stage(target, last=i == len(plan.stages) - 1)
            bench.relay()
            bench.scaling()
            bench.snapshot_rss()
            bench.r["load_start"] = load_start
            bench.r["load_end"] = load_average()
            bench.r["elapsed_s"] = time.monotonic() - started
            bench.r["command"] = command
            bench.r["finished_at"] = time.strftime("%Y-%m-%d %H:%M %Z")
            bench.r["machine"] = machine_info()
            text = report.render(bench.r)
            report.write(out, text, standalone=plan.smoke or args.out is not None)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(bench.r, indent=1, default=str))
            print(text)
            log(f"done in {bench.r['elapsed_s']:.0f}s; wrote {out}")
            ok = True
    finally:
        if system is not None:
            stop_procs(system, *list(system.procs))
            if ok and not args.keep_logs:
                import shutil

                shutil.rmtree(system.log_dir, ignore_errors=True)
            else:
                log(f"process logs kept in {system.log_dir}")
        if res is not None:
            res.close()
        stub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
