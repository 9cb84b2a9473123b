"""Prometheus metrics. One registry per process; names are stable for dashboards."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HTTP_LATENCY = Histogram(
    "pydist_http_request_duration_seconds",
    "HTTP request latency by route and status",
    ["service", "method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ORDERS_CREATED = Counter("pydist_orders_created_total", "Orders stored", ["currency"])
ORDERS_REPLAYED = Counter("pydist_orders_replayed_total", "Idempotent replays answered")
ORDERS_REFUSED = Counter("pydist_orders_refused_total", "Orders refused", ["reason"])
WRITE_BATCH_SIZE = Histogram(
    "pydist_write_batch_orders",
    "Orders per write transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
CAP_USED = Gauge("pydist_cap_used_btc", "BTC of the cap used (last seen)")
CAP_REMAINING = Gauge("pydist_cap_remaining_btc", "BTC of the cap still available (last seen)")
PRICE_AGE = Gauge("pydist_price_age_seconds", "Age of the cached BTC price", ["currency"])
PRICE_UPSTREAM_CALLS = Counter(
    "pydist_price_upstream_calls_total", "Calls to the upstream price API", ["currency", "outcome"]
)
OUTBOX_BACKLOG = Gauge("pydist_outbox_backlog", "Outbox rows not yet published")
EVENTS_PUBLISHED = Counter("pydist_events_published_total", "Events confirmed by the sink")
EVENTS_PROJECTED = Counter("pydist_events_projected_total", "Events applied to the read model")
EVENTS_DEAD_LETTERED = Counter("pydist_events_dead_lettered_total", "Messages sent to the DLQ")
READ_MODEL_LAG = Histogram(
    "pydist_read_model_lag_seconds",
    "Order commit to visible in the read model",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
)
