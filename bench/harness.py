"""The benchmark's plumbing: its own databases, vhost and processes, wrk and pgbench runners,
process CPU/RSS readings and a pg_stat_activity wait-event sampler. Only 127.0.0.1 is touched."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
from tests.support.procs import PORT_FIELDS, Proc, System, base_env, free_port, launch, wait_ready

from pydist.adapters.db import READ, WRITE, migrate

BENCH_DIR = Path(__file__).resolve().parent
WRK_DIR = BENCH_DIR / "wrk"
PG_ADMIN_URL = os.environ.get("PYDIST_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_HOST_URL = os.environ.get("PYDIST_BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Median of the runs and their spread (min..max)."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def lo(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def hi(self) -> float:
        return max(self.values) if self.values else float("nan")

    @property
    def spread_pct(self) -> float:
        """(max - min) / median, in percent."""
        m = self.median
        return 100.0 * (self.hi - self.lo) / m if m else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.lo, "max": self.hi, "runs": list(self.values)}


def stat(values: Sequence[float]) -> Stat:
    return Stat(tuple(float(v) for v in values))


# ---------------------------------------------------------------- services


def db_url(name: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


async def pg_exec(url: str, sql: str, *args: Any, timeout: float = 600) -> str:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return str(await conn.execute(sql, *args, timeout=timeout))
    finally:
        await conn.close()


async def pg_fetch(url: str, sql: str, *args: Any, timeout: float = 120) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return list(await conn.fetch(sql, *args, timeout=timeout))
    finally:
        await conn.close()


def pg_val(url: str, sql: str, *args: Any) -> Any:
    rows = asyncio.run(pg_fetch(url, sql, *args))
    return rows[0][0] if rows else None


def rabbitmqctl(*args: str) -> str:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise RuntimeError("rabbitmqctl not found: RabbitMQ must be installed")
    done = subprocess.run([exe, "-q", *args], check=True, capture_output=True, timeout=60, text=True)
    return done.stdout


@dataclass
class Resources:
    """Throw-away databases (pydist_bench_*) and a RabbitMQ vhost, dropped by close()."""

    tag: str
    write_db: str
    read_db: str
    pgbench_db: str
    vhost: str
    created: list[str] = field(default_factory=list)
    vhost_created: bool = False

    @property
    def write_url(self) -> str:
        return db_url(self.write_db)

    @property
    def read_url(self) -> str:
        return db_url(self.read_db)

    @property
    def pgbench_url(self) -> str:
        return db_url(self.pgbench_db)

    @property
    def amqp_url(self) -> str:
        return AMQP_HOST_URL.rstrip("/") + "/" + quote(self.vhost, safe="")

    @classmethod
    def create(cls) -> Resources:
        tag = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
        res = cls(
            tag=tag,
            write_db=f"pydist_bench_{tag}_w",
            read_db=f"pydist_bench_{tag}_r",
            pgbench_db=f"pydist_bench_{tag}_pgb",
            vhost=f"pydist_bench_{tag}",
        )
        try:
            for name in (res.write_db, res.read_db, res.pgbench_db):
                asyncio.run(pg_exec(PG_ADMIN_URL, f'CREATE DATABASE "{name}"'))
                res.created.append(name)
            migrate(WRITE, res.write_url)
            migrate(READ, res.read_url)
            migrate(WRITE, res.pgbench_url)
            # A cap far above what any run can use: every order is still checked against it, but
            # no measurement ends early because the 100 BTC filled up.
            for url in (res.write_url, res.pgbench_url):
                asyncio.run(pg_exec(url, "UPDATE btc_cap SET limit_btc = 1000000000 WHERE id = 1"))
            rabbitmqctl("add_vhost", res.vhost)
            res.vhost_created = True
            rabbitmqctl("set_permissions", "-p", res.vhost, "guest", ".*", ".*", ".*")
        except BaseException:
            res.close()
            raise
        return res

    def close(self) -> None:
        for name in reversed(self.created):
            with contextlib.suppress(Exception):
                asyncio.run(pg_exec(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.created.clear()
        if self.vhost_created:
            with contextlib.suppress(Exception):
                rabbitmqctl("delete_vhost", self.vhost)
            self.vhost_created = False


def system_env(res: Resources, coinbase_url: str) -> dict[str, str]:
    env = base_env(res.write_url, res.read_url, coinbase_url, res.amqp_url)
    # Production defaults for the price freshness window (base_env shortens them for tests).
    env.update(PRICE_MAX_AGE_S="10", PRICE_MIN_INTERVAL_S="1", PRICE_TIMEOUT_S="2", LOG_LEVEL="INFO")
    env.pop("WEB_CONCURRENCY", None)
    return env


def start_hello(log_dir: Path, workers: int = 1) -> Proc:
    port = free_port()
    log_path = log_dir / f"hello-{port}.log"
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "bench.hello_app", "--port", str(port), "--workers", str(workers)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=BENCH_DIR.parent,
        )
    proc = Proc("hello", port, popen, log_path)
    wait_ready(proc, timeout=180, path="/healthcheck")
    return proc


def start_procs(system: System, *names: str, timeout: float = 180) -> None:
    """Start the named processes at once, then wait for each one's /readyz (databases, broker and,
    for btc_price, a fresh upstream price answered). Bounded, but generous: on a busy 2-core
    machine a Python process can take tens of seconds just to import."""
    system.start(*names, wait=False)
    for name in names:
        wait_ready(system.procs[name], timeout=timeout, path="/readyz")


def stop_procs(system: System, *names: str, timeout: float = 20) -> None:
    """SIGTERM the named processes all at once, then wait for each (killed if it overstays)."""
    procs = [system.procs.pop(n) for n in names]
    for proc in procs:
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill9()


def wait_workers(proc: Proc, workers: int, timeout: float = 120) -> None:
    """uvicorn's supervisor answers /readyz as soon as one worker does: wait (bounded) until every
    worker has logged that its application started."""
    deadline = time.monotonic() + timeout
    while proc.log().count("Application startup complete") < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: {workers} workers not started after {timeout}s")
        time.sleep(0.2)


# ---------------------------------------------------------------- processes: CPU and memory


def children(pid: int) -> list[int]:
    """All descendants of pid (uvicorn's workers, multiprocessing helpers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for c in parents.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def tree(pid: int) -> list[int]:
    return [pid, *children(pid)]


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set since it started."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def postgres_pids() -> list[int]:
    """Every postgres process (backends, walwriter, checkpointer...)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == "postgres":
                    out.append(int(entry))
        except OSError:
            continue
    return out


def rabbitmq_pid() -> int | None:
    """The RabbitMQ VM (beam.smp), for its CPU share; None if not found."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/comm") as f:
                if f.read().strip() == "beam.smp":
                    return int(entry)
    return None


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies from /proc/stat, for whole-machine utilisation over a window."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


def backend_pids(databases: Sequence[str]) -> list[int]:
    """Postgres backends connected to `databases`, plus the WAL writer, checkpointer and
    background writer (shared with every other database on the server)."""
    rows = asyncio.run(
        pg_fetch(
            PG_ADMIN_URL,
            """
            SELECT pid FROM pg_stat_activity
            WHERE datname = ANY($1::text[])
               OR backend_type IN ('walwriter', 'checkpointer', 'background writer')
            """,
            list(databases),
        )
    )
    return [int(r[0]) for r in rows]


class CpuMeter:
    """CPU used over one window, in cores (1.0 = one core busy): by named process trees, by the
    Postgres backends of our databases (`pg_dbs`; all postgres processes if not given), and by the
    whole machine. Counted per pid, so processes started during the window count from zero."""

    def __init__(self, pids: dict[str, int], pg_dbs: Sequence[str] | None = None) -> None:
        self.pids = pids
        self.pg_dbs = pg_dbs
        self.start = {n: self._snap(tree(p)) for n, p in pids.items()}
        self.pg0 = self._snap(self._pg_pids())
        self.m0 = machine_cpu()
        self.t0 = time.monotonic()

    def _pg_pids(self) -> list[int]:
        return backend_pids(self.pg_dbs) if self.pg_dbs else postgres_pids()

    @staticmethod
    def _snap(pids: list[int]) -> dict[int, float]:
        return {p: cpu_seconds(p) for p in pids}

    @staticmethod
    def _delta(before: dict[int, float], after: dict[int, float]) -> float:
        return sum(max(0.0, v - before.get(p, 0.0)) for p, v in after.items())

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        out = {
            f"{n}_cpu": self._delta(self.start[n], self._snap(tree(p))) / wall for n, p in self.pids.items()
        }
        out["postgres_cpu"] = self._delta(self.pg0, self._snap(self._pg_pids())) / wall
        m1 = machine_cpu()
        out["machine_busy"] = (m1[0] - self.m0[0]) / max(m1[1] - self.m0[1], 1.0)
        return out


# ---------------------------------------------------------------- load generators


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    wrk_cpu: float  # CPU seconds of wrk per wall second (1.0 = one core)
    cpu: dict[str, float]
    t0: float  # wall clock (time.time()) at start and end
    t1: float


def run_wrk(
    url: str,
    script: str,
    *,
    connections: int,
    duration_s: float,
    threads: int = 2,
    meter: dict[str, int] | None = None,
    pg_dbs: Sequence[str] | None = None,
    env: dict[str, str] | None = None,
) -> WrkResult:
    threads = max(1, min(threads, connections))
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_DIR / script),
        url,
    ]
    wenv = {**os.environ, "BENCH_WRK_DIR": str(WRK_DIR), "BENCH_NONCE": uuid.uuid4().hex[:8], **(env or {})}
    cpu = CpuMeter(meter or {}, pg_dbs)
    t0 = time.time()
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=wenv)
    deadline = time.monotonic() + duration_s + 30
    assert popen.stdout is not None
    while True:
        reaped, status, rusage = os.wait4(popen.pid, os.WNOHANG)
        if reaped:
            break
        if time.monotonic() > deadline:
            popen.kill()
            raise RuntimeError(f"wrk did not finish: {' '.join(cmd)}")
        time.sleep(0.05)
    popen.returncode = os.waitstatus_to_exitcode(status)
    t1 = time.time()
    usage = cpu.stop()
    out = popen.stdout.read()
    text = out.decode(errors="replace")
    match = re.search(r"^WRK_JSON (\{.*\})$", text, re.M)
    if popen.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({popen.returncode}): {' '.join(cmd)}\n{text[-2000:]}")
    data = json.loads(match.group(1))
    seconds = data["duration_us"] / 1e6
    errors = sum(
        data[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    )
    return WrkResult(
        rps=(data["requests"] - data["status_errors"]) / seconds,
        requests=data["requests"],
        errors=errors,
        p50_ms=data["lat_p50_us"] / 1000,
        p90_ms=data["lat_p90_us"] / 1000,
        p99_ms=data["lat_p99_us"] / 1000,
        max_ms=data["lat_max_us"] / 1000,
        mean_ms=data["lat_mean_us"] / 1000,
        wrk_cpu=(rusage.ru_utime + rusage.ru_stime) / max(t1 - t0, 1e-9),
        cpu=usage,
        t0=t0,
        t1=t1,
    )


@dataclass
class PgbenchResult:
    tps: float
    latency_ms: float
    transactions: int
    failed: int


def run_pgbench(
    url: str, script: Path, *, clients: int, duration_s: float, threads: int = 2
) -> PgbenchResult:
    exe = shutil.which("pgbench")
    if exe is None:
        raise RuntimeError("pgbench not found: install postgresql-client (it ships pgbench)")
    cmd = [
        exe,
        "-n",
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-j",
        str(min(threads, clients)),
        "-T",
        str(max(1, round(duration_s))),
        "-f",
        str(script),
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60)
    text = done.stdout + done.stderr
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", text)
    lat = re.search(r"latency average = ([0-9.]+) ms", text)
    tx = re.search(r"number of transactions actually processed: (\d+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    if done.returncode != 0 or tps is None:
        raise RuntimeError(f"pgbench failed ({done.returncode}): {' '.join(cmd)}\n{text[-2000:]}")
    return PgbenchResult(
        tps=float(tps.group(1)),
        latency_ms=float(lat.group(1)) if lat else float("nan"),
        transactions=int(tx.group(1)) if tx else 0,
        failed=int(failed.group(1)) if failed else 0,
    )


# ---------------------------------------------------------------- Postgres wait events


class WaitSampler:
    """Samples pg_stat_activity for the given databases every `every_s` (a thread with its own
    connection): which backends are active and what they wait on. pg_stat_statements is not
    available unless preloaded, so this is the statement-agnostic view of where Postgres time goes."""

    def __init__(self, databases: Sequence[str], every_s: float = 0.02) -> None:
        self.databases = list(databases)
        self.every_s = every_s
        self.samples = 0
        self.counts: Counter[str] = Counter()
        self.queries: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            while not self._stop.is_set():
                rows = await conn.fetch(
                    """
                    SELECT application_name AS app, state, wait_event_type AS wt, wait_event AS we,
                           left(regexp_replace(query, '\\s+', ' ', 'g'), 60) AS q
                    FROM pg_stat_activity
                    WHERE datname = ANY($1::text[]) AND pid <> pg_backend_pid()
                    """,
                    self.databases,
                )
                self.samples += 1
                for r in rows:
                    if r["state"] == "active":
                        what = f"{r['wt']}:{r['we']}" if r["wt"] else "CPU"
                        self.counts[f"{r['app']} | {what}"] += 1
                        self.queries[f"{r['app']} | {r['q']}"] += 1
                    elif r["state"] == "idle in transaction":
                        self.counts[f"{r['app']} | idle in transaction"] += 1
                await asyncio.sleep(self.every_s)
        finally:
            await conn.close()

    def top(self, n: int = 12) -> list[tuple[str, float]]:
        """Average number of backends in each state (backends busy = sum of these)."""
        return [(k, v / max(self.samples, 1)) for k, v in self.counts.most_common(n)]

    def top_queries(self, n: int = 8) -> list[tuple[str, float]]:
        return [(k, v / max(self.samples, 1)) for k, v in self.queries.most_common(n)]


# ---------------------------------------------------------------- py-spy


def py_spy_profile(pid: int, seconds: float, out: Path) -> Path | None:
    """Collapsed stacks of a running process (py-spy record --format raw), or None if py-spy is
    missing or not allowed to attach."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return None
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        "200",
        "--format",
        "raw",
        "--nonblocking",
        "--subprocesses",
        "--output",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not out.exists():
        log(f"py-spy failed: {done.stderr[-500:]}")
        return None
    return out


def summarise_profile(path: Path, n: int = 15) -> dict[str, Any]:
    """Self time per leaf function and inclusive time for a few frames of interest."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [f for f in stack.split(";") if not f.startswith("process ")] or ["(no Python frame)"]
        leaf[_frame(frames[-1])] += count
        seen: set[str] = set()
        for frame in frames:
            key = _frame(frame)
            if key not in seen:
                seen.add(key)
                inclusive[key] += count
    return {
        "samples": total,
        "self": [(k, v / max(total, 1)) for k, v in leaf.most_common(n)],
        "inclusive": [(k, v / max(total, 1)) for k, v in inclusive.most_common(250)],
    }


def _frame(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (module.py)'."""
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m.groups()
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{func} ({short})"


# ---------------------------------------------------------------- misc


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "kernel": os.uname().release,
    }


def load_average() -> float:
    return os.getloadavg()[0]


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait (bounded) for the 1-minute load average to fall below max_load; returns the last one."""
    deadline = time.monotonic() + max_wait_s
    load = load_average()
    while load >= max_load and time.monotonic() < deadline:
        log(f"load average {load:.2f} >= {max_load}: waiting")
        time.sleep(15)
        load = load_average()
    return load


def metric_sum(url: str, name: str) -> dict[str, float]:
    """Sum a Prometheus metric's samples by full sample name (e.g. x_sum, x_count) from /metrics."""
    text = httpx.get(url + "/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name):
            sample = line.split("{", 1)[0].split(" ", 1)[0]
            value = float(line.rsplit(" ", 1)[1])
            out[sample] = out.get(sample, 0.0) + value
    return out


def histogram_buckets(url: str, name: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=5).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = re.search(r'le="([^"]+)"', line)
            if le:
                out[le.group(1)] = out.get(le.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so the finally blocks drop the databases and vhost."""

    def handler(*_: object) -> None:
        raise SystemExit(143)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def make_log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pydist-bench-"))


def spawn_service(system: System, name: str, label: str, extra_env: dict[str, str] | None = None) -> Proc:
    """One more process of service `name` (e.g. a second create built from another source tree
    via PYTHONPATH), outside System.procs, for A/B comparisons. The caller stops it."""
    port = free_port()
    env = {**system.env, PORT_FIELDS[name]: str(port), **(extra_env or {})}
    if "price" in system.procs:
        env.setdefault("BTC_PRICE_URL", system.procs["price"].url)
    proc = launch(name, port, env, system.log_dir / f"{label}-{port}.log", label)
    wait_ready(proc, timeout=180, path="/readyz")
    return proc
