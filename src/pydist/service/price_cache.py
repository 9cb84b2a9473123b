"""The btc_price use case: a per-currency cache that bounds upstream calls and never serves stale."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from pydist.domain.money import Currency
from pydist.service.ports import PriceUnavailableError

Fetch = Callable[[Currency], Awaitable[Decimal]]


@dataclass(frozen=True, slots=True)
class Quote:
    currency: Currency
    amount: Decimal
    fetched_at: datetime
    fetched_monotonic: float

    def age(self, now: float) -> float:
        return now - self.fetched_monotonic


class PriceCache:
    """At most one upstream call in flight per currency, and none sooner than `min_interval_s`
    after the previous one: the upstream call rate is bounded however many orders arrive."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        max_age_s: float,
        min_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self.max_age_s = max_age_s
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._quotes: dict[Currency, Quote] = {}
        self._locks = {c: asyncio.Lock() for c in Currency}
        self._last_attempt: dict[Currency, float] = {}
        self.upstream_calls = 0

    def age(self, currency: Currency) -> float:
        """Seconds since the newest quote was asked for, fresh or not (NaN before the first): the
        age btc_price's gauge shows, counted as the cache counts it."""
        quote = self._quotes.get(currency)
        return math.nan if quote is None else quote.age(self._clock())

    def fresh(self, currency: Currency) -> Quote | None:
        quote = self._quotes.get(currency)
        if quote is not None and quote.age(self._clock()) <= self.max_age_s:
            return quote
        return None

    async def get(self, currency: Currency) -> Quote:
        quote = self.fresh(currency)
        if quote is not None:
            return quote
        async with self._locks[currency]:  # another request may have refreshed it meanwhile
            return self.fresh(currency) or await self._refresh_locked(currency)

    async def refresh(self, currency: Currency) -> Quote:
        """Refresh ahead of expiry (background), so requests rarely wait for upstream."""
        async with self._locks[currency]:
            return await self._refresh_locked(currency)

    async def _refresh_locked(self, currency: Currency) -> Quote:
        now = self._clock()
        last = self._last_attempt.get(currency)
        if last is not None and now - last < self.min_interval_s:
            quote = self.fresh(currency)
            if quote is not None:
                return quote
            raise PriceUnavailableError("price feed is cooling down after a recent attempt")
        self._last_attempt[currency] = now
        self.upstream_calls += 1
        asked_at = datetime.now(UTC)
        amount = await self._fetch(currency)
        # The price is as old as the request that asked for it: counting its age from the answer
        # instead would let a slow upstream (up to the timeout) push it past max_age unnoticed.
        quote = Quote(currency, amount, asked_at, now)
        self._quotes[currency] = quote
        return quote
