"""relay and read_model_sync: background workers that still answer /healthcheck, /readyz and
/metrics over HTTP, and shut down through the same graceful path as the APIs.

Neither blocks its start-up on a backing service: the HTTP port opens at once, the work starts as
soon as the databases (and the broker) answer, and /readyz says 503 until then."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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


def _worker_app(
    settings: Settings,
    *,
    service: str,
    event: str,
    description: str,
    databases: dict[str, Check],
    broker: Check | None,
    work: Callable[[asyncio.Event], Awaitable[Any]],
    is_running: Callable[[], bool],
    close: Check,
    **fields: str,
) -> FastAPI:
    """Either worker's app. `event` prefixes its log events (`relay_started`, `sync_stopped`, …).
    Before the work starts the `databases` and then the `broker` are awaited in turn; once
    `is_running`, /readyz pings the databases."""
    dependencies = [(name, check, DATABASE_ATTEMPT_S) for name, check in databases.items()]
    if broker is not None:
        dependencies.append(("broker", broker, BROKER_ATTEMPT_S))

    async def run(stop: asyncio.Event) -> None:
        for name, check, attempt_s in dependencies:
            if not await await_dependency(name, check, stop, attempt_timeout_s=attempt_s):
                return
        await work(stop)

    async def ready() -> None:
        if not is_running():
            raise _NotStarted(f"{service} not running yet")
        for check in databases.values():
            await check()

    return build_app(
        service=service,
        title=f"pydist: {service}",
        description=description,
        settings=settings,
        ready=ready,
        # At the stop the work ends: the consumer settles what it already holds.
        lifespan=lambda _: running(event, [run], close, stop_s=SHUTDOWN_S, **fields),
    )


def create_relay_app(
    settings: Settings | None = None, *, graph: bootstrap.RelayGraph | None = None
) -> FastAPI:
    """Outbox → broker; with no BROKER_URL, outbox → projector → read model (direct mode)."""
    settings = settings or get_settings()
    g = graph or bootstrap.relay(settings)
    expose(*RELAY_METRICS, *(BROKER_RELAY_METRICS if g.publisher else PROJECTION_METRICS))
    mode = "broker" if g.publisher else "direct"
    databases: dict[str, Check] = {"write_database": g.db.ping}
    if g.read_db is not None:
        databases["read_database"] = g.read_db.ping
    relaying = asyncio.Event()

    async def work(stop: asyncio.Event) -> None:
        relaying.set()
        log.info("relay_running", mode=mode)
        await asyncio.gather(g.outbox.listen(g.relay.wake.set, stop), g.relay.run(stop))

    return _worker_app(
        settings,
        service="relay",
        event="relay",
        description="Publishes committed outbox events.",
        databases=databases,
        broker=g.publisher.start if g.publisher else None,
        work=work,
        is_running=relaying.is_set,
        close=g.aclose,
        mode=mode,
    )


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

    return _worker_app(
        settings,
        service="read_model_sync",
        event="sync",
        description="Projects events into the read model.",
        databases={"read_database": g.db.ping},
        broker=g.consumer.start,
        work=work,
        is_running=g.consumer.consuming.is_set,
        close=g.aclose,
    )
