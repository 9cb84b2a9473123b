"""fetch_buy_orders: GET /buy_orders on FETCH_BUY_ORDERS_PORT, served from the read model."""

from __future__ import annotations

from functools import partial

from fastapi import FastAPI, Request
from starlette.responses import Response

from pydist import bootstrap
from pydist.config import Settings, get_settings
from pydist.entrypoints.http_app import build_app
from pydist.entrypoints.lifecycle import await_dependency, running
from pydist.entrypoints.schemas import BuyOrderPage, PageQuery, problem_responses


def create_app(settings: Settings | None = None, *, graph: bootstrap.FetchGraph | None = None) -> FastAPI:
    """The uvicorn factory (called bare: the settings from the environment). A test passes its
    `settings` and a `graph` built by bootstrap.fetch with its fakes."""
    settings = settings or get_settings()
    graph = graph or bootstrap.fetch(settings)
    store = graph.pages
    # The port opens at once; /readyz answers 503 until the read model answers.
    waiting = partial(await_dependency, "read_database", store.ping)
    port = settings.fetch_buy_orders_port
    app = build_app(
        service="fetch_buy_orders",
        title="pydist: fetch buy orders",
        description="Buy orders, newest first, keyset-paged: every page costs the same.",
        settings=settings,
        ready=store.ping,
        lifespan=lambda _: running("service", [waiting], graph.aclose, stop_s=1, port=port),
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
        headers = None
        if page.has_more:  # a uuid and an int: nothing to escape in the next page's URL
            next_page = f"{request.scope['path']}?page_size={query.page_size}"
            headers = {"Link": f'<{next_page}&last_reference={page.last_reference}>; rel="next"'}
        return Response(page.body, media_type="application/json", headers=headers)

    return app
