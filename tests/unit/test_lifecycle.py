"""A process's lifespan (entrypoints/lifecycle.running): its jobs see the stop, a crashed job is
reported when it crashes, and the shutdown is bounded."""

from __future__ import annotations

import asyncio

import structlog

from pydist.entrypoints.lifecycle import running

BOUND_S = 10.0
"""How long a test waits for a condition: far above the milliseconds each takes."""


async def test_a_job_that_raises_is_reported_at_once_and_the_others_run_on() -> None:
    stopped, closed = asyncio.Event(), asyncio.Event()

    async def crashes(stop: asyncio.Event) -> None:
        raise RuntimeError("a bug")

    async def keeps_running(stop: asyncio.Event) -> None:
        await stop.wait()
        stopped.set()

    async def close() -> None:
        closed.set()

    with structlog.testing.capture_logs() as logs:
        async with asyncio.timeout(BOUND_S), running("t", [crashes, keeps_running], close, stop_s=1):
            while not any(e["event"] == "job_crashed" for e in logs):
                await asyncio.sleep(0.001)
            assert not stopped.is_set()
    crash = next(e for e in logs if e["event"] == "job_crashed")
    assert (crash["job"], crash["error"], crash["log_level"]) == ("t-0", "RuntimeError", "error")
    assert stopped.is_set()
    assert closed.is_set()


async def test_a_job_that_ignores_the_stop_is_cancelled_after_its_bound() -> None:
    cancelled = asyncio.Event()

    async def ignores(stop: asyncio.Event) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def close() -> None:
        pass

    with structlog.testing.capture_logs() as logs:
        async with asyncio.timeout(BOUND_S), running("t", [ignores], close, stop_s=0.01):
            pass
    assert cancelled.is_set()
    assert not any(e["event"] == "job_crashed" for e in logs)  # a cancel is no crash
