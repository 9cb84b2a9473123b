"""btc_price: the one process that calls Coinbase. GET /prices/{currency} on BTC_PRICE_PORT."""

from __future__ import annotations

import contextlib
import time
from functools import partial

import orjson
from fastapi import FastAPI
from starlette.responses import Response

from pydist import bootstrap
from pydist.config import Settings, get_settings
from pydist.domain.money import Currency
from pydist.entrypoints.http_app import build_app
from pydist.entrypoints.lifecycle import every, running
from pydist.entrypoints.schemas import problem_responses
from pydist.metrics import PRICE_AGE, PRICE_METRICS, expose
from pydist.service.ports import PriceUnavailableError


def create_app(settings: Settings | None = None, *, graph: bootstrap.PriceGraph | None = None) -> FastAPI:
    """The uvicorn factory (called bare: the settings from the environment)."""
    settings = settings or get_settings()
    graph = graph or bootstrap.price(settings)
    expose(*PRICE_METRICS)
    cache = graph.cache
    for c in Currency:  # read at scrape time
        PRICE_AGE.labels(c.value).set_function(partial(cache.age, c))

    async def ready() -> None:
        if not any(cache.fresh(c) for c in Currency):
            raise PriceUnavailableError("no fresh price yet")

    async def refresh() -> None:
        for currency in Currency:
            with contextlib.suppress(PriceUnavailableError):
                await cache.refresh(currency)

    # Each currency refreshed at half its allowed age, so orders rarely wait for Coinbase.
    period = max(settings.price_max_age_s / 2, settings.price_min_interval_s, 0.05)
    keep_warm = partial(every, seconds=period, job=refresh)
    fields = {"port": settings.btc_price_port, "upstream": settings.coinbase_api_url}

    app = build_app(
        service="btc_price",
        title="pydist: btc_price",
        description="Cached BTC spot prices; the only client of the upstream price API.",
        settings=settings,
        ready=ready,
        lifespan=lambda _: running("service", [keep_warm], graph.aclose, stop_s=0, **fields),
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

    return app
