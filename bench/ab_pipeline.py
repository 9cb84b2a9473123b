"""A/B of relay settings at a constant arrival rate, the whole pipeline running: create's open-loop
latency, the CPU per order of relay + RabbitMQ + sync, and the read-model lag. One system (price,
create, read_model_sync); each variant is a relay process with its own environment, started for
its turn and stopped after it (the backlog drained first, so no claim is held across a turn):

    uv run python -m bench.ab_pipeline --rate 800 \\
        --env-for p0:RELAY_PACE_S=0 --env-for p10:RELAY_PACE_S=0.01

With `--connections N` the load is wrk's closed loop at c=N instead (the sustained run's load).
"""

from __future__ import annotations

import argparse
import asyncio
from statistics import median
from typing import Any

from tests.support.procs import System

from bench import harness, open_loop
from bench.harness import Resources, log, processes, resources, spawn, stop_procs
from bench.workload import BulkLoader, drained, lag_between, lag_text


def load(system: System, res: Resources, args: argparse.Namespace, pids: dict[str, int]) -> dict[str, Any]:
    """Open loop at `args.rate`, or with `args.connections` wrk's closed loop."""
    if not args.connections:
        return open_loop.measured(system.url("create"), args.rate, args.seconds, pids, res.dbs)
    url, waits = system.url("create") + harness.PATHS["create"], harness.PgWaits(res.dbs)
    run = harness.run_wrk(url, "create.lua", args.connections, args.seconds, pids, res.dbs)
    log(f"  Postgres: {open_loop.wait_shares(waits.stop())}")
    return {k: getattr(run, k) for k in ("rps", "p50_ms", "p99_ms", "cpu", "t0", "t1")}


def one_turn(system: System, res: Resources, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Start a relay with `env`, load create, wait until everything is projected, stop the relay:
    the latencies, the CPU reading and the lag of that turn."""
    relay = spawn(system, {"relay": ("relay", env)})["relay"]
    pids = harness.meter_pids(system, "price")
    with drained(res):
        r = load(system, res, args, pids)
    r |= asyncio.run(lag_between(res, r["t0"], r["t1"]))
    r["events_per_message"] = harness.hist_mean(harness.histogram(relay.url, "pydist_events_per_message"))
    stop_procs(system, "relay")
    assert not relay.alive()
    cores = sum(r["cpu"].get(f"{n}_cpu", 0.0) for n in ("relay", "sync", "rabbitmq"))
    r["pipeline_us"] = cores * args.seconds / max(r["written"], 1.0) * 1e6
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--env-for", action="append", default=[], help="LABEL:NAME=VALUE (repeat)")
    parser.add_argument("--rate", type=float, default=800, help="orders per second")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=0, help="closed loop (wrk) at c=N instead")
    parser.add_argument("--rows", type=int, default=100_000, help="bulk rows in both models first")
    args = parser.parse_args()
    envs = harness.env_for(args.env_for, {}, new_labels=True)
    turns: dict[str, list[dict[str, Any]]] = {label: [] for label in envs}
    with resources() as res, processes(res, "price", "create", "sync") as system:
        asyncio.run(BulkLoader(res.write_url, res.read_url).load_to(args.rows))
        for _ in range(args.rounds):
            for label, env in envs.items():
                turns[label].append(r := one_turn(system, res, env, args))
                log(f"{label}: {summary(r)}")
                if "pg_waits" in r:
                    log(f"  {open_loop.stalls(r)}")
    for label, rs in turns.items():
        medians = {k: median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
        medians["cpu"] = {k: median(r["cpu"][k] for r in rs) for k in rs[0]["cpu"]}
        log(f"{label} (medians of {len(rs)}): {summary(medians)}")


def summary(r: dict[str, Any]) -> str:
    cpu = r["cpu"]
    rate = f"{r['rps']:,.0f} orders/s; " if "rps" in r else ""
    return rate + (
        f"p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms; pipeline {r['pipeline_us']:.0f} µs/order, "
        f"{r['events_per_message']:.1f} events/message; {lag_text(r)}; {harness.cores_text(cpu)}"
    )


if __name__ == "__main__":
    main()
