"""Static checks of the container setup: docker-compose.yml, Dockerfiles, env files, fluentd.

No Docker engine is needed. The one check that runs the compose CLI (`config -q`) is
skipped when no compose client is installed.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from pydist.adapters.rabbit import broker_urls
from pydist.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
CLUSTER_FILE = ROOT / "docker-compose.cluster.yml"  # the 3-node RabbitMQ option
CLUSTER_CONF = ROOT / "deploy" / "rabbitmq" / "cluster.conf"
CLUSTER_NODES = ("queue", "queue-2", "queue-3")
COMPOSE_ENV = ROOT / "docker" / "compose.env"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE_BASE = ROOT / "docker" / "Dockerfile.base"
DOCKERFILE_RUN = ROOT / "docker" / "Dockerfile"
BUILD_SCRIPT = ROOT / "docker" / "build_images.sh"
FLUENT_CONF = ROOT / "docker" / "fluentd" / "fluent.conf"
DOCKERIGNORE = ROOT / ".dockerignore"

BACKING = {"log", "write_model", "read_model", "queue"}
# service -> the full `pydist ...` command line it must run (ENTRYPOINT + command).
APP_COMMANDS = {
    "migration": "pydist migrate",
    "btc_price": "pydist serve price",
    "create_buy_order": "pydist serve create",
    "fetch_buy_orders": "pydist serve fetch",
    "relay": "pydist relay",
    "read_model_sync": "pydist sync",
}
CLI_COMMANDS = set(APP_COMMANDS.values())
ONE_SHOT = {"migration"}
# Monitoring (not pydist app services): Prometheus scrapes the apps, Grafana shows it.
MONITORING = {"prometheus", "grafana"}
ALL_SERVICES = BACKING | set(APP_COMMANDS) | MONITORING
LONG_RUNNING = ALL_SERVICES - ONE_SHOT
# Apps that use a database: they must not start before the schema exists.
# btc_price has no database, so it does not wait for migration.
NEEDS_MIGRATION = {"create_buy_order", "fetch_buy_orders", "relay", "read_model_sync"}
# Backing services (and btc_price) each app needs healthy before it starts.
REQUIRED_HEALTHY = {
    "migration": {"write_model", "read_model"},
    "btc_price": set(),
    "create_buy_order": {"write_model", "btc_price"},
    "fetch_buy_orders": {"read_model"},
    "relay": {"write_model", "queue"},
    "read_model_sync": {"read_model", "queue"},
}
# Which Settings port each long-running app serves /healthcheck on.
HEALTH_PORT_VAR = {
    "btc_price": "BTC_PRICE_PORT",
    "create_buy_order": "CREATE_BUY_ORDER_PORT",
    "fetch_buy_orders": "FETCH_BUY_ORDERS_PORT",
    "relay": "RELAY_METRICS_PORT",
    "read_model_sync": "SYNC_METRICS_PORT",
}
PUBLIC_PORTS = {8777, 8778}
# Published on the host loopback only: (service, port).
LOOPBACK_PORTS = {("log", 24224), ("grafana", 3000)}
SETTINGS_VARS = {name.upper() for name in Settings.model_fields}

_ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
# `# NAME=value`: a documented variable that is unset by default.
_COMMENTED_ENV_LINE = re.compile(r"^#\s*([A-Z][A-Z0-9_]*)=(.*)$")


# --- helpers -------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _env_file(path: Path) -> dict[str, str]:
    """Active KEY=VALUE lines of a docker env_file / dotenv file."""
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        assert match, f"{path.name}: not a KEY=VALUE line: {raw!r}"
        values[match.group(1)] = match.group(2)
    return values


def _documented_unset(path: Path) -> set[str]:
    """Names documented as commented-out `# NAME=...` lines (unset by default)."""
    names = set()
    for raw in path.read_text().splitlines():
        match = _COMMENTED_ENV_LINE.match(raw.strip())
        if match:
            names.add(match.group(1))
    return names


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return instructions


def _entrypoint() -> list[str]:
    entrypoints = [args for kw, args in _dockerfile(DOCKERFILE_RUN) if kw == "ENTRYPOINT"]
    assert entrypoints, "run image has no ENTRYPOINT"
    entrypoint = json.loads(entrypoints[-1])  # exec form, so signals reach pydist
    assert isinstance(entrypoint, list)
    return entrypoint


def _command_line(service: dict[str, Any]) -> str:
    command = service.get("command", [])
    parts = command.split() if isinstance(command, str) else list(command)
    return " ".join(_entrypoint() + parts)


def _published_ports(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(host_ip, host_port) for every published port, short or long syntax."""
    published = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            if "published" in port:
                published.append((str(port.get("host_ip", "")), int(port["published"])))
            continue
        parts = str(port).split("/")[0].split(":")
        if len(parts) == 1:  # "8777": container port on a random host port
            published.append(("", 0))
        elif len(parts) == 2:
            published.append(("", int(parts[0])))
        else:
            published.append((":".join(parts[:-2]), int(parts[-2])))
    return published


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) of every bind mount (short syntax; named volumes left out)."""
    mounts = []
    for volume in service.get("volumes", []):
        assert isinstance(volume, str), f"long-syntax volume not handled: {volume!r}"
        host, container, *_ = volume.split(":")
        if host.startswith(("./", "/")):
            mounts.append((host, container))
    return mounts


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):  # short form means service_started
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


def _compose_cli() -> list[str] | None:
    """A working Compose v2 client: the docker plugin, else the standalone v2 binary.

    Compose v1 (the Python `docker-compose` 1.x, e.g. Debian's package) is not used: it
    is end-of-life and validates a different dialect.
    """
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cli in candidates:
        try:
            probe = subprocess.run(
                [*cli, "version", "--short"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        major = probe.stdout.strip().lstrip("v").split(".")[0]
        if probe.returncode == 0 and major.isdigit() and int(major) >= 2:
            return cli
    return None


# --- docker-compose.yml --------------------------------------------------------------------


def test_all_services_present() -> None:
    assert set(_services()) == ALL_SERVICES


def test_long_running_services_have_healthcheck_and_restart() -> None:
    services = _services()
    for name in LONG_RUNNING:
        service = services[name]
        test = service.get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
        assert not service["healthcheck"].get("disable"), f"{name} disables its healthcheck"
        assert service.get("restart") == "unless-stopped", f"{name} restart policy"


def test_migration_is_a_one_shot_job() -> None:
    migration = _services()["migration"]
    assert migration.get("restart") in {"no", "on-failure"}
    assert "healthcheck" not in migration


def test_backing_service_healthchecks() -> None:
    services = _services()
    for name, db in (("write_model", "pydist_write"), ("read_model", "pydist_read")):
        service = services[name]
        assert re.match(r"postgres:[\w.-]*alpine", service["image"]), name
        assert service["environment"]["POSTGRES_DB"] == db
        assert "pg_isready" in " ".join(service["healthcheck"]["test"])
        volume = service["volumes"][0].split(":")[0]
        assert volume in _compose()["volumes"], f"{name} must use a named volume"
    queue = services["queue"]
    assert re.match(r"rabbitmq:[\w.-]*management-alpine", queue["image"])
    assert queue["healthcheck"]["test"][-3:] == ["rabbitmq-diagnostics", "-q", "ping"]
    log = services["log"]
    assert log["image"].startswith("fluent/fluentd")
    assert any(v.startswith("./docker/fluentd/fluent.conf:/fluentd/etc/fluent.conf") for v in log["volumes"])


def test_app_services_run_the_app_image_with_known_commands() -> None:
    services = _services()
    images = {services[name]["image"] for name in APP_COMMANDS}
    assert len(images) == 1, f"apps must share one image, got {images}"
    assert "pydist" in images.pop()
    for name, expected in APP_COMMANDS.items():
        command_line = _command_line(services[name])
        assert command_line in CLI_COMMANDS, f"{name}: unknown command {command_line!r}"
        assert command_line == expected, name
        assert services[name].get("env_file") in ("docker/compose.env", ["docker/compose.env"])


def test_app_healthchecks_probe_their_own_port() -> None:
    services = _services()
    env = _env_file(COMPOSE_ENV)
    for name, port_var in HEALTH_PORT_VAR.items():
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: exec-form healthcheck (the image has no curl)"
        probe = " ".join(test[1:])
        assert "urllib" in probe, name
        # Readiness (/readyz: its database and broker answer) for the apps that have backing
        # services; btc_price's /readyz needs a fresh upstream price, so it is probed for liveness.
        path = "/healthcheck" if name == "btc_price" else "/readyz"
        assert f"http://127.0.0.1:{env[port_var]}{path}" in probe, name


def test_apps_wait_for_migration_and_healthy_backing_services() -> None:
    services = _services()
    for name in APP_COMMANDS:
        deps = _depends_on(services[name])
        if name in NEEDS_MIGRATION:
            assert deps.get("migration") == "service_completed_successfully", name
        for dep in REQUIRED_HEALTHY[name]:
            assert deps.get(dep) == "service_healthy", f"{name} -> {dep}"
        # Anything long-running an app waits for must be healthy, not merely started.
        for dep, condition in deps.items():
            assert dep in ALL_SERVICES, f"{name} depends on unknown service {dep}"
            if dep in LONG_RUNNING:
                assert condition == "service_healthy", f"{name} -> {dep}: {condition}"


def test_only_public_api_ports_are_published() -> None:
    published: dict[int, tuple[str, str]] = {}
    for name, service in _services().items():
        for host_ip, port in _published_ports(service):
            if (name, port) in LOOPBACK_PORTS:
                # The fluentd logging driver runs in dockerd on the host, so fluentd must
                # be reachable on the host loopback, and only there; Grafana is for the
                # operator on the host, never for the network.
                assert host_ip == "127.0.0.1", f"{name}:{port} must be published on loopback only"
                continue
            published[port] = (name, host_ip)
    assert set(published) == PUBLIC_PORTS
    assert published[8777][0] == "create_buy_order"
    assert published[8778][0] == "fetch_buy_orders"


def test_bind_mounts_point_at_files_that_exist() -> None:
    for name, service in _services().items():
        for host, container in _bind_mounts(service):
            assert host.startswith("./"), f"{name}: mount {host} must be relative to the repository"
            assert (ROOT / host).exists(), f"{name}: {host} (mounted at {container}) does not exist"


def test_monitoring_services_mount_the_deploy_config() -> None:
    services = _services()
    prometheus = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v2\.\d+\.\d+", prometheus["image"]), "pin a v2 release"
    assert ("./deploy/prometheus", "/etc/prometheus") in _bind_mounts(prometheus)
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert (ROOT / "deploy" / "prometheus" / "prometheus.yml").is_file()
    assert "depends_on" not in prometheus, "Prometheus must run while the apps are down"
    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"]), "pin a release"
    mounts = _bind_mounts(grafana)
    assert ("./deploy/grafana/provisioning", "/etc/grafana/provisioning") in mounts
    assert ("./deploy/grafana/dashboards", "/etc/grafana/dashboards") in mounts
    for provisioned in ("datasources/prometheus.yml", "dashboards/pydist.yml"):
        assert (ROOT / "deploy" / "grafana" / "provisioning" / provisioned).is_file(), provisioned
    assert (ROOT / "deploy" / "grafana" / "dashboards" / "pydist.json").is_file()
    assert _depends_on(grafana) == {"prometheus": "service_healthy"}


def test_every_service_but_log_uses_fluentd_logging() -> None:
    services = _services()
    assert services["log"].get("logging", {}).get("driver") != "fluentd"
    for name in ALL_SERVICES - {"log"}:
        logging = services[name].get("logging", {})
        assert logging.get("driver") == "fluentd", name
        options = logging["options"]
        assert options["fluentd-address"] == "localhost:24224", name
        assert str(options["fluentd-async"]) == "true", name
        assert options["tag"].startswith("pydist."), name


@pytest.mark.timeout(60)
def test_compose_config_is_valid() -> None:
    cli = _compose_cli()
    if cli is None:
        pytest.skip(
            "no Compose v2 client: `docker compose version` fails (the docker CLI has no "
            "compose plugin) and there is no standalone docker-compose v2; "
            "`compose config` needs only the client, not an engine"
        )
    for files in ([COMPOSE_FILE], [COMPOSE_FILE, CLUSTER_FILE]):
        result = subprocess.run(
            [*cli, *(a for f in files for a in ("-f", str(f))), "config", "-q"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=50,
            check=False,
        )
        assert result.returncode == 0, (files, result.stderr)


# --- the 3-node RabbitMQ option (docker-compose.cluster.yml) --------------------------------


def _merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file: mappings merge key by key, `volumes` lists merge by
    container path, any other value is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for k, v in override.items():
            merged[k] = _merge(base[k], v, k) if k in base else v
        return merged
    if key == "volumes" and isinstance(base, list) and isinstance(override, list):
        by_target = {v.split(":")[1]: v for v in [*base, *override]}
        return list(by_target.values())
    return override


def _cluster_services() -> dict[str, dict[str, Any]]:
    override = yaml.safe_load(CLUSTER_FILE.read_text())
    merged = _merge(_compose(), override)
    assert set(override["volumes"]) <= set(merged["volumes"])
    return merged["services"]  # type: ignore[no-any-return]


def test_cluster_option_runs_three_nodes_of_one_cluster() -> None:
    services = _cluster_services()
    assert set(services) == ALL_SERVICES | {"queue-2", "queue-3"}
    nodes = [services[n] for n in CLUSTER_NODES]
    assert {node["image"] for node in nodes} == {_services()["queue"]["image"]}
    assert [node["hostname"] for node in nodes] == list(CLUSTER_NODES)  # rabbit@<hostname>
    # One cookie for every server and for the CLI tools of the healthchecks.
    cookies = {
        (
            node["environment"]["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"],
            node["environment"]["RABBITMQ_CTL_ERL_ARGS"],
        )
        for node in nodes
    }
    assert len(cookies) == 1, cookies
    assert len(set(cookies.pop())) == 1, "the CLI tools need the servers' cookie"
    data = [v.split(":")[0] for node in nodes for v in node["volumes"] if v.endswith(":/var/lib/rabbitmq")]
    assert len(set(data)) == 3, "each node keeps its own data directory"
    for node in nodes:
        assert "./deploy/rabbitmq/cluster.conf:/etc/rabbitmq/conf.d/20-cluster.conf:ro" in node["volumes"]
        assert node["restart"] == "unless-stopped"
        assert node["healthcheck"]["test"]
    # The cluster file lists exactly these nodes, by the names their hostnames give them.
    listed = re.findall(
        r"^cluster_formation\.classic_config\.nodes\.\d+\s*=\s*(\S+)$", CLUSTER_CONF.read_text(), re.M
    )
    assert listed == [f"rabbit@{n}" for n in CLUSTER_NODES]
    # Each node boots once the one before it is healthy: it always finds a peer to join.
    assert _depends_on(services["queue-2"]) == {"queue": "service_healthy"}
    assert _depends_on(services["queue-3"]) == {"queue-2": "service_healthy"}
    whole = services["queue-3"]["healthcheck"]["test"][1]
    assert all(f"rabbit@{n}" in whole for n in CLUSTER_NODES), whole


def test_cluster_option_gives_relay_and_sync_every_node() -> None:
    services = _cluster_services()
    env = _env_file(COMPOSE_ENV)
    for name in ("relay", "read_model_sync"):
        service = services[name]
        url = service["environment"]["BROKER_URL"]
        settings = Settings(**{**{k.lower(): v for k, v in env.items()}, "broker_url": url})
        assert settings.broker_url is not None
        urls = broker_urls(settings.broker_url.get_secret_value())
        assert [urlsplit(u).hostname for u in urls] == list(CLUSTER_NODES), name
        assert service["environment"]["SERVICE_NAME"] == name, "the override keeps the base's variables"
        deps = _depends_on(service)
        assert deps["queue-3"] == "service_healthy", name  # the whole cluster, before any declare
        assert deps["migration"] == "service_completed_successfully", name
    for name in set(APP_COMMANDS) - {"relay", "read_model_sync"}:
        assert "BROKER_URL" not in services[name].get("environment", {}), name


# --- environment files ---------------------------------------------------------------------


def test_compose_env_uses_only_settings_fields_and_validates() -> None:
    env = _env_file(COMPOSE_ENV)
    unknown = (set(env) | _documented_unset(COMPOSE_ENV)) - SETTINGS_VARS
    assert not unknown, f"docker/compose.env has non-Settings variables: {sorted(unknown)}"
    settings = Settings(**{k.lower(): v for k, v in env.items()})
    assert settings.bind_host == "0.0.0.0"
    assert settings.broker_url is not None
    for url in (settings.write_database_url, settings.read_database_url, settings.broker_url):
        assert "127.0.0.1" not in url.get_secret_value()
        assert "localhost" not in url.get_secret_value()
    assert settings.btc_price_url == f"http://btc_price:{settings.btc_price_port}"


def test_compose_env_db_credentials_match_postgres_services() -> None:
    env = _env_file(COMPOSE_ENV)
    services = _services()
    for var, host in (("WRITE_DATABASE_URL", "write_model"), ("READ_DATABASE_URL", "read_model")):
        pg = services[host]["environment"]
        expected = (
            f"postgresql://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@{host}:5432/{pg['POSTGRES_DB']}"
        )
        assert env[var] == expected


def test_env_example_documents_every_setting_with_its_default() -> None:
    active = _env_file(ENV_EXAMPLE)
    unset = _documented_unset(ENV_EXAMPLE)
    documented = set(active) | unset
    assert not documented - SETTINGS_VARS, f"unknown: {sorted(documented - SETTINGS_VARS)}"
    assert not SETTINGS_VARS - documented, f"undocumented: {sorted(SETTINGS_VARS - documented)}"
    lines = ENV_EXAMPLE.read_text().splitlines()
    for name in documented:
        index = next(i for i, line in enumerate(lines) if re.match(rf"^#?\s*{name}=", line))
        assert index > 0, name
        assert lines[index - 1].startswith("# "), f"{name} needs a one-line comment above it"
        assert not _COMMENTED_ENV_LINE.match(lines[index - 1]), f"{name} needs a comment"
    for name, value in active.items():
        field = name.lower()
        parsed = getattr(Settings(**{field: value}), field)
        assert parsed == Settings.model_fields[field].default, f"{name}={value} is not the default"
    for name in unset:
        assert Settings.model_fields[name.lower()].default is None, f"{name} has a default"


# --- images ----------------------------------------------------------------------------------


def test_base_image_installs_locked_dependencies_only() -> None:
    instructions = _dockerfile(DOCKERFILE_BASE)
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert froms == ["python:3.11-slim"]
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert re.search(r"useradd\b.*\bpydist\b", runs), "base image must create user pydist"
    assert re.search(r"\buv\b", runs), "base image must install uv"
    copies = [args for kw, args in instructions if kw == "COPY"]
    assert any("pyproject.toml" in c and "uv.lock" in c for c in copies)
    assert not any("src" in c.split() or "src/" in c for c in copies), "no code in the base"
    assert re.search(r"uv sync --frozen --no-install-project --no-dev", runs)
    envs = " ".join(args for kw, args in instructions if kw == "ENV")
    assert "UV_PROJECT_ENVIRONMENT=/app/.venv" in envs


def test_run_image_builds_from_base_arg_and_runs_as_non_root() -> None:
    instructions = _dockerfile(DOCKERFILE_RUN)
    keywords = [kw for kw, _ in instructions]
    first_from = keywords.index("FROM")
    base_args = [args for kw, args in instructions[:first_from] if kw == "ARG" and args.startswith("BASE")]
    assert base_args == ["BASE_IMAGE=pydist-base:latest"]
    assert [args for kw, args in instructions if kw == "FROM"] == ["${BASE_IMAGE}"]
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert "uv sync --frozen --no-dev" in runs
    assert any(kw == "COPY" and args.split()[0] in {"src", "src/"} for kw, args in instructions)
    users = [args for kw, args in instructions if kw == "USER"]
    assert users, "run image must set USER"
    assert users[-1] == "pydist"
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    assert _entrypoint() == ["pydist"]


def test_build_script_builds_base_then_run() -> None:
    script = BUILD_SCRIPT.read_text()
    assert BUILD_SCRIPT.stat().st_mode & 0o111, "build_images.sh must be executable"
    base = script.index("-f docker/Dockerfile.base")
    run = script.index("-f docker/Dockerfile ")
    assert base < run
    assert '--build-arg "BASE_IMAGE=' in script, "run image must be built FROM the base just built"
    assert "pydist:latest" in script
    assert "pydist:latest" in _services()["migration"]["image"]


def test_dockerignore_keeps_the_context_small_but_complete() -> None:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "allow-list style: ignore everything, then re-include"
    for needed in ("!pyproject.toml", "!uv.lock", "!README.md", "!src/"):
        assert needed in rules


# --- fluentd -------------------------------------------------------------------------------


def test_fluentd_config_forwards_and_parses_json_log_field() -> None:
    conf = "\n".join(
        line for line in FLUENT_CONF.read_text().splitlines() if not line.strip().startswith("#")
    )
    source = re.search(r"<source>(.*?)</source>", conf, re.S)
    assert source
    assert re.search(r"@type\s+forward", source.group(1))
    assert re.search(r"port\s+24224", source.group(1))
    assert re.search(r"bind\s+0\.0\.0\.0", source.group(1))
    parser = re.search(r"<filter pydist\.\*\*>(.*?)</filter>", conf, re.S)
    assert parser
    body = parser.group(1)
    assert re.search(r"@type\s+parser", body)
    assert re.search(r"key_name\s+log", body)
    assert re.search(r"reserve_data\s+true", body)
    assert re.search(r"<parse>\s*@type\s+json\s*</parse>", body)
    assert re.search(r"<match pydist\.\*\*>\s*@type\s+stdout", conf)
