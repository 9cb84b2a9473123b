"""relay and read_model_sync: background workers that still answer /healthcheck, /readyz and
/metrics over HTTP, and shut down through the same graceful path as the APIs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from pydist.adapters.broker import BatchingConsumer, BrokerPublisher
from pydist.adapters.db import make_engine, wait_until_ready
from pydist.adapters.outbox import Outbox
from pydist.adapters.read_store import ReadStore
from pydist.config import Settings, get_settings
from pydist.entrypoints.http_app import build_app
from pydist.metrics import OUTBOX_BACKLOG
from pydist.service.ports import EventSink
from pydist.service.projector import Projector
from pydist.service.relay import Relay

log = structlog.get_logger()


def _plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def create_relay_app(settings: Settings | None = None) -> FastAPI:
    """Outbox → broker; with no BROKER_URL, outbox → projector → read model (embedded mode)."""
    settings = settings or get_settings()
    write_url = settings.write_database_url.get_secret_value()
    engine = make_engine(write_url, 4, "pydist-relay")
    outbox = Outbox(engine, _plain_dsn(write_url))
    read_engine = None
    publisher: BrokerPublisher | None = None
    sink: EventSink
    if settings.broker_url is not None:
        publisher = BrokerPublisher(settings.broker_url.get_secret_value())
        sink = publisher
    else:
        read_engine = make_engine(settings.read_database_url.get_secret_value(), 4, "pydist-relay-embedded")
        sink = Projector(ReadStore(read_engine))
    relay = Relay(outbox, sink, batch=settings.relay_batch)

    async def watch_backlog(stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                OUTBOX_BACKLOG.set(await outbox.backlog())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=2)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await wait_until_ready(engine)
        if read_engine is not None:
            await wait_until_ready(read_engine)
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(outbox.listen(relay.wake.set, stop), name="outbox-listen"),
            asyncio.create_task(relay.run(stop), name="relay"),
            asyncio.create_task(watch_backlog(stop), name="outbox-backlog"),
        ]
        log.info("relay_started", mode="broker" if publisher else "embedded")
        yield
        stop.set()
        await asyncio.wait(tasks, timeout=10)
        if publisher is not None:
            await publisher.close()
        await engine.dispose()
        if read_engine is not None:
            await read_engine.dispose()
        log.info("relay_stopped")

    return build_app(
        service="relay",
        title="pydist: relay",
        description="Publishes committed outbox events.",
        settings=settings,
        ready=lambda: _ping(engine),
        lifespan=lifespan,
    )


def create_sync_app(settings: Settings | None = None) -> FastAPI:
    """read_model_sync: broker → projector → read model, acking only after the commit."""
    settings = settings or get_settings()
    if settings.broker_url is None:
        raise SystemExit("read_model_sync needs BROKER_URL (without it the relay projects directly)")
    engine = make_engine(settings.read_database_url.get_secret_value(), 4, "pydist-sync")
    projector = Projector(ReadStore(engine))
    consumer = BatchingConsumer(
        settings.broker_url.get_secret_value(),
        projector.publish,
        prefetch=settings.sync_prefetch,
    )

    async def consume(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await consumer.run_once(timeout=0.5)
        # Drain what was already delivered before closing; the rest is redelivered elsewhere.
        while not consumer.idle():
            await consumer.run_once(timeout=0.1)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await wait_until_ready(engine)
        await consumer.start()
        stop = asyncio.Event()
        task = asyncio.create_task(consume(stop), name="consume")
        log.info("sync_started")
        yield
        await consumer.stop_consuming()
        stop.set()
        await asyncio.wait([task], timeout=10)
        await consumer.close()
        await engine.dispose()
        log.info("sync_stopped")

    return build_app(
        service="read_model_sync",
        title="pydist: read_model_sync",
        description="Projects events into the read model.",
        settings=settings,
        ready=lambda: _ping(engine),
        lifespan=lifespan,
    )


async def _ping(engine: object) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncEngine

    assert isinstance(engine, AsyncEngine)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
