"""Integration fixtures: the real write store, order writer and use case on a throw-away database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from pydist.adapters.db import make_engine
from pydist.adapters.order_writer import BatchingOrderWriter
from pydist.adapters.read_store import ReadStore
from pydist.adapters.write_store import WriteStore
from tests.support.services import Databases


@dataclass
class Stores:
    write: WriteStore
    read: ReadStore
    writer: BatchingOrderWriter


@pytest.fixture
async def stores(clean: Databases) -> AsyncIterator[Stores]:
    write_engine = make_engine(clean.write_url, 20, "pydist-test")
    read_engine = make_engine(clean.read_url, 5, "pydist-test")
    write = WriteStore(write_engine)
    writer = BatchingOrderWriter(write, max_batch=256)
    writer.start()
    yield Stores(write, ReadStore(read_engine), writer)
    await writer.stop()
    await write_engine.dispose()
    await read_engine.dispose()
