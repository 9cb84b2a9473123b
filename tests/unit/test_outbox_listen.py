"""The relay's NOTIFY listener outlives whatever its database link fails with, the driver's own
errors included: a listener that ended would leave the relay to its idle poll."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import asyncpg
import pytest
from structlog.testing import capture_logs

from pydist.adapters.db import Database
from pydist.adapters.outbox import Outbox

BOUND_S = 10.0
"""How long the test waits for the listener: far above its 0.5 s first backoff."""


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.InternalClientError("cannot switch to state 12; another operation is in progress"),
    ],
    ids=type,
)
async def test_the_listener_reconnects_after_a_driver_error(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    outbox = Outbox(cast(Database, None))
    attempts = 0

    async def listen_once(on_notify: Callable[[], None], stop: asyncio.Event) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise error  # the LISTEN connection broke under its keep-alive query
        on_notify()
        await stop.wait()

    monkeypatch.setattr(outbox, "_listen_once", listen_once)
    stop, listening = asyncio.Event(), asyncio.Event()
    with capture_logs() as logs:
        listener = asyncio.create_task(outbox.listen(listening.set, stop))
        heard = asyncio.create_task(listening.wait())
        async with asyncio.timeout(BOUND_S):
            await asyncio.wait({listener, heard}, return_when=asyncio.FIRST_COMPLETED)
        if listener.done():
            listener.result()  # raises what ended the listener
        stop.set()
        async with asyncio.timeout(BOUND_S):
            await listener
    assert attempts == 2
    assert [e["error"] for e in logs if e["event"] == "outbox_listen_lost"] == [type(error).__name__]
