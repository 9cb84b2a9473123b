"""Run one process's ASGI app under uvicorn with graceful SIGTERM/SIGINT handling and exit 0.

uvicorn is handed `partial(process_app, name)`, which imports the one app module the process runs
when uvicorn builds the app: after `serve` has settled the metrics directory (prometheus_client
reads it when first imported), and in each worker only (uvicorn's multi-worker mode pickles the
partial and every spawned worker builds its own app; the supervisor imports no app). No app
module imports this one.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from functools import partial
from pathlib import Path
from socket import socket
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn
from uvicorn.supervisors import Multiprocess

from pydist.config import GRACEFUL_SHUTDOWN_S, MULTIPROC_DIR_ENV, Settings, get_settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = structlog.get_logger()

PORTS = {
    "create": ("create_buy_order_port", "create_buy_order"),
    "fetch": ("fetch_buy_orders_port", "fetch_buy_orders"),
    "price": ("btc_price_port", "btc_price"),
    "relay": ("relay_metrics_port", "relay"),
    "sync": ("sync_metrics_port", "read_model_sync"),
}
"""Each process's port setting and its service name (in logs and metrics)."""


def process_app(name: str) -> FastAPI:
    """Import process `name`'s app module (and only it), and build its app."""
    if name == "create":
        from pydist.entrypoints import create_api

        return create_api.create_app()
    if name == "fetch":
        from pydist.entrypoints import fetch_api

        return fetch_api.create_app()
    if name == "price":
        from pydist.entrypoints import price_api

        return price_api.create_app()
    from pydist.entrypoints import workers

    if name == "relay":
        return workers.create_relay_app()
    if name == "sync":
        return workers.create_sync_app()
    raise ValueError(f"no process {name!r}: one of {', '.join(PORTS)}")


MULTI_WORKER = frozenset({"create", "fetch"})
"""The processes WEB_CONCURRENCY applies to. btc_price stays one process (one cache, one bounded
call rate to Coinbase, and a price age computed at scrape time); relay and sync scale as more
processes sharing the outbox or the queue."""


def multiprocess_directory(configured: str | None, service: str) -> tuple[Path, bool]:
    """Where a multi-worker run keeps its metric files, and whether the run owns (made, and so
    removes) it. An operator-set PROMETHEUS_MULTIPROC_DIR is used, created if missing, and wiped
    of its metric files (`*.db`, nothing else): a previous run's values must not be added to this
    one's. Otherwise a fresh directory under the system temp dir."""
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        return path, False
    return Path(tempfile.mkdtemp(prefix=f"pydist-{service}-metrics-")), True


class MetricsSupervisor(Multiprocess):
    """uvicorn's worker supervisor, telling prometheus-client about every worker that exited
    (`mark_process_dead`: a "live*" gauge's values leave with their process; counters and
    histograms stay in the totals). uvicorn has no exit hook: the supervisor loop calls
    keep_subprocess_alive every 0.5 s, after it handled signals (SIGHUP restarts, SIGTTOU), and
    replaces dead workers there, so a worker missing from the list afterwards has exited."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket], directory: Path) -> None:
        super().__init__(config, sockets)
        self.directory = directory
        self._running: set[int] = set()

    def _workers(self) -> set[int]:
        return {p.pid for p in self.processes if p.pid is not None}

    def _mark_exited(self, pids: set[int]) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        for pid in sorted(pids):
            mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]
            log.info("metrics_worker_exited", pid=pid)

    def init_processes(self) -> None:
        super().init_processes()
        self._running = self._workers()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        running = self._workers()
        self._mark_exited(self._running - running)
        self._running = running

    def join_all(self) -> None:
        super().join_all()
        self._mark_exited(self._running | self._workers())
        self._running = set()


def serve(name: str, *, workers: int | None = None) -> None:
    port_field, service = PORTS[name]
    settings = get_settings()
    # uvicorn re-raises the signal it caught after its graceful shutdown; with these handlers in
    # place that re-raise is a no-op, so a SIGTERM ends in a clean exit 0 (12-factor disposability).
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    n = workers or (settings.web_concurrency if name in MULTI_WORKER else 1)
    if n > 1 and name not in MULTI_WORKER:
        raise SystemExit(f"{service} runs as one process; it cannot have {n} workers")
    config: dict[str, Any] = {
        "factory": True,
        "host": settings.bind_host,
        "port": getattr(settings, port_field),
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "server_header": False,
        "log_config": None,
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
        "lifespan": "on",
        "backlog": 4096,
    }
    if n == 1:
        # One process: its own in-memory registry is the whole truth (multiprocess mode would cost
        # a file write per value and drop the process_* metrics). prometheus_client reads the
        # variable when it is first imported, which is after this (in the app factory).
        if "prometheus_client" not in sys.modules:
            os.environ.pop(MULTIPROC_DIR_ENV, None)
            os.environ.pop(MULTIPROC_DIR_ENV.lower(), None)  # the deprecated spelling
        uvicorn.run(partial(process_app, name), workers=1, **config)
        return
    serve_workers(name, service, n, settings, config)


def serve_workers(name: str, service: str, n: int, settings: Settings, config: dict[str, Any]) -> None:
    """`n` uvicorn workers sharing one socket, their metrics in one multiprocess directory."""
    from pydist.logs import configure_logging

    # The supervisor's own events (and uvicorn's) as JSON lines, like the workers'.
    configure_logging(service, settings)
    directory, owned = multiprocess_directory(settings.prometheus_multiproc_dir, service)
    # Before any worker starts: each one (spawned, so importing prometheus_client afresh) reads it.
    os.environ[MULTIPROC_DIR_ENV] = str(directory)
    os.environ.pop(MULTIPROC_DIR_ENV.lower(), None)
    log.info("metrics_multiprocess", directory=str(directory), workers=n, owned=owned)
    try:
        uv_config = uvicorn.Config(partial(process_app, name), workers=n, **config)
        sock = uv_config.bind_socket()
        MetricsSupervisor(uv_config, sockets=[sock], directory=directory).run()
    finally:
        if owned:
            shutil.rmtree(directory, ignore_errors=True)
