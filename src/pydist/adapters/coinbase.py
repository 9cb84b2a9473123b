"""Coinbase spot prices over HTTP. Only the btc_price process talks to this."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx
import orjson
import structlog

from pydist.domain.errors import InvalidPriceError, PriceUnavailableError
from pydist.domain.money import Currency, parse_btc_price
from pydist.metrics import PRICE_UPSTREAM_CALLS

log = structlog.get_logger()


class CoinbaseSpot:
    """Each call is counted in pydist_price_upstream_calls_total (ok/error), and `fetched_at`
    keeps when each currency's newest price arrived (monotonic), for btc_price's age gauge."""

    def __init__(self, base_url: str, timeout_s: float, client: httpx.AsyncClient | None = None):
        self.fetched_at: dict[Currency, float] = {}
        self._timeout_s = timeout_s
        self._client = client or httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s),
            headers={"Accept": "application/json", "User-Agent": "pydist-btc-price"},
        )

    async def spot(self, currency: Currency) -> Decimal:
        try:
            price = await self._spot(currency)
        except PriceUnavailableError as exc:
            PRICE_UPSTREAM_CALLS.labels(currency.value, "error").inc()
            log.warning("price_fetch_failed", currency=currency.value, error=str(exc))
            raise
        PRICE_UPSTREAM_CALLS.labels(currency.value, "ok").inc()
        self.fetched_at[currency] = time.monotonic()
        return price

    async def _spot(self, currency: Currency) -> Decimal:
        try:
            # httpx's timeout applies to each phase (a trickling server could stretch it); this
            # bounds the whole call, so a slow feed costs at most `timeout_s`.
            async with asyncio.timeout(self._timeout_s):
                response = await self._client.get(f"/v2/prices/BTC-{currency.value}/spot")
        except (httpx.HTTPError, TimeoutError) as exc:
            raise PriceUnavailableError(f"coinbase unreachable: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise PriceUnavailableError(f"coinbase answered {response.status_code}")
        try:
            data = orjson.loads(response.content)["data"]
            if data["base"] != "BTC" or data["currency"] != currency.value:
                raise InvalidPriceError("coinbase answered for another pair")
            return parse_btc_price(data["amount"])
        except (orjson.JSONDecodeError, KeyError, TypeError, InvalidPriceError) as exc:
            raise PriceUnavailableError(f"coinbase answered garbage: {exc}") from exc

    async def aclose(self) -> None:
        await self._client.aclose()
