"""pydist's real processes on the private engines of tests/support/private_services.py, for the
fault tests in tests/faults/test_real_engines.py.

The stack: btc_price, four create_buy_order processes (the load is spread over all four),
fetch_buy_orders, relay and read_model_sync, each its own OS process. The write model is a
database on one private PostgreSQL server, the read model a database on a second one (so either
can be crashed alone), and BROKER_URL lists the three nodes of the private RabbitMQ cluster.
Nothing is proxied or mocked: faults are done to the engines themselves.

The accounting (``books``) reads both databases directly and compares them with the client's own
record of every 200 it got (idempotency key and order id); it never asks pydist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from pydist.adapters.db import READ, WRITE, migrate
from pydist.adapters.rabbit import DEAD_LETTER_QUEUE, QUEUE, BrokerLink
from tests.support import db as testdb
from tests.support.faults import Attempt, stop_together, wait_converged
from tests.support.private_services import PrivatePostgres, RabbitCluster
from tests.support.procs import COMMANDS, PORT_FIELDS, READY_PATHS, Proc, base_env, free_port, wait_ready
from tests.support.services import Databases

CREATES = ("create1", "create2", "create3", "create4")
LABELS = ("price", *CREATES, "fetch", "relay", "sync")


def kind(label: str) -> str:
    """The pydist command of a process label: create3 -> create."""
    return label.rstrip("0123456789")


# ------------------------------------------------------------------------------------ databases


def private_databases(write_pg: PrivatePostgres, read_pg: PrivatePostgres, tag: str) -> Databases:
    """A migrated write model on `write_pg` and a migrated read model on `read_pg` (one after the
    other: Alembic's migration context is process-global)."""
    names = (f"pydist_{tag}_w", f"pydist_{tag}_r")
    write_url = write_pg.create_database(names[0])
    read_url = read_pg.create_database(names[1])
    migrate(WRITE, write_url)
    migrate(READ, read_url)
    return Databases(write_url, read_url, names)


async def rows(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    return await testdb.fetch(url, sql, *args)


async def scalar(url: str, sql: str, *args: Any) -> Any:
    return (await testdb.fetch(url, sql, *args))[0][0]


# ------------------------------------------------------------------------------------ the stack


@dataclass
class RealStack:
    cluster: RabbitCluster
    write_pg: PrivatePostgres
    read_pg: PrivatePostgres
    dbs: Databases
    env: dict[str, str]
    ports: dict[str, int]
    log_dir: Path
    procs: dict[str, Proc] = field(default_factory=dict)
    startup_s: float = 0.0

    # -- processes

    def url(self, label: str) -> str:
        return f"http://127.0.0.1:{self.ports[label]}"

    @property
    def create_urls(self) -> list[str]:
        return [self.url(label) for label in CREATES]

    def launch(self, *labels: str) -> None:
        """Start each process on its own port (the same one after a restart)."""
        for label in labels:
            env = {**self.env, PORT_FIELDS[kind(label)]: str(self.ports[label])}
            log_path = self.log_dir / f"{label}.log"
            with log_path.open("ab") as out:  # a restarted process appends to its old log
                out.write(f"=== {label} started {time.time():.3f}\n".encode())
                popen = subprocess.Popen(
                    [sys.executable, "-m", "pydist.entrypoints.cli", *COMMANDS[kind(label)]],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            self.procs[label] = Proc(label, self.ports[label], popen, log_path)

    def wait_ready(self, *labels: str, timeout: float = 300) -> None:
        """Ready within `timeout` s each (all 8 at once took 23-95 s here; a restart 4-31 s)."""
        for label in labels:
            wait_ready(self.procs[label], timeout=timeout, path=READY_PATHS.get(kind(label), "/readyz"))

    def start(self, *labels: str, timeout: float = 300) -> None:
        self.launch(*labels)
        self.wait_ready(*labels, timeout=timeout)

    def pids(self, *labels: str) -> dict[str, int]:
        return {label: self.procs[label].popen.pid for label in labels or self.procs}

    def healthy(self) -> None:
        """Between tests: whatever a test froze is resumed, whatever died is started again."""
        dead = []
        for label in LABELS:
            proc = self.procs.get(label)
            if proc is not None and proc.alive():
                proc.resume()
            else:
                dead.append(label)
        if dead:
            self.start(*dead)
        if not self.write_pg.running():
            self.write_pg.start()
        if not self.read_pg.running():
            self.read_pg.start()

    def dead(self) -> list[str]:
        return [label for label, proc in self.procs.items() if not proc.alive()]

    def stop(self) -> None:
        stop_together(list(self.procs.values()))
        self.procs.clear()

    def logs(self, tail: int = 3000) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path})\n{p.log()[-tail:]}" for p in self.procs.values())

    def events(self, label: str, event: str, since: float = 0.0) -> list[dict[str, Any]]:
        """The JSON log events named `event` that `label` wrote after wall-clock time `since`."""
        found = []
        for line in (self.log_dir / f"{label}.log").read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == event and _epoch(e.get("timestamp")) >= since:
                found.append(e)
        return found

    # -- broker

    def queue_messages(self, queue: str = QUEUE) -> int:
        """Messages in `queue`, ready and unacked (rabbitmqctl, through any running node)."""
        return int(self.cluster.queue_info(queue)["messages"])

    async def purge(self) -> None:
        """Empty the sync queue and its DLQ, through the first node that answers."""
        link = BrokerLink(self.cluster.amqp_urls(), name="test-purge")
        try:
            channel = await link.channel()
            await (await channel.declare_queue(QUEUE, passive=True)).purge()
            await (await channel.declare_queue(DEAD_LETTER_QUEUE, passive=True)).purge()
        finally:
            await link.close()

    # -- between tests

    async def settle_and_reset(self, timeout: float = 60) -> None:
        """Whatever the previous test left in flight arrives (bounded: a pipeline that does not
        settle fails here, loudly), every duplicate delivery drains out of the queue, then both
        models, the cap and the queues are emptied."""
        await wait_converged(self.dbs, timeout)
        deadline = time.monotonic() + timeout
        while await asyncio.to_thread(self.queue_messages) != 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"{QUEUE} not drained within {timeout}s")
            await asyncio.sleep(0.5)  # polling pace
        await testdb.reset(self.dbs.write_url, self.dbs.read_url)
        await self.purge()


def _epoch(timestamp: Any) -> float:
    if not isinstance(timestamp, str):
        return 0.0
    try:
        return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


@contextlib.contextmanager
def real_stack(
    cluster: RabbitCluster,
    write_pg: PrivatePostgres,
    read_pg: PrivatePostgres,
    coinbase_url: str,
    **env_overrides: str,
) -> Any:
    """Create the databases, start every process at once and wait for each to be ready."""
    dbs = private_databases(write_pg, read_pg, f"t{os.getpid()}_{uuid.uuid4().hex[:6]}")
    ports = {label: free_port() for label in LABELS}
    env = base_env(dbs.write_url, dbs.read_url, coinbase_url, cluster.broker_url())
    env.update(
        BTC_PRICE_URL=f"http://127.0.0.1:{ports['price']}",
        # 4 create processes x (pool + overflow) stay well inside max_connections = 100
        DB_POOL_SIZE="5",
        # The production default (base_env's 1 s is tighter): with 3 RabbitMQ nodes booting on the
        # 2 shared cores, a healthy btc_price once took over create's 1.5 s to answer
        # (TimeoutError -> a spurious 503 during the broker restart, load average ~10). Create's
        # call is bounded at PRICE_TIMEOUT_S + 0.5 = 2.5 s, inside the 5 s a 503 is due in.
        PRICE_TIMEOUT_S="2",
    )
    env.update(env_overrides)
    log_dir = Path(tempfile.mkdtemp(prefix="pydist-real-"))
    stack = RealStack(cluster, write_pg, read_pg, dbs, env, ports, log_dir)
    try:
        t0 = time.monotonic()
        stack.launch(*LABELS)
        stack.wait_ready(*LABELS)
        stack.startup_s = time.monotonic() - t0
        yield stack
    finally:
        stack.stop()
        if not os.environ.get("PYDIST_KEEP_LOGS"):
            shutil.rmtree(log_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------ the load


def no_answers(attempts: Sequence[Attempt]) -> list[dict[str, Any]]:
    """Every request that got no HTTP answer: what, where, when (load time) and why."""
    return [
        {
            "key": str(a.key),
            "url": a.url,
            "phase": a.phase,
            "started": round(a.started, 3),
            "elapsed": round(a.elapsed, 3),
            "error": a.error,
            "detail": a.detail,
        }
        for a in attempts
        if a.status is None
    ]


# ------------------------------------------------------------------------------------ the books


@dataclass
class Books:
    """Orders counted three ways: the client's record of its 200s, the write model, the read model."""

    sent: int
    accepted: int  # distinct idempotency keys answered 200
    write: int
    read: int
    lost_from_write: int  # a 200 whose order is not in the write model
    lost_from_read: int  # an order answered 200 or committed, missing from the read model
    lost: int  # orders answered 200 or committed that are not in both models
    duplicated: int  # more than one order (or read row) for one key, or one key answered two ids
    extra_in_read: int  # read rows with no order in the write model
    written_unacknowledged: int  # committed although the client never got its 200 (503 / no answer)
    examples: list[str] = field(default_factory=list)

    def clean(self) -> bool:
        return self.lost == self.duplicated == self.extra_in_read == 0

    def figures(self) -> dict[str, int]:
        d = asdict(self)
        d.pop("examples")
        return d


async def books(dbs: Databases, attempts: Sequence[Attempt]) -> Books:
    write = await rows(dbs.write_url, "SELECT id, idempotence_key FROM buy_orders")
    read = await rows(dbs.read_url, "SELECT id, idempotence_key FROM buy_orders")
    ok = [a for a in attempts if a.status == 200]
    client_ids: dict[uuid.UUID, set[uuid.UUID]] = {}
    for a in ok:
        client_ids.setdefault(a.key, set()).add(uuid.UUID(a.body["buy_order"]["id"]))
    accepted_ids = {i for ids in client_ids.values() for i in ids}
    write_ids = {r["id"] for r in write}
    read_ids = {r["id"] for r in read}
    write_keys = Counter(r["idempotence_key"] for r in write)
    read_keys = Counter(r["idempotence_key"] for r in read)
    read_id_counts = Counter(r["id"] for r in read)
    missing_write = accepted_ids - write_ids
    missing_read = (accepted_ids | write_ids) - read_ids
    not_in_both = (accepted_ids | write_ids) - (write_ids & read_ids)
    duplicated = (
        sum(len(ids) - 1 for ids in client_ids.values())
        + sum(n - 1 for n in write_keys.values())
        + sum(n - 1 for n in read_keys.values())
        + sum(n - 1 for n in read_id_counts.values())
    )
    extra = read_ids - write_ids
    unacknowledged = set(write_keys) - set(client_ids)
    examples = [f"lost from write: {i}" for i in list(missing_write)[:3]]
    examples += [f"lost from read: {i}" for i in list(missing_read)[:3]]
    examples += [f"extra in read: {i}" for i in list(extra)[:3]]
    return Books(
        sent=len(attempts),
        accepted=len(client_ids),
        write=len(write),
        read=len(read),
        lost_from_write=len(missing_write),
        lost_from_read=len(missing_read),
        lost=len(not_in_both),
        duplicated=duplicated,
        extra_in_read=len(extra),
        written_unacknowledged=len(unacknowledged),
        examples=examples,
    )


# ------------------------------------------------------------------------------------ reporting


def summary(test: str, b: Books, recover_s: float | None, **extra: Any) -> dict[str, Any]:
    """The one-line figures of a fault test: printed (through the terminal, whatever the capture
    mode) and appended as JSON to $PYDIST_FAULT_REPORT when it is set."""
    recovered = "n/a" if recover_s is None else f"{recover_s:.2f}s"
    line = (
        f"SUMMARY {test}: sent={b.sent} accepted={b.accepted} write_model={b.write} "
        f"read_model={b.read} lost={b.lost} duplicated={b.duplicated} recover={recovered}"
    )
    record = {"test": test, **b.figures(), "recover_s": recover_s, **extra}
    target = os.environ.get("PYDIST_FAULT_REPORT")
    if target:
        with Path(target).open("a") as out:
            out.write(json.dumps(record, default=str) + "\n")
    return {"line": line, "record": record}
