"""The relay use case: committed outbox rows → the event sink, at least once, in order of commit.

Most of what a message costs the relay, the broker and the consumer is paid per message, not per
event: at 1,050 orders/s, evenly spaced, doubling the events per message (10 → 21) took their CPU
per order from 541 to 330 µs (docs/benchmarks.md, "The relay's pace"). So the relay paces its
claims: while events keep coming, two claims start at least `pace_s` apart (RELAY_PACE_S), and
the write batches committed in between travel together. After a quiet spell the first claim goes
at once, and a full claim (a backlog) is followed by the next at once."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import structlog
from tenacity import RetryCallState

from pydist.domain.events import BuyOrderCreated
from pydist.metrics import EVENTS_PUBLISHED
from pydist.retrying import failure, sleep_unless_stopped, until_stopped
from pydist.service.ports import EventSink

log = structlog.get_logger()


class ClaimsEvents(Protocol):
    def claim(self, limit: int) -> AbstractAsyncContextManager[list[BuyOrderCreated]]: ...


class Relay:
    def __init__(
        self,
        outbox: ClaimsEvents,
        sink: EventSink,
        *,
        batch: int,
        pace_s: float = 0.0,
        idle_poll_s: float = 1.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._outbox = outbox
        self._sink = sink
        self._batch = batch
        self._pace_s = pace_s
        self._claimed_at = -pace_s
        self._idle_poll_s = idle_poll_s
        self._max_backoff_s = max_backoff_s
        self.wake = asyncio.Event()

    async def relay_once(self) -> int:
        """Publish one claimed batch; the rows are marked only after the sink confirmed them."""
        async with self._outbox.claim(self._batch) as events:
            if events:
                await self._sink.publish(events)
        if events:
            EVENTS_PUBLISHED.inc(len(events))
            log.debug("events_relayed", count=len(events))
        return len(events)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.wake.clear()
            try:
                published = await self._relay_until_it_works(stop)
            except Exception:
                return  # raised only once stopping: every failure before that is retried
            if published < self._batch:
                await _wait_any(stop, self.wake, self._idle_poll_s)
                # what is left of pace_s since the last claim started (nothing after a quiet spell)
                left = self._claimed_at + self._pace_s - time.monotonic()
                if left > 0:
                    await sleep_unless_stopped(stop, left)

    async def _relay_until_it_works(self, stop: asyncio.Event) -> int:
        """One batch, retried (0.05 s, doubling up to `max_backoff_s`) while it fails."""
        async for attempt in until_stopped(stop, first_s=0.05, max_s=self._max_backoff_s, on_retry=_failed):
            with attempt:
                self._claimed_at = time.monotonic()
                return await self.relay_once()
        raise AssertionError("until_stopped() makes an attempt or raises")


def _failed(state: RetryCallState, wait_s: float) -> None:
    exc = failure(state)
    log.warning("relay_failed", error=type(exc).__name__, detail=str(exc)[:200], retry_in_s=wait_s)


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
