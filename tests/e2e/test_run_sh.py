"""The README's first command: `./run.sh` on the embedded PostgreSQL (no URLs set), offline prices,
every process up, an order created and listed over HTTP, and a clean stop on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.procs import free_port

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


def test_run_sh_brings_up_the_whole_system_and_stops_cleanly(data_dir: Path) -> None:
    ports = {name: free_port() for name in ("create", "fetch", "price", "relay", "stub")}
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"WRITE_DATABASE_URL", "READ_DATABASE_URL", "BROKER_URL", "API_KEYS", "BTC_PRICE_URL"}
    }
    env.update(
        PYDIST_DATA_DIR=str(data_dir),
        PYDIST_DEMO_PRICES="1",
        PYDIST_STUB_PORT=str(ports["stub"]),
        CREATE_BUY_ORDER_PORT=str(ports["create"]),
        FETCH_BUY_ORDERS_PORT=str(ports["fetch"]),
        BTC_PRICE_PORT=str(ports["price"]),
        RELAY_METRICS_PORT=str(ports["relay"]),
    )
    log = data_dir.parent / f"{data_dir.name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ROOT / "run.sh")], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    create = f"http://127.0.0.1:{ports['create']}"
    fetch = f"http://127.0.0.1:{ports['fetch']}"
    try:
        deadline = time.monotonic() + 150
        for url in (f"{create}/readyz", f"{fetch}/readyz", f"http://127.0.0.1:{ports['relay']}/readyz"):
            _wait(url, deadline)
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
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    text = log.read_text(errors="replace")
    log.unlink(missing_ok=True)
    assert code == 0, text[-3000:]
    for name in ("price", "create", "fetch", "relay", "stub"):
        assert f"{name}.1 stopped (rc=0)" in text or f"{name}.1 stopped (rc=-15)" in text, text[-3000:]
    for name in ("price", "create", "fetch", "relay"):
        assert f"{name}.1 stopped (rc=0)" in text, f"{name} did not exit cleanly:\n{text[-3000:]}"
    assert not (data_dir / "pg" / "postmaster.pid").exists(), "embedded PostgreSQL still running"
