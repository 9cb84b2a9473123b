"""The private RabbitMQ node of ./run.sh: its config and environment, derived without any I/O, keep
it apart from the machine's own RabbitMQ (rabbit@localhost, 5672/25672, epmd 4369, the cookie in
/var/lib/rabbitmq, /etc/rabbitmq)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pydist.devtools.embedded_rabbitmq import (
    NodeConfig,
    NotInstalledError,
    cli_env,
    find_scripts,
    rabbitmq_conf,
    server_env,
)

DATA = Path("/srv/pydist/.data/rabbitmq")
SHARED = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/root",
    "RABBITMQ_NODENAME": "rabbit@localhost",
    "RABBITMQ_CONFIG_FILE": "/etc/rabbitmq/rabbitmq.conf",
    "RABBITMQ_MNESIA_BASE": "/var/lib/rabbitmq/mnesia",
    "RABBITMQ_NODE_PORT": "5672",
    "ERL_EPMD_PORT": "4369",
    "ERL_FLAGS": "-setcookie shared",
}


def test_ports_follow_the_amqp_port_and_avoid_the_shared_node() -> None:
    default = NodeConfig(DATA)
    assert (default.amqp_port, default.dist_port, default.epmd_port) == (5673, 25673, 15673)
    assert default.node_name == "pydist-dev@localhost"
    assert default.broker_url == "amqp://guest:guest@127.0.0.1:5673/"
    other = NodeConfig(DATA, 5680)
    assert (other.amqp_port, other.dist_port, other.epmd_port) == (5680, 25680, 15680)
    assert other.broker_url == "amqp://guest:guest@127.0.0.1:5680/"


@pytest.mark.parametrize("port", [0, 80, 1023, 45536, 65535])
def test_a_port_whose_derived_ports_cannot_exist_is_refused(port: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        NodeConfig(DATA, port)


def test_a_cluster_node_takes_the_ports_and_the_home_it_is_given() -> None:
    home = DATA.parent / "cluster-home"
    node = NodeConfig(DATA / "n2", 31000, "pydist-rmq2@localhost", dist=31001, epmd=31002, shared_home=home)
    assert (node.amqp_port, node.dist_port, node.epmd_port) == (31000, 31001, 31002)
    assert node.cookie == home / ".erlang.cookie"  # one cookie for the cluster's nodes and its CLI
    assert node.config_file == DATA / "n2" / "rabbitmq.conf"
    env = server_env(node, SHARED)
    assert (env["RABBITMQ_DIST_PORT"], env["ERL_EPMD_PORT"], env["HOME"]) == ("31001", "31002", str(home))
    assert env["RABBITMQ_NODENAME"] == "pydist-rmq2@localhost"


def test_the_cli_environment_reaches_the_node_and_names_no_node() -> None:
    cfg = NodeConfig(DATA)
    cli = cli_env(cfg, SHARED)
    assert {k: cli[k] for k in ("HOME", "ERL_EPMD_PORT", "ERL_EPMD_ADDRESS")} == {
        "HOME": str(cfg.home),
        "ERL_EPMD_PORT": "15673",
        "ERL_EPMD_ADDRESS": "127.0.0.1",
    }
    assert cli["RABBITMQ_CONF_ENV_FILE"] == str(cfg.env_file)
    assert not {"RABBITMQ_NODENAME", "RABBITMQ_DIST_PORT", "ERL_FLAGS", "RABBITMQ_NODE_PORT"} & cli.keys()
    assert cli.items() <= server_env(cfg, SHARED).items()  # the server's is the CLI's, and more


def test_only_the_derived_ports_bound_the_amqp_port() -> None:
    assert NodeConfig(DATA, 60000, dist=60001, epmd=60002).epmd_port == 60002  # nothing derived
    assert NodeConfig(DATA, 50000, dist=50001).epmd_port == 60000  # epmd derived: P + 10000
    with pytest.raises(ValueError, match=r"outside 1024\.\.55535"):
        NodeConfig(DATA, 60000, dist=60001)  # P + 10000 would be 70000


def test_config_listens_on_loopback_only_on_its_own_port() -> None:
    conf = rabbitmq_conf(NodeConfig(DATA, 5690))
    listeners = [line for line in conf.splitlines() if line.startswith("listeners.")]
    assert listeners == ["listeners.tcp.1 = 127.0.0.1:5690"]
    assert "5672" not in conf


def test_environment_drops_inherited_rabbitmq_and_erlang_settings() -> None:
    env = server_env(NodeConfig(DATA), SHARED)
    assert env["PATH"] == SHARED["PATH"]
    assert "RABBITMQ_NODE_PORT" not in env
    assert "ERL_FLAGS" not in env
    assert env["RABBITMQ_NODENAME"] == "pydist-dev@localhost"
    assert env["RABBITMQ_USE_LONGNAME"] == "false"
    assert env["ERL_EPMD_PORT"] == "15673"
    assert env["ERL_EPMD_ADDRESS"] == "127.0.0.1"
    assert env["RABBITMQ_DIST_PORT"] == "25673"
    assert "{127,0,0,1}" in env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"]


def test_every_file_the_node_reads_or_writes_is_in_its_data_dir() -> None:
    cfg = NodeConfig(DATA)
    env = server_env(cfg, SHARED)
    # HOME carries the cookie: Erlang reads $HOME/.erlang.cookie, never /var/lib/rabbitmq's.
    assert env["HOME"] == str(DATA / "home")
    assert cfg.cookie == DATA / "home" / ".erlang.cookie"
    paths = {
        "HOME",
        "RABBITMQ_CONF_ENV_FILE",  # so /etc/rabbitmq/rabbitmq-env.conf is not read
        "RABBITMQ_ENABLED_PLUGINS_FILE",
        "RABBITMQ_CONFIG_FILE",
        "RABBITMQ_ADVANCED_CONFIG_FILE",
        "RABBITMQ_MNESIA_BASE",
        "RABBITMQ_LOG_BASE",
        "RABBITMQ_PID_FILE",
    }
    for name in paths:
        assert Path(env[name]).is_relative_to(DATA), (name, env[name])
    for name, value in env.items():
        if name.startswith(("RABBITMQ_", "ERL_")) or name == "HOME":
            assert "/etc/rabbitmq" not in value, name
            assert "/var/lib/rabbitmq" not in value, name
    assert cfg.state_file.parent == DATA
    assert cfg.console_log.is_relative_to(DATA)


def test_debians_user_switching_wrapper_is_never_used(tmp_path: Path) -> None:
    # /usr/sbin/rabbitmq-server on Debian links to rabbitmq-script-wrapper, which su's to rabbitmq.
    (tmp_path / "lib").mkdir()
    wrapper = tmp_path / "lib" / "rabbitmq-script-wrapper"
    wrapper.write_text("#!/bin/sh\n")
    (tmp_path / "sbin").mkdir()
    (tmp_path / "sbin" / "rabbitmq-server").symlink_to(wrapper)
    on_path = {"rabbitmq-server": str(tmp_path / "sbin" / "rabbitmq-server"), "epmd": "/usr/bin/epmd"}
    with pytest.raises(NotInstalledError, match="not installed"):
        find_scripts({}, on_path.get, system_dirs=[tmp_path / "none"])
    # A plain rabbitmq-server on PATH (a generic-unix tarball) runs as the caller: it is used.
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "rabbitmq-server").write_text("#!/bin/sh\n")
    on_path["rabbitmq-server"] = str(tmp_path / "own" / "rabbitmq-server")
    assert find_scripts({}, on_path.get, system_dirs=[]) == (tmp_path / "own", "/usr/bin/epmd")
    # PYDIST_RABBITMQ_BIN is the only place looked at when set.
    assert find_scripts({"PYDIST_RABBITMQ_BIN": str(tmp_path / "own")}, on_path.get) == (
        tmp_path / "own",
        "/usr/bin/epmd",
    )
    with pytest.raises(NotInstalledError):
        find_scripts({"PYDIST_RABBITMQ_BIN": str(tmp_path / "none")}, on_path.get)
