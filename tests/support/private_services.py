"""Private backing services for fault tests: a 3-node RabbitMQ cluster and a PostgreSQL server,
started by the tests themselves from the machine's installed binaries, on private ports, with
private data, logs, Erlang cookie and epmd, so a test may kill, crash and restart them freely.

Nothing here touches the machine's shared services (RabbitMQ ``rabbit@localhost`` on 5672 and its
cookie, PostgreSQL on 5432): the cluster's nodes share a ``HOME`` of their own holding their
``.erlang.cookie`` (the CLI uses it too), and every node has its own ``RABBITMQ_CONF_ENV_FILE`` (so
``/etc/rabbitmq/rabbitmq-env.conf`` is never read), ``RABBITMQ_CONFIG_FILE`` and an empty plugin
list, laid out by ``pydist.devtools.embedded_rabbitmq``; the CLI is called through
``/usr/lib/rabbitmq/bin`` (the ``/usr/sbin`` wrappers switch to the ``rabbitmq`` user and its
cookie). The nodes register with a private epmd on a private port, so their names never clash with
another session's.

Waiting is always for a condition, polled against a generous deadline (``wait_for``); nothing
sleeps to synchronise. Every process started here is tracked and ended by ``close()``, which is
also run at interpreter exit for anything a test left open.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from pydist.devtools import embedded_rabbitmq as rmq
from tests.support.procs import command_lines, free_port

T = TypeVar("T")

_live: set[Any] = set()  # open RabbitCluster / PrivatePostgres, closed at exit if a test did not
_TMP = Path("/tmp")  # world-traversable, so the postgres user reaches its dir (TMPDIR may not be)
_OWNER_FILE = "owner"  # "<pid> <start time>" of the process that created a service dir


@atexit.register
def _close_leftovers() -> None:
    for service in list(_live):
        with contextlib.suppress(Exception):
            service.close()


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM does not run atexit handlers: close what is open, then terminate as SIGTERM would."""
    _close_leftovers()
    previous = _previous_sigterm
    if callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


_previous_sigterm: Any = None
_sigterm_installed = False


def _register(service: Any) -> None:
    """Track an open service for the exit fallbacks, and name its owner in its dir for reap_stale."""
    global _previous_sigterm, _sigterm_installed
    _live.add(service)
    (service.base / _OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    if not _sigterm_installed and threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not signal.SIG_IGN:
            _previous_sigterm = previous
            signal.signal(signal.SIGTERM, _on_sigterm)
        _sigterm_installed = True


def _start_time(pid: int) -> float | None:
    """When ``pid`` started (epoch seconds): with the pid, names one process (a pid alone may be
    reused). psutil derives it from the boot time, which moves when the clock is stepped: compare
    with `_same_start`, never for equality."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _same_start(recorded: str, pid: int) -> bool:
    """Whether the owner file's start time is ``pid``'s. An owner file this code cannot read
    counts as live: killing another session's services is worse than leaving a stale dir."""
    try:
        expected = float(recorded)
    except ValueError:
        return True
    started = _start_time(pid)
    return started is not None and abs(started - expected) < 2.0


def reap_stale() -> list[Path]:
    """Remove the services that a killed test process (SIGKILL: no finally, no atexit) left
    behind: every ``/tmp/pydist-rmq-*`` / ``/tmp/pydist-pg-*`` dir whose owner process is gone
    has its processes killed and is deleted. Dirs of live sessions are left alone."""
    reaped = []
    for d in sorted(_TMP.glob("pydist-rmq-*")) + sorted(_TMP.glob("pydist-pg-*")):
        try:
            pid_text, start = (d / _OWNER_FILE).read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue  # not ours, or being created right now
        if _pid_alive(pid) and _same_start(start, pid):
            continue
        pids = set(processes_mentioning(str(d))) | set(processes_mentioning(d.name))
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            epmd_pid, epmd_port = (d / "epmd").read_text().split()
            if f" -port {epmd_port} " in f" {' '.join(psutil.Process(int(epmd_pid)).cmdline())} ":
                pids.add(int(epmd_pid))
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_for(
                lambda pids=pids: not any(_pid_alive(p) for p in pids),
                timeout=30,
                what=f"{d} processes gone",
            )
        shutil.rmtree(d, ignore_errors=True)
        reaped.append(d)
    return reaped


class MissingBinaryError(RuntimeError):
    """An installed binary the private services need is absent: the fault tests must fail."""


class ServiceError(RuntimeError):
    """A private service did not do what was asked (the message carries the command and its log)."""


def wait_for(condition: Callable[[], T], *, timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``condition`` until it returns a truthy value, and return it; TimeoutError after
    ``timeout`` seconds. The interval only paces the polling, it never stands in for a condition."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f}s")
        time.sleep(interval)


def _pid_alive(pid: int) -> bool:
    """Running, and not a zombie (an exited child not yet reaped keeps its pid)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _parent_pid(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def processes_in_group(pgid: int) -> list[int]:
    """Live pids in process group ``pgid`` (a service started with start_new_session=True)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(OSError):
            if os.getpgid(proc.pid) == pgid and _pid_alive(proc.pid):
                found.append(proc.pid)
    return found


def processes_mentioning(text: str) -> list[int]:
    """Live pids whose command line contains ``text`` (the leak check: our processes name our dir)."""
    return [
        pid
        for pid, cmdline in command_lines().items()
        if pid != os.getpid() and text in cmdline and _pid_alive(pid)
    ]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no {path})"


def _kill_group(popen: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGKILL a process group we started (with start_new_session) and reap its leader."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(timeout)


# --------------------------------------------------------------------------------------- RabbitMQ


def _rabbit_binaries() -> tuple[Path, str]:
    """The scripts that run as the calling user (not /usr/sbin's wrappers, which su to rabbitmq),
    with rabbitmqctl among them, and epmd."""
    try:
        scripts, epmd = rmq.find_scripts(os.environ)
    except rmq.NotInstalledError as exc:
        raise MissingBinaryError(
            f"{exc}; the fault tests need the machine's RabbitMQ binaries (apt-get install "
            "rabbitmq-server, or PYDIST_RABBITMQ_BIN=<dir with rabbitmq-server and rabbitmqctl>)"
        ) from None
    if not (scripts / "rabbitmqctl").exists():
        raise MissingBinaryError(f"no rabbitmqctl next to {scripts / 'rabbitmq-server'}")
    return scripts, epmd


@dataclass
class RabbitNode:
    index: int
    cfg: rmq.NodeConfig
    """Its directory and ports, laid out as `pydist dev rabbitmq-start` lays out its node."""
    popen: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:  # e.g. pydist-rmq1@localhost
        return self.cfg.node_name

    @property
    def amqp_port(self) -> int:
        return self.cfg.amqp_port

    @property
    def amqp_url(self) -> str:
        return self.cfg.broker_url

    @property
    def short_name(self) -> str:
        return self.name.split("@", 1)[0]

    def process_alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass(eq=False)  # identity: hashable, kept in _live
class RabbitCluster:
    """A private 3-node RabbitMQ cluster. Nodes are named ``pydist-rmq<i>@localhost``."""

    size: int = 3
    boot_timeout: float = 120.0
    base: Path = field(init=False)
    nodes: list[RabbitNode] = field(init=False)
    epmd_port: int = field(init=False)
    startup_seconds: float | None = field(init=False, default=None)
    timings: dict[str, list[float]] = field(init=False, default_factory=dict)
    _epmd: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _scripts: Path = field(init=False)
    _last_stopped: list[str] = field(init=False, default_factory=list)
    _groups: set[int] = field(init=False, default_factory=set)  # process groups of our nodes
    _closed: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._scripts, self._epmd_exe = _rabbit_binaries()
        reap_stale()
        self.nodes = []
        self.base = Path(tempfile.mkdtemp(prefix="pydist-rmq-", dir=_TMP))
        _register(self)
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> None:
        self.epmd_port = free_port()
        for i in range(1, self.size + 1):
            cfg = rmq.NodeConfig(
                self.base / f"n{i}",
                free_port(),
                f"pydist-rmq{i}@localhost",
                dist=free_port(),
                epmd=self.epmd_port,
                shared_home=self.base / "home",  # one cookie for the nodes and the CLI
            )
            rmq.prepare(cfg)
            self.nodes.append(RabbitNode(i, cfg))

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def create(cls, size: int = 3) -> RabbitCluster:
        """Start the cluster: node 1; then nodes 2 and 3 (booting together), each joined to node 1
        by ``stop_app; join_cluster node1; start_app``. ``startup_seconds`` is the whole of it."""
        cluster = cls(size)
        try:
            cluster.boot()
        except BaseException:
            cluster.close()
            raise
        return cluster

    def boot(self) -> None:
        t0 = time.monotonic()
        self._start_epmd()
        first, others = self.nodes[0], self.nodes[1:]
        self._spawn(first)
        self._await_booted([first])
        self._record("boot_first_node", time.monotonic() - t0)
        for node in others:
            self._spawn(node)
        self._await_booted(others)
        self._record("boot_all_nodes", time.monotonic() - t0)
        for node in others:  # joins one at a time: concurrent schema changes are asking for trouble
            t1 = time.monotonic()
            self.ctl(node.name, "stop_app")
            self.ctl(node.name, "join_cluster", first.name)
            self.ctl(node.name, "start_app")
            self._record("join_node", time.monotonic() - t1)
        self.wait_running(self.names)
        self.startup_seconds = time.monotonic() - t0
        self._record("cluster_startup", self.startup_seconds)

    def _start_epmd(self) -> None:
        self._epmd = subprocess.Popen(
            [self._epmd_exe, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        (self.base / "epmd").write_text(f"{self._epmd.pid} {self.epmd_port}\n")
        wait_for(self._epmd_names, timeout=30, what=f"private epmd on port {self.epmd_port}")

    def _epmd_names(self) -> str | None:
        """epmd's registry (None while epmd is not answering). Cheap: no Erlang VM started."""
        if self._epmd is None or self._epmd.poll() is not None:
            raise ServiceError(f"private epmd on port {self.epmd_port} is not running")
        out = subprocess.run(
            [self._epmd_exe, "-port", str(self.epmd_port), "-names"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout if out.returncode == 0 else None

    def _spawn(self, node: RabbitNode) -> None:
        if node.process_alive():
            raise ServiceError(f"{node.name} is already running")
        node.cfg.pid_file.unlink(missing_ok=True)
        with open(node.cfg.console_log, "ab") as log:
            node.popen = subprocess.Popen(
                [str(self._scripts / "rabbitmq-server")],
                env=rmq.server_env(node.cfg, os.environ),
                cwd=node.cfg.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: close() can end all of it
            )
        self._groups.add(node.popen.pid)

    def _await_booted(self, nodes: Sequence[RabbitNode], timeout: float | None = None) -> None:
        """Each node's process is up, registered with epmd, and RabbitMQ has finished booting."""
        timeout = self.boot_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for node in nodes:

            def registered(node: RabbitNode = node) -> bool:
                if not node.process_alive():
                    raise ServiceError(
                        f"{node.name} exited while booting (rc={node.popen and node.popen.poll()}):\n"
                        f"{rmq.node_logs(node.cfg, 30)}"
                    )
                names = self._epmd_names() or ""
                return f"name {node.short_name} at port" in names

            wait_for(registered, timeout=max(1.0, deadline - time.monotonic()), what=f"{node.name} up")
            remaining = max(1, int(deadline - time.monotonic()))
            # await_startup blocks until the boot is complete (tables synced with the cluster).
            self.ctl(node.name, "await_startup", "--timeout", str(remaining), timeout=remaining + 30)

    def start(self, node: str) -> None:
        """Start a stopped or killed node again; its data dir is kept, so it rejoins the cluster."""
        t0 = time.monotonic()
        n = self.node(node)
        self._spawn(n)
        self._await_booted([n])
        self._record("node_start", time.monotonic() - t0)

    def stop(self, node: str) -> None:
        """Graceful stop (``rabbitmqctl stop``), waiting until the node's processes are gone."""
        t0 = time.monotonic()
        n = self.node(node)
        if not n.process_alive():
            raise ServiceError(f"{n.name} is not running")
        self.ctl(n.name, "stop", timeout=120)
        assert n.popen is not None
        try:
            n.popen.wait(120)
        except subprocess.TimeoutExpired as exc:
            _kill_group(n.popen)
            raise ServiceError(f"{n.name} did not exit within 120s of rabbitmqctl stop") from exc
        self._reap_group(n)
        self._last_stopped = [name for name in self._last_stopped if name != n.name] + [n.name]
        self._record("node_stop", time.monotonic() - t0)

    def kill(self, node: str) -> int:
        """``kill -9`` of the node's beam process (a crash: no shutdown, no goodbye to its peers).
        Returns the killed OS pid."""
        t0 = time.monotonic()
        n = self.node(node)
        pid = self.beam_pid(n.name)
        os.kill(pid, signal.SIGKILL)
        assert n.popen is not None
        try:
            n.popen.wait(60)  # the rabbitmq-server shell exits once its beam is gone
        except subprocess.TimeoutExpired as exc:
            _kill_group(n.popen)
            raise ServiceError(f"{n.name}'s rabbitmq-server script outlived its killed beam") from exc
        self._reap_group(n)
        wait_for(lambda: not _pid_alive(pid), timeout=30, what=f"killed beam {pid} gone")
        self._record("node_kill", time.monotonic() - t0)
        return pid

    def _reap_group(self, n: RabbitNode) -> None:
        """Helpers left in the node's process group (erl_child_setup, inet_gethost) go too."""
        if n.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(n.popen.pid, signal.SIGKILL)

    def beam_pid(self, node: str) -> int:
        """The OS pid of the node's beam.smp, from its pid file, checked to be our own child."""
        n = self.node(node)
        if not n.process_alive():
            raise ServiceError(f"{n.name} is not running")
        assert n.popen is not None
        pid = int(wait_for(lambda: _read(n.cfg.pid_file), timeout=60, what=f"{n.cfg.pid_file} written"))
        if not _pid_alive(pid) or _parent_pid(pid) != n.popen.pid:
            raise ServiceError(f"pid {pid} in {n.cfg.pid_file} is not {n.name}'s beam (our child)")
        return pid

    def stop_all(self) -> None:
        """Stop the whole broker gracefully, node after node (the order is remembered: the last
        one stopped holds the freshest cluster metadata)."""
        for n in reversed(self.nodes):
            if n.process_alive():
                self.stop(n.name)

    def start_all(self) -> None:
        """Start every stopped node. A node restarted after the whole cluster went down waits for
        the peer that stopped last; so the last-stopped node is spawned first and the rest at once
        after it, well inside RabbitMQ's table-wait window, and then all are awaited together."""
        t0 = time.monotonic()
        down = [n for n in self.nodes if not n.process_alive()]
        order = {name: i for i, name in enumerate(reversed(self._last_stopped))}
        down.sort(key=lambda n: order.get(n.name, len(order)))
        for n in down:
            self._spawn(n)
        self._await_booted(down)
        self.wait_running(self.names)
        self._record("cluster_restart", time.monotonic() - t0)

    def close(self) -> None:
        """Stop every node (SIGTERM: RabbitMQ's graceful stop; SIGKILL after 30s), end epmd, and
        remove the temp dir. Safe to call twice; also run at exit."""
        if self._closed:
            return
        self._closed = True
        try:
            alive = [n for n in self.nodes if n.process_alive()]
            for n in alive:
                assert n.popen is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(n.popen.pid, signal.SIGTERM)  # the script's trap stops the node
            deadline = time.monotonic() + 30
            for n in alive:
                assert n.popen is not None
                with contextlib.suppress(subprocess.TimeoutExpired):
                    n.popen.wait(max(0.1, deadline - time.monotonic()))
                _kill_group(n.popen)
            if self._epmd is not None:
                _kill_group(self._epmd)
            # Anything still naming our dir or in one of our groups is ended too.
            for pid in self.leaked_processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            wait_for(
                lambda: not self.leaked_processes(),
                timeout=30,
                what=f"every process of {self.base} gone",
            )
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            _live.discard(self)

    def leaked_processes(self) -> list[int]:
        """Pids still alive that this cluster started (empty after close())."""
        pids = set(processes_mentioning(str(self.base)))
        for pgid in self._groups:
            pids.update(processes_in_group(pgid))
        if self._epmd is not None:
            pids.update(processes_in_group(self._epmd.pid))
        return sorted(pids)

    # ---------------------------------------------------------------- queries

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, node: str | int | RabbitNode) -> RabbitNode:
        if isinstance(node, RabbitNode):
            return node
        for n in self.nodes:
            if node in (n.name, n.short_name, n.index):
                return n
        raise KeyError(f"no node {node!r} in {self.names}")

    def amqp_urls(self) -> list[str]:
        return [n.amqp_url for n in self.nodes]

    def amqp_url(self, node: str) -> str:
        return self.node(node).amqp_url

    def broker_url(self) -> str:
        """Every node's URL, comma-separated (the form a multi-host BROKER_URL takes)."""
        return ",".join(self.amqp_urls())

    def running(self) -> list[str]:
        """Nodes whose process is alive (as this object knows it, without asking RabbitMQ)."""
        return [n.name for n in self.nodes if n.process_alive()]

    def ctl(self, node: str, *args: str, timeout: float = 90, tool: str = "rabbitmqctl") -> str:
        """Run a RabbitMQ CLI command against ``node`` with the private cookie; its stdout."""
        cmd = [str(self._scripts / tool), "-q", "-n", self.node(node).name, *args]
        try:
            out = subprocess.run(
                cmd,
                env=rmq.cli_env(self.nodes[0].cfg, os.environ),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"{' '.join(cmd)} timed out after {timeout}s") from exc
        if out.returncode != 0:
            raise ServiceError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def _query_node(self, via: str | None) -> str:
        if via is not None:
            return self.node(via).name
        running = self.running()
        if not running:
            raise ServiceError("no node of the cluster is running")
        return running[0]

    def cluster_status(self, via: str | None = None) -> dict[str, Any]:
        return dict(json.loads(self.ctl(self._query_node(via), "cluster_status", "--formatter", "json")))

    def running_nodes(self, via: str | None = None) -> set[str]:
        return set(self.cluster_status(via)["running_nodes"])

    def wait_running(self, nodes: Iterable[str], timeout: float | None = None) -> None:
        """Bounded wait until every one of ``nodes`` is booted and seen running by the cluster."""
        timeout = self.boot_timeout if timeout is None else timeout
        wanted = {self.node(n).name for n in nodes}
        deadline = time.monotonic() + timeout
        self._await_booted([self.node(n) for n in wanted], timeout)

        def all_running() -> bool:
            try:
                return wanted <= self.running_nodes(via=sorted(wanted)[0])
            except ServiceError:
                return False

        wait_for(
            all_running,
            timeout=max(1.0, deadline - time.monotonic()),
            what=f"{sorted(wanted)} running in the cluster",
        )

    def queues(self, vhost: str = "/", via: str | None = None) -> list[dict[str, Any]]:
        out = self.ctl(
            self._query_node(via),
            "list_queues",
            "-p",
            vhost,
            "name",
            "type",
            "leader",
            "members",
            "online",
            "messages",
            "--formatter",
            "json",
        )
        return list(json.loads(out))

    def queue_info(self, queue: str, vhost: str = "/", via: str | None = None) -> dict[str, Any]:
        for q in self.queues(vhost, via):
            if q["name"] == queue:
                return q
        raise ServiceError(f"no queue {queue!r} in vhost {vhost!r}")

    def quorum_leader(self, queue: str, vhost: str = "/", via: str | None = None) -> str | None:
        """The node leading quorum queue ``queue`` (None while it has no leader)."""
        info = self.queue_info(queue, vhost, via)
        if info.get("type") != "quorum":
            raise ServiceError(f"{queue!r} is a {info.get('type')} queue, not a quorum queue")
        leader = info.get("leader")
        return leader if isinstance(leader, str) and "@" in leader else None

    def _record(self, what: str, seconds: float) -> None:
        self.timings.setdefault(what, []).append(round(seconds, 3))


def _read(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text if text.isdigit() else None


# ------------------------------------------------------------------------------------- PostgreSQL


def _pg_bindir() -> Path:
    override = os.environ.get("PYDIST_PG_BIN")
    pattern = override or "/usr/lib/postgresql/*/bin"
    dirs = sorted(
        (Path(p) for p in glob.glob(pattern) if (Path(p) / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not dirs:
        raise MissingBinaryError(
            f"PostgreSQL server binaries not found: no initdb in {pattern} "
            "(apt-get install postgresql, or PYDIST_PG_BIN=<dir with initdb, pg_ctl, psql>)"
        )
    return dirs[-1]


class PrivatePostgres:
    """A private PostgreSQL server: its own data dir (initdb), 127.0.0.1 on a free port, its unix
    socket inside its temp dir, trust auth, fsync on. As root, the server runs as ``postgres``."""

    def __init__(self, port: int | None = None) -> None:
        self.bindir = _pg_bindir()
        self.port = port or free_port()
        reap_stale()
        self.base = Path(tempfile.mkdtemp(prefix="pydist-pg-", dir=_TMP))
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.log = self.base / "postgres.log"
        self.timings: dict[str, list[float]] = {}
        self.startup_seconds: float | None = None
        self._as_user: list[str] = []
        self._closed = False
        _register(self)
        try:
            if os.geteuid() == 0:
                self._as_user = self._switch_user_prefix()
                shutil.chown(self.base, "postgres", "postgres")
            self.sock.mkdir()
            if self._as_user:
                shutil.chown(self.sock, "postgres", "postgres")
            t0 = time.monotonic()
            self._run(
                "initdb",
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-instructions",
            )
            self._record("initdb", time.monotonic() - t0)
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(
                    "\n# pydist private server\n"
                    f"port = {self.port}\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"unix_socket_directories = '{self.sock}'\n"
                    # in every server process's title, so a leak check finds all of them
                    f"cluster_name = '{self.base.name}'\n"
                    "fsync = on\n"
                    "synchronous_commit = on\n"
                    "full_page_writes = on\n"
                    "max_connections = 100\n"
                    "shared_buffers = 64MB\n"
                )
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(cls) -> PrivatePostgres:
        pg = cls()
        try:
            t0 = time.monotonic()
            pg.start()
            pg.startup_seconds = time.monotonic() - t0 + pg.timings["initdb"][0]
        except BaseException:
            pg.close()
            raise
        return pg

    @staticmethod
    def _switch_user_prefix() -> list[str]:
        if shutil.which("runuser"):
            return ["runuser", "-u", "postgres", "--"]
        if shutil.which("setpriv"):
            return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
        raise MissingBinaryError("running as root needs runuser or setpriv to run PostgreSQL as postgres")

    def _run(self, exe: str, *args: str, timeout: float = 120) -> str:
        cmd = [*self._as_user, str(self.bindir / exe), *args]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ServiceError(f"{' '.join(cmd)} timed out after {timeout}s\n{_tail(self.log)}") from exc
        if out.returncode != 0:
            raise ServiceError(
                f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}\n{_tail(self.log)}"
            )
        return out.stdout

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE through psql (usable from sync or async code alike); its URL."""
        ident = '"' + name.replace('"', '""') + '"'
        self._run(
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            f"CREATE DATABASE {ident}",
            timeout=60,
        )
        return self.url(name)

    def postmaster_pid(self) -> int | None:
        try:
            first = (self.data / "postmaster.pid").read_text().splitlines()[0]
        except (FileNotFoundError, IndexError):
            return None
        pid = int(first)
        return pid if _pid_alive(pid) else None

    def running(self) -> bool:
        return self.postmaster_pid() is not None

    def start(self) -> None:
        t0 = time.monotonic()
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "90", "start", timeout=120)
        self._record("start", time.monotonic() - t0)

    def stop(self) -> None:
        """Clean shutdown (``-m fast``: a checkpoint, nothing to recover at the next start)."""
        self._stop("fast")

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: every server process quits at once, without a checkpoint;
        the next start replays the WAL (crash recovery)."""
        self._stop("immediate")

    def _stop(self, mode: str) -> None:
        t0 = time.monotonic()
        pid = self.postmaster_pid()
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "90", "stop", timeout=120)
        if pid is not None:
            wait_for(lambda: not _pid_alive(pid), timeout=30, what=f"postmaster {pid} gone")
        wait_for(lambda: not self.leaked_processes(), timeout=30, what="postgres processes gone")
        self._record(f"stop_{mode}", time.monotonic() - t0)

    def close(self) -> None:
        """Stop the server if it runs (immediately: the data is thrown away) and remove the dir."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.running():
                with contextlib.suppress(ServiceError, OSError):
                    self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
            pid = self.postmaster_pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            # Backends notice a dead postmaster and exit; anything left is ended.
            for p in self.leaked_processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            wait_for(lambda: not self.leaked_processes(), timeout=30, what=f"processes of {self.base} gone")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            _live.discard(self)

    def leaked_processes(self) -> list[int]:
        """Live server processes of this instance: the postmaster names the data dir, and every
        child carries the cluster_name (the temp dir's name) in its process title."""
        return sorted(set(processes_mentioning(str(self.base))) | set(processes_mentioning(self.base.name)))

    def _record(self, what: str, seconds: float) -> None:
        self.timings.setdefault(what, []).append(round(seconds, 3))
