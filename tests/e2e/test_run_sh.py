"""The README's first command: `./run.sh` on the embedded PostgreSQL (no URLs set), offline prices,
every process up, an order created and listed over HTTP, and a clean stop on SIGTERM.

With rabbitmq-server installed (as ./test.sh requires) the default run has the real topology: a
private RabbitMQ node under the data dir, the order reaching the read model through
read_model_sync, and nothing of the node left after the stop."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.procs import free_amqp_port, free_port, node_processes

# Measured on 2 shared cores, other sessions' tests running: run.sh to every process ready 42-94 s
# (the private node's first boot 9-19 s of it), SIGTERM to run.sh's exit 5-11 s, plus the 8 s
# create gives the request left in flight (GRACEFUL_SHUTDOWN_S). Bounds >= 3x.
READY_BOUND_S = 300.0
STOP_BOUND_S = 90.0
NODE = "pydist-dev@localhost"


def _rabbitmq_installed() -> bool:
    """Judged independently of run.sh's own detection, so a broken detection cannot pass."""
    scripts = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
    return scripts.exists() or shutil.which("rabbitmq-server") is not None


def _metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    return sum(values)


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Under the repository, not /tmp: as root, pgserver runs PostgreSQL as its own user, which
    # must be able to reach the directory (pytest's tmp dirs are private to root).
    path = ROOT / ".data" / f"e2e-{uuid.uuid4().hex[:8]}"
    path.parent.mkdir(exist_ok=True)  # a fresh clone has no .data yet
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _wait(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready")


def _half_sent_order(port: int) -> socket.socket:
    """A PUT whose body stops halfway: a request in flight, as a slow client leaves one."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    head = "PUT /buy_order HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: 100\r\n\r\n".encode() + b'{"currency": ')
    return sock


def test_run_sh_brings_up_the_whole_system_and_stops_cleanly(data_dir: Path) -> None:
    ports = {name: free_port() for name in ("create", "fetch", "price", "relay", "sync", "stub")}
    rabbit_port = free_amqp_port()
    with_broker = _rabbitmq_installed()
    unset = {"WRITE_DATABASE_URL", "READ_DATABASE_URL", "BROKER_URL", "API_KEYS", "BTC_PRICE_URL"}
    unset |= {"PYDIST_EMBEDDED_BROKER"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(
        PYDIST_DATA_DIR=str(data_dir),
        PYDIST_DEMO_PRICES="1",
        PYDIST_STUB_PORT=str(ports["stub"]),
        CREATE_BUY_ORDER_PORT=str(ports["create"]),
        FETCH_BUY_ORDERS_PORT=str(ports["fetch"]),
        BTC_PRICE_PORT=str(ports["price"]),
        RELAY_METRICS_PORT=str(ports["relay"]),
        SYNC_METRICS_PORT=str(ports["sync"]),
        PYDIST_RABBITMQ_PORT=str(rabbit_port),
    )
    log = data_dir.parent / f"{data_dir.name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ROOT / "run.sh")], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    t0 = time.monotonic()
    create = f"http://127.0.0.1:{ports['create']}"
    fetch = f"http://127.0.0.1:{ports['fetch']}"
    sync = f"http://127.0.0.1:{ports['sync']}"
    workers = [f"http://127.0.0.1:{ports['relay']}"] + ([sync] if with_broker else [])
    try:
        deadline = time.monotonic() + READY_BOUND_S
        for url in (create, fetch, *workers):
            _wait(f"{url}/readyz", deadline)
        ready_s = time.monotonic() - t0
        key = str(uuid.uuid4())
        body = {"currency": "USD", "amount": "123.45", "idempotence_key": key}
        for _ in range(50):  # the first price may still be on its way
            response = httpx.put(f"{create}/buy_order", json=body, timeout=10)
            if response.status_code != 503:
                break
            time.sleep(0.2)
        assert response.status_code == 200, response.text
        order = response.json()["buy_order"]
        assert order["btc_amount"] == "0.00127269"  # 123.45 / 97000.00, rounded up
        rows: list[dict[str, str]] = []
        while time.monotonic() < deadline and not rows:
            rows = httpx.get(f"{fetch}/buy_orders", timeout=5).json()["rows"]
            time.sleep(0.1)
        assert rows == [order]
        if with_broker:  # the order went relay -> private RabbitMQ -> read_model_sync -> read model
            metrics = httpx.get(f"{sync}/metrics", timeout=5).text
            assert _metric(metrics, "pydist_events_projected_total") > 0, metrics
        stalled = _half_sent_order(ports["create"])  # in flight when the stop comes
    finally:
        t1 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOP_BOUND_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        stop_s = time.monotonic() - t1
    text = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    assert code == 0, text[-3000:]
    processes = ["price", "create", "fetch", "relay", *(["sync"] if with_broker else [])]
    for name in [*processes, "stub"]:
        assert f"{name}.1 stopped (rc=0)" in text or f"{name}.1 stopped (rc=-15)" in text, text[-3000:]
    for name in processes:
        assert f"{name}.1 stopped (rc=0)" in text, f"{name} did not exit cleanly:\n{text[-3000:]}"
    # The stalled request held create for its graceful shutdown; honcho waited for it, killed nothing.
    assert "sending SIGKILL" not in text, text[-3000:]
    # ... and answered it (408 within BODY_TIMEOUT_S < GRACEFUL_SHUTDOWN_S), never cancelled it (a 500).
    assert "Exception in ASGI application" not in text, text[-3000:]
    stalled.close()
    assert not (data_dir / "pg" / "postmaster.pid").exists(), "embedded PostgreSQL still running"
    print(f"\nrun.sh ready after {ready_s:.1f}s (bound {READY_BOUND_S:.0f}s)")
    print(f"run.sh stopped {stop_s:.1f}s after SIGTERM (bound {STOP_BOUND_S:.0f}s)")
    modes = [line for line in text.splitlines() if line.startswith("read-model sync: ")]
    rabbit_dir = data_dir / "rabbitmq"
    if not with_broker:
        assert modes == [
            "read-model sync: no broker (rabbitmq-server not installed): "
            "the relay projects straight into the read model"
        ], text[-3000:]
        return
    assert modes == [
        f"read-model sync: RabbitMQ (private node {NODE} on 127.0.0.1:{rabbit_port}, data in {rabbit_dir})"
    ], text[-3000:]
    # run.sh's EXIT trap waited for the node to stop: nothing of it may be left, not even epmd.
    left = node_processes(data_dir, rabbit_port)
    assert not left, f"private RabbitMQ processes left: {left}"
    print(next(line for line in text.splitlines() if f"{NODE} accepts AMQP after" in line))
