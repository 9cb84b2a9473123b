"""`pydist read-model check/rebuild` use cases on real Postgres: exact reports of what is missing,
different and extra, a rebuild that fixes all of it, and a rebuild that is safe while orders are
being created and projected."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from pydist.adapters.outbox import Outbox
from pydist.service.relay import Relay
from tests.integration.conftest import Stores
from tests.support import db as testdb
from tests.support import read_model_admin
from tests.support.read_side import (
    background,
    backlog,
    count,
    create_orders,
    read_snapshot,
    wait_until,
)
from tests.support.services import Databases


async def project_all(stores: Stores, clean: Databases) -> None:
    relay = Relay(Outbox(stores.write.db), stores.read, batch=500)
    while await relay.relay_once():
        pass
    assert await backlog(clean.write_url) == 0


async def insert_extra(read_url: str, created_at: datetime) -> uuid.UUID:
    extra = uuid.uuid4()
    await testdb.fetch(
        read_url,
        "INSERT INTO buy_orders (id, created_at, currency, currency_amount, btc_rate, btc_amount,"
        " idempotence_key, event_id) VALUES ($1, $2, 'USD', 1.00, 97000, 0.00001031, $3, $4)",
        extra,
        created_at,
        uuid.uuid4(),
        uuid.uuid4(),
    )
    return extra


@pytest.mark.parametrize("chunk", [5000, 7])
async def test_check_reports_missing_different_and_extra_exactly(
    stores: Stores, clean: Databases, chunk: int
):
    orders = await create_orders(stores, 40)
    await project_all(stores, clean)
    assert (await read_model_admin.check(stores.write.db, stores.read.db, chunk=chunk)).clean

    by_age = sorted(orders, key=lambda o: (o.created_at, o.id))
    missing, amount, rate, when = by_age[3].id, by_age[10].id, by_age[20].id, by_age[30].id
    await testdb.fetch(clean.read_url, "DELETE FROM buy_orders WHERE id = $1", missing)
    await testdb.fetch(
        clean.read_url, "UPDATE buy_orders SET btc_amount = btc_amount + 0.00000001 WHERE id = $1", amount
    )
    # same number, other scale: the listing would show "97000.0" instead of "97000.00"
    await testdb.fetch(clean.read_url, "UPDATE buy_orders SET btc_rate = 97000.0 WHERE id = $1", rate)
    await testdb.fetch(
        clean.read_url,
        "UPDATE buy_orders SET created_at = created_at + interval '1 microsecond' WHERE id = $1",
        when,
    )
    old_extra = await insert_extra(clean.read_url, by_age[0].created_at - timedelta(days=1))
    new_extra = await insert_extra(clean.read_url, datetime.now(UTC) + timedelta(days=1))

    report = await read_model_admin.check(stores.write.db, stores.read.db, chunk=chunk)
    assert report.missing == [missing]
    assert sorted(report.different) == sorted([amount, rate, when])
    assert sorted(report.extra) == sorted([old_extra, new_extra])
    assert (report.write_count, report.read_count) == (40, 41)
    assert not report.clean

    walked = await read_model_admin.rebuild(stores.write.db, stores.read.db, chunk=chunk)
    assert walked == 40
    after = await read_model_admin.check(stores.write.db, stores.read.db, chunk=chunk)
    assert after.clean, after
    assert (after.write_count, after.read_count) == (40, 40)
    projected = await read_model_admin.all_orders(stores.read.db)
    assert projected == {o.id: o for o in orders}
    assert {o.id: o.to_public() for o in projected.values()} == {o.id: o.to_public() for o in orders}


async def test_rebuild_of_a_clean_model_changes_nothing(stores: Stores, clean: Databases):
    await create_orders(stores, 25)
    await project_all(stores, clean)
    before = await read_snapshot(clean.read_url)
    assert await read_model_admin.rebuild(stores.write.db, stores.read.db, chunk=4) == 25
    assert await read_snapshot(clean.read_url) == before  # projected_at, event_id untouched


async def test_rebuild_from_an_empty_read_model(stores: Stores, clean: Databases):
    await create_orders(stores, 12)
    await project_all(stores, clean)
    before = await read_snapshot(clean.read_url)
    await testdb.fetch(clean.read_url, "TRUNCATE buy_orders")
    assert not (await read_model_admin.check(stores.write.db, stores.read.db)).clean
    assert await read_model_admin.rebuild(stores.write.db, stores.read.db, chunk=5) == 12
    after = await read_snapshot(clean.read_url)
    assert [r[:7] for r in after] == [r[:7] for r in before]  # every column but event_id, projected_at
    assert (await read_model_admin.check(stores.write.db, stores.read.db)).clean


async def test_rebuild_while_orders_are_created_and_projected_deletes_nothing_new(
    stores: Stores, clean: Databases
):
    """A rebuild (small chunks, so it takes a while) runs while orders are created and the
    direct-mode relay projects them: no new row is deleted, an injected extra is, and once things
    settle the check is clean."""
    await create_orders(stores, 300)
    await project_all(stores, clean)
    extra = await insert_extra(clean.read_url, datetime.now(UTC) - timedelta(days=3))
    relay = Relay(Outbox(stores.write.db), stores.read, batch=20, idle_poll_s=0.05)

    async def creating(stop: asyncio.Event) -> None:
        i = 300
        while not stop.is_set():
            await create_orders(stores, 5, start=i)
            i += 5
            await asyncio.sleep(0.01)

    async with background() as bg:
        bg.start(relay.run, "relay")
        async with background() as load:
            load.start(creating, "orders")
            for _ in range(3):
                await read_model_admin.rebuild(stores.write.db, stores.read.db, chunk=25)
                load.check()
                bg.check()
        total = await count(clean.write_url)
        assert total > 300
        await wait_until(lambda: _settled(clean, total), timeout=30, what="read model settled", bg=bg)
    report = await read_model_admin.check(stores.write.db, stores.read.db)
    assert report.clean, report
    assert report.read_count == report.write_count == total
    rows = await testdb.fetch(clean.read_url, "SELECT count(*) AS n FROM buy_orders WHERE id = $1", extra)
    assert rows[0]["n"] == 0


async def _settled(clean: Databases, total: int) -> bool:
    return await backlog(clean.write_url) == 0 and await count(clean.read_url) == total
