"""The one place each process's object graph (databases, stores, clients, use cases, relay,
consumer, publisher) is built from Settings. The app factories, the CLI's admin commands and the
integration tests all take it from here, so the wiring is the same wherever it runs; a test hands
its fake to a builder (`create(settings, create_order=fake)`) instead of patching module names.
Only the outermost entries (a factory called bare by uvicorn, the CLI) read the environment.

Builders import their adapters themselves, so a process loads only what it runs (btc_price needs
no asyncpg: ~20 MB of RSS). Building opens nothing (connections are made on first use): a graph
is built with its backing services down, as every process starts, and released with `aclose()`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

from pydist.config import Settings
from pydist.service.create_order import CreateBuyOrder, CreateBuyOrderCommand, Outcome
from pydist.service.price_cache import PriceCache
from pydist.service.relay import Relay

if TYPE_CHECKING:
    from pydist.adapters.consumer import EnvelopeConsumer
    from pydist.adapters.db import Database
    from pydist.adapters.listing import Page
    from pydist.adapters.order_tables import OrderTable, ReadModelTable
    from pydist.adapters.order_writer import BatchingOrderWriter
    from pydist.adapters.outbox import Outbox
    from pydist.adapters.prices import CoinbaseSpot, PriceServiceClient
    from pydist.adapters.publisher import BrokerPublisher
    from pydist.adapters.rabbit import BrokerLink
    from pydist.adapters.write_store import WriteStore

CreateOrder = Callable[[CreateBuyOrderCommand, str | None], Awaitable[Outcome]]
"""The create use case as the API calls it: CreateBuyOrder, or a test's fake."""


class Pages(Protocol):
    """What fetch_buy_orders serves from: the listing store, or a test's fake."""

    async def page(self, page_size: int, last_reference: uuid.UUID | None) -> Page: ...

    async def ping(self) -> None: ...


@dataclass
class CreateGraph:
    store: WriteStore
    writer: BatchingOrderWriter
    prices: PriceServiceClient
    create_order: CreateOrder

    async def aclose(self) -> None:
        """Finish the orders already queued (if create's lifespan has not already), then close
        the price client and the pool."""
        await self.writer.stop()
        await self.prices.aclose()
        await self.store.db.close()


def create(settings: Settings, *, create_order: CreateOrder | None = None) -> CreateGraph:
    """create_buy_order: the write store, the batching writer, the client of btc_price, and the
    use case over them."""
    from pydist.adapters.db import Database
    from pydist.adapters.order_writer import BatchingOrderWriter
    from pydist.adapters.prices import PriceServiceClient
    from pydist.adapters.write_store import WriteStore

    url = settings.write_database_url.get_secret_value()
    store = WriteStore(Database(url, settings.db_pool_size, "pydist-create"))
    writer = BatchingOrderWriter(store, max_batch=settings.max_batch, window_s=settings.write_window_s)
    prices = PriceServiceClient(
        settings.price_service_url,
        timeout_s=settings.price_timeout_s + 0.5,
        max_age_s=settings.price_max_age_s,
    )
    return CreateGraph(store, writer, prices, create_order or CreateBuyOrder(store, prices, writer))


def fetch_db(read_url: str, pool_size: int) -> Database:
    """The read model's pool as the fetch process uses it."""
    from pydist.adapters.db import Database

    # The page statements are prepared once per connection, but Postgres' default `auto` mode
    # kept re-planning them on every call (custom plans: 0 generic / 2,020 custom in 2,020 calls),
    # which cost the deep page ~0.25 ms more than the first. The generic plans are the same
    # index-only scans (tests/integration/test_keyset.py); measured in docs/benchmarks.md: deep
    # page 445-523 -> 221-233 us per call.
    return Database(read_url, pool_size, "pydist-fetch", settings={"plan_cache_mode": "force_generic_plan"})


@dataclass
class FetchGraph:
    pages: Pages
    db: Database | None = None

    async def aclose(self) -> None:
        if self.db is not None:
            await self.db.close()


def fetch(settings: Settings, *, pages: Pages | None = None) -> FetchGraph:
    """fetch_buy_orders: the listing store on the read model (or `pages` instead)."""
    if pages is not None:
        return FetchGraph(pages)
    from pydist.adapters.listing import ListingStore

    db = fetch_db(settings.read_database_url.get_secret_value(), settings.db_pool_size)
    return FetchGraph(ListingStore(db), db)


@dataclass
class PriceGraph:
    coinbase: CoinbaseSpot
    cache: PriceCache

    async def aclose(self) -> None:
        await self.coinbase.aclose()


def price(settings: Settings) -> PriceGraph:
    """btc_price: the Coinbase client and the per-currency cache in front of it."""
    from pydist.adapters.prices import CoinbaseSpot

    coinbase = CoinbaseSpot(settings.coinbase_api_url, settings.price_timeout_s)
    cache = PriceCache(
        coinbase.spot, max_age_s=settings.price_max_age_s, min_interval_s=settings.price_min_interval_s
    )
    return PriceGraph(coinbase, cache)


@dataclass
class RelayGraph:
    db: Database
    outbox: Outbox
    relay: Relay
    publisher: BrokerPublisher | None = None
    """Broker mode: where the relay publishes."""
    read_db: Database | None = None
    """Direct mode (no BROKER_URL): the read model the relay projects into directly."""

    async def aclose(self) -> None:
        if self.publisher is not None:
            await self.publisher.close()
        await self.db.close()
        if self.read_db is not None:
            await self.read_db.close()


def relay(settings: Settings) -> RelayGraph:
    """The relay: outbox → broker, or with no BROKER_URL outbox → projector → read model."""
    from pydist.adapters.db import Database
    from pydist.adapters.outbox import Outbox
    from pydist.adapters.projection import ProjectionStore

    db = Database(settings.write_database_url.get_secret_value(), 4, "pydist-relay")
    outbox = Outbox(db)
    relay_to = partial(Relay, outbox, batch=settings.relay_batch, pace_s=settings.relay_pace_s)
    if settings.broker_url is not None:
        from pydist.adapters.publisher import BrokerPublisher

        publisher = BrokerPublisher(settings.broker_url.get_secret_value())
        return RelayGraph(db, outbox, relay_to(publisher), publisher)
    read_db = Database(settings.read_database_url.get_secret_value(), 4, "pydist-relay-direct")
    return RelayGraph(db, outbox, relay_to(ProjectionStore(read_db)), read_db=read_db)


def build_sync(read_url: str, broker_url: str, *, prefetch: int) -> tuple[Database, EnvelopeConsumer]:
    """read_model_sync's database and consumer, as the process runs them (and the integration
    tests)."""
    from pydist.adapters.consumer import EnvelopeConsumer
    from pydist.adapters.db import Database
    from pydist.adapters.projection import ProjectionStore

    db = Database(read_url, 4, "pydist-sync")
    return db, EnvelopeConsumer(broker_url, ProjectionStore(db).publish, prefetch=prefetch)


@dataclass
class SyncGraph:
    db: Database
    consumer: EnvelopeConsumer
    dlq_link: BrokerLink
    """A link of its own for measuring the DLQ's depth."""

    async def aclose(self) -> None:
        await self.consumer.close()
        await self.dlq_link.close()
        await self.db.close()


def sync(settings: Settings) -> SyncGraph:
    """read_model_sync: broker → projector → read model."""
    from pydist.adapters.rabbit import BrokerLink

    if settings.broker_url is None:
        raise SystemExit("read_model_sync needs BROKER_URL (without it the relay projects directly)")
    broker_url = settings.broker_url.get_secret_value()
    db, consumer = build_sync(
        settings.read_database_url.get_secret_value(), broker_url, prefetch=settings.sync_prefetch
    )
    return SyncGraph(
        db, consumer, BrokerLink(broker_url, name="pydist sync: DLQ depth", publisher_confirms=False)
    )


@dataclass
class AdminGraph:
    """The CLI's admin commands: both models' buy_orders, each through a small pool."""

    orders: OrderTable
    """The write model's."""
    read_model: ReadModelTable

    async def aclose(self) -> None:
        await self.orders.db.close()
        await self.read_model.db.close()


def admin(settings: Settings) -> AdminGraph:
    from pydist.adapters.db import Database
    from pydist.adapters.order_tables import OrderTable, ReadModelTable

    return AdminGraph(
        OrderTable(Database(settings.write_database_url.get_secret_value(), 2, "pydist-admin")),
        ReadModelTable(Database(settings.read_database_url.get_secret_value(), 2, "pydist-admin")),
    )
