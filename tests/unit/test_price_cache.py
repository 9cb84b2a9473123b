"""PriceCache (service/price_cache.py) with a fake clock and a fake upstream: never stale, one call
in flight per currency, none sooner than min_interval after the last, bounded under any load."""

from __future__ import annotations

import asyncio
import math
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pydist.domain.money import Currency
from pydist.service.ports import PriceUnavailableError
from pydist.service.price_cache import PriceCache, Quote

MAX_AGE = 10.0
MIN_INTERVAL = 1.0


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeUpstream:
    """Answers 100, 101, 102, ... per call (so a test can tell which call served a quote).

    `gate` holds every call until set; `failing` makes calls raise; `takes` advances the clock
    while a call is in flight (a slow upstream)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.calls: list[Currency] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate: asyncio.Event | None = None
        self.failing = False
        self.takes = 0.0

    async def __call__(self, currency: Currency) -> Decimal:
        self.calls.append(currency)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            self.clock.advance(self.takes)
            if self.failing:
                raise PriceUnavailableError("upstream down")
            return Decimal(100 + len(self.calls) - 1)
        finally:
            self.in_flight -= 1


def make(
    max_age: float = MAX_AGE, min_interval: float = MIN_INTERVAL
) -> tuple[PriceCache, FakeClock, FakeUpstream]:
    clock = FakeClock()
    upstream = FakeUpstream(clock)
    cache = PriceCache(upstream, max_age_s=max_age, min_interval_s=min_interval, clock=clock)
    return cache, clock, upstream


async def settle() -> None:
    """Let every runnable task run until it blocks."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_first_get_calls_upstream_and_returns_its_price() -> None:
    cache, clock, upstream = make()
    quote = await cache.get(Currency.USD)
    assert quote.currency is Currency.USD
    assert quote.amount == Decimal(100)
    assert quote.age(clock()) == 0
    assert upstream.calls == [Currency.USD]
    assert cache.upstream_calls == 1


async def test_serves_the_cached_quote_within_max_age() -> None:
    cache, clock, upstream = make()
    first = await cache.get(Currency.USD)
    for step in (0.0, 1.0, 5.0, 3.999, 0.001):  # up to exactly MAX_AGE in total
        clock.advance(step)
        assert await cache.get(Currency.USD) is first
    assert first.age(clock()) == pytest.approx(MAX_AGE)
    assert len(upstream.calls) == 1


async def test_never_serves_a_quote_older_than_max_age() -> None:
    cache, clock, upstream = make()
    await cache.get(Currency.USD)
    clock.advance(MAX_AGE + 0.001)
    assert cache.fresh(Currency.USD) is None
    quote = await cache.get(Currency.USD)
    assert quote.amount == Decimal(101)  # a new upstream answer, not the old one
    assert quote.age(clock()) <= MAX_AGE
    assert len(upstream.calls) == 2


async def test_age_counts_from_when_the_upstream_was_asked() -> None:
    # A slow upstream (3 s): the price may be as old as the request, so the age must start at the
    # request, not at the answer; otherwise the cache would serve a price up to 3 s past max age.
    cache, clock, upstream = make()
    upstream.takes = 3.0
    asked_at = clock()
    quote = await cache.get(Currency.USD)
    assert quote.age(clock()) == pytest.approx(3.0)
    clock.now = asked_at + MAX_AGE + 0.5  # only 7.5 s after the answer, 10.5 s after the request
    assert cache.fresh(Currency.USD) is None
    upstream.takes = 0.0
    assert (await cache.get(Currency.USD)).amount == Decimal(101)


async def test_currencies_are_cached_separately() -> None:
    cache, _, upstream = make()
    usd = await cache.get(Currency.USD)
    eur = await cache.get(Currency.EUR)
    assert (usd.currency, eur.currency) == (Currency.USD, Currency.EUR)
    assert await cache.get(Currency.USD) is usd
    assert await cache.get(Currency.EUR) is eur
    assert upstream.calls == [Currency.USD, Currency.EUR]


async def test_concurrent_gets_for_one_currency_make_one_upstream_call() -> None:
    cache, _, upstream = make()
    upstream.gate = asyncio.Event()
    tasks = [asyncio.create_task(cache.get(Currency.USD)) for _ in range(50)]
    await settle()
    assert upstream.calls == [Currency.USD]  # one call in flight, 49 waiting for it
    assert not any(t.done() for t in tasks)
    upstream.gate.set()
    quotes = await asyncio.gather(*tasks)
    assert all(q is quotes[0] for q in quotes)
    assert upstream.calls == [Currency.USD]
    assert upstream.max_in_flight == 1


async def test_a_slow_currency_does_not_hold_up_another() -> None:
    cache, _, upstream = make()
    upstream.gate = asyncio.Event()
    usd = asyncio.create_task(cache.get(Currency.USD))
    await settle()
    eur = asyncio.create_task(cache.get(Currency.EUR))
    await settle()
    assert upstream.calls == [Currency.USD, Currency.EUR]  # EUR did not queue behind USD
    upstream.gate.set()
    assert (await usd).currency is Currency.USD
    assert (await eur).currency is Currency.EUR


async def test_after_a_failure_no_new_call_before_min_interval_then_it_recovers() -> None:
    cache, clock, upstream = make()
    upstream.failing = True
    with pytest.raises(PriceUnavailableError):
        await cache.get(Currency.USD)
    assert len(upstream.calls) == 1

    # The feed is back, but it was asked less than min_interval ago: refuse fast, do not call.
    upstream.failing = False
    upstream.gate = asyncio.Event()  # a call would block here: the refusal must not wait on it
    for step in (0.0, MIN_INTERVAL / 2, MIN_INTERVAL / 2 - 0.001):
        clock.advance(step)
        with pytest.raises(PriceUnavailableError):
            await asyncio.wait_for(cache.get(Currency.USD), timeout=1.0)
    assert len(upstream.calls) == 1

    upstream.gate = None
    clock.advance(0.001)  # now exactly min_interval after the failed attempt
    quote = await cache.get(Currency.USD)
    assert quote.amount == Decimal(101)
    assert len(upstream.calls) == 2
    assert await cache.get(Currency.USD) is quote


async def test_a_failure_seen_by_many_concurrent_gets_is_one_upstream_call() -> None:
    cache, _, upstream = make()
    upstream.failing = True
    upstream.gate = asyncio.Event()
    tasks = [asyncio.create_task(cache.get(Currency.GBP)) for _ in range(100)]
    await settle()
    upstream.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, PriceUnavailableError) for r in results)
    assert len(upstream.calls) == 1


async def test_an_unexpected_upstream_error_also_starts_the_cooldown() -> None:
    cache, clock, _ = make()

    async def broken(currency: Currency) -> Decimal:
        raise RuntimeError("bug in the adapter")

    cache = PriceCache(broken, max_age_s=MAX_AGE, min_interval_s=MIN_INTERVAL, clock=clock)
    with pytest.raises(RuntimeError):
        await cache.get(Currency.USD)
    with pytest.raises(PriceUnavailableError):
        await cache.get(Currency.USD)
    assert cache.upstream_calls == 1


async def test_refresh_keeps_the_cache_warm() -> None:
    cache, clock, upstream = make()
    first = await cache.get(Currency.USD)
    clock.advance(MAX_AGE / 2)
    refreshed = await cache.refresh(Currency.USD)
    assert refreshed.amount == Decimal(101)
    assert len(upstream.calls) == 2
    # 1.25 x max age after the first fetch, but only 0.75 x after the refresh: served from cache.
    clock.advance(MAX_AGE * 0.75)
    assert await cache.get(Currency.USD) is refreshed
    assert refreshed is not first
    assert len(upstream.calls) == 2


async def test_refresh_respects_min_interval() -> None:
    cache, clock, upstream = make()
    first = await cache.get(Currency.USD)
    clock.advance(MIN_INTERVAL / 2)
    assert await cache.refresh(Currency.USD) is first  # too soon: the fresh quote, no call
    assert len(upstream.calls) == 1
    clock.advance(MIN_INTERVAL / 2)
    assert (await cache.refresh(Currency.USD)).amount == Decimal(101)
    assert len(upstream.calls) == 2


async def test_refresh_failing_keeps_serving_the_still_fresh_quote() -> None:
    cache, clock, upstream = make()
    first = await cache.get(Currency.USD)
    clock.advance(MAX_AGE / 2)
    upstream.failing = True
    with pytest.raises(PriceUnavailableError):
        await cache.refresh(Currency.USD)
    assert await cache.get(Currency.USD) is first  # still within max age
    clock.advance(MAX_AGE / 2 + 0.001)
    with pytest.raises(PriceUnavailableError):  # now stale, and the feed is down: no stale price
        await cache.get(Currency.USD)


async def test_a_thousand_concurrent_gets_make_at_most_one_call_per_currency() -> None:
    cache, _, upstream = make()
    upstream.gate = asyncio.Event()
    currencies = list(Currency)
    tasks = [asyncio.create_task(cache.get(currencies[i % len(currencies)])) for i in range(1000)]
    await settle()
    upstream.gate.set()
    quotes = await asyncio.gather(*tasks)
    assert sorted(upstream.calls) == sorted(currencies)
    assert cache.upstream_calls == len(currencies)
    for i, quote in enumerate(quotes):
        assert quote.currency is currencies[i % len(currencies)]


async def test_upstream_calls_stay_bounded_by_time_under_sustained_load() -> None:
    # 200 concurrent gets every 0.25 s for 60 simulated seconds, the feed failing half the time.
    cache, clock, upstream = make()
    for tick in range(240):
        upstream.failing = (tick // 20) % 2 == 1
        await asyncio.gather(*(cache.get(Currency.USD) for _ in range(200)), return_exceptions=True)
        clock.advance(0.25)
    elapsed = 240 * 0.25
    # At most one call per min_interval (plus the first), however many requests arrived.
    assert cache.upstream_calls == len(upstream.calls)
    assert len(upstream.calls) <= elapsed / MIN_INTERVAL + 1


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=3 * MAX_AGE, allow_nan=False),  # time passing
            st.integers(min_value=1, max_value=5),  # concurrent gets at that moment
        ),
        min_size=1,
        max_size=40,
    )
)
def test_never_stale_and_one_call_per_expiry_property(steps: list[tuple[float, int]]) -> None:
    """Against a model written here: with a healthy upstream, a call happens exactly when the last
    fetched price is older than max_age, and whatever is served is never older than max_age."""

    async def run() -> None:
        cache, clock, upstream = make()
        fetched_at: float | None = None
        expected_calls = 0
        for delta, fanout in steps:
            clock.advance(delta)
            if fetched_at is None or clock() - fetched_at > MAX_AGE:
                fetched_at = clock()
                expected_calls += 1
            quotes: list[Quote] = await asyncio.gather(*(cache.get(Currency.EUR) for _ in range(fanout)))
            for quote in quotes:
                assert quote.age(clock()) <= MAX_AGE
                assert quote.amount == Decimal(100 + expected_calls - 1)
            assert len(upstream.calls) == expected_calls

    asyncio.run(run())


async def test_age_is_the_newest_quotes_counted_from_its_request_fresh_or_not() -> None:
    """The gauge's age: NaN before any quote; then from when the quote was asked for (a slow
    upstream's 3 s count), and still shown once the quote is too old to serve."""
    cache, clock, upstream = make()
    assert math.isnan(cache.age(Currency.EUR))
    upstream.takes = 3.0
    await cache.get(Currency.EUR)
    assert cache.age(Currency.EUR) == 3.0
    clock.advance(MAX_AGE)
    assert cache.fresh(Currency.EUR) is None
    assert cache.age(Currency.EUR) == MAX_AGE + 3.0
    assert math.isnan(cache.age(Currency.USD))
