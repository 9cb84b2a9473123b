"""Logs (issues 2 and 4): every line every process writes is one JSON event with timestamp, level,
event and service, and a request's X-Request-ID travels from HTTP through the outbox (and the
broker) into the read-model projection's log event."""

from __future__ import annotations

import socket
import uuid
from datetime import datetime

import httpx

from tests.e2e.conftest import (
    SERVICE_NAMES,
    Stack,
    async_wait_until,
    json_lines,
    order_body,
)
from tests.support import db as testdb

LEVELS = {"debug", "info", "warning", "error", "critical"}


def events(stack: Stack, name: str, event: str) -> list[dict[str, object]]:
    return [e for e in json_lines(stack.procs()[name].log()) if e["event"] == event]


async def _trace(stack: Stack, projector: str) -> None:
    request_id = f"trace-{uuid.uuid4().hex}"
    response = httpx.put(
        f"{stack.url('create')}/buy_order",
        json=order_body("EUR", "42.00", str(uuid.uuid4())),
        headers={"X-Request-ID": request_id},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == request_id
    order_id = response.json()["buy_order"]["id"]

    created = [e for e in events(stack, "create", "buy_order_created") if e["order_id"] == order_id]
    assert len(created) == 1
    assert created[0]["request_id"] == request_id
    # The outbox row committed with the order carries it...
    rows = await testdb.fetch(
        stack.dbs.write_url, "SELECT request_id FROM outbox WHERE order_id = $1", uuid.UUID(order_id)
    )
    assert [r["request_id"] for r in rows] == [request_id]

    # ...and so does the projection's event in the process that applied it to the read model.
    async def projected() -> list[dict[str, object]]:
        return [e for e in events(stack, projector, "order_projected") if e["order_id"] == order_id]

    found = await async_wait_until(projected, timeout=15, what="order_projected in the log")
    assert [e["request_id"] for e in found] == [request_id]
    assert found[0]["service"] == SERVICE_NAMES[projector]


async def test_request_id_travels_through_outbox_and_broker(brokered: Stack) -> None:
    await _trace(brokered, "sync")


async def test_request_id_travels_through_outbox_to_the_direct_relay(direct: Stack) -> None:
    await _trace(direct, "relay")


async def test_every_line_of_every_process_is_a_json_event(direct: Stack, brokered: Stack) -> None:
    # Some variety first: a created order, a client error, a 404, a request uvicorn itself rejects
    # (its own logger's warning), and the workers' projections.
    for stack in (direct, brokered):
        create = stack.url("create")
        assert httpx.put(f"{create}/buy_order", json=order_body("USD", "1.00", None)).status_code == 422
        ok = httpx.put(f"{create}/buy_order", json=order_body("USD", "1.00", str(uuid.uuid4())))
        assert ok.status_code == 200, ok.text
        assert httpx.get(f"{stack.url('fetch')}/nowhere").status_code == 404
        port = stack.procs()["fetch"].port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            conn.settimeout(5)
            conn.recv(1024)
        await async_wait_until(stack.settled, timeout=15, what=f"{stack.name} settled")

    checked = 0
    uvicorn_lines = 0
    for stack in (direct, brokered):
        for name, proc in stack.procs().items():
            lines = json_lines(proc.log())
            assert lines, f"{name} wrote nothing"
            for event in lines:
                assert set(event) >= {"timestamp", "level", "event", "service"}, event
                assert event["service"] == SERVICE_NAMES[name], event
                assert event["level"] in LEVELS, event
                assert isinstance(event["event"], str), event
                assert event["event"], event
                stamp = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
                assert stamp.utcoffset() is not None, event
                uvicorn_lines += str(event.get("logger", "")).startswith("uvicorn")
                checked += 1
    assert uvicorn_lines > 0, "uvicorn's own lines are part of the check"
    # uvicorn's warning about the invalid request is one of them, in the same shape.
    fetch_lines = json_lines(direct.procs()["fetch"].log())
    assert any(e["event"] == "Invalid HTTP request received." for e in fetch_lines)
    print(f"{checked} log lines checked, {uvicorn_lines} of them from uvicorn")
