"""fetch_buy_orders: GET /buy_orders on FETCH_BUY_ORDERS_PORT, served from the read model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.responses import Response

from pydist.adapters.db import make_engine
from pydist.adapters.read_store import ReadStore
from pydist.config import Settings, get_settings
from pydist.entrypoints.http_app import build_app
from pydist.entrypoints.schemas import BuyOrderPage, PageQuery, problem_responses
from pydist.entrypoints.serve import await_dependency, cancel_tasks

log = structlog.get_logger()


def fetch_engine(read_url: str, pool_size: int) -> AsyncEngine:
    """The read model's pool as the fetch process uses it."""
    return make_engine(
        read_url,
        pool_size,
        "pydist-fetch",
        pre_ping=False,
        # No overflow: at high concurrency requests wait a moment for one of the pool's warm
        # connections instead of opening (a backend fork) and closing one each (measured).
        max_overflow=0,
        # The page statements are prepared once per connection, but Postgres' default `auto` mode
        # kept re-planning them on every call (custom plans: 0 generic / 2,020 custom in 2,020
        # calls), which cost the deep page ~0.25 ms more than the first. The generic plans are
        # the same index-only scans (tests/integration/test_keyset.py); measured in
        # docs/benchmarks.md: deep page 445-523 -> 221-233 us per call.
        server_settings={"plan_cache_mode": "force_generic_plan"},
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = fetch_engine(settings.read_database_url.get_secret_value(), settings.db_pool_size)
    store = ReadStore(engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # The port opens at once; /readyz answers 503 until the read model answers.
        stop = asyncio.Event()
        waiting = asyncio.create_task(await_dependency("read_database", store.ping, stop), name="await-db")
        log.info("service_started", port=settings.fetch_buy_orders_port)
        yield
        stop.set()
        await cancel_tasks([waiting], timeout=1)
        await engine.dispose()
        log.info("service_stopped")

    app = build_app(
        service="fetch_buy_orders",
        title="pydist: fetch buy orders",
        description="Buy orders, newest first, keyset-paged: every page costs the same.",
        settings=settings,
        ready=store.ping,
        lifespan=lifespan,
    )

    @app.get(
        "/buy_orders",
        tags=["orders"],
        summary="List buy orders, newest first",
        response_model=BuyOrderPage,
        responses={
            200: {"description": "A page; a Link rel=next header is present while more rows exist"},
            **problem_responses(401, 404, 422, 503),
        },
        openapi_extra={"parameters": PageQuery.openapi_parameters()},
    )
    async def get_buy_orders(request: Request) -> Response:
        query = PageQuery.model_validate(request.query_params)  # ValidationError: a 422 problem
        page = await store.page(query.page_size, query.last_reference)
        last = page.public_rows[-1]["id"] if page.public_rows else None
        headers = None
        if page.has_more:  # a uuid and an int: nothing to escape in the next page's URL
            next_page = f"{request.scope['path']}?page_size={query.page_size}&last_reference={last}"
            headers = {"Link": f'<{next_page}>; rel="next"'}
        last_json = b'"%s"' % last.encode() if last else b"null"
        body = b'{"rows":%b,"last_reference":%b}' % (page.public_json, last_json)
        return Response(body, media_type="application/json", headers=headers)

    return app
