"""The Prometheus alerts, scrape config and Grafana dashboard under deploy/, for tests.

`dashboard_expressions()` gives every dashboard query as PromQL that a real Prometheus accepts
(Grafana's `$__rate_interval` and friends replaced by concrete durations), so an e2e test can run
the dashboard against a live Prometheus. `metric_names()` lists the metric names an expression
selects. `promtool()` finds the real promtool, failing (never skipping) when it is missing.
`Receiver` is an OTLP/HTTP trace receiver (the e2e trace test's collector, the benchmark's sink).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
ALERTS_FILE = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST_FILE = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARD_FILE = GRAFANA_DIR / "dashboards" / "pydist.json"
GRAFANA_DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARD_PROVIDER = GRAFANA_DIR / "provisioning" / "dashboards" / "pydist.yml"

# Every metric the processes expose that alerts and dashboards may use, with its type.
KNOWN_METRICS: dict[str, str] = {
    "pydist_http_request_duration_seconds": "histogram",
    "pydist_http_requests_shed_total": "counter",
    "pydist_orders_created_total": "counter",
    "pydist_orders_replayed_total": "counter",
    "pydist_orders_refused_total": "counter",
    "pydist_cap_used_btc": "gauge",
    "pydist_cap_remaining_btc": "gauge",
    "pydist_price_age_seconds": "gauge",
    "pydist_price_upstream_calls_total": "counter",
    "pydist_outbox_backlog": "gauge",
    "pydist_outbox_oldest_unpublished_age_seconds": "gauge",
    "pydist_events_published_total": "counter",
    "pydist_events_per_message": "histogram",
    "pydist_events_projected_total": "counter",
    "pydist_events_dead_lettered_total": "counter",
    "pydist_read_model_lag_seconds": "histogram",
    "pydist_dlq_messages": "gauge",
    "up": "gauge",  # Prometheus's own, per scrape target
}
# The scrape jobs (= the long-running processes) and the port each serves /metrics on.
SCRAPE_JOBS: dict[str, int] = {
    "create_buy_order": 8777,
    "fetch_buy_orders": 8778,
    "btc_price": 8779,
    "relay": 8780,
    "read_model_sync": 8781,
}
# Grafana's built-in interval variables, as they resolve with a 15 s scrape interval.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


def series_names() -> set[str]:
    """Names a query may select: each metric, and a histogram's _bucket/_count/_sum series."""
    names = set()
    for name, kind in KNOWN_METRICS.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        else:
            names.add(name)
    return names


def base_metric(series: str) -> str:
    """The metric a series name belongs to (a histogram's _bucket/_count/_sum → the histogram)."""
    for suffix in ("_bucket", "_count", "_sum"):
        stem = series.removesuffix(suffix)
        if stem != series and KNOWN_METRICS.get(stem) == "histogram":
            return stem
    return series


# --- PromQL: which metric names an expression selects --------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(r"(?P<number>\.?\d[\w.]*)|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<other>\S)")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "on", "ignoring"}
    | {"by", "without", "inf", "nan"}
)


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects (not functions, aggregations, keywords or labels).

    A small lexer, not a parser: promtool checks the syntax separately. Selecting a metric by
    `{__name__=...}` is refused, since the name could not be checked.
    """
    if "__name__" in expr:
        raise ValueError(f"select metrics by name, not by __name__: {expr!r}")
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    tokens = [m for m in _TOKEN.finditer(text) if m.lastgroup != "number"]
    names = set()
    for i, token in enumerate(tokens):
        if token.lastgroup != "ident":
            continue
        word = token.group()
        followed_by = tokens[i + 1].group() if i + 1 < len(tokens) else ""
        if followed_by == "(" or word.lower() in _KEYWORDS:
            continue  # a function or aggregation call, or an operator keyword
        names.add(word)
    return names


# --- promtool ------------------------------------------------------------------------------


def promtool() -> str:
    """Path of the real promtool; a test that needs it fails (never skips) when it is missing."""
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install the Debian package `prometheus` "
            "(apt-get install -y --no-install-recommends prometheus; ./test.sh does it)"
        )
    return path


def run_promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check_expressions(exprs: list[str], workdir: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` on `exprs` written as recording rules: promtool parses each one."""
    rules = {
        "groups": [
            {
                "name": "expressions",
                "rules": [{"record": f"check:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)],
            }
        ]
    }
    path = workdir / "expressions.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return run_promtool("check", "rules", path, cwd=workdir)


# --- alerts --------------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule in deploy/prometheus/alerts.yml."""
    data = yaml.safe_load(ALERTS_FILE.read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


# --- the Grafana dashboard -----------------------------------------------------------------


@dataclass(frozen=True)
class DashboardQuery:
    panel: str
    ref_id: str
    expr: str  # as Grafana stores it, with its $__ variables

    @property
    def promql(self) -> str:
        """The query as plain PromQL, as Grafana would send it to Prometheus."""
        text = self.expr
        for variable, value in GRAFANA_VARIABLES.items():
            text = text.replace(variable, value)
        return text


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD_FILE.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel, rows included, with the panels of collapsed rows."""
    found: list[dict[str, Any]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.append(panel)
            walk(panel.get("panels", []))

    walk(dashboard()["panels"])
    return found


def dashboard_queries() -> list[DashboardQuery]:
    return [
        DashboardQuery(panel["title"], target["refId"], target["expr"])
        for panel in dashboard_panels()
        for target in panel.get("targets", [])
    ]


def dashboard_expressions() -> list[str]:
    """Every dashboard query as PromQL for a real Prometheus (for unit and e2e tests)."""
    return [query.promql for query in dashboard_queries()]


@dataclass
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def _spans(request: ExportTraceServiceRequest) -> Iterator[Span]:
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for s in scope_spans.spans:
                yield Span(
                    service=str(resource.get("service.name")),
                    name=s.name,
                    kind=s.kind,
                    trace_id=s.trace_id.hex(),
                    span_id=s.span_id.hex(),
                    parent_span_id=s.parent_span_id.hex(),
                    attributes={a.key: _value(a.value) for a in s.attributes},
                    links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                )


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    discard: bool = False
    """Answer every export without decoding or keeping it (the benchmark's sink)."""
    spans: list[Span] = field(default_factory=list)
    exports: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                if not receiver.discard:
                    request.ParseFromString(body)
                with receiver.lock:
                    receiver.exports += 1
                    receiver.spans.extend(_spans(request))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def snapshot(self) -> list[Span]:
        with self.lock:
            return list(self.spans)
