"""btc_price: the one process that calls Coinbase. GET /prices/{currency} on BTC_PRICE_PORT."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal

import orjson
import structlog
from fastapi import FastAPI
from starlette.responses import Response

from pydist.adapters.coinbase import CoinbaseSpot
from pydist.config import Settings, get_settings
from pydist.domain.errors import PriceUnavailableError
from pydist.domain.money import Currency
from pydist.entrypoints.http_app import build_app
from pydist.entrypoints.schemas import problem_responses
from pydist.metrics import PRICE_AGE, PRICE_METRICS, PRICE_UPSTREAM_CALLS, expose
from pydist.service.price_cache import PriceCache

log = structlog.get_logger()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    expose(*PRICE_METRICS)
    coinbase = CoinbaseSpot(settings.coinbase_api_url, settings.price_timeout_s)
    fetched: dict[Currency, float] = {}

    def age_of(currency: Currency) -> Callable[[], float]:
        def age() -> float:
            at = fetched.get(currency)
            return math.nan if at is None else time.monotonic() - at

        return age

    # Read at scrape time: the age of the newest quote, NaN before the first one.
    for c in Currency:
        PRICE_AGE.labels(c.value).set_function(age_of(c))

    async def fetch(currency: Currency) -> Decimal:
        try:
            price = await coinbase.spot(currency)
        except PriceUnavailableError as exc:
            PRICE_UPSTREAM_CALLS.labels(currency.value, "error").inc()
            log.warning("price_fetch_failed", currency=currency.value, error=str(exc))
            raise
        PRICE_UPSTREAM_CALLS.labels(currency.value, "ok").inc()
        fetched[currency] = time.monotonic()
        return price

    cache = PriceCache(
        fetch,
        max_age_s=settings.price_max_age_s,
        min_interval_s=settings.price_min_interval_s,
    )

    async def keep_warm() -> None:
        """Refresh each currency at half its allowed age, so orders rarely wait for Coinbase."""
        period = max(settings.price_max_age_s / 2, settings.price_min_interval_s, 0.05)
        while True:
            for currency in Currency:
                with contextlib.suppress(PriceUnavailableError):
                    await cache.refresh(currency)
            await asyncio.sleep(period)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(keep_warm(), name="price-keep-warm")
        log.info("service_started", port=settings.btc_price_port, upstream=settings.coinbase_api_url)
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await coinbase.aclose()
        log.info("service_stopped")

    async def ready() -> None:
        if not any(cache.fresh(c) for c in Currency):
            raise PriceUnavailableError("no fresh price yet")

    app = build_app(
        service="btc_price",
        title="pydist: btc_price",
        description="Cached BTC spot prices; the only client of the upstream price API.",
        settings=settings,
        ready=ready,
        lifespan=lifespan,
    )

    @app.get(
        "/prices/{currency}",
        tags=["prices"],
        summary="Fiat price of 1 BTC, never older than PRICE_MAX_AGE_S",
        responses=problem_responses(422, 503),
    )
    async def get_price(currency: Currency) -> Response:
        quote = await cache.get(currency)
        age = quote.age(time.monotonic())
        body = {
            "currency": currency.value,
            "amount": f"{quote.amount:f}",
            "fetched_at": quote.fetched_at.isoformat(),
            "age_s": round(age, 3),
        }
        return Response(orjson.dumps(body), media_type="application/json")

    app.state.cache = cache
    return app
