"""Least privilege (migrations w0002 / r0002) on real Postgres.

Every session here connects as the test superuser and switches to a pydist role at connection
start (the `role` setting, same as SET ROLE): from then on only that role's rights count. Each
role is shown doing its job through the real adapters (the same code the processes run), then
refused everything else, statement by statement.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest

from pydist.adapters.db import Database
from pydist.adapters.listing import ListingStore
from pydist.adapters.order_writer import BatchingOrderWriter
from pydist.adapters.outbox import Outbox
from pydist.adapters.projection import ProjectionStore
from pydist.adapters.write_store import WriteStore
from pydist.domain.money import Currency
from pydist.domain.order import CapExceededError
from pydist.migrations.roles import ensure_roles
from pydist.service.create_order import CreateBuyOrder, CreateBuyOrderCommand
from tests.support import db as testdb
from tests.support.read_side import page_ids
from tests.support.services import PG_ADMIN_URL, Databases

WRITE_ROLES = ("pydist_create", "pydist_relay")
READ_ROLES = ("pydist_sync", "pydist_fetch")
ALL_ROLES = (*WRITE_ROLES, *READ_ROLES, "pydist_place_orders")


def role_db(url: str, role: str) -> Database:
    return Database(url, 2, "pydist-test-roles", settings={"role": role})


async def as_role(url: str, role: str) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(url, timeout=5, server_settings={"role": role})
    assert await conn.fetchval("SELECT current_user") == role
    return conn


class FixedPrice:
    async def price(self, currency: Currency) -> Decimal:
        return Decimal("97000.00")


@pytest.fixture
async def dbs(clean: Databases) -> AsyncIterator[dict[str, Database]]:
    made = {
        "create": role_db(clean.write_url, "pydist_create"),
        "relay": role_db(clean.write_url, "pydist_relay"),
        "sync": role_db(clean.read_url, "pydist_sync"),
        "fetch": role_db(clean.read_url, "pydist_fetch"),
    }
    yield made
    for db in made.values():
        await db.close()


# ------------------------------------------------------------------------------ each does its job


async def test_each_role_does_its_job_through_the_real_adapters(
    dbs: dict[str, Database], clean: Databases
) -> None:
    # create: the whole use case (replay lookup, place_orders(), cap refusal, cap status).
    store = WriteStore(dbs["create"])
    writer = BatchingOrderWriter(store, max_batch=64)
    writer.start()
    try:
        create = CreateBuyOrder(store, FixedPrice(), writer)
        key = uuid.uuid4()
        placed = [
            await create(CreateBuyOrderCommand(Currency.USD, Decimal("100.00"), key), "req-roles"),
            await create(CreateBuyOrderCommand(Currency.EUR, Decimal("50.00"), uuid.uuid4()), None),
        ]
        replay = await create(CreateBuyOrderCommand(Currency.USD, Decimal("100.00"), key), None)
        assert replay.replayed
        assert replay.order == placed[0].order
        with pytest.raises(CapExceededError):
            await create(CreateBuyOrderCommand(Currency.USD, Decimal("999999999.99"), uuid.uuid4()), None)
        status = await store.status()
        assert status.used_btc == sum(p.order.btc_amount for p in placed)
    finally:
        await writer.stop()

    # relay (direct mode) claims and marks the outbox; sync projects (twice: idempotent).
    outbox = Outbox(dbs["relay"])
    assert (await store.status()).outbox_backlog == 2
    projector = ProjectionStore(dbs["sync"])
    async with outbox.claim(100) as events:
        assert len(events) == 2
        await projector.publish(events)
        await projector.publish(events)
    assert (await store.status()).outbox_backlog == 0
    published = await testdb.fetch(
        clean.write_url, "SELECT count(*) AS n FROM outbox WHERE published_at IS NULL"
    )
    assert published[0]["n"] == 0

    # fetch: the listing, both pages.
    reader = ListingStore(dbs["fetch"])
    first = await reader.page(1, None)
    assert first.has_more
    assert len(first.public_rows) == 1
    second = await reader.page(1, page_ids(first)[0])
    assert {page_ids(first)[0], page_ids(second)[0]} == {p.order.id for p in placed}


# ------------------------------------------------------------------------------ and nothing else

ORDER_VALUES = "(gen_random_uuid(), 'USD', 1, 1, 1)"
ORDER_COLUMNS = "(idempotence_key, currency, currency_amount, btc_rate, btc_amount)"
READ_ROW = (
    "INSERT INTO buy_orders (id, created_at, currency, currency_amount, btc_rate, btc_amount, "
    "idempotence_key, event_id) VALUES (gen_random_uuid(), now(), 'USD', 1, 1, 1, "
    "gen_random_uuid(), gen_random_uuid())"
)
PLACE = (
    'SELECT * FROM place_orders(\'[{"key": "%s", "currency": "USD", "amount": "1", '
    '"rate": "97000", "btc": "0.00001031", "request_id": null}]\'::jsonb)'
)

WRITE_REFUSALS = {
    "pydist_create": [
        f"INSERT INTO buy_orders {ORDER_COLUMNS} VALUES {ORDER_VALUES}",  # only via place_orders()
        "UPDATE buy_orders SET currency_amount = 2",
        "DELETE FROM buy_orders",
        "TRUNCATE buy_orders",
        "UPDATE btc_cap SET used_btc = 0",  # cannot reset the cap
        "UPDATE btc_cap SET limit_btc = 1000",  # nor raise it
        "INSERT INTO outbox (order_id) SELECT id FROM buy_orders LIMIT 1",
        "SELECT order_id FROM outbox",  # the unpublished head's two timestamps only (w0004)
        "SELECT request_id, traceparent FROM outbox",
        "UPDATE outbox SET published_at = now()",
        "DELETE FROM outbox",
        "CREATE TABLE pydist_intruder (x int)",
        "CREATE TEMP TABLE pydist_intruder (x int)",
    ],
    "pydist_relay": [
        f"INSERT INTO buy_orders {ORDER_COLUMNS} VALUES {ORDER_VALUES}",
        "UPDATE buy_orders SET currency_amount = 2",
        "DELETE FROM buy_orders",
        "INSERT INTO outbox (order_id) SELECT id FROM buy_orders LIMIT 1",
        "UPDATE outbox SET order_id = order_id",  # only published_at
        "UPDATE outbox SET request_id = 'forged'",
        "DELETE FROM outbox",
        "TRUNCATE outbox",
        "SELECT * FROM btc_cap",
        "UPDATE btc_cap SET used_btc = 0",
        PLACE % uuid.uuid4(),
        "CREATE TABLE pydist_intruder (x int)",
    ],
    "pydist_sync": ["SELECT count(*) FROM buy_orders", "SELECT count(*) FROM outbox", PLACE % uuid.uuid4()],
    "pydist_fetch": ["SELECT count(*) FROM buy_orders", "SELECT count(*) FROM btc_cap", PLACE % uuid.uuid4()],
}
READ_REFUSALS = {
    "pydist_fetch": [
        READ_ROW,
        "UPDATE buy_orders SET currency_amount = 2",
        "DELETE FROM buy_orders",
        "TRUNCATE buy_orders",
        "CREATE TABLE pydist_intruder (x int)",
    ],
    "pydist_sync": [
        "UPDATE buy_orders SET currency_amount = 2",
        "DELETE FROM buy_orders",
        "TRUNCATE buy_orders",
        "CREATE TABLE pydist_intruder (x int)",
        "CREATE TEMP TABLE pydist_intruder (x int)",
    ],
    "pydist_create": ["SELECT count(*) FROM buy_orders", READ_ROW, "DELETE FROM buy_orders"],
    "pydist_relay": ["SELECT count(*) FROM buy_orders", READ_ROW],
}


def _cases(refusals: dict[str, list[str]], model: str) -> list[tuple[str, str, str]]:
    return [(model, role, sql) for role, sqls in refusals.items() for sql in sqls]


REFUSALS = _cases(WRITE_REFUSALS, "write") + _cases(READ_REFUSALS, "read")


@pytest.mark.parametrize(
    ("model", "role", "sql"),
    REFUSALS,
    ids=[f"{m}-{r.removeprefix('pydist_')}-{s[:32]}" for m, r, s in REFUSALS],
)
async def test_everything_else_is_refused(clean: Databases, model: str, role: str, sql: str) -> None:
    url = clean.write_url if model == "write" else clean.read_url
    await _seed(clean)
    conn = await as_role(url, role)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(sql)
    finally:
        await conn.close()
    # Belt and braces: the refused statement changed nothing.
    assert (await testdb.fetch(url, "SELECT count(*) AS n FROM buy_orders"))[0]["n"] == 1


async def _seed(dbs: Databases) -> None:
    """One order in each model, written as the owner, so refused statements have a row to hit."""
    conn = await asyncpg.connect(dbs.write_url, timeout=5)
    try:
        await conn.execute(PLACE % uuid.uuid4())
    finally:
        await conn.close()
    conn = await asyncpg.connect(dbs.read_url, timeout=5)
    try:
        await conn.execute(READ_ROW)
    finally:
        await conn.close()


async def test_nobody_can_delete_or_rewrite_orders(clean: Databases) -> None:
    await _seed(clean)
    for url in (clean.write_url, clean.read_url):
        for role in (*WRITE_ROLES, *READ_ROLES):
            conn = await as_role(url, role)
            try:
                for sql in ("DELETE FROM buy_orders", "UPDATE buy_orders SET btc_amount = btc_amount"):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.execute(sql)
            finally:
                await conn.close()


async def test_only_the_right_roles_may_connect(databases: Databases) -> None:
    """CONNECT is off for PUBLIC on both databases: the create and relay roles cannot even open
    a session on the read model, the sync and fetch roles none on the write model."""
    for url, allowed in ((databases.write_url, WRITE_ROLES), (databases.read_url, READ_ROLES)):
        rows = await testdb.fetch(
            url,
            "SELECT coalesce(r.rolname, 'PUBLIC') AS grantee, a.privilege_type AS privilege "
            "FROM pg_database d, aclexplode(d.datacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee "
            "WHERE d.datname = current_database() AND d.datdba <> a.grantee",
        )
        grants = {(r["grantee"], r["privilege"]) for r in rows}
        assert grants == {(role, "CONNECT") for role in allowed}, grants
        for role in (*WRITE_ROLES, *READ_ROLES):
            can = await testdb.fetch(
                url, "SELECT has_database_privilege($1, current_database(), 'CONNECT') AS ok", role
            )
            assert can[0]["ok"] is (role in allowed), (url.rsplit("/", 1)[-1], role)


async def test_roles_are_nologin_and_place_orders_is_a_pinned_definer(databases: Databases) -> None:
    rows = await testdb.fetch(
        databases.write_url,
        "SELECT rolname, rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolbypassrls, rolinherit "
        "FROM pg_roles WHERE rolname = ANY($1::text[])",
        list(ALL_ROLES),
    )
    assert {r["rolname"] for r in rows} == set(ALL_ROLES)
    for r in rows:
        # NOLOGIN as the migration made them: an operator grants LOGIN (docs/security.md).
        assert not any(r[k] for k in ("rolcanlogin", "rolsuper", "rolcreatedb", "rolcreaterole")), dict(r)
        assert not r["rolbypassrls"], dict(r)
    fn = await testdb.fetch(
        databases.write_url,
        "SELECT prosecdef, proconfig, pg_get_userbyid(proowner) AS owner, "
        "has_function_privilege('pydist_relay', oid, 'EXECUTE') AS relay_can, "
        "has_function_privilege('pydist_create', oid, 'EXECUTE') AS create_can "
        "FROM pg_proc WHERE proname = 'place_orders'",
    )
    assert len(fn) == 1
    assert fn[0]["prosecdef"], "place_orders() must be SECURITY DEFINER (a later migration reset it?)"
    assert fn[0]["proconfig"] == ["search_path=public, pg_temp"], fn[0]["proconfig"]
    assert fn[0]["owner"] == "pydist_place_orders"
    assert fn[0]["create_can"]
    assert not fn[0]["relay_can"]


async def test_role_creation_survives_concurrent_migrations() -> None:
    """Roles are cluster-wide and parallel sessions migrate at once: the migration's own DO block,
    run by four transactions at the same moment for a role that does not exist yet, must let all
    four succeed (one creates it, the others find it made meanwhile)."""
    name = f"pydist_t_race_{uuid.uuid4().hex[:10]}"
    sql = ensure_roles([name])
    conns = [await asyncpg.connect(PG_ADMIN_URL, timeout=5) for _ in range(4)]

    async def migrate(conn: asyncpg.Connection) -> None:
        async with conn.transaction():
            await conn.execute(sql)

    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(migrate(c) for c in conns), return_exceptions=True), timeout=30
        )
        assert [r for r in results if r is not None] == []
        count = await conns[0].fetchval("SELECT count(*) FROM pg_roles WHERE rolname = $1", name)
        assert count == 1
        login = await conns[0].fetchval("SELECT rolcanlogin FROM pg_roles WHERE rolname = $1", name)
        assert login is False
    finally:
        await conns[0].execute(f'DROP ROLE IF EXISTS "{name}"')
        for conn in conns:
            await conn.close()
