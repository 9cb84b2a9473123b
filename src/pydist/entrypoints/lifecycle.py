"""Start-up and shutdown helpers every process's lifespan uses.

The start-up rule every process follows: a backing service that is down at start-up is waited for
in the background (capped backoff, one log event per attempt), never by crashing. The HTTP port
opens at once, so /healthcheck says the process lives and /readyz says 503 until the dependency
answers; an orchestrator sees an unready process, not a crash loop.

A module of its own, not part of `serve.py`: serve loads the app modules by import string, so
an app module importing serve would close an import cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog

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
    `attempt_timeout_s`, the pause between attempts by `max_backoff_s`."""
    delay = 0.1
    attempt = 0
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            attempt += 1
            checking = asyncio.ensure_future(asyncio.wait_for(check(), timeout=attempt_timeout_s))
            await asyncio.wait([checking, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not checking.done():  # stop was set: abandon the attempt at once
                checking.cancel()
                with contextlib.suppress(BaseException):
                    await checking
                return False
            exc = checking.exception()
            if exc is None:
                if attempt > 1:
                    log.info("dependency_ready", dependency=name, attempts=attempt)
                return True
            log.warning(
                "dependency_unavailable",
                dependency=name,
                attempt=attempt,
                error=type(exc).__name__,
                retry_in_s=delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stopping), timeout=delay)
            delay = min(delay * 2, max_backoff_s)
        return False
    finally:
        stopping.cancel()


async def cancel_tasks(tasks: Sequence[asyncio.Task[Any]], timeout: float) -> None:
    """Give `tasks` `timeout` seconds to finish on their own, then cancel what is left."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=1)
