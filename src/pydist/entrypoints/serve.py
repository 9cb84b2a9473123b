"""Run one process's ASGI app under uvicorn with graceful SIGTERM/SIGINT handling and exit 0.

Also the start-up rule every process follows: a backing service that is down at start-up is
waited for in the background (capped backoff, one log event per attempt), never by crashing. The
HTTP port opens at once, so /healthcheck says the process lives and /readyz says 503 until the
dependency answers; an orchestrator sees an unready process, not a crash loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
import uvicorn

from pydist.config import get_settings

log = structlog.get_logger()

APPS = {
    "create": (
        "pydist.entrypoints.create_api:create_app",
        "create_buy_order_port",
        "create_buy_order",
    ),
    "fetch": (
        "pydist.entrypoints.fetch_api:create_app",
        "fetch_buy_orders_port",
        "fetch_buy_orders",
    ),
    "price": ("pydist.entrypoints.price_api:create_app", "btc_price_port", "btc_price"),
    "relay": ("pydist.entrypoints.workers:create_relay_app", "relay_metrics_port", "relay"),
    "sync": ("pydist.entrypoints.workers:create_sync_app", "sync_metrics_port", "read_model_sync"),
}

GRACEFUL_SHUTDOWN_S = 8
"""How long in-flight requests get after SIGTERM before uvicorn cancels them."""


async def await_dependency(
    name: str,
    check: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    *,
    attempt_timeout_s: float = 5.0,
    max_backoff_s: float = 2.0,
) -> bool:
    """Retry `check` until it succeeds (True) or `stop` is set (False). Each attempt is bounded by
    `attempt_timeout_s`, the pause between attempts by `max_backoff_s`."""
    delay = 0.1
    attempt = 0
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            attempt += 1
            checking = asyncio.ensure_future(asyncio.wait_for(check(), timeout=attempt_timeout_s))
            await asyncio.wait([checking, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not checking.done():  # stop was set: abandon the attempt at once
                checking.cancel()
                with contextlib.suppress(BaseException):
                    await checking
                return False
            exc = checking.exception()
            if exc is None:
                if attempt > 1:
                    log.info("dependency_ready", dependency=name, attempts=attempt)
                return True
            log.warning(
                "dependency_unavailable",
                dependency=name,
                attempt=attempt,
                error=type(exc).__name__,
                retry_in_s=delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopping), timeout=delay)
            delay = min(delay * 2, max_backoff_s)
        return False
    finally:
        stopping.cancel()


async def cancel_tasks(tasks: Sequence[asyncio.Task[Any]], timeout: float) -> None:
    """Give `tasks` `timeout` seconds to finish on their own, then cancel what is left."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1)


def serve(name: str, *, workers: int | None = None) -> None:
    factory, port_field, _service = APPS[name]
    settings = get_settings()
    # uvicorn re-raises the signal it caught after its graceful shutdown; with these handlers in
    # place that re-raise is a no-op, so a SIGTERM ends in a clean exit 0 (12-factor disposability).
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    n = workers or (settings.web_concurrency if name in ("create", "fetch") else 1)
    uvicorn.run(
        factory,
        factory=True,
        host=settings.bind_host,
        port=getattr(settings, port_field),
        workers=n,
        loop="uvloop",
        http="httptools",
        access_log=False,
        server_header=False,
        log_config=None,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        lifespan="on",
        backlog=4096,
    )
