"""Issue 3 end to end: orders created over HTTP reach the read model (direct-mode relay, and the
broker topology relay → RabbitMQ → read_model_sync) and GET /buy_orders walks them page by page."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.e2e.conftest import Stack, assert_problem, async_wait_until, order_body, run_cli

N = 45
PAGE = 19


async def create_orders(stack: Stack, n: int) -> list[dict[str, str]]:
    """n orders over HTTP, in concurrent waves (so some share a write batch); returns the
    buy_order objects of the PUT responses."""
    url = f"{stack.url('create')}/buy_order"
    currencies = ("USD", "EUR", "GBP")
    async with httpx.AsyncClient(timeout=15) as client:
        responses: list[httpx.Response] = []
        for wave in range(0, n, 15):
            responses += await asyncio.gather(
                *(
                    client.put(
                        url, json=order_body(currencies[i % 3], f"{10 + i}.{i:02d}", str(uuid.uuid4()))
                    )
                    for i in range(wave, min(wave + 15, n))
                )
            )
    assert [r.status_code for r in responses] == [200] * n, [
        r.text for r in responses if r.status_code != 200
    ]
    return [r.json()["buy_order"] for r in responses]


async def wait_listed(stack: Stack, n: int) -> None:
    async def listed() -> bool:
        r = httpx.get(f"{stack.url('fetch')}/buy_orders", params={"page_size": 100}, timeout=5)
        return r.status_code == 200 and len(r.json()["rows"]) == n

    await async_wait_until(listed, timeout=20, what=f"{n} orders in the read model", interval=0.1)


def key(row: dict[str, str]) -> tuple[datetime, uuid.UUID]:
    return datetime.fromisoformat(row["created_at"].replace("Z", "+00:00")), uuid.UUID(row["id"])


def walk(stack: Stack, page_size: int) -> list[tuple[list[dict[str, str]], httpx.Response]]:
    """Every page, following the Link rel=next header (checked against last_reference)."""
    base = stack.url("fetch")
    pages = []
    response = httpx.get(f"{base}/buy_orders", params={"page_size": page_size}, timeout=5)
    for _ in range(100):  # bounded: 45 rows can never need more pages than this
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert set(body) == {"rows", "last_reference"}
        rows = body["rows"]
        pages.append((rows, response))
        if rows:
            assert body["last_reference"] == rows[-1]["id"]
        else:
            assert body["last_reference"] is None
        if "next" not in response.links:
            return pages
        link = urlsplit(response.links["next"]["url"])
        assert link.path == "/buy_orders"
        assert parse_qs(link.query) == {
            "page_size": [str(page_size)],
            "last_reference": [body["last_reference"]],
        }
        response = httpx.get(f"{base}/buy_orders?{link.query}", timeout=5)
    raise AssertionError("the Link rel=next chain does not end")


def check_listing(stack: Stack, created: list[dict[str, str]]) -> None:
    pages = walk(stack, PAGE)
    assert [len(rows) for rows, _ in pages] == [19, 19, 7]
    # Link rel=next exactly while more rows exist.
    assert ["next" in r.links for _, r in pages] == [True, True, False]
    listed = [row for rows, _ in pages for row in rows]
    ids = [row["id"] for row in listed]
    assert len(ids) == len(set(ids)) == N, "each id exactly once"
    # Strictly newest first, across page boundaries too (created_at, then id, both descending).
    keys = [key(row) for row in listed]
    assert all(a > b for a, b in itertools.pairwise(keys)), "not strictly newest first"
    # Rows are the PUT responses' buy_order objects, field for field.
    assert {row["id"]: row for row in listed} == {row["id"]: row for row in created}

    # A page that ends exactly at the last row has no next link.
    exact = walk(stack, N)
    assert [len(rows) for rows, _ in exact] == [N]
    assert "link" not in exact[0][1].headers


async def test_walk_every_page_direct(direct: Stack) -> None:
    created = await create_orders(direct, N)
    await wait_listed(direct, N)
    check_listing(direct, created)


async def test_walk_every_page_broker_topology(brokered: Stack) -> None:
    """relay → RabbitMQ (publisher confirms) → read_model_sync → read model, then the same walk,
    and `pydist read-model check` agrees that the read model matches the write model."""
    created = await create_orders(brokered, N)
    await wait_listed(brokered, N)
    check_listing(brokered, created)
    await async_wait_until(brokered.settled, timeout=10, what="outbox drained")

    result = await asyncio.to_thread(run_cli, brokered.env, "read-model", "check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report == {
        "write_orders": N,
        "read_orders": N,
        "missing": [],
        "different": [],
        "extra": [],
        "clean": True,
    }


def test_empty_listing(direct: Stack) -> None:
    response = httpx.get(f"{direct.url('fetch')}/buy_orders", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"rows": [], "last_reference": None}
    assert "link" not in response.headers


@pytest.mark.parametrize("page_size", ["0", "101", "abc", "-1", "1.5", ""])
def test_bad_page_size_is_422_problem(direct: Stack, page_size: str) -> None:
    response = httpx.get(f"{direct.url('fetch')}/buy_orders", params={"page_size": page_size}, timeout=5)
    problem = assert_problem(response, 422, "validation-error")
    assert [e["field"] for e in problem["errors"]] == ["page_size"]


@pytest.mark.parametrize("reference", ["nope", "12345", "0" * 33, "{uuid}x"])
def test_malformed_last_reference_is_422_problem(direct: Stack, reference: str) -> None:
    reference = reference.replace("{uuid}", str(uuid.uuid4()))
    response = httpx.get(f"{direct.url('fetch')}/buy_orders", params={"last_reference": reference}, timeout=5)
    problem = assert_problem(response, 422, "validation-error")
    assert [e["field"] for e in problem["errors"]] == ["last_reference"]


async def test_unknown_last_reference_is_404_problem(direct: Stack) -> None:
    await create_orders(direct, 3)
    await wait_listed(direct, 3)
    unknown = str(uuid.uuid4())
    response = httpx.get(f"{direct.url('fetch')}/buy_orders", params={"last_reference": unknown}, timeout=5)
    problem = assert_problem(response, 404, "unknown-reference")
    assert unknown in problem["detail"]
