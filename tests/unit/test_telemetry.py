"""Tracing's configuration (off unless an OTLP endpoint is set) and its traceparent helpers.

Turning tracing on installs a global provider and patches httpx and asyncpg, so that is checked in
a fresh interpreter; the span helpers run here against a private provider with an in-memory
exporter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pydist import telemetry
from pydist.adapters.messages import batches, decode, parse_event
from pydist.domain.events import BuyOrderCreated
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TP2 = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

_PROBE = """
import json, sys
from opentelemetry import trace
from pydist import telemetry
on = telemetry.setup("relay")
provider = trace.get_tracer_provider()
resource = dict(getattr(provider, "resource", None).attributes) if on else {}
import httpx
print(json.dumps({
    "on": on,
    "enabled": telemetry.ENABLED,
    "provider": type(provider).__name__,
    "service": resource.get("service.name"),
    "httpx_patched": hasattr(httpx.AsyncHTTPTransport.handle_async_request, "__wrapped__"),
    "sampler": provider.sampler.get_description() if on else None,
}))
"""


def _probe(**env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "SERVICE_NAME"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_off_by_default_nothing_is_installed() -> None:
    result = _probe()
    assert result == {
        "on": False,
        "enabled": False,
        "provider": "ProxyTracerProvider",  # the API's placeholder: no SDK provider
        "service": None,
        "httpx_patched": False,
        "sampler": None,
    }


def test_on_with_an_endpoint_named_after_the_role() -> None:
    result = _probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9")
    assert result["on"] is True
    assert result["provider"] == "TracerProvider"
    assert result["service"] == "relay"
    assert result["httpx_patched"] is True
    assert str(result["sampler"]).startswith("WithoutLoneStatements{ParentBased{root:AlwaysOnSampler")


def test_traces_endpoint_and_service_name_and_disabled() -> None:
    on = _probe(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://127.0.0.1:9/v1/traces", SERVICE_NAME="relay-eu")
    assert on["on"] is True
    assert on["service"] == "relay-eu"
    off = _probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_SDK_DISABLED="true")
    assert off["on"] is False
    assert off["provider"] == "ProxyTracerProvider"


def test_wanted_reads_the_standard_variables() -> None:
    assert not telemetry.wanted({})
    assert telemetry.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert telemetry.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not telemetry.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "TRUE"})
    assert telemetry.service_name("btc_price", {}) == "btc_price"
    assert telemetry.service_name("btc_price", {"OTEL_SERVICE_NAME": "x", "SERVICE_NAME": "y"}) == "x"
    assert telemetry.service_name("btc_price", {"SERVICE_NAME": "pydist"}) == "btc_price"  # the default


def test_off_the_hot_path_helpers_do_nothing() -> None:
    assert telemetry.ENABLED is False
    assert telemetry.current_traceparent() is None
    with telemetry.batch_span("x", "INTERNAL", [TP], {}) as span:
        assert span is None


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        "garbage",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # an unknown version
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # the invalid trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # the invalid span id
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        TP + "-extra",
    ],
)
def test_invalid_traceparents_are_refused(value: object) -> None:
    assert telemetry.parse_traceparent(value) is None
    assert telemetry.span_context(value if isinstance(value, str) else None) is None


def test_traceparent_round_trip_and_links() -> None:
    parsed = telemetry.parse_traceparent(TP)
    assert parsed == (0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, 1)
    assert telemetry.format_traceparent(*parsed) == TP
    links = telemetry.links([TP, None, "bad", TP2, TP])
    assert [link.context.trace_id for link in links] == [parsed[0], 0x4BF92F3577B34DA6A3CE929D0E0E4736]
    assert all(link.context.is_remote for link in links)


def _event(traceparent: str | None) -> BuyOrderCreated:
    order = BuyOrder(
        id=uuid.uuid4(),
        idempotence_key=uuid.uuid4(),
        created_at=datetime(2026, 12, 1, 12, 0, tzinfo=UTC),
        currency=Currency.USD,
        currency_amount=Decimal("10.00"),
        btc_rate=Decimal("97000.00"),
        btc_amount=Decimal("0.00010310"),
    )
    return BuyOrderCreated(uuid.uuid4(), order, "req", traceparent)


def test_the_traceparent_travels_in_each_event_of_an_envelope() -> None:
    events = [_event(TP), _event(None), _event(TP2)]
    ((_, message),) = batches(events)
    items = orjson.loads(message.body)["events"]
    assert [item.get("traceparent") for item in items] == [TP, None, TP2]
    assert "traceparent" not in items[1]  # absent, as in a v1 message before it
    decoded = decode(message)
    assert not isinstance(decoded, str)
    assert decoded.events == events


def test_an_invalid_traceparent_is_dropped_not_poison() -> None:
    item = _event(None).to_message()
    assert "traceparent" not in item
    event = parse_event({**item, "traceparent": "00-not-a-trace"})
    assert isinstance(event, BuyOrderCreated)
    assert event.traceparent is None
    assert isinstance(parse_event({**item, "traceparent": TP}), BuyOrderCreated)


def test_the_configured_sampler_is_kept_under_the_statement_filter() -> None:
    result = _probe(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0.1",
    )
    assert str(result["sampler"]).startswith("WithoutLoneStatements{ParentBased{root:TraceIdRatioBased{0.1}")


def test_a_statement_without_a_parent_is_not_traced() -> None:
    """The background polls' statements would each be a one-span trace: dropped. The same
    statement inside a request is kept, and so is any other span without a parent."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=telemetry.without_lone_statements(ALWAYS_ON))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    client = trace.SpanKind.CLIENT
    for system in ("db.system", "db.system.name"):  # the old and the stable conventions
        with tracer.start_as_current_span("SELECT", kind=client, attributes={system: "postgresql"}):
            pass
    with (
        tracer.start_as_current_span("PUT /buy_order", kind=trace.SpanKind.SERVER),
        tracer.start_as_current_span("SELECT", kind=client, attributes={"db.system": "postgresql"}),
    ):
        pass
    with tracer.start_as_current_span("GET", kind=client, attributes={"http.request.method": "GET"}):
        pass
    with tracer.start_as_current_span("publish", kind=trace.SpanKind.PRODUCER):
        pass
    names = sorted(span.name for span in exporter.get_finished_spans())
    assert names == ["GET", "PUT /buy_order", "SELECT", "publish"]
    kept = next(span for span in exporter.get_finished_spans() if span.name == "SELECT")
    assert kept.parent is not None
    provider.shutdown()


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing 'on' for the helpers, on a private provider (the global one stays unset)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(telemetry, "ENABLED", True)
    monkeypatch.setattr(telemetry, "tracer", lambda: provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def test_a_batch_span_links_every_order_and_takes_its_parent(spans: InMemorySpanExporter) -> None:
    attrs = telemetry.order_attributes(["o1"])
    with telemetry.batch_span("write", "INTERNAL", [TP, TP2], attrs, first_order_parent=True) as span:
        assert span is not None
        inner = telemetry.current_traceparent()
    with telemetry.batch_span("publish", "PRODUCER", [TP, TP2], {}):
        pass
    with telemetry.batch_span("process", "CONSUMER", [TP], {}, parent=inner):
        pass
    write, publish, process = spans.get_finished_spans()
    parsed = telemetry.parse_traceparent(TP)
    assert parsed is not None
    assert write.context.trace_id == parsed[0]  # in the first order's trace
    assert write.parent is not None
    assert write.parent.span_id == parsed[1]
    assert write.attributes["pydist.order_id"] == "o1"
    assert write.attributes["messaging.batch.message_count"] == 1
    assert len(write.links) == 2
    assert publish.parent is None  # a new trace, joined to the orders' by links
    assert publish.kind == trace.SpanKind.PRODUCER
    assert {link.context.trace_id for link in publish.links} == {
        parsed[0],
        0x4BF92F3577B34DA6A3CE929D0E0E4736,
    }
    assert process.parent is not None
    assert process.parent.span_id == write.context.span_id
    assert inner == telemetry.format_traceparent(write.context.trace_id, write.context.span_id, 1)


def test_log_lines_carry_the_current_span(spans: InMemorySpanExporter) -> None:
    assert telemetry.add_trace_ids(None, "info", {}) == {}
    with telemetry.batch_span("x", "INTERNAL", [TP], {}, first_order_parent=True) as span:
        assert span is not None
        event = telemetry.add_trace_ids(None, "info", {"event": "e"})
    assert event["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert event["span_id"] == f"{span.get_span_context().span_id:016x}"
