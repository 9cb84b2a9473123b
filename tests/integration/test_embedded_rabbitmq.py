"""The private RabbitMQ node of ./run.sh, as real processes: `start` boots it (or reuses it), `stop`
ends it and its epmd and keeps its data, and a start that fails leaves nothing running.

The node runs on ports of its own (tests.support.procs.free_amqp_port) under a temp dir, so the
machine's shared RabbitMQ is never touched. Measured on 2 shared cores: a boot 6-19 s, a stop
1-3 s; the default bounds (BOOT_TIMEOUT_S 120 s, STOP_TIMEOUT_S 60 s) are far above them."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import aiormq
import pytest

from pydist.devtools import embedded_rabbitmq as rmq
from tests.support.procs import free_amqp_port, node_processes


def _beams_and_epmds(left: dict[int, str]) -> tuple[int, int]:
    programs = [cmd.split(" ", 1)[0] for cmd in left.values()]
    return sum(p.endswith("beam.smp") for p in programs), sum(p.endswith("epmd") for p in programs)


async def _logs_in(url: str) -> bool:
    connection = await aiormq.connect(url)
    await connection.close()
    return True


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "rabbitmq"
    yield path
    rmq.stop(path, timeout=10)  # whatever a failed test left


def test_start_reuses_a_running_node_and_stop_ends_it_keeping_its_data(data_dir: Path) -> None:
    port = free_amqp_port()
    cfg = rmq.start(data_dir, port)
    assert asyncio.run(_logs_in(cfg.broker_url))
    running = node_processes(data_dir, port)
    assert _beams_and_epmds(running) == (1, 1), running
    assert rmq.start(data_dir, port) == cfg  # reused: nothing new starts
    assert node_processes(data_dir, port) == running
    with pytest.raises(rmq.NodeError, match=f"already runs on port {port}"):
        rmq.start(data_dir, port + 1)
    assert rmq.stop(data_dir) is True
    assert node_processes(data_dir, port) == {}
    assert any(cfg.mnesia_base.iterdir())  # the data stays
    assert rmq.stop(data_dir) is False  # nothing left to stop


def test_a_port_in_use_is_refused_before_anything_starts(data_dir: Path) -> None:
    port = free_amqp_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(rmq.NodeError, match=f"port\\(s\\) {port} already in use"):
            rmq.start(data_dir, port)
    assert node_processes(data_dir, port) == {}


def test_a_boot_that_times_out_leaves_nothing_running(data_dir: Path) -> None:
    """Half a second is far less than any boot: start gives up with the node's log, and the beam
    it had started (still booting) and the epmd are gone."""
    port = free_amqp_port()
    with pytest.raises(rmq.NodeError, match="did not accept AMQP connections in time"):
        rmq.start(data_dir, port, timeout=0.5)
    assert not rmq.NodeConfig(data_dir, port).state_file.exists()
    # Not even the subshell rabbitmq-server starts erl from, which outlived the script's own kill
    # before start killed the whole session: it would boot the node later, with no owner.
    deadline = time.monotonic() + 30  # a killed process is gone in well under 1 s
    while (left := node_processes(data_dir, port)) and time.monotonic() < deadline:
        time.sleep(0.1)  # paces the polling of a condition
    assert left == {}
