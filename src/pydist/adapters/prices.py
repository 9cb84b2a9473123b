"""BTC prices over HTTP, both hops of one: btc_price asks Coinbase (`CoinbaseSpot`, only that
process talks to Coinbase), and the create service asks btc_price (`PriceServiceClient`, which
keeps each answer only while it is young).

On either hop, whatever goes wrong (a peer that cannot be reached or is too slow, a status other
than 200, a body that holds no price) is a PriceUnavailableError: the order gets a 503."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from decimal import Decimal
from functools import partial
from typing import Any, TypeVar

import httpx
import orjson
import structlog

from pydist.domain.money import Currency, InvalidPriceError, parse_btc_price
from pydist.metrics import PRICE_UPSTREAM_CALLS
from pydist.service.ports import PriceUnavailableError

log = structlog.get_logger()
T = TypeVar("T")

KEEPALIVE_EXPIRY_S = 2.0
"""Idle connections to btc_price are dropped well before its server closes them (uvicorn's
`timeout_keep_alive`, 5 s). httpx's default expiry is the same 5 s, so a connection reused at that
instant met a closing server: a spurious 503 `RemoteProtocolError` (about 1 call in 60 after an
idle of 4.99 s, measured 2026-12-01)."""
RETRY_AFTER_S = 0.25
"""After a failed call to btc_price, orders for that currency are refused at once this long."""


async def get_json(
    client: httpx.AsyncClient, path: str, timeout_s: float, peer: str, parse: Callable[[Any], T]
) -> T:
    """GET `path` and `parse` its JSON body, within `timeout_s` in all: httpx's timeout applies to
    each phase, so a trickling server could otherwise stretch one call well past it."""
    try:
        async with asyncio.timeout(timeout_s):
            response = await client.get(path)
    except (httpx.HTTPError, TimeoutError) as exc:
        raise PriceUnavailableError(f"{peer} unreachable: {type(exc).__name__}") from exc
    if response.status_code != 200:
        raise PriceUnavailableError(f"{peer} answered {response.status_code}")
    try:
        return parse(orjson.loads(response.content))
    except (KeyError, TypeError, ValueError) as exc:  # bad JSON and bad prices are ValueErrors
        raise PriceUnavailableError(f"{peer} answered garbage: {exc}") from exc


def _spot_of(currency: Currency, body: Any) -> Decimal:
    data = body["data"]
    if data["base"] != "BTC" or data["currency"] != currency.value:
        raise InvalidPriceError("coinbase answered for another pair")
    return parse_btc_price(data["amount"])


def _rate_and_age(body: Any) -> tuple[Decimal, float]:
    return parse_btc_price(body["amount"]), float(body["age_s"])


class CoinbaseSpot:
    """Each call is counted in pydist_price_upstream_calls_total (ok/error)."""

    def __init__(self, base_url: str, timeout_s: float):
        self._timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(timeout_s),
            headers={"Accept": "application/json", "User-Agent": "pydist-btc-price"},
        )

    async def spot(self, currency: Currency) -> Decimal:
        path, parse = f"/v2/prices/BTC-{currency.value}/spot", partial(_spot_of, currency)
        try:
            price = await get_json(self._client, path, self._timeout_s, "coinbase", parse)
        except PriceUnavailableError as exc:
            PRICE_UPSTREAM_CALLS.labels(currency.value, "error").inc()
            log.warning("price_fetch_failed", currency=currency.value, error=str(exc))
            raise
        PRICE_UPSTREAM_CALLS.labels(currency.value, "ok").inc()
        return price

    async def aclose(self) -> None:
        await self._client.aclose()


class PriceServiceClient:
    """Caches a quote until it reaches `max_age_s` by the price service's own age count, so the
    create path makes no HTTP call per order and still never uses a price older than allowed.

    Single flight with a shared outcome: while one call for a currency is in flight, every other
    order for that currency waits for *that* call and gets its result or its error. (A lock alone
    would make the waiters call again one after the other when the call fails, so with a slow
    feed the n-th order would wait n timeouts.) After a failure, orders are refused at once for
    `retry_after_s` instead of calling again, which bounds the calls to btc_price during an outage.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float,
        max_age_s: float,
        retry_after_s: float = RETRY_AFTER_S,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._client = client or httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S),
        )
        self._timeout_s = timeout_s
        self._max_age_s = max_age_s
        self._retry_after_s = retry_after_s
        self._cache: dict[Currency, tuple[Decimal, float]] = {}
        self._failed: dict[Currency, tuple[PriceUnavailableError, float]] = {}
        self._inflight: dict[Currency, asyncio.Future[Decimal]] = {}

    async def price(self, currency: Currency) -> Decimal:
        cached = self._cache.get(currency)
        if cached is not None and time.monotonic() < cached[1]:
            return cached[0]
        failed = self._failed.get(currency)
        if failed is not None and time.monotonic() < failed[1]:
            raise PriceUnavailableError(str(failed[0]))
        flight = self._inflight.get(currency)
        if flight is None:
            flight = asyncio.ensure_future(self._fetch(currency))
            self._inflight[currency] = flight
            flight.add_done_callback(lambda f: self._landed(currency, f))
        # shield: a client that goes away must not cancel the call the others are waiting for
        return await asyncio.shield(flight)

    def _landed(self, currency: Currency, flight: asyncio.Future[Decimal]) -> None:
        if self._inflight.get(currency) is flight:
            del self._inflight[currency]
        if flight.cancelled():
            return
        exc = flight.exception()  # also marks it retrieved when no one waits any more
        if isinstance(exc, PriceUnavailableError):
            self._failed[currency] = (exc, time.monotonic() + self._retry_after_s)
        elif exc is None:
            self._failed.pop(currency, None)

    async def _fetch(self, currency: Currency) -> Decimal:
        asked = time.monotonic()
        rate, age = await get_json(
            self._client, f"/prices/{currency.value}", self._timeout_s, "btc_price", _rate_and_age
        )
        # Count the time in flight as age too: the quote expires no later than upstream's.
        self._cache[currency] = (rate, asked + self._max_age_s - max(age, 0.0))
        return rate

    async def aclose(self) -> None:
        for flight in list(self._inflight.values()):
            flight.cancel()
            with contextlib.suppress(BaseException):
                await flight
        await self._client.aclose()
