"""FLUENTD_HOST: every event (structlog's and the stdlib loggers') also goes to fluentd over the
forward protocol. Proven against a local forward-protocol receiver (msgpack over TCP, as fluentd's
in_forward speaks it) and a real process."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import pytest

from pydist.devtools.coinbase_stub import CoinbaseStub
from tests.support.procs import base_env, running
from tests.support.services import Databases


class ForwardReceiver:
    """Accepts forward-protocol connections and decodes [tag, time, record] entries (message mode,
    and the forward mode [tag, [[time, record], ...]] too)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self.port = self._sock.getsockname()[1]
        self.entries: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        unpacker = msgpack.Unpacker(raw=False)
        with conn:
            while data := conn.recv(65536):
                unpacker.feed(data)
                for message in unpacker:
                    tag, rest = message[0], message[1:]
                    items = rest[0] if isinstance(rest[0], list) else [rest[:2]]
                    with self._lock:
                        self.entries.extend((tag, record) for _, record in items)

    def records(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self.entries)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def receiver() -> Iterator[ForwardReceiver]:
    r = ForwardReceiver()
    yield r
    r.close()


def test_events_reach_fluentd_with_the_request_id(
    databases: Databases, coinbase: CoinbaseStub, receiver: ForwardReceiver
) -> None:
    env = base_env(databases.write_url, databases.read_url, coinbase.url, None)
    env.update(FLUENTD_HOST="127.0.0.1", FLUENTD_PORT=str(receiver.port))
    request_id = f"fluent-{uuid.uuid4().hex[:12]}"
    with running(env, "price", "create") as system:
        response = httpx.put(
            system.url("create") + "/buy_order",
            json={"currency": "GBP", "amount": "12.34", "idempotence_key": str(uuid.uuid4())},
            headers={"X-Request-ID": request_id},
            timeout=10,
        )
        assert response.status_code == 200, response.text
        order_id = response.json()["buy_order"]["id"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            created = [
                (tag, r)
                for tag, r in receiver.records()
                if r.get("event") == "buy_order_created" and r.get("request_id") == request_id
            ]
            if created:
                break
            time.sleep(0.1)
        stdout = system.procs["create"].log()
    assert created, receiver.records()[-5:]
    tag, record = created[0]
    assert tag == "pydist.create_buy_order.buy_order_created"
    assert record["order_id"] == order_id
    assert record["service"] == "create_buy_order"
    assert record["level"] == "info"
    # Events of the libraries' stdlib loggers go too, tagged by their logger: uvicorn's start-up
    # line was sent before the order's event, on the same connection.
    startup = [
        r
        for t, r in receiver.records()
        if t == "pydist.create_buy_order.uvicorn.error"
        and r["event"].startswith("Application startup complete")
    ]
    assert startup, receiver.records()[:5]
    assert startup[0]["service"] == "create_buy_order"
    # Every process forwards, not only the one under test; and stdout still has everything.
    assert any(t.startswith("pydist.btc_price.") for t, _ in receiver.records())
    assert request_id in stdout
