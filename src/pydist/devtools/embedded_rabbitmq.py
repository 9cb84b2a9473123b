"""A private RabbitMQ node for `./run.sh`, so the default run has the real topology (relay →
RabbitMQ → read_model_sync) whenever the machine has `rabbitmq-server` installed.

It must never touch the machine's own RabbitMQ (``rabbit@localhost`` on 5672/25672, epmd on 4369,
its cookie in ``/var/lib/rabbitmq``, ``/etc/rabbitmq``), which other software may rely on. So all
the node reads or writes is under its data dir: its own ``HOME`` and 0600 ``.erlang.cookie``, env
file, config, empty plugin list, mnesia, logs, pid file. It registers with an epmd of its own on a
private port (one that erl started on 4369 by itself would outlive the node). The scripts come from
``PYDIST_RABBITMQ_BIN``, else ``/usr/lib/rabbitmq/bin`` or a versioned ``rabbitmq_server-*/sbin``,
else the PATH's (`find_scripts`), never the ``/usr/sbin`` wrappers: they switch to the ``rabbitmq``
user and its cookie.

Ports follow from the AMQP port P (default 5673) as RabbitMQ derives its own: distribution on
P + 20000, epmd on P + 10000. `NodeConfig`, `rabbitmq_conf`, `cli_env` and `server_env` do no I/O
(unit-tested); with `prepare` they also lay out the fault tests' 3-node cluster
(tests/support/private_services.py: ports of its own, one epmd and one HOME), which runs its
processes itself. `start` and `stop` find a node with a HOME of its own by its processes' command
lines (psutil). The node outlives `start` in its own session (like pgserver's PostgreSQL):
`./run.sh` stops it from its EXIT trap.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiormq
import psutil

NODE_NAME = "pydist-dev@localhost"
DEFAULT_AMQP_PORT = 5673  # next to the shared node's 5672, never on it
BOOT_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
NOT_INSTALLED_EXIT = 3  # `pydist dev rabbitmq-start`'s exit code when there is nothing to start


class NotInstalledError(RuntimeError):
    """No usable rabbitmq-server (or no epmd): run.sh falls back to the direct projection."""


class NodeError(RuntimeError):
    """The node could not be started or stopped; the message carries the cause and its log."""


@dataclass
class NodeConfig:
    """Where one private node keeps everything, and its ports (no I/O). The distribution and epmd
    ports follow from the AMQP port unless given (`dist`, `epmd`); a test cluster's nodes share one
    epmd and one HOME (the cookie they authenticate each other with), so those can be given too.
    What follows from the fields is worked out once, in `__post_init__` (so `dataclasses.replace`
    works it out again); nothing changes a config after that."""

    data_dir: Path
    amqp_port: int = DEFAULT_AMQP_PORT
    node_name: str = NODE_NAME
    dist: int | None = None
    epmd: int | None = None
    shared_home: Path | None = None

    def __post_init__(self) -> None:
        # A derived port must still be a port; below 1024 needs root and clashes with system services.
        highest = 65535 - max(20000 if self.dist is None else 0, 10000 if self.epmd is None else 0)
        if not 1024 <= self.amqp_port <= highest:
            raise ValueError(f"AMQP port {self.amqp_port} is outside 1024..{highest}")
        self.dist_port = self.dist or self.amqp_port + 20000
        self.epmd_port = self.epmd or self.amqp_port + 10000
        # guest is allowed from loopback only (RabbitMQ's default), which is all this node listens on.
        self.broker_url = f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"
        self.home = self.shared_home or self.data_dir / "home"
        self.cookie = self.home / ".erlang.cookie"  # Erlang reads the cookie from $HOME
        self.config_file = self.data_dir / "rabbitmq.conf"
        self.env_file = self.data_dir / "rabbitmq-env.conf"
        self.plugins_file = self.data_dir / "enabled_plugins"
        self.mnesia_base = self.data_dir / "mnesia"
        self.log_dir = self.data_dir / "log"
        self.console_log = self.log_dir / "console.log"
        self.pid_file = self.data_dir / "rabbit.pid"
        self.state_file = self.data_dir / "node.json"  # the ports and epmd pid `start` gave it


def rabbitmq_conf(cfg: NodeConfig) -> str:
    """The node's rabbitmq.conf: AMQP on loopback only, logs to a file in the data dir."""
    return (
        "# a private pydist node (pydist dev rabbitmq-start, or a test's cluster)\n"
        f"listeners.tcp.1 = 127.0.0.1:{cfg.amqp_port}\n"
        "loopback_users.guest = true\n"
        "log.console = false\n"
        "log.file.level = info\n"
    )


def cli_env(cfg: NodeConfig, base: Mapping[str, str]) -> dict[str, str]:
    """What a RabbitMQ script needs to reach the node: the caller's environment minus any
    RABBITMQ_*/ERL_* setting (an inherited RABBITMQ_NODENAME or ERL_EPMD_PORT would aim it at the
    shared node), plus the node's cookie (via HOME), its epmd, and nothing read from /etc."""
    env = {k: v for k, v in base.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update(
        HOME=str(cfg.home),
        ERL_EPMD_PORT=str(cfg.epmd_port),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_CONF_ENV_FILE=str(cfg.env_file),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(cfg.plugins_file),
    )
    return env


def server_env(cfg: NodeConfig, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of rabbitmq-server: `cli_env`'s, plus a path in the data dir for everything
    RabbitMQ would otherwise take from /etc or /var/lib/rabbitmq."""
    env = cli_env(cfg, base)
    env.update(
        RABBITMQ_NODENAME=cfg.node_name,
        RABBITMQ_USE_LONGNAME="false",
        RABBITMQ_CONFIG_FILE=str(cfg.config_file),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(cfg.data_dir / "advanced.config"),  # absent on purpose
        RABBITMQ_MNESIA_BASE=str(cfg.mnesia_base),
        RABBITMQ_LOG_BASE=str(cfg.log_dir),
        RABBITMQ_PID_FILE=str(cfg.pid_file),
        RABBITMQ_DIST_PORT=str(cfg.dist_port),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
    )
    return env


def prepare(cfg: NodeConfig) -> None:
    """The data dir, the private cookie (0600: Erlang refuses one others can read; kept if there
    is one, which the nodes sharing a HOME rely on), the config."""
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    cfg.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    cfg.log_dir.mkdir(exist_ok=True)
    if not cfg.cookie.exists():
        fd = os.open(cfg.cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from the start
        with os.fdopen(fd, "w") as cookie:
            cookie.write("PYDIST" + secrets.token_hex(16).upper())
    cfg.env_file.write_text("# private node: /etc/rabbitmq/rabbitmq-env.conf is not read\n")
    cfg.plugins_file.write_text("[].\n")
    cfg.config_file.write_text(rabbitmq_conf(cfg))


def find_scripts(
    environ: Mapping[str, str],
    which: Callable[[str], str | None] = shutil.which,
    system_dirs: Sequence[Path] | None = None,
) -> tuple[Path, str]:
    """RabbitMQ's own scripts dir (they run as the caller) and epmd; NotInstalledError if absent.

    ``PYDIST_RABBITMQ_BIN`` overrides the dir; else Debian's ``/usr/lib/rabbitmq/bin`` (or
    ``system_dirs``), then a ``rabbitmq-server`` on PATH, but never Debian's ``/usr/sbin`` wrapper
    (a link to rabbitmq-script-wrapper, which su's to the rabbitmq user and its cookie)."""
    override = environ.get("PYDIST_RABBITMQ_BIN")
    if override:
        candidates = [Path(override)]
    else:
        candidates = list(_system_script_dirs() if system_dirs is None else system_dirs)
        on_path = which("rabbitmq-server")
        if on_path and Path(on_path).resolve().name != "rabbitmq-script-wrapper":
            candidates.append(Path(on_path).resolve().parent)
    scripts = next((d for d in candidates if (d / "rabbitmq-server").exists()), None)
    if scripts is None:
        raise NotInstalledError(
            f"rabbitmq-server not installed (looked in {', '.join(map(str, candidates))})"
        )
    epmd = which("epmd") or next(iter(sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"))), None)
    if epmd is None:
        raise NotInstalledError("Erlang's epmd not found (it comes with erlang-base)")
    return scripts, epmd


def _system_script_dirs() -> list[Path]:
    """Debian's scripts dir, then any versioned one a rabbitmq-server package unpacked."""
    versioned = sorted(glob.glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"))
    return [Path("/usr/lib/rabbitmq/bin"), *map(Path, versioned)]


# ------------------------------------------------------------------------------------ processes


def start(data_dir: Path, amqp_port: int = DEFAULT_AMQP_PORT, timeout: float = BOOT_TIMEOUT_S) -> NodeConfig:
    """Start the node (or reuse the one already running from ``data_dir``) and return once it
    accepts AMQP connections, within ``timeout`` seconds; on failure nothing started is left."""
    cfg = NodeConfig(data_dir, amqp_port)
    scripts, epmd_exe = find_scripts(os.environ)
    deadline = time.monotonic() + timeout
    state = _read_state(cfg)
    if _beams_of(cfg):
        if (running_port := state.get("amqp_port")) != amqp_port:
            raise NodeError(
                f"the node in {data_dir} already runs on port {running_port}, not {amqp_port}: "
                f"stop it (pydist dev rabbitmq-stop --data-dir {data_dir}) or use that port"
            )
        _await_amqp(cfg, None, deadline)
        return cfg
    prepare(cfg)
    epmd = _own_epmd(state) if state.get("epmd_port") == cfg.epmd_port else None
    ports = (cfg.amqp_port, cfg.dist_port) + (() if epmd else (cfg.epmd_port,))
    if busy := [p for p in ports if port_in_use(p)]:
        raise NodeError(
            f"port(s) {', '.join(map(str, busy))} already in use: choose another AMQP port "
            "(PYDIST_RABBITMQ_PORT; distribution and epmd ports follow from it)"
        )
    started: list[subprocess.Popen[bytes]] = []
    try:
        if epmd is None:
            started.append(_detached(cfg, [epmd_exe, "-port", str(cfg.epmd_port), "-address", "127.0.0.1"]))
        epmd_pid = epmd.pid if epmd else started[0].pid
        state = dict(node=cfg.node_name, amqp_port=cfg.amqp_port, epmd_port=cfg.epmd_port, epmd_pid=epmd_pid)
        cfg.state_file.write_text(json.dumps(state) + "\n")
        with cfg.console_log.open("ab") as log:
            started.append(
                _detached(cfg, [str(scripts / "rabbitmq-server")], log, server_env(cfg, os.environ))
            )
        _await_amqp(cfg, started[-1], deadline)
    except BaseException:
        stop(data_dir)
        for p in started:  # whatever stop could not find yet, the script's subshell too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # each was started as its own session (_detached)
            p.wait()
        raise
    return cfg


def _detached(
    cfg: NodeConfig, argv: list[str], out: IO[bytes] | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A process in its own session, run from the data dir (where erl writes a crash dump): it
    outlives this command and is not hit by the terminal's Ctrl-C (run.sh stops it from its EXIT
    trap)."""
    return subprocess.Popen(
        argv,
        env=env,
        cwd=cfg.data_dir,
        stdin=subprocess.DEVNULL,
        stdout=out or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _await_amqp(cfg: NodeConfig, server: subprocess.Popen[bytes] | None, deadline: float) -> None:
    """Poll until an AMQP login as guest succeeds (the node has booted and seeded its users)."""
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)  # each refused attempt is expected here

    async def logs_in() -> bool:
        try:
            connection = await asyncio.wait_for(aiormq.connect(cfg.broker_url), timeout=5)
        except Exception:  # not listening yet, or mid-boot: aiormq raises a variety of things
            return False
        await connection.close()
        return True

    async def poll() -> None:  # one event loop for every attempt
        while True:
            if server is not None and server.poll() is not None:
                raise NodeError(
                    f"rabbitmq-server exited while booting (rc={server.returncode}):\n{node_logs(cfg)}"
                )
            if await logs_in():
                return
            if time.monotonic() >= deadline:
                raise NodeError(f"{cfg.node_name} did not accept AMQP connections in time:\n{node_logs(cfg)}")
            await asyncio.sleep(0.2)  # paces the polling only

    asyncio.run(poll())


def node_logs(cfg: NodeConfig, lines: int = 20) -> str:
    """The last `lines` of the node's console log and of its own log, for an error message."""
    out = []
    for path in (cfg.console_log, cfg.log_dir / f"{cfg.node_name}.log"):
        with contextlib.suppress(OSError):
            out.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(out)


def stop(data_dir: Path, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the node of ``data_dir``, even one still booting, and its epmd: SIGTERM (RabbitMQ's
    clean shutdown), SIGKILL what is left after ``timeout``. Data is kept. Returns whether anything
    was running."""
    cfg = NodeConfig(data_dir)  # the default port: the beams are found by HOME, the epmd by state
    beams = _beams_of(cfg)
    _end(beams, timeout)
    epmd = _own_epmd(_read_state(cfg))
    _end([epmd] if epmd else [], 10)
    cfg.state_file.unlink(missing_ok=True)
    return bool(beams) or epmd is not None


def _end(procs: list[psutil.Process], timeout: float) -> None:
    """SIGTERM, then SIGKILL whatever still runs after ``timeout``. A zombie counts as gone: a
    process that is not our child stays one until its parent reaps it (so no psutil.wait_procs)."""
    for signal_it, bound in ((psutil.Process.terminate, timeout), (psutil.Process.kill, 10.0)):
        for proc in procs:
            with contextlib.suppress(psutil.Error):  # gone meanwhile, or not ours to signal
                signal_it(proc)
        deadline = time.monotonic() + bound
        while any(_running(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)  # paces the polling of a condition, never a stand-in for one
        if not any(_running(p) for p in procs):
            return


def _read_state(cfg: NodeConfig) -> dict[str, object]:
    try:
        value = json.loads(cfg.state_file.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _own_epmd(state: Mapping[str, object]) -> psutil.Process | None:
    """The epmd `start` gave the node, if it still runs: the state file's pid, checked against its
    command line (a pid may be recycled) with the port that follows from the node's AMQP port (so
    never the machine's epmd on 4369, whatever a stale or edited state file says)."""
    pid, amqp_port = state.get("epmd_pid"), state.get("amqp_port")
    if not isinstance(pid, int) or not isinstance(amqp_port, int):
        return None
    port = amqp_port + 10000
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        if state.get("epmd_port") == port and _runs(proc, "epmd", "-port", str(port)):
            return proc
    return None


def _beams_of(cfg: NodeConfig) -> list[psutil.Process]:
    """Live Erlang VMs started with this node's private HOME (``-home <data dir>/home`` on erl's
    command line), booted or still booting: only this node's (`start` gives each node a HOME of
    its own), never a shell or an editor that happens to mention the data dir."""
    return [p for p in psutil.process_iter() if _runs(p, "beam.smp", "-home", str(cfg.home))]


def _runs(proc: psutil.Process, program: str, flag: str, value: str) -> bool:
    """Whether ``proc`` is a live ``program`` whose command line has ``flag value``."""
    try:
        cmd = proc.cmdline()
    except psutil.Error:  # gone meanwhile, or not ours to read
        return False
    ours = bool(cmd) and cmd[0].endswith(program) and (flag, value) in itertools.pairwise(cmd)
    return ours and _running(proc)


def _running(proc: psutil.Process) -> bool:
    """Alive and not a zombie (a child that exited and has not been reaped yet still has a pid)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def port_in_use(port: int) -> bool:
    """Whether a listener holds ``port`` on 127.0.0.1 (the node's ports must all be free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False
