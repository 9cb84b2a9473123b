"""The Prometheus alerts and scrape config, and the Grafana dashboard, checked with the real promtool.

promtool comes from the Debian package `prometheus` (./test.sh installs it). Without it these
tests fail: they are never skipped.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.observability import (
    ALERTS_FILE,
    ALERTS_TEST_FILE,
    DASHBOARD_FILE,
    GRAFANA_DASHBOARD_PROVIDER,
    GRAFANA_DATASOURCES,
    KNOWN_METRICS,
    PROMETHEUS_CONFIG,
    ROOT,
    SCRAPE_JOBS,
    alert_rules,
    base_metric,
    check_expressions,
    dashboard,
    dashboard_expressions,
    dashboard_panels,
    dashboard_queries,
    metric_names,
    promtool,
    run_promtool,
    series_names,
)

README = ROOT / "README.md"
COMPOSE_FILE = ROOT / "docker-compose.yml"

# The alerts issue 12 asks for, and the metric each one watches.
ISSUE_ALERTS = {
    "PydistCapNearlyExhausted": "pydist_cap_remaining_btc",
    "PydistOutboxEventStuck": "pydist_outbox_oldest_unpublished_age_seconds",
    "PydistDeadLetterQueueNotEmpty": "pydist_dlq_messages",
    "PydistReadModelLagHigh": "pydist_read_model_lag_seconds_bucket",
    "PydistHTTPServerErrors": "pydist_http_request_duration_seconds_count",
    "PydistBTCPriceStale": "pydist_price_age_seconds",
    "PydistProcessDown": "up",
}
SEVERITIES = {"warning", "critical"}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(duration: str | int) -> float:
    if isinstance(duration, int):
        return float(duration)
    parts = _DURATION.findall(duration)
    assert parts, duration
    assert "".join(n + u for n, u in parts) == duration, f"unparsed duration {duration!r}"
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)


def _assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )


def _readme_anchors() -> set[str]:
    """GitHub's anchors for README headings: lower case, punctuation dropped, spaces → '-'."""
    anchors = set()
    for line in README.read_text().splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if match:
            title = match.group(1).strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def _alert_tests() -> dict[str, Any]:
    data = yaml.safe_load(ALERTS_TEST_FILE.read_text())
    assert isinstance(data, dict)
    return data


# --- promtool itself ---------------------------------------------------------------------


def test_promtool_is_installed() -> None:
    result = run_promtool("--version")
    _assert_ok(result)
    assert "promtool" in result.stdout + result.stderr


def test_alert_rules_pass_promtool_check() -> None:
    result = run_promtool("check", "rules", ALERTS_FILE)
    _assert_ok(result)
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_prometheus_config_passes_promtool_check() -> None:
    # Also loads and checks the rule files the config names.
    result = run_promtool("check", "config", PROMETHEUS_CONFIG)
    _assert_ok(result)
    assert "SUCCESS: 1 rule files found" in result.stdout


def test_alert_unit_tests_pass() -> None:
    result = run_promtool("test", "rules", ALERTS_TEST_FILE)
    _assert_ok(result)
    assert "SUCCESS" in result.stdout


def test_promtool_rejects_a_broken_alert_unit_test(tmp_path: Path) -> None:
    """Control: the unit tests would catch an alert that no longer fires."""
    (tmp_path / "alerts.yml").write_text(
        ALERTS_FILE.read_text().replace("max(pydist_dlq_messages) > 0", "max(pydist_dlq_messages) > 5")
    )
    (tmp_path / "alerts_test.yml").write_text(ALERTS_TEST_FILE.read_text())
    result = run_promtool("test", "rules", tmp_path / "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "PydistDeadLetterQueueNotEmpty" in result.stdout + result.stderr


# --- the alerts ----------------------------------------------------------------------------


def test_every_issue_alert_is_present_and_watches_its_metric() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert len(rules) == len(alert_rules()), "duplicate alert names"
    assert set(rules) == set(ISSUE_ALERTS)
    for name, metric in ISSUE_ALERTS.items():
        assert metric in metric_names(rules[name]["expr"]), name


def test_every_alert_has_severity_summary_description_and_a_runbook_in_the_readme() -> None:
    anchors = _readme_anchors()
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert set(annotations) >= {"summary", "description", "runbook"}, name
        assert annotations["summary"].strip(), name
        assert annotations["description"].strip(), name
        page, _, anchor = annotations["runbook"].partition("#")
        assert page == "README.md", name
        assert anchor == name.lower(), f"{name}: runbook anchor {anchor!r}"
        assert anchor in anchors, f"{name}: README.md has no heading for #{anchor}"


def test_alerts_use_only_known_metrics() -> None:
    allowed = series_names()
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - allowed
        assert not unknown, f"{rule['alert']} uses unknown metrics {sorted(unknown)}"


def test_every_alert_has_firing_quiet_and_for_boundary_cases() -> None:
    """Each alert fires in some case and stays quiet in another; an alert with `for:` has, in
    one test group, a quiet evaluation one interval before a firing one (the boundary)."""
    data = _alert_tests()
    assert data["rule_files"] == ["alerts.yml"]
    interval = _seconds(data.get("evaluation_interval", "1m"))
    for rule in alert_rules():
        name = rule["alert"]
        fires, quiet, boundary = False, False, False
        for group in data["tests"]:
            cases = [c for c in group.get("alert_rule_test", []) if c["alertname"] == name]
            firing_at = {_seconds(c["eval_time"]) for c in cases if c.get("exp_alerts")}
            quiet_at = {_seconds(c["eval_time"]) for c in cases if not c.get("exp_alerts")}
            fires |= bool(firing_at)
            quiet |= bool(quiet_at)
            boundary |= any(t - interval in quiet_at for t in firing_at)
        assert fires, f"{name}: no test case where it fires"
        assert quiet, f"{name}: no test case where it stays quiet"
        if _seconds(rule.get("for", "0s")) > 0:
            assert boundary, f"{name}: no quiet evaluation just before its `for:` elapses"


# --- the scrape config ---------------------------------------------------------------------


def test_prometheus_scrapes_the_five_processes_by_compose_service_name() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == set(SCRAPE_JOBS)
    for name, port in SCRAPE_JOBS.items():
        job = jobs[name]
        assert job.get("metrics_path", "/metrics") == "/metrics", name
        targets = [t for static in job["static_configs"] for t in static["targets"]]
        assert targets == [f"{name}:{port}"], name
        assert name in services, f"{name} is not a compose service"


def test_process_down_alert_watches_exactly_the_scrape_jobs() -> None:
    rule = next(r for r in alert_rules() if r["alert"] == "PydistProcessDown")
    match = re.fullmatch(r'up\{job=~"([\w|]+)"\} == 0', rule["expr"].strip())
    assert match, rule["expr"]
    assert set(match.group(1).split("|")) == set(SCRAPE_JOBS)


def test_scrape_ports_are_the_processes_ports() -> None:
    from pydist.config import Settings

    fields = Settings.model_fields
    ports = {
        "create_buy_order": fields["create_buy_order_port"].default,
        "fetch_buy_orders": fields["fetch_buy_orders_port"].default,
        "btc_price": fields["btc_price_port"].default,
        "relay": fields["relay_metrics_port"].default,
        "read_model_sync": fields["sync_metrics_port"].default,
    }
    assert ports == SCRAPE_JOBS


# --- PromQL checks: can they fail? ---------------------------------------------------------


def test_metric_names_finds_metrics_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, service) (rate(pydist_a_bucket{route=~"/x(y)", b="c"}[5m])))'
        " > 1 and on (job) up offset 5m or sum without (le) (pydist_b) / ignoring(x) group_left(y) pydist_c"
    )
    assert metric_names(expr) == {"pydist_a_bucket", "up", "pydist_b", "pydist_c"}
    assert metric_names("sum(rate(nope_total[1m])) > bool 0.5e3") == {"nope_total"}
    with pytest.raises(ValueError, match="__name__"):
        metric_names('{__name__="pydist_cap_used_btc"}')


def test_promtool_expression_check_rejects_invalid_promql(tmp_path: Path) -> None:
    promtool()
    result = check_expressions(["sum(rate(pydist_orders_created_total[5m])", "up"], tmp_path)
    assert result.returncode != 0, result.stdout
    _assert_ok(check_expressions(["sum(rate(pydist_orders_created_total[5m]))", "up"], tmp_path))


# --- the Grafana dashboard -----------------------------------------------------------------


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exprs = dashboard_expressions()
    assert exprs
    assert not [e for e in exprs if "$" in e], "a Grafana variable is left in a query"
    _assert_ok(check_expressions(exprs, tmp_path))


def test_dashboard_uses_only_known_metrics_and_covers_every_one() -> None:
    allowed = series_names()
    used: set[str] = set()
    for query in dashboard_queries():
        names = metric_names(query.promql)
        assert names, f"{query.panel}/{query.ref_id} selects no metric"
        unknown = names - allowed
        assert not unknown, f"{query.panel}/{query.ref_id} uses unknown metrics {sorted(unknown)}"
        used |= {base_metric(n) for n in names}
    assert used == set(KNOWN_METRICS), f"no panel shows {sorted(set(KNOWN_METRICS) - used)}"


@pytest.mark.parametrize(
    ("quantile", "series", "grouping"),
    [
        ("0.5", "pydist_http_request_duration_seconds_bucket", "service, le"),
        ("0.99", "pydist_http_request_duration_seconds_bucket", "service, le"),
        ("0.5", "pydist_read_model_lag_seconds_bucket", "le"),
        ("0.99", "pydist_read_model_lag_seconds_bucket", "le"),
        ("0.5", "pydist_events_per_message_bucket", "le"),
        ("0.99", "pydist_events_per_message_bucket", "le"),
    ],
)
def test_dashboard_shows_latency_quantiles(quantile: str, series: str, grouping: str) -> None:
    wanted = f"histogram_quantile({quantile}, sum by ({grouping}) (rate({series}["
    assert any(e.startswith(wanted) for e in dashboard_expressions()), wanted


def test_dashboard_panels_by_label() -> None:
    exprs = dashboard_expressions()
    assert any("sum by (currency) (rate(pydist_orders_created_total[" in e for e in exprs)
    assert any("sum by (service) (rate(pydist_http_request_duration_seconds_count[" in e for e in exprs)
    assert any(e == "max by (currency) (pydist_price_age_seconds)" for e in exprs)


def test_dashboard_is_well_formed_for_grafana() -> None:
    data = dashboard()
    assert data["uid"] == "pydist"
    assert data["title"]
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    datasource = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"]
    assert len(datasource) == 1
    source = datasource[0]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        columns = range(grid["x"], grid["x"] + grid["w"])
        cells = {(x, y) for x in columns for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), panel["title"]
        for ref in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]


def test_grafana_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    provider = yaml.safe_load(GRAFANA_DASHBOARD_PROVIDER.read_text())["providers"]
    assert [p["type"] for p in provider] == ["file"]
    path = provider[0]["options"]["path"]
    grafana = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["grafana"]
    mounts = {}  # container path -> host path, for the bind mounts
    for volume in grafana["volumes"]:
        host, container, *_ = volume.split(":")
        if host.startswith("./"):
            mounts[container] = host
    assert mounts.get(path) == "./" + str(DASHBOARD_FILE.parent.relative_to(ROOT)), mounts
    assert mounts.get("/etc/grafana/provisioning") == "./deploy/grafana/provisioning", mounts


# --- the README ----------------------------------------------------------------------------


def test_readme_documents_every_signal_and_alert() -> None:
    text = README.read_text()
    section = text[text.index("## Operating pydist") :]
    section = section[: section.index("\n## ", 1)]
    for metric in KNOWN_METRICS:
        assert f"`{metric}" in section, f"README 'Operating pydist' does not list {metric}"
    for rule in alert_rules():
        name = rule["alert"]
        assert f"[{name}](#{name.lower()})" in section, f"{name} missing from the alerts table"
        assert f"\n#### {name}\n" in section, f"{name} has no runbook heading"
