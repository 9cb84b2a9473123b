"""OpenTelemetry tracing, configured only by the standard OTEL_* variables, and off by default.

Off (no OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, or OTEL_SDK_DISABLED=true)
nothing is installed and the hot paths only test `ENABLED`; the SDK and the instrumentations are
imported only when tracing is on.

On, every process exports its spans over OTLP/HTTP (a BatchSpanProcessor's thread, so a slow
collector never slows a request); the FastAPI, httpx and asyncpg instrumentations make the server,
client and statement spans. The messaging spans are made here: one broker message carries up to 256
orders, each of its own trace, so the publish and projection spans *link* to their orders' traces
(the messaging conventions for batches), which no per-message instrumentation can do. An order's
trace crosses the outbox as its W3C `traceparent` string.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Link, Span, SpanContext

ENABLED = False
"""True once `setup` installed a provider: the one check the hot paths make."""
_provider: Any = None
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for tracing: an OTLP endpoint is set and the SDK not disabled."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def service_name(role: str, env: Mapping[str, str] | None = None) -> str:
    """OTEL_SERVICE_NAME, else SERVICE_NAME if the deployment named the process (compose does), else
    the role: SERVICE_NAME's default `pydist` would show every process as one service."""
    env = os.environ if env is None else env
    named = env.get("SERVICE_NAME", "")
    return env.get("OTEL_SERVICE_NAME") or (named if named not in ("", "pydist") else role)


def setup(role: str) -> bool:
    """Install the tracer provider and the instrumentations once per process, if wanted."""
    global ENABLED, _provider
    if ENABLED or not wanted():
        return ENABLED
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT/HEADERS/TIMEOUT, the processor
    # OTEL_BSP_*, the provider OTEL_TRACES_SAMPLER(_ARG) and OTEL_RESOURCE_ATTRIBUTES.
    _provider = TracerProvider(resource=Resource.create({"service.name": service_name(role)}))
    _provider.sampler = without_lone_statements(_provider.sampler)  # before any tracer exists
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)
    HTTPXClientInstrumentor().instrument()
    AsyncPGInstrumentor().instrument()  # type: ignore[no-untyped-call]
    ENABLED = True
    return True


def without_lone_statements(sampler: Sampler) -> Sampler:
    """`sampler` (OTEL_TRACES_SAMPLER's), except that a database statement with no parent span is
    dropped: the background polls (create's cap and outbox every second, the relay's listener probe
    and claims) would each be a one-span trace of nobody's order, about 90,000 a day per create
    worker. Statements inside a request or a batch span are sampled as before."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    class WithoutLoneStatements(Sampler):
        def should_sample(  # type: ignore[no-untyped-def]
            self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
        ) -> SamplingResult:
            lone = not trace.get_current_span(parent_context).get_span_context().is_valid
            # a statement: the asyncpg instrumentation's attributes (old and stable conventions)
            statement = attributes is not None and (
                "db.system" in attributes or "db.system.name" in attributes
            )
            if lone and kind == trace.SpanKind.CLIENT and statement:
                return SamplingResult(Decision.DROP)
            return sampler.should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

        def get_description(self) -> str:
            return f"WithoutLoneStatements{{{sampler.get_description()}}}"

    return WithoutLoneStatements()


def instrument_app(app: FastAPI) -> None:
    """Server spans for every request but the probes (healthcheck, readiness, metrics), without the
    ASGI `receive`/`send` sub-spans, which say nothing more (docs/benchmarks.md, "Tracing cost")."""
    if ENABLED:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app, excluded_urls="/healthcheck,/readyz,/metrics", exclude_spans=["receive", "send"]
        )


def shutdown() -> None:
    """Export what is still buffered (the process is stopping)."""
    if _provider is not None:
        _provider.shutdown()


def parse_traceparent(value: object) -> tuple[int, int, int] | None:
    """(trace id, span id, flags) of a valid W3C version-00 traceparent, else None."""
    match = _TRACEPARENT.match(value.strip().lower()) if isinstance(value, str) else None
    if match is None:
        return None
    trace_id, span_id, flags = (int(g, 16) for g in match.groups())
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, flags


def format_traceparent(trace_id: int, span_id: int, flags: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"


def current_traceparent() -> str | None:
    """The current span's traceparent (None when tracing is off or no span is current)."""
    if not ENABLED:
        return None
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format_traceparent(ctx.trace_id, ctx.span_id, int(ctx.trace_flags)) if ctx.is_valid else None


def span_context(traceparent: str | None) -> SpanContext | None:
    """The remote span context a stored traceparent names (None if absent or invalid)."""
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        return None
    from opentelemetry.trace import SpanContext, TraceFlags

    return SpanContext(parsed[0], parsed[1], is_remote=True, trace_flags=TraceFlags(parsed[2]))


def links(traceparents: Sequence[str | None]) -> list[Link]:
    """One Link per distinct valid traceparent: a batch span's ties to its orders' traces."""
    from opentelemetry.trace import Link

    first: dict[tuple[int, int], SpanContext] = {}
    for ctx in filter(None, map(span_context, traceparents)):
        first.setdefault((ctx.trace_id, ctx.span_id), ctx)  # the first copy, its flags with it
    return [Link(ctx) for ctx in first.values()]


def tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer("pydist")


@contextmanager
def batch_span(
    name: str,
    kind: str,
    traceparents: Sequence[str | None],
    attributes: dict[str, Any],
    *,
    parent: str | None = None,
    first_order_parent: bool = False,
) -> Iterator[Span | None]:
    """A current span for work done for many orders at once, linked to every order's trace: the
    child of `parent` (a traceparent), or of the first order's span with `first_order_parent`
    (so an order alone in its batch has the span in its own trace), else a new trace's root.
    None when tracing is off."""
    if not ENABLED:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.context import Context

    parent_ctx = span_context(parent)
    if parent_ctx is None and first_order_parent:
        parent_ctx = next(filter(None, map(span_context, traceparents)), None)
    # In an empty context, not the current one: no parent (an invalid one) starts a new trace.
    parent_span = trace.NonRecordingSpan(parent_ctx or trace.INVALID_SPAN_CONTEXT)
    context = trace.set_span_in_context(parent_span, Context())
    with tracer().start_as_current_span(
        name,
        context=context,
        kind=getattr(trace.SpanKind, kind),
        links=links(traceparents),
        attributes=attributes,
    ) as span:
        yield span


def order_attributes(order_ids: Sequence[object]) -> dict[str, Any]:
    """`pydist.order_id` for a batch of one, and `pydist.order_ids` (every one) for any batch."""
    ids = [str(i) for i in order_ids]
    attrs: dict[str, Any] = {"pydist.order_ids": ids, "messaging.batch.message_count": len(ids)}
    if len(ids) == 1:
        attrs["pydist.order_id"] = ids[0]
    return attrs


def messaging_attributes(
    operation: tuple[str, str], destination: str, message_id: str | None, events: Sequence[Any]
) -> dict[str, Any]:
    """A messaging span's attributes: `operation` (type, name), where, which message, its orders."""
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": operation[0],
        "messaging.operation.name": operation[1],
        "messaging.destination.name": destination,
        "messaging.message.id": message_id or "",
        **order_attributes([e.order.id for e in events]),
    }


def tag_order(order_id: object) -> None:
    """Name the order on the current span (the create request's server span)."""
    if ENABLED:
        from opentelemetry import trace

        trace.get_current_span().set_attribute("pydist.order_id", str(order_id))


def add_trace_ids(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the current span's trace_id and span_id (installed only when on)."""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", f"{ctx.trace_id:032x}")
        event.setdefault("span_id", f"{ctx.span_id:016x}")
    return event
