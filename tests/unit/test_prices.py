"""The create side's client for btc_price: its idle connections expire before the server's do."""

from __future__ import annotations

import uvicorn

from pydist.adapters.prices import KEEPALIVE_EXPIRY_S, PriceServiceClient


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
