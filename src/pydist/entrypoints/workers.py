"""relay and read_model_sync: background workers that still answer /healthcheck, /readyz and
/metrics over HTTP, and shut down through the same graceful path as the APIs.

Neither blocks its start-up on a backing service: the HTTP port opens at once, the work starts as
soon as the databases (and the broker) answer, and /readyz says 503 until then."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import structlog
from fastapi import FastAPI

from pydist import bootstrap
from pydist.adapters.rabbit import DEAD_LETTER_QUEUE, depth
from pydist.config import Settings, get_settings
from pydist.entrypoints.http_app import build_app
from pydist.entrypoints.lifecycle import await_dependency, every, running
from pydist.metrics import (
    BROKER_RELAY_METRICS,
    DLQ_MESSAGES,
    PROJECTION_METRICS,
    RELAY_METRICS,
    SYNC_METRICS,
    expose,
)

log = structlog.get_logger()

DATABASE_ATTEMPT_S = 5.0
BROKER_ATTEMPT_S = 20.0
"""One broker attempt: every node of BROKER_URL is tried within it (5 s connect timeout each)."""
WATCH_S = 2.0
"""How often the DLQ depth is measured for /metrics."""
SHUTDOWN_S = 10.0
Check = Callable[[], Awaitable[Any]]


class _NotStarted(Exception):
    pass


@dataclass
class _Worker:
    """What tells the two workers apart; `_worker_app` runs either the same way."""

    service: str
    event: str
    """The prefix of its log events (`relay_started`, `sync_stopped`, …)."""
    description: str
    dependencies: Sequence[tuple[str, Check, float]]
    """Awaited in turn before the work starts: name, check, the bound of one attempt."""
    work: Callable[[asyncio.Event], Awaitable[Any]]
    running: Callable[[], bool]
    databases: Sequence[Check]
    """Pinged by /readyz once running."""
    close: Check
    fields: dict[str, str] = field(default_factory=dict)


def _worker_app(settings: Settings, worker: _Worker) -> FastAPI:
    async def run(stop: asyncio.Event) -> None:
        for name, check, attempt_s in worker.dependencies:
            if not await await_dependency(name, check, stop, attempt_timeout_s=attempt_s):
                return
        await worker.work(stop)

    async def ready() -> None:
        if not worker.running():
            raise _NotStarted(f"{worker.service} not running yet")
        for check in worker.databases:
            await check()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # At the stop the work ends: the consumer settles what it already holds.
        async with running(worker.event, [run], worker.close, stop_s=SHUTDOWN_S, **worker.fields):
            yield

    return build_app(
        service=worker.service,
        title=f"pydist: {worker.service}",
        description=worker.description,
        settings=settings,
        ready=ready,
        lifespan=lifespan,
    )


def create_relay_app(
    settings: Settings | None = None, *, graph: bootstrap.RelayGraph | None = None
) -> FastAPI:
    """Outbox → broker; with no BROKER_URL, outbox → projector → read model (direct mode)."""
    settings = settings or get_settings()
    g = graph or bootstrap.relay(settings)
    expose(*RELAY_METRICS, *(BROKER_RELAY_METRICS if g.publisher else PROJECTION_METRICS))
    mode = "broker" if g.publisher else "direct"
    pings: dict[str, Check] = {"write_database": g.db.ping}
    if g.read_db is not None:
        pings["read_database"] = g.read_db.ping
    dependencies = [(name, check, DATABASE_ATTEMPT_S) for name, check in pings.items()]
    if g.publisher is not None:
        dependencies.append(("broker", g.publisher.start, BROKER_ATTEMPT_S))
    running = asyncio.Event()

    async def work(stop: asyncio.Event) -> None:
        running.set()
        log.info("relay_running", mode=mode)
        await asyncio.gather(g.outbox.listen(g.relay.wake.set, stop), g.relay.run(stop))

    description = "Publishes committed outbox events."
    databases = list(pings.values())
    worker = _Worker("relay", "relay", description, dependencies, work, running.is_set, databases, g.aclose)
    worker.fields["mode"] = mode
    return _worker_app(settings, worker)


def create_sync_app(settings: Settings | None = None, *, graph: bootstrap.SyncGraph | None = None) -> FastAPI:
    """read_model_sync: broker → projector → read model, acking only after the commit."""
    settings = settings or get_settings()
    g = graph or bootstrap.sync(settings)
    expose(*SYNC_METRICS)

    async def measure_dlq() -> None:
        try:
            DLQ_MESSAGES.set(await depth(await g.dlq_link.channel(), DEAD_LETTER_QUEUE))
        except Exception:
            await g.dlq_link.reset()
            raise

    async def work(stop: asyncio.Event) -> None:
        log.info("sync_consuming")
        await asyncio.gather(g.consumer.run(stop), every(stop, WATCH_S, measure_dlq))

    database = (g.db.ping,)
    dependencies = [
        ("read_database", database[0], DATABASE_ATTEMPT_S),
        ("broker", g.consumer.start, BROKER_ATTEMPT_S),
    ]
    description = "Projects events into the read model."
    return _worker_app(
        settings,
        _Worker(
            "read_model_sync",
            "sync",
            description,
            dependencies,
            work,
            g.consumer.consuming.is_set,
            database,
            g.aclose,
        ),
    )
