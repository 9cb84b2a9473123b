"""Start-up and shutdown helpers every process's lifespan uses.

The start-up rule every process follows: a backing service that is down at start-up is waited for
in the background (capped backoff, one log event per attempt), never by crashing. The HTTP port
opens at once, so /healthcheck says the process lives and /readyz says 503 until the dependency
answers; an orchestrator sees an unready process, not a crash loop.

Not in `serve.py`: serve imports the app modules, so an app module importing serve would close
an import cycle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any

import structlog
from tenacity import RetryCallState

from pydist.retrying import failure, sleep_unless_stopped, until_stopped

log = structlog.get_logger()


async def await_dependency(
    name: str,
    check: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    *,
    attempt_timeout_s: float = 5.0,
    max_backoff_s: float = 2.0,
) -> bool:
    """Retry `check` until it succeeds (True) or `stop` is set (False). Each attempt is bounded by
    `attempt_timeout_s`, the pause between attempts by `max_backoff_s`; a stop abandons an attempt
    in flight at once (a shutdown never waits for a dependency's timeout)."""

    def unavailable(state: RetryCallState, wait_s: float) -> None:
        error, attempt = type(failure(state)).__name__, state.attempt_number
        log.warning(
            "dependency_unavailable", dependency=name, attempt=attempt, error=error, retry_in_s=wait_s
        )

    async def until_ready() -> None:
        async for attempt in until_stopped(stop, first_s=0.1, max_s=max_backoff_s, on_retry=unavailable):
            with attempt:  # a failure is recorded here, and retried
                await asyncio.wait_for(check(), timeout=attempt_timeout_s)
                if (attempts := attempt.retry_state.attempt_number) > 1:
                    log.info("dependency_ready", dependency=name, attempts=attempts)
                return

    if stop.is_set():
        return False
    waiting, stopping = asyncio.ensure_future(until_ready()), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        ready = waiting.done()  # before the stop, not because of it (a check may swallow a cancel)
        waiting.cancel()  # at a stop, with any attempt in flight
    try:
        await waiting
    except BaseException:  # cancelled at a stop, or its last failure raised once stopping
        return False
    return ready


Job = Callable[[asyncio.Event], Coroutine[Any, Any, object]]
"""A process's background work: it runs until the stop event is set."""


@asynccontextmanager
async def running(
    event: str, jobs: Sequence[Job], close: Callable[[], Awaitable[object]], stop_s: float, **fields: Any
) -> AsyncIterator[None]:
    """A process's lifespan: start `jobs`, log `<event>_started`; at shutdown set their stop event,
    give them `stop_s` seconds to finish (then cancel them), `close` the graph, log `<event>_stopped`."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(job(stop), name=f"{event}-{i}") for i, job in enumerate(jobs)]
    for task in tasks:
        task.add_done_callback(_report_crash)
    log.info(f"{event}_started", **fields)
    yield
    stop.set()
    if tasks:  # given `stop_s` to finish on their own, then what is left is cancelled
        _, pending = await asyncio.wait(tasks, timeout=stop_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1)
    await close()
    log.info(f"{event}_stopped")


def _report_crash(task: asyncio.Task[object]) -> None:
    """A job is written to keep running until its stop: one that raised is a bug, said at once
    (with its traceback) rather than found at shutdown, or never."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("job_crashed", job=task.get_name(), error=type(exc).__name__, exc_info=exc)


async def every(stop: asyncio.Event, seconds: float, job: Callable[[], Awaitable[object]]) -> None:
    """Run `job` every `seconds` until `stop`; a failed run waits for the next."""
    while not stop.is_set():
        try:
            await job()
        except Exception as exc:
            log.debug("job_failed", job=getattr(job, "__name__", "?"), error=type(exc).__name__)
        await sleep_unless_stopped(stop, seconds)
