"""create_buy_order: PUT /buy_order on CREATE_BUY_ORDER_PORT."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated

import orjson
from fastapi import FastAPI, Header, Request
from starlette.responses import Response

from pydist import bootstrap, telemetry
from pydist.adapters.write_store import WriteStore
from pydist.config import Settings, get_settings
from pydist.domain.order import CapExceededError, IdempotencyKeyReusedError
from pydist.entrypoints.http_app import Lifespan, build_app
from pydist.entrypoints.lifecycle import Job, await_dependency, every, running
from pydist.entrypoints.problems import invalid, problem_type
from pydist.entrypoints.schemas import BuyOrderIn, CreateBuyOrderOut, problem_responses, read_json_object
from pydist.metrics import (
    CAP_REMAINING,
    CAP_USED,
    CREATE_METRICS,
    ORDERS_CREATED,
    ORDERS_REFUSED,
    ORDERS_REPLAYED,
    OUTBOX_BACKLOG,
    OUTBOX_OLDEST_AGE,
    expose,
)
from pydist.service.create_order import CreateBuyOrderCommand
from pydist.service.ports import PriceUnavailableError, StoreUnavailableError

_MAX_KEY_HEADER = 100
WATCH_S = 1.0
"""How often the cap and outbox gauges are read from the write model (WriteStore.status: the cap
row and the outbox's partial index of unpublished rows)."""
REFUSALS = (CapExceededError, IdempotencyKeyReusedError, PriceUnavailableError, StoreUnavailableError)
"""What the use case may refuse an order with: each counted in pydist_orders_refused_total under
its problem type's slug (cap_exceeded, idempotency_key_reused, price_unavailable,
store_unavailable)."""


def _refusal_reason(exc: Exception) -> str:
    return problem_type(exc).slug.replace("-", "_")


def _header_key(raw: str | None) -> uuid.UUID | None:
    """Idempotency-Key is an RFC 8941 sf-string ("..."); a bare UUID is accepted too."""
    if raw is None:
        return None
    if len(raw) > _MAX_KEY_HEADER:
        detail = f"Idempotency-Key header must be at most {_MAX_KEY_HEADER} characters"
        raise invalid("Idempotency-Key", "too long", detail)
    text = raw.strip()
    if len(text) > 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    try:
        return uuid.UUID(text)
    except ValueError:
        raise invalid("Idempotency-Key", "must be a UUID", "Idempotency-Key header must be a UUID") from None


def create_app(settings: Settings | None = None, *, graph: bootstrap.CreateGraph | None = None) -> FastAPI:
    """The uvicorn factory (called bare: the settings from the environment). A test passes its
    `settings` and a `graph` built by bootstrap.create with its fakes."""
    settings = settings or get_settings()
    graph = graph or bootstrap.create(settings)
    expose(*CREATE_METRICS)
    app = build_app(
        service="create_buy_order",
        title="pydist: create buy order",
        description="Place an idempotent BTC buy order for EUR, GBP or USD.",
        settings=settings,
        ready=graph.store.ping,
        lifespan=_lifespan(graph, settings.create_buy_order_port),
    )
    _route_put_buy_order(app, graph.create_order, settings)
    return app


def _write_model_gauges(store: WriteStore) -> Callable[[], Awaitable[None]]:
    """Keep the cap and outbox gauges current. The cap row is the truth (other create processes
    write it too), so it is read rather than tracked. While the write model cannot be read,
    nothing can be published either: the oldest unpublished event is then at most the last
    reading plus the time since, and the age gauge says so (an upper bound, so the outbox alert
    fires during such an outage instead of showing the last value for ever)."""
    read_at, age = time.monotonic(), 0.0

    async def write_model_gauges() -> None:
        nonlocal read_at, age
        try:
            status = await store.status()
        except Exception:
            OUTBOX_OLDEST_AGE.set(age + time.monotonic() - read_at)
            return
        read_at, age = time.monotonic(), status.outbox_oldest_age_s
        CAP_USED.set(float(status.used_btc))
        CAP_REMAINING.set(float(status.available_btc))
        OUTBOX_BACKLOG.set(status.outbox_backlog)
        OUTBOX_OLDEST_AGE.set(age)

    return write_model_gauges


def _lifespan(graph: bootstrap.CreateGraph, port: int) -> Lifespan:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # No blocking wait for the database: the port opens at once and /readyz answers 503
        # until the write model answers (requests meanwhile get a 503 problem, nothing stored).
        graph.writer.start()
        gauges = _write_model_gauges(graph.store)
        jobs: list[Job] = [
            partial(await_dependency, "write_database", graph.store.ping),
            partial(every, seconds=WATCH_S, job=gauges),
        ]
        async with running("service", jobs, graph.aclose, stop_s=2, port=port):
            yield
            # The queued orders first, before the jobs get their time: the shutdown stays within
            # its budget. graph.aclose stops the writer again (a no-op then), for a graph closed
            # without this lifespan (the CLI, tests).
            await graph.writer.stop()

    return lifespan


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="IETF Idempotency-Key (a UUID, bare or as a quoted sf-string); "
        "must match idempotence_key if both are given",
        json_schema_extra={"maxLength": _MAX_KEY_HEADER},  # checked by _header_key: its own 422
    ),
]
"""FastAPI's own Header parameter: 0.95x the orders/s of reading it by hand, within the rounds'
spread (0.82-1.14), so the library wins (A/B in docs/benchmarks.md, "FastAPI's own parameters")."""

_OPENAPI_EXTRA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": BuyOrderIn.model_json_schema()}},
    },
}


def _route_put_buy_order(app: FastAPI, create_order: bootstrap.CreateOrder, settings: Settings) -> None:
    @app.put(
        "/buy_order",
        tags=["orders"],
        summary="Create a buy order (idempotent)",
        response_model=CreateBuyOrderOut,
        responses={
            200: {"description": "Created, or replayed (header Idempotent-Replayed: true)"},
            **problem_responses(401, 408, 409, 413, 415, 422, 503),
        },
        openapi_extra=_OPENAPI_EXTRA,
    )
    async def put_buy_order(
        request: Request, idempotency_key_header: IdempotencyKeyHeader = None
    ) -> Response:
        raw = await read_json_object(request, settings.max_body_bytes, settings.body_timeout_s)
        body = BuyOrderIn.model_validate(raw)  # ValidationError: a 422 problem
        # Repeated header lines are one list (RFC 9110 section 5.3), of which FastAPI's parameter
        # keeps one: two keys are no key.
        if len(request.headers.getlist("idempotency-key")) > 1:
            raise invalid(
                "Idempotency-Key", "given more than once", "Idempotency-Key header must be given once"
            )
        header_key = _header_key(idempotency_key_header)
        command = CreateBuyOrderCommand(body.currency, body.amount, body.idempotence_key, header_key)
        try:
            outcome = await create_order(command, request.state.request_id)
        except REFUSALS as exc:
            ORDERS_REFUSED.labels(_refusal_reason(exc)).inc()
            raise
        telemetry.tag_order(outcome.order.id)
        headers = {}
        if outcome.replayed:
            headers["Idempotent-Replayed"] = "true"
            ORDERS_REPLAYED.inc()
        else:
            ORDERS_CREATED.labels(outcome.order.currency.value).inc()
        payload = {
            "idempotence_key": str(outcome.order.idempotence_key),
            "buy_order": outcome.order.to_public(),
        }
        return Response(orjson.dumps(payload), media_type="application/json", headers=headers)
