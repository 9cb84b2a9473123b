"""Shared fixtures. Integration and e2e tests use the machine's real Postgres and RabbitMQ; if
either is missing the session fails (./test.sh starts them), it is never skipped."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pydist.devtools.coinbase_stub import CoinbaseStub
from tests.support import db as testdb
from tests.support.services import (
    Databases,
    create_databases,
    create_vhost,
    delete_vhost,
    drop_databases,
)

LONG = os.environ.get("PYDIST_LONG") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if LONG:
        return
    skip = pytest.mark.skip(reason="long mode only: PYDIST_LONG=1 ./test.sh")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def databases() -> Iterator[Databases]:
    dbs = create_databases(f"p{os.getpid()}")
    yield dbs
    drop_databases(dbs)


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    vhost, url = create_vhost(f"p{os.getpid()}")
    yield url
    delete_vhost(vhost)


@pytest.fixture
async def clean(databases: Databases) -> Databases:
    """Empty models and an empty cap before the test."""
    await testdb.reset(databases.write_url, databases.read_url)
    return databases


@pytest.fixture(scope="session")
def coinbase() -> Iterator[CoinbaseStub]:
    stub = CoinbaseStub().start()
    yield stub
    stub.stop()


@pytest.fixture
def stub(coinbase: CoinbaseStub) -> CoinbaseStub:
    """The session's stub, back to healthy default prices."""
    coinbase.reset()
    return coinbase
