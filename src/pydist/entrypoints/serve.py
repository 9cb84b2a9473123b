"""Run one process's ASGI app under uvicorn with graceful SIGTERM/SIGINT handling and exit 0."""

from __future__ import annotations

import signal

import uvicorn

from pydist.config import get_settings

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
        log_config=None,
        timeout_graceful_shutdown=8,
        lifespan="on",
        backlog=4096,
    )
