"""The create side's client for btc_price: its idle connections expire before the server's do, and
concurrent orders share one call and its outcome."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import httpx
import pytest
import uvicorn

from pydist.adapters.prices import KEEPALIVE_EXPIRY_S, PriceServiceClient
from pydist.domain.money import Currency
from pydist.service.ports import PriceUnavailableError


async def test_idle_connections_expire_well_before_the_server_closes_them():
    """Equal expiries (httpx's and uvicorn's defaults are both 5 s) let a reused connection meet
    a closing server: a spurious 503. The margin must cover a loaded event loop's lateness."""
    server_keep_alive = uvicorn.Config(app=lambda: None).timeout_keep_alive
    assert server_keep_alive / 2 >= KEEPALIVE_EXPIRY_S
    client = PriceServiceClient("http://127.0.0.1:1", timeout_s=1, max_age_s=5)
    try:
        pool = client._client._transport._pool  # type: ignore[attr-defined]
        assert pool._keepalive_expiry == KEEPALIVE_EXPIRY_S
    finally:
        await client.aclose()


class _SlowPriceService:
    """btc_price behind an httpx.MockTransport: every call says it `entered`, waits for `release`,
    then answers `status`; `calls` counts them."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.calls = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        return httpx.Response(self.status, json={"amount": "91234.56", "age_s": 0.1})


def _client(service: _SlowPriceService) -> PriceServiceClient:
    http = httpx.AsyncClient(base_url="http://btc-price", transport=httpx.MockTransport(service))
    # A failure is remembered far longer than the test lasts: nothing here depends on timing.
    return PriceServiceClient("http://btc-price", timeout_s=5, max_age_s=60, retry_after_s=60, client=http)


async def _orders_waiting(client: PriceServiceClient, service: _SlowPriceService, n: int) -> list[Any]:
    """`n` orders for USD, all waiting while the one call is held; then the call answers."""
    waiting = [asyncio.ensure_future(client.price(Currency.USD)) for _ in range(n)]
    await service.entered.wait()  # the call is made after every order has started waiting on it
    assert not any(w.done() for w in waiting)
    service.release.set()
    return list(await asyncio.gather(*waiting, return_exceptions=True))


async def test_concurrent_orders_share_one_failed_call_and_then_fail_at_once():
    """Fifty orders for one currency while its price call is in flight: one call, and all fifty
    get its error (a lock alone would make each waiter call again after the failure, so the
    n-th order would wait n calls). Within `retry_after_s` the next orders fail without a call."""
    service = _SlowPriceService(503)
    client = _client(service)
    try:
        outcomes = await _orders_waiting(client, service, 50)
        assert service.calls == 1
        assert all(isinstance(o, PriceUnavailableError) for o in outcomes), outcomes[:3]
        with pytest.raises(PriceUnavailableError):
            await client.price(Currency.USD)
        assert service.calls == 1
    finally:
        await client.aclose()


async def test_a_good_answer_is_shared_and_kept_while_young():
    service = _SlowPriceService(200)
    client = _client(service)
    try:
        assert set(await _orders_waiting(client, service, 20)) == {Decimal("91234.56")}
        assert await client.price(Currency.USD) == Decimal("91234.56")
        assert service.calls == 1
    finally:
        await client.aclose()
