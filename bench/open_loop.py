"""An open-loop load generator: PUT /buy_order at a constant arrival rate, whatever the answers do.

wrk is closed-loop: a slow response delays the requests behind it, so its latencies hide queueing
(coordinated omission). Here request i is due at t0 + i / rate, its latency counts from that due
time, and it takes an idle keep-alive connection or opens a new one, so a stall shows in full.
Its own process (uvloop, a minimal HTTP/1.1 client): it reports its CPU and how late it fired.

    uv run python -m bench.open_loop --url http://127.0.0.1:8777 --rate 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvloop

_BODY = b'{"currency":"USD","amount":"10.00"}'
_HEAD = (
    b"PUT %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    b"Idempotency-Key: %s\r\nContent-Length: %d\r\n\r\n"
)


class _Client:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()

    async def put(self, path: str) -> int:
        reader, writer = self._idle_connection() or await asyncio.open_connection(self.host, self.port)
        key = str(uuid.uuid4()).encode()
        writer.write(_HEAD % (path.encode(), key, len(_BODY)) + _BODY)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lengths = [int(ln[15:]) for ln in head.split(b"\r\n") if ln[:15].lower() == b"content-length:"]
        await reader.readexactly(lengths[0] if lengths else 0)
        self.idle.append((reader, writer))
        return status

    def _idle_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used idle connection the server has not closed. uvicorn closes one
        left idle for 5 s (timeout_keep_alive): after a burst, the extra connections opened for it
        sit idle, and reusing one whose FIN has arrived was a failed request that the server never
        saw (the 50 "errors" at 50% load in the 2026-12-02 02:24 run). Real clients check too."""
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None


async def run(url: str, rate: float, seconds: float) -> dict[str, Any]:
    parts = urlsplit(url)
    client = _Client(parts.hostname or "127.0.0.1", parts.port or 80)
    by_second: dict[int, list[float]] = {}  # latencies by the second of the run they were due in
    late: list[float] = []
    errors: Counter[str] = Counter()  # by kind: the status code, or the exception's type
    tasks: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        try:
            status = await client.put("/buy_order")
        except Exception as exc:  # a reset, a refused or half-closed connection: an error, never a crash
            errors[type(exc).__name__] += 1
            return
        if status == 200:
            by_second.setdefault(int(due - t0), []).append(time.perf_counter() - due)
        else:
            errors[str(status)] += 1

    n = int(rate * seconds)
    cpu0, t0 = time.process_time(), time.perf_counter() + 0.05
    started_at = time.time() + 0.05  # t0 on the wall clock, to line up other samplers' seconds
    for i in range(n):
        due = t0 + i / rate
        wait = due - time.perf_counter()
        if wait > 0.0005:
            await asyncio.sleep(wait)
        late.append(max(time.perf_counter() - due, 0.0))
        task = asyncio.create_task(one(due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    _, late_tasks = await asyncio.wait(set(tasks), timeout=60) if tasks else (set(), set())
    for task in late_tasks:  # no answer within a minute of the last request: counted as errors
        task.cancel()
    if late_tasks:
        errors["no answer within 60 s"] += len(late_tasks)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies = sorted(ms for second in by_second.values() for ms in second)
    return {
        "rate": rate,
        "seconds": seconds,
        "sent": n,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "p50_ms": _pct(latencies, 0.5),
        "p99_ms": _pct(latencies, 0.99),
        "max_ms": _pct(latencies, 1.0),
        "late_p99_ms": _pct(sorted(late), 0.99),  # the generator's own delay
        "client_cpu": cpu / wall,  # the generator's own CPU, in cores
        "per_second_p99_ms": [_pct(sorted(by_second.get(i, [])), 0.99) for i in range(int(seconds))],
        "started_at": started_at,
    }


def _pct(values: list[float], q: float) -> float:
    """The q-quantile of sorted `values` (seconds), in ms."""
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def measured(
    url: str, rate: float, seconds: float, pids: dict[str, int], dbs: Sequence[str]
) -> dict[str, Any]:
    """This generator in its own process against create at `url`, with the CPU of `pids` and of
    the Postgres backends of `dbs` over the run (harness.CpuMeter, under "cpu"), and the run's
    wall-clock start and end ("t0", "t1": for workload.lag_between). "pg_waits" is harness.PgWaits
    over the run, its seconds lined up with the generator's "per_second_p99_ms"."""
    from bench.harness import CpuMeter, PgWaits  # the generator's own process needs none of these

    cmd = [sys.executable, "-m", "bench.open_loop", "--url", url, "--rate", f"{rate:.1f}"]
    cmd += ["--seconds", str(seconds)]
    meter, waits, t0 = CpuMeter(pids, dbs), PgWaits(dbs), time.time()
    done = subprocess.run(cmd, cwd=Path(__file__).parent.parent, capture_output=True, check=True)
    usage, pg_waits, t1 = meter.stop(), waits.stop(), time.time()
    r = json.loads(done.stdout)
    skip = max(0, int(r["started_at"] - t0))  # the seconds before the generator's first request
    return {**r, "cpu": usage, "pg_waits": pg_waits[skip:], "t0": t0, "t1": t1}


def wait_shares(counts: list[dict[str, int]]) -> str:
    """harness.PgWaits seconds as 'IO:WALSync 58%, CPU 21%' (the four most sampled)."""
    total = sum((Counter(c) for c in counts), Counter[str]())
    n = max(sum(total.values()), 1)
    return ", ".join(f"{k} {v / n:.0%}" for k, v in total.most_common(4))


def stalls(r: dict[str, Any]) -> str:
    """An open-loop run's seconds by their p99, and what the Postgres backends were doing in all
    of them and in the worst one: where a p99 comes from, one stall or a spread."""
    per_second, waits = r["per_second_p99_ms"], r["pg_waits"]
    worst = max(range(len(per_second)), key=lambda i: per_second[i])
    over = sum(1 for ms in per_second if ms > 50)
    return (
        f"seconds with p99 > 50 ms: {over} of {len(per_second)}; worst second {worst}: "
        f"{per_second[worst]:.0f} ms; Postgres all run: {wait_shares(waits)}; "
        f"in the worst second: {wait_shares(waits[worst : worst + 1])}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--url", required=True, help="create_buy_order's base URL")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args.url, args.rate, args.seconds))))


if __name__ == "__main__":
    main()
