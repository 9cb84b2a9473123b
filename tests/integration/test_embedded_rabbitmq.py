"""The private RabbitMQ node of ./run.sh, as real processes: `start` boots it (or reuses it), `stop`
ends it and its epmd and keeps its data, and a start that fails leaves nothing running.

The node runs on ports of its own (tests.support.procs.free_amqp_port) under a temp dir, so the
machine's shared RabbitMQ is never touched. Measured on 2 shared cores: a boot 6-19 s, a stop
1-3 s; the default bounds (BOOT_TIMEOUT_S 120 s, STOP_TIMEOUT_S 60 s) are far above them."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import aiormq
import pytest

from pydist.devtools import embedded_rabbitmq as rmq
from tests.support.procs import command_lines, free_amqp_port


def _left(data_dir: Path, amqp_port: int) -> dict[int, str]:
    """The node's processes still running: its beam (by its HOME under the data dir), its epmd."""
    epmd = f"-port {amqp_port + 10000} "
    return {
        pid: cmd
        for pid, cmd in command_lines().items()
        if ("beam.smp" in cmd and str(data_dir) in cmd) or ("epmd" in cmd and epmd in f"{cmd} ")
    }


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
    running = _left(data_dir, port)
    assert len(running) == 2, running  # one beam, one epmd
    assert rmq.start(data_dir, port) == cfg  # reused: nothing new starts
    assert _left(data_dir, port) == running
    with pytest.raises(rmq.NodeError, match=f"already runs on port {port}"):
        rmq.start(data_dir, port + 1)
    assert rmq.stop(data_dir) is True
    assert _left(data_dir, port) == {}
    assert any(cfg.mnesia_base.iterdir())  # the data stays
    assert rmq.stop(data_dir) is False  # nothing left to stop


def test_a_port_in_use_is_refused_before_anything_starts(data_dir: Path) -> None:
    port = free_amqp_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(rmq.NodeError, match=f"port\\(s\\) {port} already in use"):
            rmq.start(data_dir, port)
    assert _left(data_dir, port) == {}


def test_a_boot_that_times_out_leaves_nothing_running(data_dir: Path) -> None:
    """Half a second is far less than any boot: start gives up with the node's log, and the beam
    it had started (still booting) and the epmd are gone."""
    port = free_amqp_port()
    with pytest.raises(rmq.NodeError, match="did not accept AMQP connections in time"):
        rmq.start(data_dir, port, timeout=0.5)
    assert _left(data_dir, port) == {}
    assert not rmq.NodeConfig(data_dir, port).state_file.exists()
