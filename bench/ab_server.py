"""uvicorn against granian (a Rust HTTP server for ASGI apps), in one run and in turns
(`ab_rounds`): the hello-world GET and POST, and pydist's fetch and create processes, each served
by both with the settings pydist uses (uvloop, one worker, no access log, backlog 4096).

    uv run --with 'granian[uvloop]==2.8.9' python -m bench.ab_server --rounds 4 --seconds 8

granian is not a dependency of pydist: the run brings it in for itself (`uv run --with`).
Results: docs/benchmarks.md, "The ASGI server".
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from tests.support.procs import Proc

from bench.ab_create import ab_rounds
from bench.harness import log, processes, resources, spawn, start_hello, start_server
from bench.workload import BulkLoader


def start_granian(label: str, target: str, env: dict[str, str] | None, log_dir: Path) -> Proc:
    """`target` (module:app, or module:factory when `env` is given: a pydist process) under granian."""
    opts = "--interface asgi --host 127.0.0.1 --loop uvloop --workers 1 --backlog 4096 --no-ws --http 1"
    factory = ["--factory"] if env is not None else []

    def argv(port: int) -> list[str]:
        return ["granian", *opts.split(), "--port", str(port), *factory, target]

    return start_server(label, argv, log_dir, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    extra: list[Proc] = []
    with resources() as res, processes(res, "price", "relay", "sync") as system:
        asyncio.run(BulkLoader(res.write_url, res.read_url).load_to(10_000))
        uv = spawn(system, {"create": ("create", {}), "fetch": ("fetch", {})})
        env = {**system.env, "BTC_PRICE_URL": system.url("price")}
        try:
            extra.append(start_hello(system.log_dir))
            extra.append(start_granian("hello-granian", "bench.hello_app:app", None, system.log_dir))
            for s in uv:
                target = f"pydist.entrypoints.{s}_api:create_app"
                extra.append(start_granian(f"{s}-granian", target, env, system.log_dir))
            hello, hello_g, create_g, fetch_g = extra
            pairs = {
                "hello GET": ((hello.url, hello_g.url), "/hello", "get.lua"),
                "hello POST": ((hello.url, hello_g.url), "/hello", "post.lua"),
                "fetch": ((uv["fetch"].url, fetch_g.url), "/buy_orders?page_size=10", "get.lua"),
                "create": ((uv["create"].url, create_g.url), "/buy_order", "create.lua"),
            }
            for name, ((a, b), path, script) in pairs.items():
                log(f"{name}: uvicorn, granian")
                urls = {"uvicorn": a + path, "granian": b + path}
                runs = ab_rounds(urls, script, args.connections, (args.rounds, args.seconds), {})
                ratio = runs["granian"]["rps"]["median"] / runs["uvicorn"]["rps"]["median"]
                log(f"{name}: granian / uvicorn = {ratio:.2f}")
        finally:
            for proc in extra:
                proc.popen.terminate()
                proc.popen.wait(timeout=30)


if __name__ == "__main__":
    main()
