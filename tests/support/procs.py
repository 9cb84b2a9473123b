"""Real processes for e2e tests: each pydist service started as its own OS process over HTTP."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from pydist.devtools import embedded_rabbitmq as rmq

PORT_FIELDS = {
    "create": "CREATE_BUY_ORDER_PORT",
    "fetch": "FETCH_BUY_ORDERS_PORT",
    "price": "BTC_PRICE_PORT",
    "relay": "RELAY_METRICS_PORT",
    "sync": "SYNC_METRICS_PORT",
}
# What "started" means for System.start: ready to do its work. The APIs and workers open their HTTP
# port before their databases (and broker) answer, so /readyz is the signal; btc_price's /readyz
# needs a fresh upstream price, which a test may withhold on purpose, so it is waited for as alive.
READY_PATHS = {"price": "/healthcheck"}
# Ports are picked below Linux's ephemeral range (32768-60999), so an outgoing connection never
# takes one between our choice and the server's bind; bind(0) would hand out ephemeral ports, and two
# processes started together were once given the same one.
_PORT_RANGE = (20000, 32000)
_chosen_ports: set[int] = set()
_port_lock = threading.Lock()
COMMANDS = {
    "create": ["serve", "create"],
    "fetch": ["serve", "fetch"],
    "price": ["serve", "price"],
    "relay": ["relay"],
    "sync": ["sync"],
}


def _port_is_free(port: int) -> bool:
    families = [(socket.AF_INET, "127.0.0.1")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::1"))
    for family, host in families:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((host, port))
        except OSError as exc:
            # No IPv6 loopback on this machine is not a port in use.
            if family == socket.AF_INET6 and exc.errno in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL
                continue
            return False
    return True


_PORTS_RNG = random.SystemRandom()
"""Not the module-level generator, which pytest-randomly reseeds before each test: two test
processes (./test.sh and a benchmark, two CI jobs) must not walk the same sequence of ports."""


def free_port() -> int:
    """A port free on 127.0.0.1 (and ::1), never handed out twice by this process."""
    with _port_lock:
        for _ in range(1000):
            port = _PORTS_RNG.randint(*_PORT_RANGE)
            if port not in _chosen_ports and _port_is_free(port):
                _chosen_ports.add(port)
                return port
    raise RuntimeError(f"no free port found in {_PORT_RANGE[0]}-{_PORT_RANGE[1]}")


def free_amqp_port() -> int:
    """An AMQP port whose derived distribution (+20000) and epmd (+10000) ports are free too, as
    a private RabbitMQ node (pydist.devtools.embedded_rabbitmq) lays its ports out."""
    for _ in range(100):
        port = free_port()
        derived = {port + 10000, port + 20000}
        with _port_lock:
            if derived & _chosen_ports or any(rmq.port_in_use(p) for p in derived):
                continue
            _chosen_ports.update(derived)  # never handed out by free_port afterwards
        return port
    raise RuntimeError("no AMQP port with free derived ports")


def command_lines() -> dict[int, str]:
    """Every process's command line, its arguments joined by spaces."""
    return {p.pid: " ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"])}


def node_processes(data_dir: Path, amqp_port: int) -> dict[int, str]:
    """The processes of a private RabbitMQ node (pydist.devtools.embedded_rabbitmq) still running
    under `data_dir`, by command line: its epmd (by its port, AMQP + 10000), and everything started
    with the node's environment, which names the data dir (the rabbitmq-server script, the subshell
    it starts erl from, the beam). Judged apart from the module's own lookup, so a broken lookup
    cannot pass."""
    epmd = f"-port {amqp_port + 10000} "
    left = {}
    for pid, cmd in command_lines().items():
        with contextlib.suppress(psutil.Error):  # gone meanwhile
            env = psutil.Process(pid).environ() if pid != os.getpid() else {}
            ours_epmd = cmd.split(" ", 1)[0].endswith("epmd") and epmd in f"{cmd} "
            if ours_epmd or str(data_dir) in env.get("RABBITMQ_MNESIA_BASE", ""):
                left[pid] = cmd
    return left


@dataclass
class Proc:
    name: str
    port: int
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.alive():
            self.popen.send_signal(sig)
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGCONT)  # a paused process must run to handle it
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        self.popen.wait()

    def pause(self) -> None:
        """SIGSTOP: the process is frozen (its sockets stay open, nothing answers)."""
        self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.popen.send_signal(signal.SIGCONT)


def launch(name: str, port: int, env: dict[str, str], log_path: Path, label: str | None = None) -> Proc:
    """Start one pydist process (`COMMANDS[name]`) with stdout and stderr to `log_path`."""
    with log_path.open("wb") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", "pydist.entrypoints.cli", *COMMANDS[name]],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Proc(label or name, port, popen, log_path)


@dataclass
class System:
    """A set of running processes sharing one environment (databases, broker, price stub)."""

    env: dict[str, str]
    procs: dict[str, Proc] = field(default_factory=dict)
    log_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pydist-e2e-")))

    def start(self, *names: str, wait: bool = True, ports: dict[str, int] | None = None) -> None:
        """Start each named process (all at once), then wait until each is ready (see READY_PATHS)."""
        for name in names:
            port = (ports or {}).get(name) or free_port()
            env = {**self.env, PORT_FIELDS[name]: str(port)}
            if name == "create" and "price" in self.procs and "BTC_PRICE_URL" not in self.env:
                env["BTC_PRICE_URL"] = self.procs["price"].url
            self.procs[name] = launch(name, port, env, self.log_dir / f"{name}-{port}.log")
        if wait:
            for name in names:
                wait_ready(self.procs[name], path=READY_PATHS.get(name, "/readyz"))

    def restart(self, name: str) -> None:
        """Stop `name` (if alive) and start it again on the same port, so the URLs other processes
        were given (BTC_PRICE_URL) stay valid."""
        old = self.procs.pop(name)
        if old.alive():
            old.resume()
            old.stop()
        self.start(name, ports={name: old.port})

    def url(self, name: str) -> str:
        return self.procs[name].url

    def stop_all(self, timeout: float = 10) -> None:
        """SIGTERM every process at once, then wait for each (kill -9 after `timeout` s)."""
        procs = list(self.procs.values())
        for proc in procs:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
                    proc.popen.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill9()
        self.procs.clear()


def wait_ready(proc: Proc, timeout: float = 40, path: str = "/healthcheck") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(proc.url + path, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready after {timeout}s:\n{proc.log()[-3000:]}")


def base_env(write_url: str, read_url: str, coinbase_url: str, broker_url: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"BROKER_URL", "API_KEYS", "BTC_PRICE_URL", "FLUENTD_HOST"}
    }
    env.update(
        WRITE_DATABASE_URL=write_url,
        READ_DATABASE_URL=read_url,
        COINBASE_API_URL=coinbase_url,
        PRICE_MAX_AGE_S="2",
        PRICE_MIN_INTERVAL_S="0.2",
        PRICE_TIMEOUT_S="1",
        LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    if broker_url:
        env["BROKER_URL"] = broker_url
    return env


@contextlib.contextmanager
def running(env: dict[str, str], *names: str) -> Iterator[System]:
    system = System(env)
    try:
        system.start(*names)
        yield system
    finally:
        system.stop_all()


def tcp_queues(port: int) -> list[tuple[int, int, int, int]]:
    """The machine's TCP sockets with `port` at either end (Linux /proc/net/tcp{,6}), as
    (local port, remote port, bytes not yet acknowledged by the peer, bytes not yet read by the
    owner). For waits on "the peer has read what was sent", where a sleep would only guess."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)  # header
            for line in f:
                fields = line.split()
                local, remote = (int(a.rsplit(":", 1)[1], 16) for a in fields[1:3])
                tx, rx = (int(q, 16) for q in fields[4].split(":"))
                if port in (local, remote):
                    found.append((local, remote, tx, rx))
    return found
