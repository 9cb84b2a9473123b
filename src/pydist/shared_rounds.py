"""Concurrent requests that ask the database the same kind of question share one round of it.

Two hot paths use it, each because an A/B in docs/benchmarks.md ("Every trick earns its place")
showed it worth far more than the 10% a trick must earn:

- create_buy_order's idempotency-key lookups: the keys of all waiting requests go in one
  `= ANY($1)` query (1.24x the orders/s of a query per request);
- fetch_buy_orders' page reads: identical concurrent page requests share one query and one
  rendering to JSON (2.1x the pages/s of a query per request at c=64).

One task runs the rounds, one after the other, while anything waits. A request that arrives
while a round runs waits for the next one, so every answer was read after its request arrived
(never an older snapshot). Each request has a future of its own: one that gives up cancels
nothing but itself.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Fetch = Callable[[list[K]], Awaitable[Mapping[K, V | BaseException]]]
"""One round: an answer for every key asked (an exception for a key fails that key only); a
raised exception fails the whole round."""


class SharedRounds(Generic[K, V]):
    def __init__(self, fetch: Fetch[K, V], *, name: str, max_keys: int = 1000) -> None:
        self._fetch = fetch
        self._name = name
        self._max_keys = max_keys
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._runner: asyncio.Task[None] | None = None

    def ask(self, key: K) -> asyncio.Future[V]:
        """The answer for `key`, from the next round to start."""
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        if self._runner is None or self._runner.done():
            # A context of its own, not the first asker's: its statement spans (tracing on)
            # and log fields belong to no one request.
            self._runner = asyncio.create_task(self._run(), name=self._name, context=contextvars.Context())
        return future

    async def _run(self) -> None:
        # Ends in the same step as it finds nothing waiting, so no ask() can slip in between.
        while self._waiting:
            keys = list(self._waiting)[: self._max_keys]
            asked = {key: self._waiting.pop(key) for key in keys}
            try:
                answers = await self._fetch(keys)
            except asyncio.CancelledError:
                for futures in (*asked.values(), *self._waiting.values()):
                    for future in futures:
                        future.cancel()
                self._waiting.clear()
                raise
            except Exception as exc:
                answers = dict.fromkeys(keys, exc)
            for key, futures in asked.items():
                _settle(futures, answers.get(key, KeyError(key)))


def _settle(futures: list[asyncio.Future[V]], answer: V | BaseException) -> None:
    for future in futures:
        if future.done():  # its asker gave up
            continue
        if isinstance(answer, BaseException):
            future.set_exception(answer)
            future.exception()  # seen: an asker that went away leaves no "never retrieved" warning
        else:
            future.set_result(answer)
