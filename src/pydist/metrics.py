"""Prometheus metrics. One registry per process; names are stable for dashboards.

Each process exposes only the series it produces: apart from the HTTP metrics every HTTP process
shares, a metric is created unregistered and the entrypoint that owns it calls `expose()` (a
`pydist_cap_used_btc 0` scraped from fetch_buy_orders would read as a fact on a dashboard).

An HTTP service run with several workers (WEB_CONCURRENCY > 1) uses prometheus-client's
multiprocess mode: `pydist serve` points PROMETHEUS_MULTIPROC_DIR at a directory of its own before
the workers start, each worker writes its values to its own files there, and `render()` answers a
scrape of any worker with the totals of all of them (docs/architecture.md, "Metrics with several
workers"). Whether a process is in that mode is fixed when prometheus_client is imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from pydist.config import MULTIPROC_DIR_ENV

HTTP_LATENCY = Histogram(
    "pydist_http_request_duration_seconds",
    "HTTP request latency by route and status",
    ["service", "method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
HTTP_SHED = Counter(
    "pydist_http_requests_shed_total", "Requests answered 503 overloaded at once (MAX_IN_FLIGHT)", ["service"]
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def newest_reading(name: str, documentation: str) -> Gauge:
    """A gauge that every create worker sets from the same rows (the cap row, the outbox): the
    newest reading of any of them is the truth (multiprocess mode "mostrecent"; a dead worker's
    last reading is older, so never shown over a live one's). Neither "liveall" (one series per
    pid) nor "max" (wrong once the cap row is reset) would be."""
    return Gauge(name, documentation, registry=None, multiprocess_mode="mostrecent")


# create_buy_order
ORDERS_CREATED = Counter("pydist_orders_created_total", "Orders stored", ["currency"], registry=None)
ORDERS_REPLAYED = Counter("pydist_orders_replayed_total", "Idempotent replays answered", registry=None)
ORDERS_REFUSED = Counter("pydist_orders_refused_total", "Orders refused", ["reason"], registry=None)
WRITE_BATCH_SIZE = Histogram(
    "pydist_write_batch_orders", "Orders per write transaction", buckets=BATCH_BUCKETS, registry=None
)
CAP_USED = newest_reading("pydist_cap_used_btc", "BTC of the cap used (last seen)")
CAP_REMAINING = newest_reading("pydist_cap_remaining_btc", "BTC of the cap still available (last seen)")
# The outbox, read by create_buy_order (which writes it) rather than by the relay (which drains
# it): a stopped relay cannot report its own backlog.
OUTBOX_BACKLOG = newest_reading("pydist_outbox_backlog", "Outbox rows not yet published")
OUTBOX_OLDEST_AGE = newest_reading(
    "pydist_outbox_oldest_unpublished_age_seconds",
    "Age of the oldest outbox event not yet published (0 when none)",
)
# btc_price: always one process (`serve` refuses more), so its age is computed at scrape time
# (`set_function`), which multiprocess mode could not aggregate.
PRICE_AGE = Gauge("pydist_price_age_seconds", "Age of the cached BTC price", ["currency"], registry=None)
PRICE_UPSTREAM_CALLS = Counter(
    "pydist_price_upstream_calls_total",
    "Calls to the upstream price API",
    ["currency", "outcome"],
    registry=None,
)
# relay
EVENTS_PUBLISHED = Counter("pydist_events_published_total", "Events confirmed by the sink", registry=None)
EVENTS_PER_MESSAGE = Histogram(
    "pydist_events_per_message",
    "Events per broker message (batch envelope)",
    buckets=BATCH_BUCKETS,
    registry=None,
)
# read_model_sync, and the relay in direct mode
EVENTS_PROJECTED = Counter("pydist_events_projected_total", "Events applied to the read model", registry=None)
EVENTS_DEAD_LETTERED = Counter(
    "pydist_events_dead_lettered_total",
    "Events (or unreadable messages) read_model_sync sent to the DLQ",
    registry=None,
)
DLQ_MESSAGES = Gauge("pydist_dlq_messages", "Messages waiting in the dead-letter queue", registry=None)
READ_MODEL_LAG = Histogram(
    "pydist_read_model_lag_seconds",
    "Order written to projected: created_at to the read-model row's projected_at",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
    registry=None,
)

CREATE_METRICS: tuple[MetricWrapperBase, ...] = (
    ORDERS_CREATED,
    ORDERS_REPLAYED,
    ORDERS_REFUSED,
    WRITE_BATCH_SIZE,
    CAP_USED,
    CAP_REMAINING,
    OUTBOX_BACKLOG,
    OUTBOX_OLDEST_AGE,
)
PRICE_METRICS: tuple[MetricWrapperBase, ...] = (PRICE_AGE, PRICE_UPSTREAM_CALLS)
PROJECTION_METRICS: tuple[MetricWrapperBase, ...] = (EVENTS_PROJECTED, READ_MODEL_LAG)
RELAY_METRICS: tuple[MetricWrapperBase, ...] = (EVENTS_PUBLISHED,)
BROKER_RELAY_METRICS: tuple[MetricWrapperBase, ...] = (EVENTS_PER_MESSAGE,)
SYNC_METRICS: tuple[MetricWrapperBase, ...] = (*PROJECTION_METRICS, EVENTS_DEAD_LETTERED, DLQ_MESSAGES)


_EXPOSED: set[str] = {
    family.name for collector in (HTTP_LATENCY, HTTP_SHED) for family in collector.describe()
}
"""The metric families this process's /metrics shows (names as prometheus-client's collectors
and multiprocess files carry them: a counter's without its `_total`)."""


def expose(*collectors: MetricWrapperBase) -> None:
    """Add `collectors` to this process's /metrics (idempotent: an app may be built twice)."""
    for collector in collectors:
        with contextlib.suppress(ValueError):  # already registered
            REGISTRY.register(collector)
        _EXPOSED.update(family.name for family in collector.describe())


def multiprocess_dir() -> str | None:
    """The directory this process's metric values are kept in (multiprocess mode), else None."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return os.environ.get(MULTIPROC_DIR_ENV) or None


class ExposedFamilies(MultiProcessCollector):
    """The families `expose()`d in this process, summed over every worker's files. The files hold
    every metric a worker created, registered or not (pydist.metrics creates them all at import):
    without the filter fetch_buy_orders would show `pydist_cap_used_btc`."""

    def collect(self) -> Iterator[Metric]:
        return (family for family in super().collect() if family.name in _EXPOSED)  # type: ignore[no-untyped-call]


def render() -> bytes:
    """The body of GET /metrics. One process: its own registry (with prometheus-client's process
    and GC collectors). Several workers: the totals of all of them, from their files, whichever
    worker is asked, without the per-process process_* and python_gc_* (a different worker's at
    each scrape). A registry per scrape, as prometheus-client's multiprocess docs do."""
    directory = multiprocess_dir()
    if directory is None:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    registry.register(ExposedFamilies(None, path=directory))  # type: ignore[no-untyped-call]
    return generate_latest(registry)
