"""What prometheus-client's multiprocess mode costs a request, measured in-process.

CPU time of the measuring process (time.process_time: the 2-core machine is shared, and wall time
would count the other work's share). Each mode runs in its own interpreter (the mode is fixed when
prometheus_client is imported), the two alternating (ABBA...) so machine noise hits both alike.
Per run, best of `--repeat` rounds:

- observe: the metric work every request does, `HTTP_LATENCY.labels(...).observe(...)`;
- create: what a created order adds, that observe plus `pydist_orders_created_total{currency}`;
- request: a whole `GET /healthcheck` through the real app of fetch_buy_orders (EdgeMiddleware,
  routing, handler), driven as ASGI calls without a server or a client;
- scrape: `metrics.render()` with the files of 2 workers (multiprocess) or the registry (single).

    uv run python -m bench.metrics_cost [--runs 3] [--n 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping
from typing import Any

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _best(fn: Callable[[], object], n: int, repeat: int) -> float:
    """Best of `repeat` rounds of `n` calls: seconds per call."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - started) / n)
    return best


async def _request_cost(n: int, repeat: int) -> float:
    from pydantic import SecretStr

    from pydist.config import Settings
    from pydist.entrypoints.fetch_api import create_app

    unreachable = SecretStr("postgresql://bench@127.0.0.1:9/never")  # never connected to
    settings = Settings(read_database_url=unreachable, log_level="ERROR")
    app = create_app(settings)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/healthcheck",
        "raw_path": b"/healthcheck",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            assert message["status"] == 200, message

    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for _ in range(n):
            await app(dict(scope), receive, send)
        best = min(best, (time.process_time() - started) / n)
    return best


def measure(n: int, repeat: int) -> dict[str, float]:
    """Run in a child interpreter: the figures of the mode its environment selects."""
    import uvloop

    from pydist import metrics

    multiprocess = metrics.multiprocess_dir() is not None
    labels = metrics.HTTP_LATENCY.labels("create_buy_order", "PUT", "/buy_order", "200")
    created = metrics.ORDERS_CREATED.labels("USD")
    metrics.expose(*metrics.CREATE_METRICS)

    def observe() -> None:
        metrics.HTTP_LATENCY.labels("create_buy_order", "PUT", "/buy_order", "200").observe(0.0042)

    def create() -> None:
        labels.observe(0.0042)
        created.inc()

    gc.collect()
    gc.freeze()
    out = {
        "multiprocess": float(multiprocess),
        "observe_us": _best(observe, n, repeat) * 1e6,
        "create_us": _best(create, n, repeat) * 1e6,
        "request_us": uvloop.run(_request_cost(n // 4, repeat)) * 1e6,
    }
    if multiprocess:  # a second worker's files, as in a 2-worker run
        subprocess.run([sys.executable, "-c", _SECOND_WORKER], check=True, env=os.environ.copy())
    out["scrape_ms"] = _best(metrics.render, 50, repeat) * 1e3
    return out


_SECOND_WORKER = """
from pydist import metrics
metrics.HTTP_LATENCY.labels("create_buy_order", "PUT", "/buy_order", "200").observe(0.0042)
metrics.HTTP_LATENCY.labels("fetch_buy_orders", "GET", "/buy_orders", "200").observe(0.0042)
metrics.ORDERS_CREATED.labels("USD").inc()
"""


def _child(multiprocess: bool, n: int, repeat: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k.upper() != MULTIPROC_ENV}
    with tempfile.TemporaryDirectory(prefix="pydist-bench-metrics-") as directory:
        if multiprocess:
            env[MULTIPROC_ENV] = directory
        code = f"import json, bench.metrics_cost as m; print(json.dumps(m.measure({n}, {repeat})))"
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    assert bool(result["multiprocess"]) == multiprocess, result
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="runs per mode, alternating")
    parser.add_argument("--n", type=int, default=20000, help="calls per round")
    parser.add_argument("--repeat", type=int, default=7, help="rounds per run (best kept)")
    args = parser.parse_args()
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for i in range(args.runs):
        for multiprocess in (False, True) if i % 2 == 0 else (True, False):  # ABBA: no order bias
            runs[multiprocess].append(_child(multiprocess, args.n, args.repeat))
    keys = ("observe_us", "create_us", "request_us", "scrape_ms")
    print("| figure (median of runs) | single process | multiprocess | difference |")
    print("|---|---|---|---|")
    for key in keys:
        single, multi = (statistics.median(r[key] for r in runs[mode]) for mode in (False, True))
        spread = {mode: "/".join(f"{r[key]:.2f}" for r in runs[mode]) for mode in (False, True)}
        diff = multi - single
        print(f"| {key} | {single:.2f} ({spread[False]}) | {multi:.2f} ({spread[True]}) | {diff:+.2f} |")


if __name__ == "__main__":
    main()
