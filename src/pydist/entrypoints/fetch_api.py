"""fetch_buy_orders: GET /buy_orders on FETCH_BUY_ORDERS_PORT, served from the read model."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlencode

import orjson
import structlog
from fastapi import FastAPI, Query, Request
from starlette.responses import Response

from pydist.adapters.db import make_engine
from pydist.adapters.read_store import ReadStore
from pydist.config import Settings, get_settings
from pydist.entrypoints.http_app import build_app
from pydist.entrypoints.schemas import BuyOrderPage, problem_responses
from pydist.entrypoints.serve import await_dependency, cancel_tasks

log = structlog.get_logger()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    engine = make_engine(
        settings.read_database_url.get_secret_value(),
        settings.db_pool_size,
        "pydist-fetch",
        pre_ping=False,
        # No overflow: at high concurrency requests wait a moment for one of the pool's warm
        # connections instead of opening (a backend fork) and closing one each (measured).
        max_overflow=0,
    )
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
    )
    async def get_buy_orders(
        request: Request,
        page_size: int = Query(default=10, ge=1, le=100, description="Rows per page, 1..100"),
        last_reference: uuid.UUID | None = Query(
            default=None, description="id of the last row of the previous page"
        ),
    ) -> Response:
        page = await store.page(page_size, last_reference)
        last = str(page.rows[-1].id) if page.rows else None
        headers = {}
        if page.has_more and last is not None:
            query = urlencode({"page_size": page_size, "last_reference": last})
            headers["Link"] = f'<{request.url.path}?{query}>; rel="next"'
        body = {"rows": page.public_rows, "last_reference": last}
        return Response(orjson.dumps(body), media_type="application/json", headers=headers)

    return app
