"""Integration fixtures: the real write store, order writer, projection and listing stores on a
throw-away database, wired by bootstrap as the processes wire them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from pydantic import SecretStr

from pydist import bootstrap
from pydist.adapters.db import Database
from pydist.adapters.listing import ListingStore
from pydist.adapters.order_writer import BatchingOrderWriter
from pydist.adapters.projection import ProjectionStore
from pydist.adapters.write_store import WriteStore
from pydist.config import Settings
from tests.support.services import Databases


@dataclass
class Stores:
    write: WriteStore
    read: ProjectionStore
    """The read model as the projector writes it."""
    writer: BatchingOrderWriter
    listing: ListingStore
    """The read model as fetch_buy_orders lists it."""


@pytest.fixture
async def stores(clean: Databases) -> AsyncIterator[Stores]:
    settings = Settings(
        write_database_url=SecretStr(clean.write_url),
        read_database_url=SecretStr(clean.read_url),
        db_pool_size=20,
        max_batch=256,
    )
    create = bootstrap.create(settings)
    fetch = bootstrap.fetch(settings)
    assert isinstance(fetch.pages, ListingStore)
    read_db = Database(clean.read_url, 5, "pydist-test")
    create.writer.start()
    yield Stores(create.store, ProjectionStore(read_db), create.writer, fetch.pages)
    await create.aclose()
    await fetch.aclose()
    await read_db.close()
