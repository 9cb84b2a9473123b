"""The relay's pace (RELAY_PACE_S): while events keep coming, two claims start at least `pace_s`
apart and the events committed in between travel in one message; a backlog and the first event
after a quiet spell are claimed at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from itertools import pairwise
from typing import Any

from pydist.service.relay import Relay

BOUND_S = 10.0
"""How long a test waits for a condition: far above the milliseconds each takes."""


class Outbox:
    """A fake outbox: pending events, and the start time and size of every claim."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.claims: list[tuple[float, int]] = []

    @asynccontextmanager
    async def claim(self, limit: int) -> AsyncIterator[list[Any]]:
        taken, self.pending = self.pending[:limit], self.pending[limit:]
        self.claims.append((time.monotonic(), len(taken)))
        yield taken


class Sink:
    def __init__(self) -> None:
        self.messages: list[int] = []

    async def publish(self, events: Sequence[Any]) -> None:
        self.messages.append(len(events))


async def until(condition: Any) -> None:
    async with asyncio.timeout(BOUND_S):
        while not condition():
            await asyncio.sleep(0.001)


@asynccontextmanager
async def running(pace_s: float, batch: int = 500) -> AsyncIterator[tuple[Relay, Outbox, Sink]]:
    outbox, sink = Outbox(), Sink()
    relay, stop = Relay(outbox, sink, batch=batch, pace_s=pace_s), asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    await until(lambda: outbox.claims)  # its first claim, at start-up, finds nothing
    try:
        yield relay, outbox, sink
    finally:
        stop.set()
        await asyncio.wait_for(task, BOUND_S)


async def steady_stream(pace_s: float, events: int = 60) -> tuple[Outbox, Sink]:
    """One event every millisecond or so, each followed by the NOTIFY's wake-up."""
    async with running(pace_s) as (relay, outbox, sink):
        for i in range(events):
            outbox.pending.append(i)
            relay.wake.set()
            await asyncio.sleep(0.001)
        await until(lambda: sum(sink.messages) == events)
    return outbox, sink


def gaps(outbox: Outbox) -> list[float]:
    starts = [t for t, _ in outbox.claims]
    return [b - a for a, b in pairwise(starts)]


async def test_claims_under_a_steady_stream_start_a_pace_apart() -> None:
    outbox, sink = await steady_stream(pace_s=0.03)
    assert min(gaps(outbox)) >= 0.03
    assert max(sink.messages) > 1  # the events of a pace travelled together


async def test_control_without_a_pace_each_wake_up_claims() -> None:
    outbox, _ = await steady_stream(pace_s=0.0)
    assert min(gaps(outbox)) < 0.03


async def test_a_backlog_is_claimed_without_pausing() -> None:
    async with running(pace_s=1.0, batch=5) as (relay, outbox, sink):
        outbox.pending.extend(range(20))
        relay.wake.set()
        await until(lambda: sum(sink.messages) == 20)
    assert sink.messages == [5, 5, 5, 5]
    # the first full claim waited out the pace since start-up; the three after it followed at
    # once (paced, they would have started three seconds after it)
    full = [t for t, n in outbox.claims if n == 5]
    assert full[-1] - full[0] < 1.0


async def test_the_first_event_after_a_quiet_spell_goes_at_once() -> None:
    pace_s = 0.2
    async with running(pace_s) as (relay, outbox, sink):
        quiet_since = outbox.claims[-1][0]
        await until(lambda: time.monotonic() - quiet_since > pace_s)  # the quiet spell itself
        t0 = time.monotonic()
        outbox.pending.append(1)
        relay.wake.set()
        await until(lambda: sink.messages == [1])
        assert time.monotonic() - t0 < pace_s  # not paced: it would have waited ~pace_s
