"""The `pydist` CLI (issue 4) as an operator runs it: the installed console script, in its own
process, with the same environment as the services, against the running direct stack."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import uuid
from decimal import Decimal

import httpx

from pydist.devtools.coinbase_stub import CoinbaseStub
from tests.e2e.conftest import (
    PRICE_MAX_AGE_S,
    PYDIST,
    Stack,
    async_wait_until,
    json_lines,
    order_body,
    run_cli,
    wait_until,
)
from tests.support import db as testdb
from tests.support.procs import free_port

UUID_RE = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


async def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, stack.env, *args)


async def test_orders_create_prints_the_key_and_replays_with_it(direct: Stack) -> None:
    create = direct.url("create")
    result = await cli(direct, "orders", "create", "--currency", "EUR", "--amount", "10", "--url", create)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(rf"idempotency key: ({UUID_RE})", result.stdout)
    assert match, result.stdout
    key = match.group(1)
    rows = await testdb.fetch(
        direct.dbs.write_url,
        "SELECT id, btc_amount FROM buy_orders WHERE idempotence_key = $1",
        uuid.UUID(key),
    )
    assert len(rows) == 1
    assert rows[0]["btc_amount"] == Decimal("0.00010961")  # 10 / 91234.56, rounded up
    assert str(rows[0]["id"]) in result.stdout

    # --json, reusing the printed key: a replay of the same order, machine-readable.
    again = await cli(
        direct,
        "orders",
        "create",
        "--currency",
        "EUR",
        "--amount",
        "10",
        "--key",
        key,
        "--json",
        "--url",
        create,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    doc = json.loads(again.stdout)
    assert doc["status"] == 200
    assert doc["idempotence_key"] == key
    assert doc["buy_order"]["id"] == str(rows[0]["id"])
    assert doc["buy_order"]["currency_amount"] == "10.00"
    assert await direct.written() == 1

    # A refused order: exit 1, the problem in the JSON.
    refused = await cli(
        direct,
        "orders",
        "create",
        "--currency",
        "EUR",
        "--amount",
        "11",
        "--key",
        key,
        "--json",
        "--url",
        create,
    )
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["status"] == 422


async def test_orders_create_retries_with_the_same_key(direct: Stack, feed: CoinbaseStub) -> None:
    """The feed is down when the CLI starts: it gets 503s, retries with the same key, and the
    order is stored exactly once when the feed comes back."""
    feed.configure(mode="down")
    wait_until(
        lambda: httpx.get(f"{direct.url('price')}/prices/EUR", timeout=5).status_code == 503,
        timeout=PRICE_MAX_AGE_S + 8,
        what="btc_price to drop its cached EUR quote",
        interval=0.1,
    )
    key = str(uuid.uuid4())
    create_proc = direct.system.procs["create"]
    args = ["orders", "create", "--currency", "EUR", "--amount", "10", "--key", key, "--json"]
    proc = subprocess.Popen(
        [PYDIST, *args, "--url", direct.url("create")],
        env=direct.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def refusals() -> int:
            return sum(
                1
                for e in json_lines(create_proc.log())
                if e["event"] == "upstream_unavailable" and e.get("idempotence_key") == key
            )

        wait_until(lambda: refusals() >= 1, timeout=30, what="the CLI's first attempt to be refused")
        feed.configure(mode="ok")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    doc = json.loads(out)
    assert doc["status"] == 200
    assert doc["idempotence_key"] == key
    created = [
        e
        for e in json_lines(create_proc.log())
        if e["event"] == "buy_order_created" and e["idempotence_key"] == key
    ]
    assert len(created) == 1
    assert refusals() >= 1  # at least one 503 before, every attempt with the same key
    assert await direct.written() == 1


async def _orders(stack: Stack, n: int) -> list[dict[str, str]]:
    made = []
    for i in range(n):
        r = httpx.put(
            f"{stack.url('create')}/buy_order",
            json=order_body(("USD", "EUR", "GBP")[i % 3], f"{100 + i}.5", str(uuid.uuid4())),
            timeout=10,
        )
        assert r.status_code == 200, r.text
        made.append(r.json()["buy_order"])
    await async_wait_until(stack.settled, timeout=15, what="orders projected")
    return made


async def test_orders_list_all_json(direct: Stack) -> None:
    made = await _orders(direct, 5)
    result = await cli(
        direct, "orders", "list", "--all", "--page-size", "2", "--json", "--url", direct.url("fetch")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert [r["id"] for r in doc["rows"]] == [o["id"] for o in reversed(made)]  # newest first
    assert doc["rows"] == list(reversed(made))
    assert doc["last_reference"] == made[0]["id"]


async def test_cap_json_agrees_with_the_orders(direct: Stack) -> None:
    made = await _orders(direct, 3)
    result = await cli(direct, "cap", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    cap = json.loads(result.stdout)
    used = sum(Decimal(o["btc_amount"]) for o in made)
    assert Decimal(cap["used_btc"]) == used
    assert Decimal(cap["limit_btc"]) == 100
    assert Decimal(cap["available_btc"]) == 100 - used


async def test_read_model_check_and_rebuild(direct: Stack) -> None:
    made = await _orders(direct, 4)  # settled: the read model has them (a clean check: test_listing)

    # Lose one read row (and corrupt another): check reports both and exits 1...
    lost, changed = uuid.UUID(made[1]["id"]), uuid.UUID(made[2]["id"])
    await testdb.fetch(direct.dbs.read_url, "DELETE FROM buy_orders WHERE id = $1", lost)
    await testdb.fetch(direct.dbs.read_url, "UPDATE buy_orders SET btc_amount = 1 WHERE id = $1", changed)
    broken = await cli(direct, "read-model", "check", "--json")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    report = json.loads(broken.stdout)
    assert report["missing"] == [str(lost)]
    assert report["different"] == [str(changed)]
    assert report["clean"] is False
    human = await cli(direct, "read-model", "check")
    assert human.returncode == 1
    assert "1 missing, 1 different" in human.stdout

    # ...rebuild puts the write model's truth back, and the listing shows it again.
    rebuilt = await cli(direct, "read-model", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "rebuilt" in rebuilt.stdout
    after = await cli(direct, "read-model", "check", "--json")
    assert after.returncode == 0, after.stdout
    assert json.loads(after.stdout)["clean"] is True
    listed = httpx.get(f"{direct.url('fetch')}/buy_orders", params={"page_size": 10}, timeout=5).json()
    assert listed["rows"] == list(reversed(made))


async def test_migrate_is_idempotent(direct: Stack) -> None:
    versions = []
    for _ in range(2):
        result = await cli(direct, "migrate")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "migrations applied" in result.stdout
        write = await testdb.fetch(direct.dbs.write_url, "SELECT version_num FROM alembic_version")
        read = await testdb.fetch(direct.dbs.read_url, "SELECT version_num FROM alembic_version")
        versions.append(([r["version_num"] for r in write], [r["version_num"] for r in read]))
    assert versions[0] == versions[1]
    assert all(len(v) == 1 for v in versions[0])
    # The running system is unaffected.
    ok = httpx.put(f"{direct.url('create')}/buy_order", json=order_body("USD", "5.00", str(uuid.uuid4())))
    assert ok.status_code == 200, ok.text


async def test_an_unreachable_database_or_broker_is_named_and_exits_2(direct: Stack) -> None:
    """Nothing listens on `closed`: each admin command says which service it could not reach, in
    one line, with exit 2. A broker command names the broker, though a broker's refused
    connection is an OSError, as a database's is."""
    closed = f"127.0.0.1:{free_port()}"
    no_database = {
        **direct.env,
        "WRITE_DATABASE_URL": f"postgresql://postgres@{closed}/pydist_write",
        "READ_DATABASE_URL": f"postgresql://postgres@{closed}/pydist_read",
    }
    no_broker = {**direct.env, "BROKER_URL": f"amqp://guest:guest@{closed}/"}
    cases = [
        (no_database, ("cap",), "database unavailable"),
        (no_database, ("read-model", "check"), "database unavailable"),
        (no_broker, ("dlq", "list"), "broker unavailable"),
        (no_broker, ("dlq", "replay"), "broker unavailable"),
        (no_broker, ("broker", "migrate-queues"), "broker unavailable"),
    ]
    for env, args, said in cases:
        result = await asyncio.to_thread(run_cli, env, *args)
        assert (result.returncode, said) == (2, result.stdout.splitlines()[0].split(":")[0]), (
            args,
            result.stdout + result.stderr,
        )
        assert "Traceback" not in result.stdout + result.stderr, args
