"""pydist benchmark: every figure of issue 5 as a ratio to a baseline measured in the same run.

    ./bench/run.sh            full run (~12 min), writes the table into docs/benchmarks.md
    ./bench/run.sh --smoke    ~2 min check that everything runs; writes bench/out/smoke.md

Everything runs against 127.0.0.1 only: throw-away databases, a private RabbitMQ vhost, the
Coinbase stub, and the real pydist processes. Every load loop is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata as md
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tests.support.observability import Receiver
from tests.support.procs import System

from bench import harness, open_loop, report, workload
from bench.harness import Resources, ab_rounds, log, pg_fetch, run_wrk, stat, wrk_json
from bench.workload import BulkLoader, drained, lag_between
from pydist.adapters.listing import _NEXT_PAGE

ROOT = harness.BENCH_DIR.parent
# fetch's own query. Postgres 15 plans an EXPLAIN with its parameters' values (a custom plan);
# fetch's connections force the generic plan, the same index-only scans (tests/integration/test_keyset.py).
_EXPLAIN = f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {_NEXT_PAGE}"
PACKAGES = "fastapi uvicorn starlette pydantic sqlalchemy asyncpg aio-pika uvloop opentelemetry-sdk".split()  # noqa: SIM905
SAMPLED = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
BATCHES = "pydist_write_batch_orders"


# The plan: each setting's value in a full run and in a smoke run (one short run of each, one
# stage, no fetch with two workers: process start-up dominates a smoke run). Durations in seconds.
PLAN: dict[str, tuple[Any, Any]] = {
    "runs": (3, 1),
    "create_s": (6, 2),
    "short_s": (4, 1),  # throughput runs: hello, fetch, two workers
    "latency_s": (2, 1),  # page latency, one client
    "lag_s": (60, 4),  # sustained create with the pipeline running
    "headroom_s": (30, 2),  # a second sustained run below saturation: the lag with CPU to spare
    "open_loop_s": (20, 2),
    "profile_s": (8, 2),
    "pgbench_s": (5, 1),
    "tracing_rounds": (4, 1),
    "tracing_s": (4, 1),
    "stages": ((10_000, 100_000, 1_000_000), (5_000,)),
    "deep_depth": (1_000_000, 5_000),
    "relay_n": (10_000, 1_000),
    "scale_fetch": (True, False),
}
CONNECTIONS = {"create_c": 64, "pgbench_c": 32, "fetch_c": 64, "headroom_c": 8}  # the same in both


class Bench:
    """The phases of one run, in order (measure()), each adding its figures to `r`."""

    def __init__(self, plan: SimpleNamespace, res: Resources, system: System) -> None:
        self.plan, self.res, self.system = plan, res, system
        self.r: dict[str, Any] = {"plan": vars(plan), "rss_mb": {}, "stages": []}
        self.loader = BulkLoader(res.write_url, res.read_url)
        self.labels: dict[str, str] = {}

    def url(self, name: str) -> str:
        return self.system.url(name) + harness.PATHS[name]

    def runs(self, url: str, script: str, connections: int, seconds: float) -> dict[str, Any]:
        """plan.runs wrk runs after a warm-up, with the CPU of every process and our Postgres backends."""
        meters, rounds = {script: harness.meter_pids(self.system)}, (self.plan.runs, seconds)
        return ab_rounds({script: url}, script, connections, rounds, meters, self.res.dbs)[script]

    def snapshot_rss(self) -> None:
        """Peak RSS (VmHWM) of the busiest OS process of each service so far."""
        for name, proc in self.system.procs.items():
            if proc.alive():
                key = self.labels.get(name, name)
                peak = max(harness.peak_rss_mb(p) for p in harness.tree(proc.popen.pid))
                self.r["rss_mb"][key] = max(self.r["rss_mb"].get(key, 0.0), peak)

    @contextlib.contextmanager
    def pipeline_paused(self) -> Iterator[None]:
        """SIGSTOP relay and read_model_sync: the create figures measure HTTP → committed (order,
        cap, outbox) with the whole machine, as the issue defines them. Afterwards both resume
        and, if both run, the backlog is drained before the next measurement."""
        workers = [p for n, p in self.system.procs.items() if n in ("relay", "sync") and p.alive()]
        with drained(self.res) if len(workers) == 2 else contextlib.nullcontext():
            for proc in workers:
                proc.pause()
            try:
                yield
            finally:
                for proc in workers:
                    proc.resume()

    def baselines(self) -> None:
        plan, url, script = self.plan, self.res.pgbench_url, harness.BENCH_DIR / "naive_order.sql"
        log(f"baseline: pgbench naive order transaction c={plan.pgbench_c}")
        harness.run_pgbench(url, script, plan.pgbench_c, 1)  # warm-up
        pg = [harness.run_pgbench(url, script, plan.pgbench_c, plan.pgbench_s) for _ in range(plan.runs)]
        log("  pgbench: " + ", ".join(f"{tps:,.0f} tps ({ms:.1f} ms, {bad} failed)" for tps, ms, bad in pg))
        self.r["pgbench"] = {"tps": stat([p[0] for p in pg]), "latency_ms": stat([p[1] for p in pg])}
        log("baseline: hello-world FastAPI, same uvicorn settings")
        hello = self.system.procs["hello"] = harness.start_hello(self.system.log_dir)
        try:
            self.r["hello_post"] = self.runs(hello.url + "/hello", "post.lua", plan.create_c, plan.short_s)
            self.r["hello_get"] = self.runs(hello.url + "/hello", "get.lua", plan.fetch_c, plan.short_s)
            self.snapshot_rss()
        finally:
            self.system.procs.pop("hello").stop()

    def create_runs(self, seconds: float) -> dict[str, Any]:
        """create at c=64 with the pipeline paused: throughput, latency, batch sizes, Postgres."""
        metrics = self.system.url("create")
        with self.pipeline_paused():
            h0 = harness.histogram(metrics, BATCHES)
            out = self.runs(self.url("create"), "create.lua", self.plan.create_c, seconds)
            h1 = harness.histogram(metrics, BATCHES)
        d = {k: v - h0.get(k, 0.0) for k, v in h1.items()}
        les = [k for k in d if k[0].isdigit() or k == "+Inf"]  # cumulative: made per bucket below
        buckets = {le: d[le] - (d[les[i - 1]] if i else 0.0) for i, le in enumerate(les)}
        mean = harness.hist_mean(d)
        out["batches"] = {"count": d["count"], "orders": d["sum"], "mean": mean, "buckets": buckets}
        log(f"  batches: mean {mean:.1f} orders per place_orders()")
        return out

    def profiled(self, url: str, script: str, *names: str) -> dict[str, Any]:
        """py-spy on the `names` processes, at the same time, while wrk loads `url` at c=64."""
        seconds, logs = self.plan.profile_s, self.system.log_dir
        log(f"profile: py-spy on {' and '.join(names)} for {seconds:.0f}s under c={self.plan.create_c}")
        with ThreadPoolExecutor(len(names) + 1) as pool:
            load = pool.submit(run_wrk, url, script, self.plan.create_c, seconds + 2)
            time.sleep(1)
            pids = {n: self.system.procs[n].popen.pid for n in names}
            spies = {
                n: pool.submit(harness.py_spy, p, seconds, logs / f"{n}.pyspy.txt") for n, p in pids.items()
            }
            load.result()
            return {n: spy.result() for n, spy in spies.items()}

    def stage(self, target: int, last: bool) -> None:
        added, seconds = asyncio.run(self.loader.load_to(target))
        w, r = asyncio.run(self.loader.counts())
        log(f"stage {target:,}: bulk-loaded {added:,} rows in {seconds:.1f}s; write {w:,}, read {r:,}")
        stage: dict[str, Any] = {"write_rows": w, "read_rows": r}
        stage["create"] = self.create_runs(self.plan.create_s)
        # page latency, one client: the first page and one deep down the listing, interleaved
        ref, depth = asyncio.run(self.loader.reference_at_depth(self.plan.deep_depth))
        urls = {"page_first": self.url("fetch"), "page_deep": f"{self.url('fetch')}&last_reference={ref}"}
        meters = dict.fromkeys(urls, harness.meter_pids(self.system))
        stage |= ab_rounds(urls, "get.lua", 1, (self.plan.runs, self.plan.latency_s), meters, self.res.dbs)
        explain = [row[0] for row in asyncio.run(pg_fetch(self.res.read_url, _EXPLAIN, 11, ref))]
        stage["page_deep"] |= {"depth": depth, "explain": explain}
        if last:
            self.headline(stage)
        self.r["stages"].append(stage)
        self.snapshot_rss()

    def headline(self, stage: dict[str, Any]) -> None:
        """The last stage's extra figures: fetch throughput, the profiles, the sustained runs with
        the pipeline running and the open-loop latency."""
        plan, create, fetch = self.plan, self.url("create"), self.url("fetch")
        stage["fetch"] = self.runs(fetch, "get.lua", plan.fetch_c, plan.short_s)
        profiles = self.profiled(fetch, "get.lua", "fetch")
        with self.pipeline_paused():
            profiles |= self.profiled(create, "create.lua", "create")
        with drained(self.res):  # where relay and read_model_sync spend their CPU under the same load
            profiles |= self.profiled(create, "create.lua", "relay", "sync")
        stage["profiles"] = profiles
        stage["sustained"] = self.sustained(plan.create_c, plan.lag_s)
        stage["sustained_headroom"] = self.sustained(plan.headroom_c, plan.headroom_s)
        # The open loop's 80% stage outruns create whenever the pipeline takes over a fifth of its
        # rate, and the requests queued then set create's peak: its RSS under load is read first.
        self.snapshot_rss()
        self.r["rss_before_open_loop_mb"] = dict(self.r["rss_mb"])
        stage["open_loop"] = [self.open_loop(share, stage["create"]["rps"]["median"]) for share in (0.5, 0.8)]

    def open_loop(self, share: float, max_rate: float) -> dict[str, Any]:
        """create at a constant arrival rate of `share` times the max create rate, pipeline running,
        from bench/open_loop.py (its own process): latency counted from each request's due time."""
        rate, seconds, pids = share * max_rate, self.plan.open_loop_s, harness.meter_pids(self.system)
        log(f"open loop: {rate:,.0f} orders/s ({share:.0%} of max) for {seconds:.0f}s")
        with drained(self.res):
            r = open_loop.measured(self.system.url("create"), rate, seconds, pids, self.res.dbs)
        ms = f"p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} max {r['max_ms']:.0f} ms"
        late = f"generator {r['client_cpu']:.2f} core, fired late p99 {r['late_p99_ms']:.0f} ms"
        log(f"  {ms}; {r['errors']} errors {r['error_kinds']}; {late}")
        log(f"  cores: {harness.cores_text(r['cpu'])}")
        log(f"  {open_loop.stalls(r)}")
        return r | {"share": share}

    def sustained(self, connections: int, seconds: float) -> dict[str, Any]:
        """create at c=`connections` for `seconds` with the whole pipeline running: the rate, the
        commit-to-visible lag of those orders and the backlog over time."""
        log(f"sustained create, c={connections}, {seconds:.0f}s, pipeline running: lag and backlog")
        pids = harness.meter_pids(self.system)
        with drained(self.res):
            run = run_wrk(self.url("create"), "create.lua", connections, seconds, pids, self.res.dbs)
        lag = asyncio.run(lag_between(self.res, run.t0, run.t1))
        trend = f"backlog trend {lag['backlog_slope_per_s']:+.1f}/s"
        log(f"  {run.rps:,.0f} orders/s; {workload.lag_text(lag)}; {trend}")
        return {**wrk_json([run]), "connections": connections, "duration_s": seconds, **lag}

    def relay(self) -> None:
        """The relay alone (read_model_sync stopped, so both publish into a queue nobody reads)."""
        n = self.plan.relay_n
        log(f"relay: {n:,} outbox events vs raw aio-pika, 500 in flight (sync stopped)")
        self.snapshot_rss()
        self.system.procs["sync"].stop()
        relay, raw = [], []
        for _ in range(self.plan.runs):
            relay.append(asyncio.run(workload.relay_run(self.res.write_url, n)))
            raw.append(asyncio.run(workload.raw_publish(self.res.amqp_url, n, 500)))
            log(f"  relay {relay[-1]:,.0f} events/s; raw aio-pika {raw[-1]:,.0f} msgs/s")
        asyncio.run(workload.purge_sync_queue(self.res.amqp_url))
        self.r["relay"] = {"relay_eps": stat(relay), "raw_mps": stat(raw), "n": n}

    def scaling(self) -> None:
        """create and fetch again with WEB_CONCURRENCY=2. The relay is stopped too (read_model_sync
        already is): create is measured without the pipeline, as in the 1-worker runs, and nothing
        else competes with fetch."""
        self.snapshot_rss()
        names = ("create", "fetch") if self.plan.scale_fetch else ("create",)
        log(f"scaling: WEB_CONCURRENCY=2 for {' and '.join(names)}")
        harness.stop_procs(self.system, "relay", *names)
        self.system.env["WEB_CONCURRENCY"] = "2"
        harness.spawn(self.system, {n: (n, {}) for n in names})
        for name in names:
            harness.wait_workers(self.system.procs[name], 2)
            self.labels[name] = f"{name} (2 workers)"
        self.r["scaling"] = {"create_2w": self.create_runs(self.plan.short_s)}
        if self.plan.scale_fetch:
            fetch = self.runs(self.url("fetch"), "get.lua", self.plan.fetch_c, self.plan.short_s)
            self.r["scaling"]["fetch_2w"] = fetch
        self.snapshot_rss()

    def tracing(self) -> None:
        """create with tracing off, on (default sampling: every request) and on sampling 1 in 10,
        exporting over OTLP/HTTP to a local sink that discards: three fresh one-worker create
        processes loaded in turn (ab_rounds). Last, so that nothing else runs: relay and
        read_model_sync are stopped by now."""
        plan, sink = self.plan, Receiver(discard=True)
        off = {"WEB_CONCURRENCY": "1"}
        on = off | {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.start()}
        log(f"tracing: create with tracing off / on / on sampling 0.1, {plan.tracing_rounds} rounds")
        try:
            variants = {"off": off, "on": on, "sampled": on | SAMPLED}
            procs = harness.spawn(self.system, {k: ("create", env) for k, env in variants.items()})
            rounds = (plan.tracing_rounds, plan.tracing_s)
            self.r["tracing"] = harness.ab_procs(procs, "create", rounds, plan.create_c, self.res.dbs)
            harness.stop_procs(self.system, *procs)
        finally:
            sink.stop()
        self.r["tracing"]["exports"] = sink.exports


def versions(res: Resources) -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in PACKAGES:
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    out["postgres"] = str(asyncio.run(pg_fetch(res.write_url, "SHOW server_version"))[0][0]).split()[0]
    tools = {"wrk": "wrk -v", "pgbench": "pgbench --version", "rabbitmq": "rabbitmqctl -q version"}
    for key, cmd in tools.items():
        with contextlib.suppress(Exception):  # the first version-like word: 4.1.0-3+b2, 15.20, 3.10.8
            done = subprocess.run(cmd.split(), capture_output=True, text=True, timeout=30)
            out[key] = found[0] if (found := re.search(r"\d+\.\d+\S*", done.stdout + done.stderr)) else "?"
    return out


def measure(plan: SimpleNamespace, keep_logs: bool) -> dict[str, Any]:
    """Every phase, in order, on resources and processes of its own."""
    started, load_start = time.monotonic(), os.getloadavg()[0]
    log(f"{'smoke' if plan.smoke else 'full'} run; load average {load_start:.2f}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks drop databases and vhost
    names = ("price", "create", "fetch", "relay", "sync")
    with harness.resources() as res, harness.processes(res, *names, keep_logs=keep_logs) as system:
        bench = Bench(plan, res, system)
        bench.r["versions"] = versions(res)
        bench.baselines()
        for i, target in enumerate(plan.stages):
            bench.stage(target, last=i == len(plan.stages) - 1)
        bench.relay()
        bench.scaling()
        bench.tracing()
    when = {"elapsed_s": time.monotonic() - started, "finished_at": time.strftime("%Y-%m-%d %H:%M %Z")}
    load = {"load_start": load_start, "load_end": os.getloadavg()[0]}
    return bench.r | when | load | {"machine": harness.machine_info()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a short run that checks everything works")
    parser.add_argument("--out", type=Path, help="markdown file to write (default: see above)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--wait-load", type=float, help="first wait (bounded) for loadavg < this")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs directory")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only re-render from a --json file")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
    else:
        quiet, deadline = args.wait_load or float("inf"), time.monotonic() + 300  # quiet, not forever
        while (load := os.getloadavg()[0]) >= quiet and time.monotonic() < deadline:
            log(f"load average {load:.2f} >= {quiet}: waiting")
            time.sleep(15)
        plan = {k: v[args.smoke] for k, v in PLAN.items()}
        results = measure(SimpleNamespace(smoke=args.smoke, **plan, **CONNECTIONS), args.keep_logs)
        results["command"] = " ".join(["./bench/run.sh", *(shlex.quote(a) for a in sys.argv[1:])])
    smoke = bool(results["plan"]["smoke"])
    out = args.out or ROOT / ("bench/out/smoke.md" if smoke else "docs/benchmarks.md")
    text = report.render(results)
    report.write(out, text, standalone=smoke or args.out is not None)
    if args.json and not args.render:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
