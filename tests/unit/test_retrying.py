"""The one retry policy of the background loops (pydist.retrying) and the start-up wait built on
it (entrypoints/lifecycle.await_dependency): retried until it works, ended at once by a stop."""

from __future__ import annotations

import asyncio
import time

import pytest

from pydist.entrypoints.lifecycle import await_dependency
from pydist.retrying import failure, until_stopped


class Flaky:
    """Fails `failures` times with `error`, then returns the attempt count."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    async def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return self.calls


async def run(op: Flaky, stop: asyncio.Event, seen: list[tuple[str, float]], **kw: object) -> int:
    def on_retry(state: object, wait_s: float) -> None:
        seen.append((str(failure(state)), wait_s))  # type: ignore[arg-type]

    async for attempt in until_stopped(stop, first_s=0.001, max_s=0.004, on_retry=on_retry, **kw):  # type: ignore[arg-type]
        with attempt:
            return await op()
    raise AssertionError("no attempt")


async def test_retried_with_a_capped_doubling_backoff_until_it_works() -> None:
    seen: list[tuple[str, float]] = []
    assert await run(Flaky(4), asyncio.Event(), seen) == 5
    assert seen == [("failure 1", 0.001), ("failure 2", 0.002), ("failure 3", 0.004), ("failure 4", 0.004)]


async def test_an_exception_it_does_not_retry_is_raised_at_once() -> None:
    op = Flaky(3, error=ValueError)
    with pytest.raises(ValueError, match="failure 1"):
        await run(op, asyncio.Event(), [], retry_on=ConnectionError)
    assert op.calls == 1


async def test_a_stop_ends_the_backoff_at_once_with_the_last_failure() -> None:
    stop = asyncio.Event()
    op = Flaky(10**6)
    backing_off = asyncio.Event()

    async def attempts() -> None:
        retrying = until_stopped(stop, first_s=60, max_s=60, on_retry=lambda *_: backing_off.set())
        async for attempt in retrying:
            with attempt:
                await op()

    running = asyncio.create_task(attempts())
    await backing_off.wait()  # the first failure, then a 60 s backoff
    started = time.monotonic()
    stop.set()
    with pytest.raises(ConnectionError, match="failure 1"):
        await asyncio.wait_for(running, timeout=5)
    assert time.monotonic() - started < 5  # not the 60 s
    assert op.calls == 1  # no attempt after the stop


async def test_await_dependency_waits_for_a_dependency_that_comes_up() -> None:
    check = Flaky(3)
    assert await await_dependency("db", check, asyncio.Event(), max_backoff_s=0.01) is True
    assert check.calls == 4


async def test_await_dependency_abandons_a_hanging_attempt_when_stopped() -> None:
    stop = asyncio.Event()
    hanging = asyncio.Event()

    async def check() -> None:
        hanging.set()
        await asyncio.Event().wait()  # a dependency that never answers

    waiting = asyncio.create_task(await_dependency("broker", check, stop, attempt_timeout_s=60))
    await hanging.wait()
    started = time.monotonic()
    stop.set()
    assert await asyncio.wait_for(waiting, timeout=5) is False
    assert time.monotonic() - started < 5  # not the attempt's 60 s


async def test_await_dependency_is_false_at_once_when_already_stopped() -> None:
    stop = asyncio.Event()
    stop.set()
    check = Flaky(0)
    assert await await_dependency("db", check, stop) is False
    assert check.calls == 0
