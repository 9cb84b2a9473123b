"""A/B runs: variants loaded in turn (A, B, A, B, …) so that machine noise hits all alike. The loop
is `ab_rounds`; ./bench/run.sh uses it for the first/deep page runs and for tracing on/off. Run as
a program, it compares two create (or fetch) processes built from different source trees, on the
same databases, broker and workers:

    uv run python -m bench.ab_create --src A=/tmp/old/src --src B=src --rounds 4 --seconds 5
    uv run python -m bench.ab_create --src off=src --src on=src --env-for off:WRITE_WINDOW_S=0

Each `--src LABEL=PATH` (repeated) is a variant; its tree is put first on PYTHONPATH of its
process (an empty PATH: the installed one). Each variant is compared with the first.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import (
    NAN,
    WrkResult,
    cores_text,
    env_for,
    histogram,
    log,
    processes,
    resources,
    run_wrk,
    spawn,
    stat,
)
from bench.workload import BulkLoader


def wrk_json(results: list[WrkResult]) -> dict[str, Any]:
    """Runs as their medians and spreads (harness.stat), CPU by process included."""
    out = {k: stat([getattr(x, k) for x in results]) for k in ("rps", "p50_ms", "p99_ms", "wrk_cpu")}
    out["cpu"] = {k: stat([x.cpu.get(k, NAN) for x in results]) for k in results[0].cpu}
    return out | {"errors": sum(x.errors for x in results), "requests": sum(x.requests for x in results)}


def ab_rounds(
    urls: dict[str, str],
    script: str,
    connections: int,
    rounds: tuple[int, float],
    meters: dict[str, dict[str, int]],
    pg_dbs: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """A warm-up run of each variant (url), then `rounds` = (n, seconds): n rounds of one wrk run
    per variant in turn. `meters` names the processes whose CPU each variant's runs measure."""
    for url in urls.values():
        run_wrk(url, script, connections, 1)
    out: dict[str, list[WrkResult]] = {label: [] for label in urls}
    for _ in range(rounds[0]):
        for label, url in urls.items():
            out[label].append(r := run_wrk(url, script, connections, rounds[1], meters.get(label), pg_dbs))
            ms = f"p50 {r.p50_ms:.1f} p99 {r.p99_ms:.1f} ms"
            log(f"  {label}: {r.rps:,.0f} req/s {ms}, {r.errors} errors; {cores_text(r.cpu)}")
    return {label: wrk_json(results) for label, results in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--src", action="append", required=True, help="LABEL=PATH (repeat)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rows", type=int, default=100_000, help="bulk rows in both models first")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for both variants")
    parser.add_argument("--env-for", action="append", default=[], help="LABEL:NAME=VALUE for one")
    parser.add_argument("--service", choices=("create", "fetch"), default="create")
    args = parser.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.env)
    create = args.service == "create"
    path, script = ("/buy_order", "create.lua") if create else ("/buy_orders?page_size=10", "get.lua")
    srcs = dict(kv.split("=", 1) for kv in args.src)
    with resources() as res, processes(res, "price", "relay", "sync") as system:
        asyncio.run(BulkLoader(res.write_url, res.read_url).load_to(args.rows))
        paths = {k: str(Path(src).resolve()) if src else "" for k, src in srcs.items()}
        envs = {k: {**extra, "PYTHONPATH": path} for k, path in paths.items()}
        env_for(args.env_for, envs, new_labels=False)
        procs = spawn(system, {k: (args.service, env) for k, env in envs.items()})
        urls = {k: p.url + path for k, p in procs.items()}
        meters = {k: {args.service: p.popen.pid} for k, p in procs.items()}
        runs = ab_rounds(urls, script, args.connections, (args.rounds, args.seconds), meters, res.dbs)
        for label, p in procs.items() if create else ():
            h = histogram(p.url, "pydist_write_batch_orders")
            log(f"{label}: {h['sum'] / max(h['count'], 1):.1f} orders per write batch (mean, all runs)")
    for label, r in runs.items():
        cores = r["cpu"][f"{args.service}_cpu"]["median"]
        log(f"{label}: {r['rps']['median']:,.0f} req/s, p99 {r['p99_ms']['median']:.1f} ms, {cores:.2f} core")
    first, *others = runs
    for label in others:
        log(f"{label} / {first} = {runs[label]['rps']['median'] / runs[first]['rps']['median']:.2f}")


if __name__ == "__main__":
    main()
