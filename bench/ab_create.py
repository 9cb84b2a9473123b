"""A/B of create (or fetch) processes built from different source trees (or run with different
settings), on the same databases, broker and workers, loaded in turn (harness.ab_rounds):

    uv run python -m bench.ab_create --src A=/tmp/old/src --src B=src --rounds 4 --seconds 5
    uv run python -m bench.ab_create --src off=src --src on=src --env-for off:WRITE_WINDOW_S=0

Each `--src LABEL=PATH` (repeated) is a variant; its tree is put first on PYTHONPATH of its
process (an empty PATH: the installed one). Each variant is compared with the first.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bench.harness import ab_procs, env_for, hist_mean, histogram, log, processes, resources, spawn
from bench.workload import BulkLoader


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
    srcs = dict(kv.split("=", 1) for kv in args.src)
    envs = {k: {**extra, "PYTHONPATH": str(Path(src).resolve()) if src else ""} for k, src in srcs.items()}
    env_for(args.env_for, envs, new_labels=False)
    with resources() as res, processes(res, "price", "relay", "sync") as system:
        asyncio.run(BulkLoader(res.write_url, res.read_url).load_to(args.rows))
        procs = spawn(system, {k: (args.service, env) for k, env in envs.items()})
        runs = ab_procs(procs, args.service, (args.rounds, args.seconds), args.connections, res.dbs)
        for label, p in procs.items() if args.service == "create" else ():
            mean = hist_mean(histogram(p.url, "pydist_write_batch_orders"))
            log(f"{label}: {mean:.1f} orders per write batch (mean, all runs)")
    for label, r in runs.items():
        cores = r["cpu"][f"{args.service}_cpu"]["median"]
        log(f"{label}: {r['rps']['median']:,.0f} req/s, p99 {r['p99_ms']['median']:.1f} ms, {cores:.2f} core")
    first, *others = runs
    for label in others:
        log(f"{label} / {first} = {runs[label]['rps']['median'] / runs[first]['rps']['median']:.2f}")


if __name__ == "__main__":
    main()
