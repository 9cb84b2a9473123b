"""The benchmark's plumbing: its own databases, vhost and processes, wrk and pgbench runners (and
`ab_rounds`, variants loaded in turn), process CPU and memory readings, and py-spy. Only 127.0.0.1
is used."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from tests.support import services
from tests.support.procs import PORT_FIELDS, Proc, System, base_env, free_port, launch, wait_ready

from pydist.devtools.coinbase_stub import CoinbaseStub

BENCH_DIR = Path(__file__).resolve().parent
WRK_DIR = BENCH_DIR / "wrk"
NAN = float("nan")
PATHS = {"create": "/buy_order", "fetch": "/buy_orders?page_size=10"}  # what a service's load requests
SCRIPTS = {"create": "create.lua", "fetch": "get.lua"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stat(values: Sequence[float]) -> dict[str, Any]:
    """The median of the runs and their spread (min, max), as the report shows them."""
    v = [float(x) for x in values] or [NAN]
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}


async def pg_fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    """`sql` on a connection of its own (VACUUM included); its rows."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        return list(await conn.fetch(sql, *args, timeout=600))
    finally:
        await conn.close()


@dataclass(frozen=True)
class Resources:
    write_url: str
    read_url: str
    pgbench_url: str
    amqp_url: str
    dbs: tuple[str, str]  # the names of the write and read databases


@contextlib.contextmanager
def resources() -> Iterator[Resources]:
    """Throw-away migrated databases (both models, and a write model for pgbench) and a RabbitMQ
    vhost, dropped afterwards. The cap is raised far above what any run can use: every order is
    still checked against it, but no measurement ends early because the 100 BTC filled up."""
    made: list[services.Databases] = []
    vhost = ""
    try:
        for tag in ("bench", "benchpg"):
            made.append(services.create_databases(tag))
            asyncio.run(pg_fetch(made[-1].write_url, "UPDATE btc_cap SET limit_btc = 1e9 WHERE id = 1"))
        vhost, amqp_url = services.create_vhost("bench")
        yield Resources(made[0].write_url, made[0].read_url, made[1].write_url, amqp_url, made[0].names)
    finally:
        for dbs in made:
            with contextlib.suppress(Exception):
                services.drop_databases(dbs)
        if vhost:
            with contextlib.suppress(Exception):
                services.delete_vhost(vhost)


@contextlib.contextmanager
def processes(res: Resources, *names: str, keep_logs: bool = False) -> Iterator[System]:
    """The Coinbase stub and the named pydist processes (all at once; price first: create is given
    its URL), all stopped afterwards; their logs kept on failure or if asked. Their environment:
    production price windows (base_env shortens them for tests), one worker, and tracing off
    unless a stage turns it on."""
    stub = CoinbaseStub().start()
    env = base_env(res.write_url, res.read_url, stub.url, res.amqp_url)
    env.update(PRICE_MAX_AGE_S="10", PRICE_MIN_INTERVAL_S="1", PRICE_TIMEOUT_S="2", WEB_CONCURRENCY="1")
    env = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
    system = System(env, log_dir=Path(tempfile.mkdtemp(prefix="pydist-bench-")))
    log(f"process logs in {system.log_dir}")
    try:
        spawn(system, {n: (n, {}) for n in names})
        yield system
    except BaseException:
        keep_logs = True
        raise
    finally:
        stop_procs(system, *system.procs)
        stub.stop()
        log(f"process logs kept in {system.log_dir}") if keep_logs else shutil.rmtree(system.log_dir, True)


def start_hello(log_dir: Path) -> Proc:
    """bench/hello_app.py under uvicorn, with the settings of pydist's HTTP processes, on a free
    port, logged to `log_dir`; returned once it answers GET /hello."""
    port = free_port()
    opts = "--loop uvloop --http httptools --no-access-log --no-server-header --backlog 4096"
    with (log_dir / f"hello-{port}.log").open("wb") as out:
        cmd = [sys.executable, "-m", "uvicorn", "bench.hello_app:app", *opts.split(), "--port", str(port)]
        popen = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=BENCH_DIR.parent)
    proc = Proc("hello", port, popen, Path(out.name))
    wait_ready(proc, timeout=180, path="/hello")
    return proc


def stop_procs(system: System, *names: str) -> None:
    """SIGTERM the named processes all at once, then wait for each (killed if it overstays)."""
    System(system.env, {n: system.procs.pop(n) for n in names}, system.log_dir).stop_all(timeout=20)


def spawn(system: System, procs: dict[str, tuple[str, dict[str, str]]]) -> dict[str, Proc]:
    """Start processes at once, each label: (service, extra environment: e.g. another source tree
    on PYTHONPATH, tracing on), in System.procs under its label; then wait for each one's /readyz,
    generously: a Python process can take tens of seconds to import on a busy 2-core machine."""
    for label, (name, extra) in procs.items():
        port, price = free_port(), {"BTC_PRICE_URL": system.url("price")} if "price" in system.procs else {}
        env = {**system.env, PORT_FIELDS[name]: str(port), **price, **extra}
        system.procs[label] = launch(name, port, env, system.log_dir / f"{label}-{port}.log", label)
    for label in procs:
        wait_ready(system.procs[label], timeout=180, path="/readyz")
    return {label: system.procs[label] for label in procs}


def wait_workers(proc: Proc, workers: int, timeout: float = 120) -> None:
    """uvicorn's supervisor answers /readyz as soon as one worker does: wait (bounded) until every
    worker has logged that its application started."""
    deadline = time.monotonic() + timeout
    while proc.log().count("Application startup complete") < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name}: {workers} workers not started after {timeout}s")
        time.sleep(0.2)


def meter_pids(system: System, *skip: str) -> dict[str, int]:
    """The running processes of `system` (but `skip`) and the broker, as CpuMeter entries."""
    pids = {n: p.popen.pid for n, p in system.procs.items() if p.alive() and n not in skip}
    url = system.env.get("BROKER_URL")
    port = (urlsplit(url).port or 5672) if url else None
    broker = _listener(port) if port else None
    if port and broker is None:  # e.g. not root: another user's sockets show no pid
        log(f"the broker's process (listening on port {port}) is not visible: its CPU is not measured")
    return pids | ({"rabbitmq": broker} if broker else {})


def _listener(port: int) -> int | None:
    """The pid listening on `port`: the broker the bench uses, not whichever other RabbitMQ node
    (a test's private cluster) happens to run on the machine."""
    for conn in psutil.net_connections("tcp"):
        # laddr is () for a socket with no address
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def tree(pid: int) -> list[int]:
    """pid and all its descendants (uvicorn's workers, multiprocessing helpers)."""
    with contextlib.suppress(psutil.Error):
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    return [pid]


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(psutil.Error):
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    return 0.0


def _proc(path: str) -> str:
    """The text of /proc/`path`; "" if the process is gone. Read by hand for what psutil does not
    give: the run-queue wait (schedstat) and the peak resident set (VmHWM)."""
    try:
        return Path(f"/proc/{path}").read_text()
    except OSError:
        return ""


def runq_seconds(pid: int) -> float:
    """How long the process's main thread (an event loop) has waited on a run queue: runnable,
    but with no core to run on (/proc/PID/schedstat, second field, ns)."""
    fields = _proc(f"{pid}/schedstat").split()
    return int(fields[1]) / 1e9 if len(fields) > 1 else 0.0


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set since it started."""
    found = re.search(r"^VmHWM:\s+(\d+)", _proc(f"{pid}/status"), re.MULTILINE)
    return int(found[1]) / 1024 if found else 0.0


def machine_cpu() -> tuple[float, float, float]:
    """(busy, total, steal) CPU seconds of the machine. Steal (the hypervisor ran another guest on
    our virtual cores) counts as busy: those cores were not ours to use."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - times.iowait, sum(times), times.steal


_BACKENDS = """
SELECT pid FROM pg_stat_activity WHERE datname = ANY($1::text[])
   OR backend_type IN ('walwriter', 'checkpointer', 'background writer')
"""


_WAITS = """
SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU') FROM pg_stat_activity
WHERE (datname = ANY($1::text[]) AND state = 'active' AND pid <> pg_backend_pid())
   OR (backend_type = 'walwriter' AND wait_event IS DISTINCT FROM 'WalWriterMain')
"""


class PgWaits:
    """What the Postgres backends of `pg_dbs` (and the WAL writer) are doing, sampled every 10 ms
    from pg_stat_activity in a thread of its own: per wait event (`CPU`: running), the samples of
    each second of the window. A wait profile: where commits spend their time."""

    def __init__(self, pg_dbs: Sequence[str]) -> None:
        self.pg_dbs, self.t0 = list(pg_dbs), time.time()
        self.seconds: list[Counter[str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._sample()), daemon=True)
        self._thread.start()

    async def _sample(self) -> None:
        conn = await asyncpg.connect(services.PG_ADMIN_URL)
        try:
            while not self._stop.is_set():
                second = int(time.time() - self.t0)
                while len(self.seconds) <= second:
                    self.seconds.append(Counter())
                self.seconds[second].update(r[0] for r in await conn.fetch(_WAITS, self.pg_dbs))
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    def stop(self) -> list[dict[str, int]]:
        self._stop.set()
        self._thread.join(timeout=10)
        return [dict(c) for c in self.seconds]


class CpuMeter:
    """CPU used over one window, in cores (1.0 = one core busy): by named process trees, by the
    Postgres backends of `pg_dbs` with the WAL writer, checkpointer and background writer, and by
    the whole machine (and the share the hypervisor stole). Counted per pid, so processes started
    during the window count from zero.
    Also, per named process, the share of the window its main thread waited for a core (`_runq`)."""

    def __init__(self, pids: dict[str, int], pg_dbs: Sequence[str] = ()) -> None:
        self.pids, self.pg_dbs = pids, list(pg_dbs)
        self.q0 = {n: runq_seconds(p) for n, p in pids.items()}
        self.t0, self.m0, self.c0 = time.monotonic(), machine_cpu(), self._snap()

    def _snap(self) -> dict[str, dict[int, float]]:
        groups = {n: tree(p) for n, p in self.pids.items()}
        groups["postgres"] = [
            r[0] for r in asyncio.run(pg_fetch(services.PG_ADMIN_URL, _BACKENDS, self.pg_dbs))
        ]
        return {n: {p: cpu_seconds(p) for p in pids} for n, pids in groups.items()}

    def stop(self) -> dict[str, float]:
        wall, after, m1 = time.monotonic() - self.t0, self._snap(), machine_cpu()
        cores = {
            n: sum(max(0.0, s - self.c0[n].get(p, 0.0)) for p, s in pids.items()) for n, pids in after.items()
        }
        busy, steal = ((m1[i] - self.m0[i]) / max(m1[1] - self.m0[1], 1.0) for i in (0, 2))
        runq = {f"{n}_runq": (runq_seconds(p) - self.q0[n]) / wall for n, p in self.pids.items()}
        machine = {"machine_busy": busy, "machine_steal": steal}
        return {f"{n}_cpu": v / wall for n, v in cores.items()} | machine | runq


def cores_text(cpu: dict[str, float]) -> str:
    """A CpuMeter reading as 'create 0.74, postgres 0.30 (processes using at least 0.01 core); 84%
    busy, 1.2% stolen; create's loop waited 6.3%' (the wait when create was metered)."""
    cores = ", ".join(f"{k[:-4]} {v:.2f}" for k, v in cpu.items() if k.endswith("_cpu") and v >= 0.01)
    text = f"{cores}; {cpu['machine_busy']:.0%} busy, {cpu['machine_steal']:.1%} stolen"
    return text + (f"; create's loop waited {cpu['create_runq']:.1%}" if "create_runq" in cpu else "")


@dataclass
class WrkResult:
    rps: float  # 2xx/3xx answers per second
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    wrk_cpu: float  # wrk's own CPU, in cores
    cpu: dict[str, float]  # CpuMeter over the run
    t0: float  # wall clock (time.time()) at start and end
    t1: float


def run_wrk(
    url: str,
    script: str,
    connections: int,
    seconds: float,
    meter: dict[str, int] | None = None,
    pg_dbs: Sequence[str] = (),
) -> WrkResult:
    """One wrk run (2 threads) of bench/wrk/`script`, with CpuMeter over `meter` and `pg_dbs`."""
    cmd = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{max(1, round(seconds))}s"]
    cmd += ["--timeout", "10s", "-s", str(WRK_DIR / script), url]
    env = {**os.environ, "BENCH_WRK_DIR": str(WRK_DIR), "BENCH_NONCE": uuid.uuid4().hex[:8]}
    cpu, t0 = CpuMeter(meter or {}, pg_dbs), time.time()
    popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    killer = threading.Timer(seconds + 30, popen.kill)  # bounded: a wrk that hangs is killed
    killer.start()
    try:
        _, status, rusage = os.wait4(popen.pid, 0)  # wait4, not wait: it gives wrk's own CPU time
    finally:
        killer.cancel()
    t1, usage = time.time(), cpu.stop()
    popen.returncode = code = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    assert popen.stdout is not None
    text = popen.stdout.read().decode(errors="replace")
    found = re.search(r"^WRK_JSON (\{.*\})$", text, re.M)
    if code != 0 or found is None:
        raise RuntimeError(f"wrk failed ({code}): {' '.join(cmd)}\n{text[-2000:]}")
    d = json.loads(found[1])
    errors = sum(d[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    rps = (d["requests"] - d["status_errors"]) / (d["duration_us"] / 1e6)
    p50, p99 = d["lat_p50_us"] / 1000, d["lat_p99_us"] / 1000
    wrk_cpu = (rusage.ru_utime + rusage.ru_stime) / max(t1 - t0, 1e-9)
    return WrkResult(rps, d["requests"], errors, p50, p99, wrk_cpu, usage, t0, t1)


def wrk_json(results: list[WrkResult]) -> dict[str, Any]:
    """Runs as their medians and spreads (stat), CPU by process included."""
    out = {k: stat([getattr(x, k) for x in results]) for k in ("rps", "p50_ms", "p99_ms", "wrk_cpu")}
    out["cpu"] = {k: stat([x.cpu.get(k, NAN) for x in results]) for k in results[0].cpu}
    return out | {"errors": sum(x.errors for x in results), "requests": sum(x.requests for x in results)}


def ab_rounds(
    urls: dict[str, str],
    script: str,
    connections: int,
    rounds: tuple[int, float],
    meters: dict[str, dict[str, int]],
    pg_dbs: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Variants (urls) loaded in turn (A, B, A, B, …), so that machine noise hits all alike: a
    warm-up run of each, then `rounds` = (n, seconds): n rounds of one wrk run per variant.
    `meters` names the processes whose CPU each variant's runs measure."""
    for url in urls.values():
        run_wrk(url, script, connections, 1)
    out: dict[str, list[WrkResult]] = {label: [] for label in urls}
    for _ in range(rounds[0]):
        for label, url in urls.items():
            out[label].append(r := run_wrk(url, script, connections, rounds[1], meters.get(label), pg_dbs))
            ms = f"p50 {r.p50_ms:.1f} p99 {r.p99_ms:.1f} ms"
            log(f"  {label}: {r.rps:,.0f} req/s {ms}, {r.errors} errors; {cores_text(r.cpu)}")
    return {label: wrk_json(results) for label, results in out.items()}


def ab_procs(
    procs: dict[str, Proc], service: str, rounds: tuple[int, float], connections: int, pg_dbs: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """ab_rounds over processes of one `service` (create or fetch), each metered alone."""
    urls = {k: p.url + PATHS[service] for k, p in procs.items()}
    meters = {k: {service: p.popen.pid} for k, p in procs.items()}
    return ab_rounds(urls, SCRIPTS[service], connections, rounds, meters, pg_dbs)


def run_pgbench(url: str, script: Path, clients: int, seconds: float) -> tuple[float, float, int]:
    """(tps, mean latency ms, failed transactions) of one `pgbench -M prepared` run (2 threads)."""
    cmd = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(2, clients))]
    cmd += ["-T", str(max(1, round(seconds))), "-f", str(script), url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    text = done.stdout + done.stderr
    tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", text)
    if done.returncode != 0 or tps is None:
        raise RuntimeError(f"pgbench failed ({done.returncode}): {' '.join(cmd)}\n{text[-2000:]}")
    lat = re.search(r"latency average = ([0-9.]+) ms", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    return float(tps.group(1)), float(lat.group(1)) if lat else NAN, int(failed.group(1)) if failed else 0


def py_spy(pid: int, seconds: float, out: Path) -> dict[str, Any] | None:
    """py-spy (200 Hz) on a running process: self time per leaf function and inclusive time per
    frame, as shares of the samples; None if py-spy is missing or may not attach."""
    exe = shutil.which("py-spy")
    cmd = [str(exe), "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "200"]
    cmd += ["--format", "raw", "--nonblocking", "--subprocesses", "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60) if exe else None
    if done is None or done.returncode != 0 or not out.exists():
        log(f"py-spy failed: {done.stderr[-500:] if done else 'not installed'}")
        return None
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for stack, _, count in (line.rpartition(" ") for line in out.read_text().splitlines()):
        frames = [_frame(f) for f in stack.split(";") if not f.startswith("process ")]
        frames = frames or ["(no Python frame)"]
        leaf[frames[-1]] += int(count)
        inclusive.update(dict.fromkeys(frames, int(count)))
    n = sum(leaf.values())
    shares = {
        k: [(f, v / max(n, 1)) for f, v in c.most_common(250)]
        for k, c in (("self", leaf), ("inclusive", inclusive))
    }
    return {"samples": n, **shares}


def _frame(frame: str) -> str:
    """'func (path/to/module.py:123)' -> 'func (to/module.py)'."""
    m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame.strip())
    return f"{m[1]} ({'/'.join(m[2].split('/')[-2:])})" if m else frame.strip()


def histogram(url: str, name: str) -> dict[str, float]:
    """A histogram's count, sum and cumulative buckets (by `le`) from /metrics, summed over labels."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=5).text):
        for s in family.samples:
            if s.name.startswith(name + "_"):
                key = s.labels.get("le") or s.name.removeprefix(name + "_")
                out[key] = out.get(key, 0.0) + s.value
    return out


def hist_mean(h: dict[str, float]) -> float:
    """The mean of a histogram(); NaN before its first observation."""
    return h["sum"] / h["count"] if h.get("count") else NAN


def machine_info() -> dict[str, str]:
    with open("/proc/cpuinfo") as f:  # psutil does not name the CPU model
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    memory = f"{psutil.virtual_memory().total / 1024**3:.1f} GiB"
    return {"cores": str(os.cpu_count()), "cpu": cpu, "memory": memory, "kernel": os.uname().release}


def env_for(
    specs: Sequence[str], envs: dict[str, dict[str, str]], *, new_labels: bool
) -> dict[str, dict[str, str]]:
    """The A/B tools' `--env-for LABEL:NAME=VALUE` (repeated), added to each label's environment;
    a label not in `envs` is a new variant, or (not `new_labels`) a mistake."""
    for spec in specs:
        label, kv = spec.split(":", 1)
        if label not in envs and not new_labels:
            raise SystemExit(f"--env-for {spec}: no variant {label!r} (one of {', '.join(envs)})")
        name, value = kv.split("=", 1)
        envs.setdefault(label, {})[name] = value
    return envs
