"""A/B of the create (or fetch) path: two processes built from different source trees, on the same
databases, broker and workers, loaded in turn (ABAB...) so that machine noise hits both alike.

    uv run python -m bench.ab_create --a-src /tmp/old/src --b-src src --rounds 4 --seconds 5

A source tree is put first on PYTHONPATH of its create process (an empty value: the installed one).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
from pathlib import Path

from tests.support.procs import System

from bench.harness import (
    PG_ADMIN_URL,
    Resources,
    WaitSampler,
    log,
    make_log_dir,
    metric_sum,
    pg_val,
    run_wrk,
    spawn_service,
    start_procs,
    system_env,
)
from bench.workload import BulkLoader
from pydist.devtools.coinbase_stub import CoinbaseStub

_SESSIONS = "SELECT sessions FROM pg_stat_database WHERE datname = $1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--a-src", default="", help="source tree for A (empty: installed)")
    parser.add_argument("--b-src", default="", help="source tree for B (empty: installed)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rows", type=int, default=100_000, help="bulk rows in both models first")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for both creates")
    parser.add_argument("--service", choices=("create", "fetch"), default="create")
    parser.add_argument("--keep-logs", action="store_true", help="keep the process logs directory")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.env)
    stub = CoinbaseStub().start()
    res = Resources.create()
    system = System(system_env(res, stub.url), log_dir=make_log_dir())
    procs = []
    try:
        start_procs(system, "price")
        start_procs(system, "relay", "sync")
        asyncio.run(BulkLoader(res.write_url, res.read_url).load_to(args.rows))
        variants = {}
        for label, src in (("A", args.a_src), ("B", args.b_src)):
            env = {**extra, "PYTHONPATH": str(Path(src).resolve()) if src else ""}
            proc = spawn_service(system, args.service, f"{args.service}-{label}", env)
            procs.append(proc)
            variants[label] = proc
        results: dict[str, list[tuple[float, float, float, float, float]]] = {"A": [], "B": []}
        path, script = ("/buy_order", "create.lua")
        if args.service == "fetch":
            path, script = ("/buy_orders?page_size=10", "get.lua")
        for proc in variants.values():  # warm-up
            run_wrk(proc.url + path, script, connections=args.connections, duration_s=1)
        for _ in range(args.rounds):
            for label, proc in variants.items():
                b0 = metric_sum(proc.url, "pydist_write_batch_orders")
                s0 = pg_val(PG_ADMIN_URL, _SESSIONS, res.write_db)
                with WaitSampler([res.write_db, res.read_db]) as waits:
                    r = run_wrk(
                        proc.url + path,
                        script,
                        connections=args.connections,
                        duration_s=args.seconds,
                        meter={"create": proc.popen.pid},
                        pg_dbs=[res.write_db, res.read_db],
                    )
                b1 = metric_sum(proc.url, "pydist_write_batch_orders")
                opened = (pg_val(PG_ADMIN_URL, _SESSIONS, res.write_db) - s0) / args.seconds
                count, total = "pydist_write_batch_orders_count", "pydist_write_batch_orders_sum"
                n = b1.get(count, 0) - b0.get(count, 0)
                o = b1.get(total, 0) - b0.get(total, 0)
                results[label].append(
                    (r.rps, r.p99_ms, r.cpu["create_cpu"], r.cpu["postgres_cpu"], o / n if n else 0.0)
                )
                log(
                    f"{label}: {r.rps:,.0f} req/s p50 {r.p50_ms:.1f} p99 {r.p99_ms:.1f} ms, errors "
                    f"{r.errors}; create {r.cpu['create_cpu']:.2f} core, postgres "
                    f"{r.cpu['postgres_cpu']:.2f}, machine {100 * r.cpu['machine_busy']:.0f}%; "
                    f"batch {o / n if n else 0:.1f}; {opened:.0f} connections opened/s"
                )
                log("   waits: " + "; ".join(f"{k} {v:.2f}" for k, v in waits.top(6)))
        for label, rows in results.items():
            med = [statistics.median(col) for col in zip(*rows, strict=True)]
            log(
                f"{label} median: {med[0]:,.0f} req/s, p99 {med[1]:.1f} ms, create {med[2]:.2f} core, "
                f"postgres {med[3]:.2f} core, batch {med[4]:.1f}"
            )
        a = statistics.median(r[0] for r in results["A"])
        b = statistics.median(r[0] for r in results["B"])
        log(f"B / A = {b / a:.2f}")
    finally:
        for proc in procs:
            proc.stop()
        system.stop_all()
        res.close()
        stub.stop()
        if args.keep_logs:
            log(f"process logs kept in {system.log_dir}")
        else:
            shutil.rmtree(system.log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
