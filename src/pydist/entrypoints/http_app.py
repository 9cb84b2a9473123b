"""What every HTTP process shares: request ids, API keys, metrics, health and problem errors."""

from __future__ import annotations

import gc
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pydist import telemetry
from pydist.config import Settings
from pydist.entrypoints.problems import install_problem_handlers, problem
from pydist.entrypoints.schemas import PROBLEM_SCHEMA
from pydist.logs import configure_logging
from pydist.metrics import HTTP_LATENCY, HTTP_SHED, render

log = structlog.get_logger()
OPEN_PATHS = frozenset({"/healthcheck", "/readyz", "/metrics"})
KEYED_SERVICES = frozenset({"create_buy_order", "fetch_buy_orders"})
"""The two public APIs: API_KEYS applies to them only. btc_price is an internal service (its one
client, create_buy_order, sends no key) and relay/read_model_sync serve only the open paths."""
_MAX_REQUEST_ID = 128
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""The `method` label's values; any other method (httptools accepts some thirty, WebDAV's among
them) is counted as `other`, so a client cannot multiply the latency histogram's series."""
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[Any]]
MAX_HEADER_BYTES = 16 * 1024
"""All request header names and values together; more is answered 431 before any routing.
(uvicorn's httptools parser has no limit of its own: this is the application's.)"""
# nginx's code for "the client closed the connection before the answer": no one reads a reply, and
# the latency histogram and logs should not count a client that hung up as the server's 500.
CLIENT_CLOSED_REQUEST = 499


def _request_id(raw: bytes | None) -> str:
    """The client's X-Request-ID if it is short, visible ASCII (no space, CR, LF or other control
    byte, nothing that could split or smuggle a header); otherwise a fresh id."""
    if raw and len(raw) <= _MAX_REQUEST_ID and all(0x21 <= b <= 0x7E for b in raw):
        return raw.decode("ascii")
    return uuid.uuid4().hex


def _has_body(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class EdgeMiddleware:
    """Pure ASGI (no per-request task like BaseHTTPMiddleware): request id, header size, load
    shedding, auth, latency."""

    def __init__(self, app: ASGIApp, *, service: str, api_keys: frozenset[str], max_in_flight: int) -> None:
        self.app = app
        self.service = service
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        HTTP_SHED.labels(service)  # the series exists (at 0) before the first shed request
        # Keys are kept (and compared) as SHA-256 digests: equal lengths, so the comparison time
        # says nothing about a key's length or content.
        self.api_keys = tuple(_digest(k.encode()) for k in api_keys)

    def _route(self, scope: Scope) -> str:
        matched = scope.get("route")  # set by the router once it matched: no second search
        if matched is not None:
            return str(getattr(matched, "path", "unmatched"))
        app = scope.get("app")
        router = getattr(app, "router", None)
        for route in getattr(router, "routes", ()):
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"

    def _authorised(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        if not self.api_keys or scope["path"] in OPEN_PATHS:
            return True
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        presented = _digest(token.strip())
        # Compare against every key, always (a list, not any()'s short cut), so timing says
        # nothing about which matched.
        return any([hmac.compare_digest(presented, key) for key in self.api_keys])

    def _refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> Response | None:
        """The answer to give without running the app, if any. Past `max_in_flight` requests in
        progress (`_run_counted`) a new one is shed at once (503, Retry-After) rather than queued:
        under overload every queued request would wait out its deadlines, latency would climb for
        all, and the process's memory with it (327 MB for create at 110% of its rate,
        docs/reliability.md). The ops paths are never shed."""
        if sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
            detail = f"the request headers may be at most {MAX_HEADER_BYTES} bytes in total"
            return problem(431, "headers-too-large", detail)
        if self._in_flight >= self.max_in_flight and scope["path"] not in OPEN_PATHS:
            HTTP_SHED.labels(self.service).inc()
            detail = f"{self.service} is at capacity; nothing was done. Retry shortly."
            return problem(503, "overloaded", detail, headers={"Retry-After": "1"})
        if not self._authorised(scope, headers):
            detail = "a valid API key is required: send 'Authorization: Bearer <key>'"
            return problem(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _run_counted(
        self, scope: Scope, headers: dict[bytes, bytes], receive: Receive, send: Send
    ) -> None:
        """The app, with the request counted in flight from the moment its body has arrived
        whole (at once if it has none, or is a GET or HEAD) until the app is done. A client that
        stalls in its body holds no slot, so slow senders cannot lock the others out; the ops
        paths hold none."""
        if scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        # A GET's body is never read, so a Content-Length on it must not keep it uncounted.
        counted = scope["method"] == "GET" or not _has_body(headers)
        if counted:
            self._in_flight += 1

        async def receive_counting() -> Message:
            nonlocal counted
            message = await receive()
            if not counted and message["type"] == "http.request" and not message.get("more_body"):
                counted = True
                self._in_flight += 1
            return message

        try:
            await self.app(scope, receive_counting, send)
        finally:
            if counted:
                self._in_flight -= 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        request_id = _request_id(headers.get(b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
            await send(message)

        # HEAD is GET without the body (RFC 9110 9.3.2: a server MUST support it); FastAPI's routes
        # take GET only, so the app sees GET and uvicorn, which parsed HEAD, drops the body.
        routed = {**scope, "method": "GET"} if scope["method"] == "HEAD" else scope
        try:
            refusal = self._refusal(scope, headers)
            if refusal is not None:
                await refusal(scope, receive, send_wrapper)
                return
            await self._run_counted(routed, headers, receive, send_wrapper)
        except ClientDisconnect:
            # Nothing was stored: the body never arrived whole. The client may retry with its key.
            status = CLIENT_CLOSED_REQUEST
            log.info("client_disconnected", path=scope["path"])
        except Exception as exc:
            # Answered here rather than by Starlette's outer ServerErrorMiddleware, so the 500 also
            # carries X-Request-ID. Logged with its traceback; the client gets a bare problem.
            log.exception("unhandled_error", error_type=type(exc).__name__)
            if response_started:
                raise
            await problem(500, "internal-error", "an internal error occurred; it has been logged")(
                scope, receive, send_wrapper
            )
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            HTTP_LATENCY.labels(self.service, method, self._route(routed), str(status)).observe(
                time.perf_counter() - started
            )


def _api_routes_first(app: FastAPI) -> None:
    """The router tries routes in order and FastAPI registers its docs routes first: put the
    service's own API before the docs and ops routes, so a request to it matches on the first
    try instead of the eighth (the paths never overlap, so nothing else changes)."""
    rest = {app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url, *OPEN_PATHS}
    app.router.routes.sort(key=lambda route: getattr(route, "path", None) in rest)


def build_app(
    *,
    service: str,
    title: str,
    description: str,
    settings: Settings,
    ready: Callable[[], Awaitable[None]],
    lifespan: Lifespan,
) -> FastAPI:
    tracing = telemetry.setup(service)
    configure_logging(service, settings, tracing=tracing)

    @asynccontextmanager
    async def frozen_after_startup(app: FastAPI) -> AsyncIterator[Any]:
        _api_routes_first(app)
        async with lifespan(app) as state:
            # What start-up built lives as long as the process: move it out of the collector's
            # way, so full collections stop walking it (measured: p99 137 → 89 ms on create).
            gc.collect()
            gc.freeze()
            yield state
        telemetry.shutdown()  # export the spans still buffered

    # FastAPI's native instrumentation (OTEL_TELEMETRY) would make a second server span per
    # request next to the OpenTelemetry instrumentation's: with pydist's tracing on it stays off.
    otel = settings.otel_telemetry and not tracing
    app = FastAPI(
        title=title,
        description=description,
        version="1.0.0",
        lifespan=frozen_after_startup,
        telemetry={"tracing": otel, "metrics": otel, "logs": otel},
    )
    install_problem_handlers(app)
    telemetry.instrument_app(app)
    api_keys = settings.api_key_set if service in KEYED_SERVICES else frozenset()
    app.add_middleware(
        EdgeMiddleware, service=service, api_keys=api_keys, max_in_flight=settings.max_in_flight
    )
    if api_keys:
        _declare_bearer_auth(app)
    _route_ops(app, service, ready)
    return app


def _route_ops(app: FastAPI, service: str, ready: Callable[[], Awaitable[None]]) -> None:
    """/healthcheck (liveness), /readyz (`ready` answers) and /metrics, on every process."""

    @app.get(
        "/healthcheck",
        tags=["ops"],
        summary="Liveness: the process answers",
        responses={200: {"content": {"application/json": {"schema": _STATUS_SCHEMA}}}},
    )
    async def healthcheck() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["ops"],
        summary="Readiness: the process can do its work (its database answers; btc_price: a fresh quote)",
        responses={
            200: {"description": "Ready", "content": {"application/json": {"schema": _STATUS_SCHEMA}}},
            503: {"description": "Not ready: a dependency is down", "content": PROBLEM_SCHEMA},
        },
    )
    async def readyz() -> Response:
        try:
            await ready()
        except Exception as exc:
            log.warning("not_ready", error=type(exc).__name__)
            return problem(503, "not-ready", f"{service} is not ready: a dependency is down")
        return Response(b'{"status":"ready"}', media_type="application/json")

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(render(), media_type=CONTENT_TYPE_LATEST)


_STATUS_SCHEMA = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}


def _declare_bearer_auth(app: FastAPI) -> None:
    """With API_KEYS set, the OpenAPI document says so: bearer auth everywhere but the open paths."""
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        schema = plain_openapi()  # FastAPI's, made once and kept: what is set below is kept too
        schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearerAuth"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "one of the keys in API_KEYS",
        }
        schema["security"] = [{"bearerAuth": []}]
        for path, operations in schema.get("paths", {}).items():
            if path in OPEN_PATHS:
                for operation in operations.values():
                    operation["security"] = []
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
