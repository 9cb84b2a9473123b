"""The relay use case: committed outbox rows → the event sink, at least once, in order of commit."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import structlog

from pydist.domain.events import BuyOrderCreated
from pydist.metrics import EVENTS_PUBLISHED
from pydist.service.ports import EventSink

log = structlog.get_logger()


class ClaimsEvents(Protocol):
    def claim(self, limit: int) -> AbstractAsyncContextManager[list[BuyOrderCreated]]: ...

    def keeping_connection(self) -> AbstractAsyncContextManager[None]:
        """Claims inside may share one database connection (held while batches keep coming)."""
        ...


class Relay:
    def __init__(
        self,
        outbox: ClaimsEvents,
        sink: EventSink,
        *,
        batch: int,
        idle_poll_s: float = 1.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self._outbox = outbox
        self._sink = sink
        self._batch = batch
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
        async with self._outbox.keeping_connection():
            await self._loop(stop)

    async def _loop(self, stop: asyncio.Event) -> None:
        backoff = 0.05
        while not stop.is_set():
            self.wake.clear()
            try:
                published = await self.relay_once()
            except Exception as exc:
                log.warning(
                    "relay_failed",
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                    retry_in_s=backoff,
                )
                await _sleep_unless(stop, backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            backoff = 0.05
            if published < self._batch:
                await _wait_any(stop, self.wake, self._idle_poll_s)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
