"""The write path's guarantees on real Postgres: the 100 BTC cap and idempotency under races."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

import pytest

from pydist.adapters.db import Database
from pydist.adapters.order_writer import BatchingOrderWriter
from pydist.adapters.write_store import WriteStore
from pydist.domain.money import Currency
from pydist.domain.order import CapExceededError, IdempotencyKeyReusedError
from pydist.service.create_order import CreateBuyOrder, CreateBuyOrderCommand
from pydist.service.ports import PriceUnavailableError
from tests.integration.conftest import Stores
from tests.support import db as testdb
from tests.support.services import Databases


class FixedPrice:
    """A price source that counts calls; `down` makes it fail like an unreachable feed."""

    def __init__(self, rate: str = "97000.00") -> None:
        self.rate = Decimal(rate)
        self.calls = 0
        self.down = False

    async def price(self, currency: Currency) -> Decimal:
        self.calls += 1
        if self.down:
            raise PriceUnavailableError("feed down")
        return self.rate


def request(
    amount: str = "123.45", key: uuid.UUID | None = None, currency: str = "USD"
) -> CreateBuyOrderCommand:
    return CreateBuyOrderCommand(Currency(currency), Decimal(amount), body_key=key or uuid.uuid4())


async def test_order_is_stored_with_outbox_event_in_one_transaction(stores: Stores, clean: Databases):
    use_case = CreateBuyOrder(stores.write, FixedPrice(), stores.writer)
    outcome = await use_case(request(), "req-1")
    assert not outcome.replayed
    assert outcome.order.btc_amount == Decimal("0.00127269")
    rows = await testdb.fetch(clean.write_url, "SELECT order_id, request_id FROM outbox")
    assert [(r["order_id"], r["request_id"]) for r in rows] == [(outcome.order.id, "req-1")]
    assert await testdb.cap_used(clean.write_url) == Decimal("0.00127269")


async def test_replay_returns_identical_order_without_calling_the_price_feed(stores: Stores):
    prices = FixedPrice()
    use_case = CreateBuyOrder(stores.write, prices, stores.writer)
    first = await use_case(request(key=(key := uuid.uuid4())))
    prices.down = True
    prices.rate = Decimal("1")
    calls = prices.calls
    again = await use_case(request(key=key))
    assert again.replayed
    assert again.order == first.order
    assert prices.calls == calls


async def test_replay_succeeds_when_the_cap_is_now_full(stores: Stores, clean: Databases):
    use_case = CreateBuyOrder(stores.write, FixedPrice(), stores.writer)
    first = await use_case(request(key=(key := uuid.uuid4())))
    await testdb.reset_cap_only(clean.write_url, Decimal(100))
    assert (await use_case(request(key=key))).order == first.order


async def test_same_key_different_request_is_refused(stores: Stores):
    use_case = CreateBuyOrder(stores.write, FixedPrice(), stores.writer)
    key = uuid.uuid4()
    await use_case(request("10.00", key))
    with pytest.raises(IdempotencyKeyReusedError):
        await use_case(request("10.01", key))
    with pytest.raises(IdempotencyKeyReusedError):
        await use_case(request("10.00", key, currency="EUR"))


async def test_twenty_concurrent_identical_requests_make_one_order(stores: Stores, clean: Databases):
    use_case = CreateBuyOrder(stores.write, FixedPrice(), stores.writer)
    key = uuid.uuid4()
    outcomes = await asyncio.gather(*(use_case(request(key=key)) for _ in range(20)))
    assert len({o.order for o in outcomes}) == 1
    assert sum(not o.replayed for o in outcomes) == 1
    rows = await testdb.fetch(clean.write_url, "SELECT count(*) AS n FROM buy_orders")
    assert rows[0]["n"] == 1


async def test_exactly_100_btc_is_allowed_and_one_satoshi_more_is_not(stores: Stores, clean: Databases):
    await testdb.reset_cap_only(clean.write_url, Decimal("99"))
    use_case = CreateBuyOrder(stores.write, FixedPrice("1000.00"), stores.writer)
    outcome = await use_case(request("1000.00"))  # exactly 1 BTC → total 100
    assert outcome.order.btc_amount == Decimal(1)
    with pytest.raises(CapExceededError) as refused:
        await use_case(request("0.01"))
    assert refused.value.available_btc == Decimal(0)
    assert await testdb.cap_used(clean.write_url) == Decimal(100)


async def test_cap_refusal_writes_nothing(stores: Stores, clean: Databases):
    await testdb.reset_cap_only(clean.write_url, Decimal("99.5"))
    use_case = CreateBuyOrder(stores.write, FixedPrice("1000.00"), stores.writer)
    with pytest.raises(CapExceededError) as refused:
        await use_case(request("600.00"))
    assert "0.5" in str(refused.value)
    rows = await testdb.fetch(
        clean.write_url, "SELECT (SELECT count(*) FROM buy_orders) AS o, (SELECT count(*) FROM outbox) AS e"
    )
    assert (rows[0]["o"], rows[0]["e"]) == (0, 0)


async def test_cap_storm_from_several_connections_never_exceeds_100(clean: Databases):
    """≥150 concurrent orders from 4 independent writers (own pools, like 4 processes) at the last
    BTC: the total ends ≤ 100 exactly, with less than one order's worth left unused."""
    await testdb.reset_cap_only(clean.write_url, Decimal("98.5"))
    prices = FixedPrice("1000.00")
    order_btc = Decimal("0.03")  # 30.00 fiat at 1000 → 0.03 BTC; 1.5 BTC left → room for 50
    dbs = [Database(clean.write_url, 10, f"storm-{i}") for i in range(4)]
    writers = [BatchingOrderWriter(WriteStore(d), max_batch=8) for d in dbs]
    for w in writers:
        w.start()
    use_cases = [CreateBuyOrder(WriteStore(d), prices, w) for d, w in zip(dbs, writers, strict=True)]

    async def one(i: int) -> str:
        try:
            await use_cases[i % 4](request("30.00"))
            return "ok"
        except CapExceededError:
            return "cap"

    try:
        results = await asyncio.gather(*(one(i) for i in range(160)))
    finally:
        for w in writers:
            await w.stop()
        for d in dbs:
            await d.close()
    accepted = results.count("ok")
    total = await testdb.order_sum(clean.write_url)
    used = await testdb.cap_used(clean.write_url)
    assert accepted == 50
    assert results.count("cap") == 110
    assert used == Decimal("98.5") + total
    assert used <= Decimal(100)
    assert Decimal(100) - used < order_btc


async def test_database_enforces_the_cap_and_append_only_against_a_buggy_writer(
    stores: Stores, clean: Databases
):
    """Belt and braces: a CHECK refuses a cap row over its limit; a trigger refuses edits."""
    import asyncpg

    await CreateBuyOrder(stores.write, FixedPrice(), stores.writer)(request())
    conn = await asyncpg.connect(clean.write_url)
    try:
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute("UPDATE btc_cap SET used_btc = 100.00000001")
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("UPDATE buy_orders SET btc_amount = 1")
        with pytest.raises(asyncpg.RaiseError, match="append-only"):
            await conn.execute("DELETE FROM buy_orders")
    finally:
        await conn.close()
