"""The one place each process's object graph is built from Settings: engines, stores, clients,
use cases, relay, consumer, publisher.

The app factories, the CLI's admin commands, the benchmark and the integration tests all take
their objects from here, so the wiring is the same wherever it runs. A test hands its fake to a
builder (`create(settings, create_order=fake)`) instead of patching module names. Settings are an
argument: only the outermost entries (a factory called bare by uvicorn, the CLI) read the
environment.

Builders import their adapters themselves, so a process loads only what it runs (btc_price needs
neither SQLAlchemy nor asyncpg: ~20 MB of RSS). Building opens nothing (connections are made on
first use), so a graph is built with its backing services down, as every process starts, and
released with `aclose()`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pydist.config import Settings, plain_url
from pydist.domain.order import OrderRequest
from pydist.service.create_order import CreateBuyOrder, Outcome
from pydist.service.price_cache import PriceCache
from pydist.service.projector import Projector
from pydist.service.relay import Relay

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from pydist.adapters.coinbase import CoinbaseSpot
    from pydist.adapters.consumer import EnvelopeConsumer
    from pydist.adapters.listing import Page
    from pydist.adapters.order_tables import OrderTable, ReadModelTable
    from pydist.adapters.order_writer import BatchingOrderWriter
    from pydist.adapters.outbox import Outbox
    from pydist.adapters.price_client import PriceServiceClient
    from pydist.adapters.publisher import BrokerPublisher
    from pydist.adapters.rabbit import BrokerLink
    from pydist.adapters.write_store import WriteStore

CreateOrder = Callable[[OrderRequest, str | None], Awaitable[Outcome]]
"""The create use case as the API calls it: CreateBuyOrder, or a test's fake."""


class Pages(Protocol):
    """What fetch_buy_orders serves from: the listing store, or a test's fake."""

    async def page(self, page_size: int, last_reference: uuid.UUID | None) -> Page: ...

    async def ping(self) -> None: ...


def projector(read_engine: AsyncEngine) -> Projector:
    """The projector on the read model: read_model_sync's, the embedded relay's, `dlq replay`'s."""
    from pydist.adapters.projection import ProjectionStore

    return Projector(ProjectionStore(read_engine))


@dataclass
class CreateGraph:
    store: WriteStore
    writer: BatchingOrderWriter
    prices: PriceServiceClient
    create_order: CreateOrder

    async def aclose(self) -> None:
        """Finish the orders already queued, then close the price client and the pool."""
        await self.writer.stop()
        await self.prices.aclose()
        await self.store.engine.dispose()


def create(settings: Settings, *, create_order: CreateOrder | None = None) -> CreateGraph:
    """create_buy_order: the write store, the batching writer, the client of btc_price, and the
    use case over them."""
    from pydist.adapters.db import make_engine
    from pydist.adapters.order_writer import BatchingOrderWriter
    from pydist.adapters.price_client import PriceServiceClient
    from pydist.adapters.write_store import WriteStore

    url = settings.write_database_url.get_secret_value()
    store = WriteStore(make_engine(url, settings.db_pool_size, "pydist-create"))
    writer = BatchingOrderWriter(store, max_batch=settings.max_batch)
    prices = PriceServiceClient(
        settings.price_service_url,
        timeout_s=settings.price_timeout_s + 0.5,
        max_age_s=settings.price_max_age_s,
    )
    return CreateGraph(store, writer, prices, create_order or CreateBuyOrder(store, prices, writer))


def fetch_engine(read_url: str, pool_size: int) -> AsyncEngine:
    """The read model's pool as the fetch process uses it."""
    from pydist.adapters.db import make_engine

    return make_engine(
        read_url,
        pool_size,
        "pydist-fetch",
        pre_ping=False,
        # No overflow: at high concurrency requests wait a moment for one of the pool's warm
        # connections instead of opening (a backend fork) and closing one each (measured).
        max_overflow=0,
        # The page statements are prepared once per connection, but Postgres' default `auto` mode
        # kept re-planning them on every call (custom plans: 0 generic / 2,020 custom in 2,020
        # calls), which cost the deep page ~0.25 ms more than the first. The generic plans are
        # the same index-only scans (tests/integration/test_keyset.py); measured in
        # docs/benchmarks.md: deep page 445-523 -> 221-233 us per call.
        server_settings={"plan_cache_mode": "force_generic_plan"},
    )


@dataclass
class FetchGraph:
    pages: Pages
    engine: AsyncEngine | None = None

    async def aclose(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()


def fetch(settings: Settings, *, pages: Pages | None = None) -> FetchGraph:
    """fetch_buy_orders: the listing store on the read model (or `pages` instead)."""
    if pages is not None:
        return FetchGraph(pages)
    from pydist.adapters.listing import ListingStore

    engine = fetch_engine(settings.read_database_url.get_secret_value(), settings.db_pool_size)
    return FetchGraph(ListingStore(engine), engine)


@dataclass
class PriceGraph:
    coinbase: CoinbaseSpot
    cache: PriceCache

    async def aclose(self) -> None:
        await self.coinbase.aclose()


def price(settings: Settings) -> PriceGraph:
    """btc_price: the Coinbase client and the per-currency cache in front of it."""
    from pydist.adapters.coinbase import CoinbaseSpot

    coinbase = CoinbaseSpot(settings.coinbase_api_url, settings.price_timeout_s)
    cache = PriceCache(
        coinbase.spot, max_age_s=settings.price_max_age_s, min_interval_s=settings.price_min_interval_s
    )
    return PriceGraph(coinbase, cache)


@dataclass
class RelayGraph:
    engine: AsyncEngine
    outbox: Outbox
    relay: Relay
    publisher: BrokerPublisher | None = None
    """Broker mode: where the relay publishes."""
    read_engine: AsyncEngine | None = None
    """Embedded mode (no BROKER_URL): the read model the relay projects into directly."""

    async def aclose(self) -> None:
        if self.publisher is not None:
            with contextlib.suppress(Exception):
                await self.publisher.close()
        await self.engine.dispose()
        if self.read_engine is not None:
            await self.read_engine.dispose()


def relay(settings: Settings) -> RelayGraph:
    """The relay: outbox → broker, or with no BROKER_URL outbox → projector → read model."""
    from pydist.adapters.db import make_engine
    from pydist.adapters.outbox import Outbox

    write_url = settings.write_database_url.get_secret_value()
    engine = make_engine(write_url, 4, "pydist-relay")
    outbox = Outbox(engine, plain_url(write_url))
    if settings.broker_url is not None:
        from pydist.adapters.publisher import BrokerPublisher

        publisher = BrokerPublisher(settings.broker_url.get_secret_value())
        return RelayGraph(engine, outbox, Relay(outbox, publisher, batch=settings.relay_batch), publisher)
    read_engine = make_engine(settings.read_database_url.get_secret_value(), 4, "pydist-relay-embedded")
    sink = projector(read_engine)
    return RelayGraph(
        engine, outbox, Relay(outbox, sink, batch=settings.relay_batch), read_engine=read_engine
    )


def build_sync(read_url: str, broker_url: str, *, prefetch: int) -> tuple[AsyncEngine, EnvelopeConsumer]:
    """read_model_sync's engine and consumer, as the process runs them (and the integration tests).

    No pool pre-ping: it cost three round trips per batch (~10% of the process's CPU); a dead
    connection is renewed and retried by the projection store itself."""
    from pydist.adapters.consumer import EnvelopeConsumer
    from pydist.adapters.db import make_engine

    engine = make_engine(read_url, 4, "pydist-sync", pre_ping=False)
    return engine, EnvelopeConsumer(broker_url, projector(engine).publish, prefetch=prefetch)


@dataclass
class SyncGraph:
    engine: AsyncEngine
    consumer: EnvelopeConsumer
    dlq_link: BrokerLink
    """A link of its own for measuring the DLQ's depth."""

    async def aclose(self) -> None:
        for link in (self.consumer, self.dlq_link):
            with contextlib.suppress(Exception):
                await link.close()
        await self.engine.dispose()


def sync(settings: Settings) -> SyncGraph:
    """read_model_sync: broker → projector → read model."""
    from pydist.adapters.rabbit import BrokerLink

    if settings.broker_url is None:
        raise SystemExit("read_model_sync needs BROKER_URL (without it the relay projects directly)")
    broker_url = settings.broker_url.get_secret_value()
    engine, consumer = build_sync(
        settings.read_database_url.get_secret_value(), broker_url, prefetch=settings.sync_prefetch
    )
    return SyncGraph(engine, consumer, BrokerLink(broker_url, publisher_confirms=False))


@dataclass
class AdminGraph:
    """The CLI's admin commands: both models' buy_orders, each through a small pool."""

    orders: OrderTable
    """The write model's."""
    read_model: ReadModelTable

    async def aclose(self) -> None:
        await self.orders.engine.dispose()
        await self.read_model.engine.dispose()


def admin(settings: Settings) -> AdminGraph:
    from pydist.adapters.db import make_engine
    from pydist.adapters.order_tables import OrderTable, ReadModelTable

    return AdminGraph(
        OrderTable(make_engine(settings.write_database_url.get_secret_value(), 2, "pydist-admin")),
        ReadModelTable(make_engine(settings.read_database_url.get_secret_value(), 2, "pydist-admin")),
    )
