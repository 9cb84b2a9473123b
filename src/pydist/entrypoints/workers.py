"""relay and read_model_sync: background workers that still answer /healthcheck, /readyz and
/metrics over HTTP, and shut down through the same graceful path as the APIs.

Neither blocks its start-up on a backing service: the HTTP port opens at once, the work starts as
soon as the databases (and the broker) answer, and /readyz says 503 until then."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from pydist.adapters.consumer import EnvelopeConsumer
from pydist.adapters.db import make_engine, ping
from pydist.adapters.outbox import Outbox
from pydist.adapters.publisher import BrokerPublisher
from pydist.adapters.rabbit import DEAD_LETTER_QUEUE, BrokerLink, depth
from pydist.adapters.read_store import ReadStore
from pydist.config import Settings, get_settings, plain_url
from pydist.entrypoints.http_app import build_app
from pydist.entrypoints.serve import await_dependency, cancel_tasks
from pydist.metrics import (
    BROKER_RELAY_METRICS,
    DLQ_MESSAGES,
    PROJECTION_METRICS,
    RELAY_METRICS,
    SYNC_METRICS,
    expose,
)
from pydist.service.ports import EventSink
from pydist.service.projector import Projector
from pydist.service.relay import Relay

log = structlog.get_logger()

BROKER_ATTEMPT_S = 20.0
"""One broker attempt: every node of BROKER_URL is tried within it (5 s connect timeout each)."""
WATCH_S = 2.0
"""How often the DLQ depth is measured for /metrics."""
SHUTDOWN_S = 10.0


class _NotStarted(Exception):
    pass


def relay_engine(write_url: str) -> AsyncEngine:
    """The relay's write-model engine (bench/pipeline_cpu.py builds the relay with it too)."""
    return make_engine(write_url, 4, "pydist-relay")


def build_sync(read_url: str, broker_url: str, *, prefetch: int) -> tuple[AsyncEngine, EnvelopeConsumer]:
    """read_model_sync's engine and consumer, as the process runs them (and bench/pipeline_cpu.py).

    No pool pre-ping: it cost three round trips per batch (~10% of the process's CPU); a dead
    connection is renewed and retried by ReadStore itself."""
    engine = make_engine(read_url, 4, "pydist-sync", pre_ping=False)
    projector = Projector(ReadStore(engine))
    return engine, EnvelopeConsumer(broker_url, projector.publish, prefetch=prefetch)


async def _every(stop: asyncio.Event, seconds: float, measure: Callable[[], Awaitable[None]]) -> None:
    """Run `measure` every `seconds` until `stop`; a failed measurement waits for the next."""
    while not stop.is_set():
        try:
            await measure()
        except Exception as exc:
            log.debug("measure_failed", error=type(exc).__name__)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)


def create_relay_app(settings: Settings | None = None) -> FastAPI:
    """Outbox → broker; with no BROKER_URL, outbox → projector → read model (embedded mode)."""
    settings = settings or get_settings()
    expose(*RELAY_METRICS)
    write_url = settings.write_database_url.get_secret_value()
    engine = relay_engine(write_url)
    outbox = Outbox(engine, plain_url(write_url))
    read_engine: AsyncEngine | None = None
    publisher: BrokerPublisher | None = None
    sink: EventSink
    if settings.broker_url is not None:
        publisher = BrokerPublisher(settings.broker_url.get_secret_value())
        sink = publisher
        expose(*BROKER_RELAY_METRICS)
    else:
        read_engine = make_engine(settings.read_database_url.get_secret_value(), 4, "pydist-relay-embedded")
        sink = Projector(ReadStore(read_engine))
        expose(*PROJECTION_METRICS)
    relay = Relay(outbox, sink, batch=settings.relay_batch)
    running = asyncio.Event()

    async def run(stop: asyncio.Event) -> None:
        if not await await_dependency("write_database", lambda: ping(engine), stop):
            return
        if read_engine is not None:
            read = read_engine
            if not await await_dependency("read_database", lambda: ping(read), stop):
                return
        if publisher is not None and not await await_dependency(
            "broker", publisher.start, stop, attempt_timeout_s=BROKER_ATTEMPT_S
        ):
            return
        running.set()
        log.info("relay_running", mode="broker" if publisher else "embedded")
        await asyncio.gather(
            outbox.listen(relay.wake.set, stop),
            relay.run(stop),
        )

    async def ready() -> None:
        if not running.is_set():
            raise _NotStarted("relay not running yet")
        await ping(engine)
        if read_engine is not None:
            await ping(read_engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(run(stop), name="relay")
        log.info("relay_started", mode="broker" if publisher else "embedded")
        yield
        stop.set()
        await cancel_tasks([task], timeout=SHUTDOWN_S)
        if publisher is not None:
            with contextlib.suppress(Exception):
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
        ready=ready,
        lifespan=lifespan,
    )


def create_sync_app(settings: Settings | None = None) -> FastAPI:
    """read_model_sync: broker → projector → read model, acking only after the commit."""
    settings = settings or get_settings()
    if settings.broker_url is None:
        raise SystemExit("read_model_sync needs BROKER_URL (without it the relay projects directly)")
    expose(*SYNC_METRICS)
    broker_url = settings.broker_url.get_secret_value()
    engine, consumer = build_sync(
        settings.read_database_url.get_secret_value(), broker_url, prefetch=settings.sync_prefetch
    )
    dlq_link = BrokerLink(broker_url, publisher_confirms=False)

    async def measure_dlq() -> None:
        try:
            DLQ_MESSAGES.set(await depth(await dlq_link.channel(), DEAD_LETTER_QUEUE))
        except Exception:
            await dlq_link.reset()
            raise

    async def run(stop: asyncio.Event) -> None:
        if not await await_dependency("read_database", lambda: ping(engine), stop):
            return
        if not await await_dependency("broker", consumer.start, stop, attempt_timeout_s=BROKER_ATTEMPT_S):
            return
        log.info("sync_consuming")
        await asyncio.gather(consumer.run(stop), _every(stop, WATCH_S, measure_dlq))

    async def ready() -> None:
        if not consumer.consuming.is_set():
            raise _NotStarted("not consuming yet")
        await ping(engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(run(stop), name="consume")
        log.info("sync_started")
        yield
        stop.set()  # the consumer cancels its subscription, then settles what it already holds
        await cancel_tasks([task], timeout=SHUTDOWN_S)
        with contextlib.suppress(Exception):
            await consumer.close()
        with contextlib.suppress(Exception):
            await dlq_link.close()
        await engine.dispose()
        log.info("sync_stopped")

    return build_app(
        service="read_model_sync",
        title="pydist: read_model_sync",
        description="Projects events into the read model.",
        settings=settings,
        ready=ready,
        lifespan=lifespan,
    )
