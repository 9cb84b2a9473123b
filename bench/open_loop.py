"""An open-loop load generator: PUT /buy_order at a constant arrival rate, whatever the answers do.

wrk is closed-loop: a slow response delays the requests behind it, so its latencies hide queueing
(coordinated omission). Here request i is due at t0 + i / rate and its latency is counted from that
due time, not from when it could be sent, so a stall shows in full. Each request takes an idle
keep-alive connection or opens a new one, so the arrival rate never waits for an answer.

It runs as its own process (uvloop, a minimal HTTP/1.1 client on asyncio streams: a few tens of
µs of CPU per request) and reports its own CPU and how late it fired requests, so a run can show
that the generator was not the bottleneck.

    uv run python -m bench.open_loop --url http://127.0.0.1:8777 --rate 1000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import uvloop

_BODY = b'{"currency":"USD","amount":"10.00"}'


@dataclass
class OpenLoopResult:
    rate: float
    seconds: float
    sent: int
    ok: int
    errors: int
    achieved_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    late_p99_ms: float
    """How late the generator itself fired requests (its own scheduling delay), p99."""
    client_cpu: float
    """Cores the generator used."""
    connections: int


class _Client:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: deque[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = deque()
        self.opened = 0

    async def put(self, path: str) -> int:
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
        key = str(uuid.uuid4()).encode()
        writer.write(
            b"PUT " + path.encode() + b" HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Idempotency-Key: "
            + key
            + b"\r\nContent-Length: "
            + str(len(_BODY)).encode()
            + b"\r\n\r\n"
            + _BODY
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        self.idle.append((reader, writer))
        return status


async def run(url: str, rate: float, seconds: float) -> OpenLoopResult:
    parts = urlsplit(url)
    client = _Client(parts.hostname or "127.0.0.1", parts.port or 80)
    latencies: list[float] = []
    late: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        nonlocal errors
        try:
            status = await client.put("/buy_order")
        except Exception:  # a reset, a refused or half-closed connection: an error, never a crash
            errors += 1
            return
        if status == 200:
            latencies.append(time.perf_counter() - due)
        else:
            errors += 1

    n = int(rate * seconds)
    cpu0, t0 = time.process_time(), time.perf_counter() + 0.05
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
    errors += len(late_tasks)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latencies.sort()
    late.sort()
    return OpenLoopResult(
        rate=rate,
        seconds=seconds,
        sent=n,
        ok=len(latencies),
        errors=errors,
        achieved_rps=len(latencies) / wall,
        p50_ms=_pct(latencies, 0.50),
        p90_ms=_pct(latencies, 0.90),
        p99_ms=_pct(latencies, 0.99),
        max_ms=latencies[-1] * 1000 if latencies else float("nan"),
        late_p99_ms=_pct(late, 0.99),
        client_cpu=cpu / wall,
        connections=client.opened,
    )


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--url", required=True, help="create_buy_order's base URL")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    print(json.dumps(asdict(uvloop.run(run(args.url, args.rate, args.seconds)))))


if __name__ == "__main__":
    main()
