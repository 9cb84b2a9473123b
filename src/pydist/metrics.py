"""Prometheus metrics. One registry per process; names are stable for dashboards.

Each process exposes only the series it produces: apart from the HTTP latency every HTTP process
shares, a metric is created unregistered and the entrypoint that owns it calls `expose()`. (A
registered-everywhere `pydist_cap_used_btc 0` scraped from fetch_buy_orders, or an
`pydist_outbox_backlog 0` from btc_price, would read as facts on a dashboard.)
"""

from __future__ import annotations

import contextlib

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

HTTP_LATENCY = Histogram(
    "pydist_http_request_duration_seconds",
    "HTTP request latency by route and status",
    ["service", "method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
# create_buy_order
ORDERS_CREATED = Counter("pydist_orders_created_total", "Orders stored", ["currency"], registry=None)
ORDERS_REPLAYED = Counter("pydist_orders_replayed_total", "Idempotent replays answered", registry=None)
ORDERS_REFUSED = Counter("pydist_orders_refused_total", "Orders refused", ["reason"], registry=None)
WRITE_BATCH_SIZE = Histogram(
    "pydist_write_batch_orders",
    "Orders per write transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=None,
)
CAP_USED = Gauge("pydist_cap_used_btc", "BTC of the cap used (last seen)", registry=None)
CAP_REMAINING = Gauge("pydist_cap_remaining_btc", "BTC of the cap still available (last seen)", registry=None)
# btc_price
PRICE_AGE = Gauge("pydist_price_age_seconds", "Age of the cached BTC price", ["currency"], registry=None)
PRICE_UPSTREAM_CALLS = Counter(
    "pydist_price_upstream_calls_total",
    "Calls to the upstream price API",
    ["currency", "outcome"],
    registry=None,
)
# relay
OUTBOX_BACKLOG = Gauge("pydist_outbox_backlog", "Outbox rows not yet published", registry=None)
OUTBOX_OLDEST_AGE = Gauge(
    "pydist_outbox_oldest_unpublished_age_seconds",
    "Age of the oldest outbox event not yet published (0 when none)",
    registry=None,
)
EVENTS_PUBLISHED = Counter("pydist_events_published_total", "Events confirmed by the sink", registry=None)
EVENTS_PER_MESSAGE = Histogram(
    "pydist_events_per_message",
    "Events per broker message (batch envelope)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=None,
)
# read_model_sync, and the relay in embedded mode
EVENTS_PROJECTED = Counter("pydist_events_projected_total", "Events applied to the read model", registry=None)
EVENTS_DEAD_LETTERED = Counter(
    "pydist_events_dead_lettered_total",
    "Events (or unreadable messages) read_model_sync sent to the DLQ",
    registry=None,
)
DLQ_MESSAGES = Gauge("pydist_dlq_messages", "Messages waiting in the dead-letter queue", registry=None)
READ_MODEL_LAG = Histogram(
    "pydist_read_model_lag_seconds",
    "Order commit to visible in the read model",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
    registry=None,
)

CREATE_METRICS: tuple[Collector, ...] = (
    ORDERS_CREATED,
    ORDERS_REPLAYED,
    ORDERS_REFUSED,
    WRITE_BATCH_SIZE,
    CAP_USED,
    CAP_REMAINING,
)
PRICE_METRICS: tuple[Collector, ...] = (PRICE_AGE, PRICE_UPSTREAM_CALLS)
PROJECTION_METRICS: tuple[Collector, ...] = (EVENTS_PROJECTED, READ_MODEL_LAG)
RELAY_METRICS: tuple[Collector, ...] = (OUTBOX_BACKLOG, OUTBOX_OLDEST_AGE, EVENTS_PUBLISHED)
BROKER_RELAY_METRICS: tuple[Collector, ...] = (EVENTS_PER_MESSAGE,)
SYNC_METRICS: tuple[Collector, ...] = (*PROJECTION_METRICS, EVENTS_DEAD_LETTERED, DLQ_MESSAGES)


def expose(*collectors: Collector) -> None:
    """Add `collectors` to this process's /metrics (idempotent: an app may be built twice)."""
    for collector in collectors:
        with contextlib.suppress(ValueError):  # already registered
            REGISTRY.register(collector)
