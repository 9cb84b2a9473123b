"""The one retry policy of pydist's long-running loops, on tenacity: retry until it works or the
process stops, with a capped exponential backoff, and one log event per failed attempt.

Every background loop (the relay's claims, its NOTIFY listener, read_model_sync's projection,
the start-up waits) faces the same thing, a backing service down for a while, and retries the same
way, so a stop (SIGTERM) ends the wait at once instead of after the backoff."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential


def until_stopped(
    stop: asyncio.Event,
    *,
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
    first_s: float,
    max_s: float,
    on_retry: Callable[[RetryCallState, float], None],
) -> AsyncRetrying:
    """Attempts of one operation: a failure of `retry_on` waits `first_s`, then twice that, … up to
    `max_s`, and tries again; `on_retry(state, wait_s)` logs it. Once `stop` is set no attempt is
    made and the last failure is raised (`reraise`), as is any other exception at once."""
    last: BaseException | None = None

    def before_sleep(state: RetryCallState) -> None:
        nonlocal last
        last = failure(state)
        on_retry(state, state.upcoming_sleep)

    async def sleep(seconds: float) -> None:
        await sleep_unless_stopped(stop, seconds)
        if stop.is_set() and last is not None:  # stopped while waiting: no further attempt
            raise last

    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        wait=wait_exponential(multiplier=first_s, max=max_s),
        stop=lambda _: stop.is_set(),
        sleep=sleep,
        before_sleep=before_sleep,
        reraise=True,
    )


async def sleep_unless_stopped(stop: asyncio.Event, seconds: float) -> None:
    """Sleep `seconds`, or until `stop` is set if that comes first: a SIGTERM must not wait out a
    backoff or a poll period."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def failure(state: RetryCallState) -> BaseException | None:
    """The exception the attempt failed with (for the log line)."""
    return state.outcome.exception() if state.outcome is not None else None
