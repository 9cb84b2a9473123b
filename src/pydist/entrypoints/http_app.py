"""What every HTTP process shares: request ids, API keys, metrics, health and problem errors."""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import structlog
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pydist.config import Settings
from pydist.entrypoints.problems import install_problem_handlers, problem
from pydist.logs import configure_logging
from pydist.metrics import HTTP_LATENCY

log = structlog.get_logger()
OPEN_PATHS = frozenset({"/healthcheck", "/readyz", "/metrics"})
_MAX_REQUEST_ID = 128


def _request_id(raw: bytes | None) -> str:
    if raw and len(raw) <= _MAX_REQUEST_ID:
        text = raw.decode("latin-1")
        if text.isprintable() and " " not in text:
            return text
    return uuid.uuid4().hex


class EdgeMiddleware:
    """Pure ASGI (no per-request task like BaseHTTPMiddleware): request id, auth, latency."""

    def __init__(self, app: ASGIApp, *, service: str, api_keys: frozenset[str]) -> None:
        self.app = app
        self.service = service
        self.api_keys = tuple(k.encode() for k in api_keys)

    def _route(self, scope: Scope) -> str:
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
        # Compare against every key, always, so timing says nothing about which matched.
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(token.strip(), key)
        return matched

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

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if not self._authorised(scope, headers):
                response = problem(
                    401,
                    "unauthorized",
                    "a valid API key is required: send 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            HTTP_LATENCY.labels(self.service, scope["method"], self._route(scope), str(status)).observe(
                time.perf_counter() - started
            )


def build_app(
    *,
    service: str,
    title: str,
    description: str,
    settings: Settings,
    ready: Callable[[], Awaitable[None]],
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]],
) -> FastAPI:
    configure_logging(
        service,
        settings.log_level,
        fluentd_host=settings.fluentd_host,
        fluentd_port=settings.fluentd_port,
    )
    app = FastAPI(title=title, description=description, version="1.0.0", lifespan=lifespan)
    install_problem_handlers(app)
    app.add_middleware(EdgeMiddleware, service=service, api_keys=settings.api_key_set)

    @app.get("/healthcheck", tags=["ops"], summary="Liveness: the process answers")
    async def healthcheck() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Readiness: the process and its database answer")
    async def readyz() -> Response:
        try:
            await ready()
        except Exception as exc:
            log.warning("not_ready", error=type(exc).__name__)
            return problem(503, "not-ready", f"{service} is not ready: a dependency is down")
        return Response(b'{"status":"ready"}', media_type="application/json")

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
