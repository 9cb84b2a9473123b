"""Keyset paging of the read model on real Postgres: ties on created_at, every page size, unknown and
last references, and the plan shape at depth (an index range scan, no Sort, no OFFSET)."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import asyncpg
import orjson
import pytest

from pydist import bootstrap
from pydist.adapters import listing
from pydist.adapters.listing import ListingStore
from pydist.domain.events import BuyOrderCreated
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder
from pydist.entrypoints.schemas import BuyOrderPage
from pydist.service.ports import UnknownReferenceError
from tests.integration.conftest import Stores
from tests.support import db as testdb
from tests.support.read_side import page_ids
from tests.support.services import Databases

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


async def insert_rows(read_url: str, created: list[datetime]) -> list[tuple[datetime, uuid.UUID]]:
    """Read rows straight into the read model; returns their (created_at, id) keys."""
    rows = [
        (uuid.uuid4(), at, "USD", f"{10 + i}.25", "97000.00", "0.00010567", uuid.uuid4(), uuid.uuid4())
        for i, at in enumerate(created)
    ]
    conn = await asyncpg.connect(read_url, timeout=5)
    try:
        await conn.executemany(
            "INSERT INTO buy_orders (id, created_at, currency, currency_amount, btc_rate, btc_amount,"
            " idempotence_key, event_id) VALUES ($1, $2, $3, $4::numeric, $5::numeric, $6::numeric, $7, $8)",
            rows,
        )
    finally:
        await conn.close()
    return [(r[1], r[0]) for r in rows]


async def walk(store: ListingStore, size: int) -> tuple[list[uuid.UUID], list[int]]:
    ids: list[uuid.UUID] = []
    sizes: list[int] = []
    ref: uuid.UUID | None = None
    for _ in range(1000):  # bounded
        page = await store.page(size, ref)
        ids.extend(page_ids(page))
        sizes.append(len(page.public_rows))
        if not page.has_more:
            return ids, sizes
        assert len(page.public_rows) == size
        ref = page_ids(page)[-1]
    raise AssertionError("the walk did not end")


@pytest.mark.parametrize("size", [1, 3, 19, 100])
async def test_walk_with_tied_created_at_returns_every_row_once_in_order(
    stores: Stores, clean: Databases, size: int
):
    # 41 rows: groups of up to 7 sharing the very same created_at, and a few unique ones
    created = [T0 + timedelta(microseconds=i // 7) for i in range(38)] + [T0 - timedelta(days=1)] * 3
    keys = await insert_rows(clean.read_url, created)
    expected = [k[1] for k in sorted(keys, reverse=True)]  # (created_at DESC, id DESC)
    ids, sizes = await walk(stores.listing, size)
    assert ids == expected
    assert len(set(ids)) == len(keys) == 41
    full, rest = divmod(41, size)
    assert sizes == [size] * full + ([rest] if rest else [])


async def test_exact_multiple_of_page_size_ends_without_an_empty_page(stores: Stores, clean: Databases):
    await insert_rows(clean.read_url, [T0] * 6)
    ids, sizes = await walk(stores.listing, 3)
    assert sizes == [3, 3]
    assert len(set(ids)) == 6


async def test_reference_to_the_last_row_gives_an_empty_final_page(stores: Stores, clean: Databases):
    keys = await insert_rows(clean.read_url, [T0, T0, T0 - timedelta(seconds=1)])
    oldest = min(keys)[1]
    page = await stores.listing.page(10, oldest)
    assert page.public_rows == []
    assert page.has_more is False


async def test_unknown_reference_is_refused(stores: Stores, clean: Databases):
    await insert_rows(clean.read_url, [T0])
    with pytest.raises(UnknownReferenceError):
        await stores.listing.page(10, uuid.uuid4())


async def test_empty_read_model_first_page(stores: Stores, clean: Databases):
    page = await stores.listing.page(10, None)
    assert (page.public_rows, page.has_more) == ([], False)


async def execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(sql, timeout=60)
    finally:
        await conn.close()


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


async def test_page_query_at_depth_is_an_index_range_scan(stores: Stores, clean: Databases):
    """50 000 rows (created_at tied in threes): a page 45 000 rows deep is read with the
    buy_orders_newest_first index from the reference onwards, reading only page_size + 1 index
    entries, with no Sort node and no OFFSET; the rows match an OFFSET-based oracle."""
    await execute(
        clean.read_url,
        """INSERT INTO buy_orders (id, created_at, currency, currency_amount, btc_rate, btc_amount,
                                   idempotence_key, event_id)
           SELECT gen_random_uuid(), timestamptz '2024-01-01' + (g / 3) * interval '1 second', 'EUR',
                  10.00 + g % 1000, 97000, 0.00010309, gen_random_uuid(), gen_random_uuid()
           FROM generate_series(1, 50000) g""",
    )
    await execute(clean.read_url, "VACUUM ANALYZE buy_orders")
    oracle = await testdb.fetch(
        clean.read_url, "SELECT id FROM buy_orders ORDER BY created_at DESC, id DESC OFFSET 45000 LIMIT 21"
    )
    ref, expected = oracle[0]["id"], [r["id"] for r in oracle[1:]]

    page = await stores.listing.page(20, ref)
    assert page_ids(page) == expected
    assert page.has_more

    cases = [
        (sql, params, mode)
        for sql, params in ((listing._NEXT_PAGE, (21, ref)), (listing._FIRST_PAGE, (21,)))
        for mode in ("force_custom_plan", "force_generic_plan")  # the fetch pool uses generic plans
    ]
    for sql, params, mode in cases:
        assert "OFFSET" not in sql.upper()
        nodes = plan_nodes(await explain_prepared(clean.read_url, sql, params, mode))
        kinds = [n["Node Type"] for n in nodes]
        assert "Sort" not in kinds, kinds
        assert "Incremental Sort" not in kinds, kinds
        assert "Seq Scan" not in kinds, kinds
        scans = [n for n in nodes if n.get("Index Name") == "buy_orders_newest_first"]
        assert len(scans) == 1, kinds
        scan = scans[0]
        assert scan["Node Type"] in ("Index Scan", "Index Only Scan")
        assert scan["Actual Rows"] * scan["Actual Loops"] <= 21, scan  # stops after one page
        if sql is listing._NEXT_PAGE:
            assert "created_at" in scan.get("Index Cond", ""), scan  # starts at the reference
            assert "Filter" not in scan, scan


async def explain_prepared(
    url: str, sql: str, params: tuple[Any, ...], plan_cache_mode: str
) -> dict[str, Any]:
    """EXPLAIN ANALYZE of `sql` run as a prepared statement under `plan_cache_mode`."""
    conn = await asyncpg.connect(url, timeout=5, server_settings={"plan_cache_mode": plan_cache_mode})
    try:
        types = "int" if len(params) == 1 else "int, uuid"
        await conn.execute(f"PREPARE page_q({types}) AS {sql}")
        literal = ", ".join(f"'{p}'" for p in params)
        doc = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE page_q({literal})")
    finally:
        await conn.close()
    plan: dict[str, Any] = (doc if isinstance(doc, list) else json.loads(doc))[0]["Plan"]
    return plan


async def test_fetch_pool_reuses_generic_plans_for_pages(clean: Databases):
    """The fetch process's connections plan each page statement once (generic plans), where
    Postgres' default kept re-planning them on every call."""
    await insert_rows(clean.read_url, [T0 + timedelta(seconds=i) for i in range(30)])
    db = bootstrap.fetch_db(clean.read_url, 1)  # one connection: the statements stay on it
    try:
        store = ListingStore(db)
        first = await store.page(10, None)
        for _ in range(12):
            await store.page(10, None)
            await store.page(10, page_ids(first)[-1])
        async with db.connection() as conn:
            assert await conn.fetch("SHOW plan_cache_mode") == [("force_generic_plan",)]
            plans = await conn.fetch(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = ANY($1)",
                [listing._FIRST_PAGE, listing._NEXT_PAGE],
            )
    finally:
        await db.close()
    assert len(plans) == 2
    assert all(r["custom_plans"] == 0 and r["generic_plans"] >= 12 for r in plans), plans


class CountingReads:
    """Wraps ListingStore._read_page (the one real query) to count rounds and, on demand, hold a
    round after its query ran: what a slow database would look like to the requests behind it."""

    def __init__(self, store: ListingStore) -> None:
        self.real = store._read_page
        self.rounds = 0
        self.hold: asyncio.Event | None = None
        self.read_done = asyncio.Event()
        store._read_page = self  # type: ignore[method-assign]

    async def __call__(self, page_size: int, last_reference: uuid.UUID | None) -> listing.Page:
        self.rounds += 1
        page = await self.real(page_size, last_reference)
        self.read_done.set()
        if self.hold is not None:
            await self.hold.wait()
        return page


async def test_identical_concurrent_page_reads_share_a_query(stores: Stores, clean: Databases):
    """64 concurrent first-page requests: at most two queries (the first and the one for those
    that arrived while it ran), the same answer for all; other page keys get their own."""
    keys = await insert_rows(clean.read_url, [T0 + timedelta(seconds=i) for i in range(15)])
    newest = [k[1] for k in sorted(keys, reverse=True)]
    reads = CountingReads(stores.listing)
    pages = await asyncio.gather(*(stores.listing.page(10, None) for _ in range(64)))
    assert reads.rounds <= 2
    assert all(page_ids(p) == newest[:10] and p.has_more for p in pages)

    reads.rounds = 0
    mixed = await asyncio.gather(*(stores.listing.page(size, None) for size in (3, 5, 3, 5)))
    assert [len(p.public_rows) for p in mixed] == [3, 5, 3, 5]
    assert reads.rounds == 2


async def test_a_request_never_gets_a_snapshot_older_than_itself(stores: Stores, clean: Databases):
    """A request that arrives while a query for its page runs does not join it (that query's
    snapshot may predate the request): it waits for the next round, which sees a row stored
    between the two."""
    await insert_rows(clean.read_url, [T0])
    reads = CountingReads(stores.listing)
    first_hold = reads.hold = asyncio.Event()
    early = asyncio.create_task(stores.listing.page(10, None))
    await asyncio.wait_for(reads.read_done.wait(), 10)  # the first round has read its snapshot
    ((_, newer_id),) = await insert_rows(clean.read_url, [T0 + timedelta(seconds=1)])
    arrived = asyncio.Event()

    async def late_request() -> listing.Page:
        arrived.set()
        # page() runs without suspending up to its shared wait: by the time the test resumes
        # after `arrived`, this request has joined a round (the right one or not).
        return await stores.listing.page(10, None)

    late = asyncio.create_task(late_request())
    await asyncio.wait_for(arrived.wait(), 10)
    # Hold every later round after its query; release only the first one.
    reads.hold = asyncio.Event()
    first_hold.set()
    early_page = await asyncio.wait_for(early, 10)
    assert len(early_page.public_rows) == 1
    # Had `late` joined the first round it would be answered now, with that round's old page.
    # Instead a second round must have queried (after the first ended) and be holding it.
    await asyncio.wait_for(_until(lambda: reads.rounds >= 2 or late.done()), 10)
    assert not late.done(), f"served the running round's answer: {page_ids(late.result())}"
    assert reads.rounds == 2
    reads.hold.set()
    late_page = await asyncio.wait_for(late, 10)
    assert page_ids(late_page)[0] == newer_id
    assert len(late_page.public_rows) == 2
    assert reads.rounds == 2


async def _until(cond: Callable[[], bool]) -> None:
    """Poll `cond` (the caller bounds the wait)."""
    while not cond():
        await asyncio.sleep(0.01)


async def test_a_client_that_leaves_does_not_cancel_the_shared_read(stores: Stores, clean: Databases):
    await insert_rows(clean.read_url, [T0, T0 + timedelta(seconds=1)])
    reads = CountingReads(stores.listing)
    reads.hold = asyncio.Event()
    leaving = asyncio.create_task(stores.listing.page(10, None))
    staying = asyncio.create_task(stores.listing.page(10, None))
    await asyncio.wait_for(reads.read_done.wait(), 10)
    leaving.cancel()
    reads.hold.set()
    page = await asyncio.wait_for(staying, 10)
    assert len(page.public_rows) == 2
    assert reads.rounds == 1
    assert leaving.cancelled()


async def test_an_unknown_reference_fails_every_request_sharing_it(stores: Stores, clean: Databases):
    await insert_rows(clean.read_url, [T0])
    missing = uuid.uuid4()
    results = await asyncio.gather(
        *(stores.listing.page(10, missing) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, UnknownReferenceError) for r in results)
    page = await stores.listing.page(10, None)  # and the store still serves
    assert len(page.public_rows) == 1


def _edge_orders(n_random: int) -> list[BuyOrder]:
    """Orders whose wire form is easy to get wrong: whole seconds (no fraction in isoformat),
    fractions with trailing zeros, offsets other than UTC, leap days, year boundaries, the
    smallest and largest amounts, rates of every scale from 1e-12 to 1e15."""
    rng = random.Random(20261130)
    instants = [
        datetime(2024, 5, 1, 12, 0, 0, 0, tzinfo=UTC),
        datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC),
        datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC),
        datetime(2024, 5, 1, 12, 0, 0, 999999, tzinfo=UTC),
        datetime(2024, 2, 29, 23, 59, 59, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-11))),
        datetime(2038, 1, 19, 3, 14, 8, 0, tzinfo=UTC),
    ]
    instants += [
        datetime(2000, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randrange(10**15))
        for _ in range(n_random)
    ]
    amounts = ["0.01", "999999999.99", "10.00", "10.50", "123.45"]
    rates = ["97000", "97000.00", "0.000000000001", "123456789012345.123456789", "1.5", "60000.1"]
    btcs = ["0.00000001", "100.00000000", "0.00127269", "1.00000000"]
    return [
        BuyOrder(
            id=uuid.uuid4(),
            idempotence_key=uuid.uuid4(),
            created_at=at,
            currency=Currency(("EUR", "GBP", "USD")[i % 3]),
            currency_amount=Decimal(amounts[i % len(amounts)]),
            btc_rate=Decimal(rates[i % len(rates)]),
            btc_amount=Decimal(btcs[i % len(btcs)]),
        )
        for i, at in enumerate(instants)
    ]


async def test_pages_render_each_row_exactly_as_to_public(stores: Stores, clean: Databases):
    """Over edge values projected by the real projector path, every row read back equals the
    order's BuyOrder.to_public() character for character (the read model keeps every scale and
    instant), and the page's body is the BuyOrderPage of those rows."""
    orders = _edge_orders(300)
    await stores.read.apply([BuyOrderCreated(uuid.uuid4(), o) for o in orders])
    by_id = {str(o.id): o.to_public() for o in orders}
    seen = 0
    ref: uuid.UUID | None = None
    while True:
        page = await stores.listing.page(37, ref)
        for row in page.public_rows:
            assert row == by_id[row["id"]], row
        rows = [by_id[r["id"]] for r in page.public_rows]
        assert page.body == orjson.dumps({"rows": rows, "last_reference": page.last_reference})
        assert BuyOrderPage.model_validate_json(page.body).model_dump(mode="json")["rows"] == rows
        seen += len(page.public_rows)
        if not page.has_more:
            break
        ref = page_ids(page)[-1]
    assert seen == len(orders)
