"""How the create service asks btc_price for a rate, keeping each answer only while it is young."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import httpx
import orjson

from pydist.domain.errors import InvalidPriceError, PriceUnavailableError
from pydist.domain.money import Currency, parse_btc_price


class PriceServiceClient:
    """Caches a quote until it reaches `max_age_s` by the price service's own age count, so the
    create path makes no HTTP call per order and still never uses a price older than allowed."""

    def __init__(self, base_url: str, *, timeout_s: float, max_age_s: float) -> None:
        self._client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s))
        self._max_age_s = max_age_s
        self._cache: dict[Currency, tuple[Decimal, float]] = {}
        self._locks = {c: asyncio.Lock() for c in Currency}

    def _cached(self, currency: Currency) -> Decimal | None:
        hit = self._cache.get(currency)
        if hit is not None and time.monotonic() < hit[1]:
            return hit[0]
        return None

    async def price(self, currency: Currency) -> Decimal:
        cached = self._cached(currency)
        if cached is not None:
            return cached
        async with self._locks[currency]:
            cached = self._cached(currency)
            if cached is not None:
                return cached
            asked = time.monotonic()
            try:
                response = await self._client.get(f"/prices/{currency.value}")
            except httpx.HTTPError as exc:
                raise PriceUnavailableError(f"btc_price unreachable: {type(exc).__name__}") from exc
            if response.status_code != 200:
                raise PriceUnavailableError(f"btc_price answered {response.status_code}")
            try:
                body = orjson.loads(response.content)
                rate = parse_btc_price(body["amount"])
                age = float(body["age_s"])
            except (
                orjson.JSONDecodeError,
                KeyError,
                TypeError,
                ValueError,
                InvalidPriceError,
            ) as exc:
                raise PriceUnavailableError("btc_price answered garbage") from exc
            # Count the time in flight as age too: the quote expires no later than upstream's.
            self._cache[currency] = (rate, asked + self._max_age_s - age)
            return rate

    async def aclose(self) -> None:
        await self._client.aclose()
