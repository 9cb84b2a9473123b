"""`pydist`: every process, admin task and a small client, in one command (typer)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import aclosing
from dataclasses import asdict
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from pydist.config import Settings, get_settings

if TYPE_CHECKING:
    import httpx

    from pydist.bootstrap import AdminGraph

# httpx, tenacity, rich.progress and rich.table are imported by the commands that use them: every
# process (`pydist serve …`) and admin command starts through this module, so what it imports at
# the top is paid by all of them.

app = typer.Typer(help="pydist: BTC buy orders, idempotent and race-free.", no_args_is_help=True)


def _group(name: str, help_text: str) -> typer.Typer:
    """A sub-command group of `pydist` (listed in --help in the order made here)."""
    group = typer.Typer(help=help_text, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


serve_app = _group("serve", "Run one HTTP process.")
dlq_app = _group("dlq", "The dead-letter queue of read_model_sync.")
broker_app = _group("broker", "Admin tasks on RabbitMQ.")
read_model_app = _group("read-model", "Admin tasks on the read model.")
orders_app = _group("orders", "A client for the two APIs.")
dev_app = _group("dev", "Development helpers used by ./run.sh.")
console = Console()
T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output")]
DataDir = Annotated[Path, typer.Option(resolve_path=True)]


class Service(StrEnum):
    create = "create"
    fetch = "fetch"
    price = "price"


@serve_app.callback(invoke_without_command=True)
def serve(
    service: Annotated[Service, typer.Argument(help="create (:8777), fetch (:8778) or price")],
    workers: Annotated[int | None, typer.Option(help="Worker processes (WEB_CONCURRENCY)")] = None,
) -> None:
    from pydist.entrypoints.serve import serve as run

    run(service.value, workers=workers)


@app.command()
def relay() -> None:
    """Publish outbox events to RabbitMQ (or straight to the read model without BROKER_URL)."""
    from pydist.entrypoints.serve import serve as run

    run("relay")


@app.command()
def sync() -> None:
    """read_model_sync: consume events from RabbitMQ into the read model."""
    from pydist.entrypoints.serve import serve as run

    run("sync")


@app.command()
def migrate() -> None:
    """Run the Alembic migrations of both databases (safe to run concurrently and repeatedly)."""
    from pydist.adapters.db import READ, WRITE
    from pydist.adapters.db import migrate as run_migrations
    from pydist.logs import configure_logging

    settings = get_settings()
    configure_logging("migration", settings)
    run_migrations(WRITE, settings.write_database_url.get_secret_value())
    run_migrations(READ, settings.read_database_url.get_secret_value())
    console.print("[green]migrations applied[/green] (write and read models at head)")


def _run_admin(coro: Coroutine[Any, Any, T], *, broker: bool = False) -> T:
    """Run an admin task; a database (or, for a task that needs the `broker` too, a broker) that
    cannot be reached is one clear line naming it, and exit 2, not a page of traceback. The
    database adapter raises every failure to reach Postgres as a StoreUnavailableError, so
    whatever else is transient (an OSError among them) is the broker's."""
    from pydist.service.ports import StoreUnavailableError

    broker_errors: tuple[type[BaseException], ...] = ()
    if broker:
        from pydist.adapters.rabbit import TRANSIENT as broker_errors
    try:
        return asyncio.run(coro)
    except StoreUnavailableError as exc:  # its text already says "database unavailable: <cause>"
        console.print(f"[red]database unavailable[/red]: {str(exc).removeprefix('database unavailable: ')}")
        raise typer.Exit(2) from None
    except broker_errors as exc:
        console.print(f"[red]broker unavailable[/red]: {type(exc).__name__}: {exc}")
        raise typer.Exit(2) from None


async def _with_admin(use: Callable[[AdminGraph], Awaitable[T]]) -> T:
    """`use` the admin graph of both models (small pools, closed after)."""
    from pydist import bootstrap

    async with aclosing(bootstrap.admin(get_settings())) as graph:
        return await use(graph)


@read_model_app.command("check")
def read_model_check(as_json: JsonOpt = False) -> None:
    """Report orders missing from, or different in, the read model. Exit 1 if any."""
    from pydist.service.read_model_admin import check

    report = _run_admin(_with_admin(lambda graph: check(graph.orders, graph.read_model)))
    summary = {
        "write_orders": report.write_count,
        "read_orders": report.read_count,
        "missing": [str(i) for i in report.missing],
        "different": [str(i) for i in report.different],
        "extra": [str(i) for i in report.extra],
        "clean": report.clean,
    }
    if as_json:
        print(json.dumps(summary))
    else:
        colour = "green" if report.clean else "red"
        console.print(
            f"[{colour}]write {report.write_count}, read {report.read_count}: "
            f"{len(report.missing)} missing, {len(report.different)} different, "
            f"{len(report.extra)} extra[/{colour}]"
        )
    raise typer.Exit(0 if report.clean else 1)


@read_model_app.command("rebuild")
def read_model_rebuild() -> None:
    """Rebuild the read model from the write model (the source of truth), while the system runs."""
    from rich.progress import Progress

    from pydist.service.read_model_admin import rebuild

    async def run(graph: AdminGraph) -> int:
        total = await graph.orders.count()
        with Progress(console=console, transient=False) as progress:
            task = progress.add_task("rebuilding read model", total=total)
            return await rebuild(graph.orders, graph.read_model, lambda n: progress.advance(task, n))

    walked = _run_admin(_with_admin(run))
    console.print(f"[green]read model rebuilt[/green] from {walked} orders")


def _broker_url() -> str:
    url = get_settings().broker_url
    if url is None:
        console.print("[red]BROKER_URL is not set[/red] (without a broker there is no queue)")
        raise typer.Exit(2)
    return url.get_secret_value()


@dlq_app.command("list")
def dlq_list(
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option(help="Most messages to show")] = 1000,
) -> None:
    """What the DLQ holds and why (changes nothing)."""
    from pydist.adapters.dlq import list_dead_letters

    letters = _run_admin(list_dead_letters(_broker_url(), limit=limit), broker=True)
    if as_json:
        print(json.dumps([asdict(letter) for letter in letters]))
        return
    from rich.table import Table

    table = Table("message id", "type", "reason", "from message", "index", "events")
    for letter in letters:
        index = None if letter.event_index is None else str(letter.event_index)  # None: a blank cell
        events = str(len(letter.event_ids))
        table.add_row(letter.message_id, letter.type, letter.reason, letter.source_message_id, index, events)
    console.print(table)
    console.print(f"{len(letters)} dead-lettered message(s)")


@dlq_app.command("replay")
def dlq_replay(as_json: JsonOpt = False) -> None:
    """Project the DLQ's events into the read model (idempotent); what still fails stays. Exit 1
    if anything stayed."""
    from pydist.adapters.dlq import replay
    from pydist.adapters.projection import ProjectionStore

    broker_url = _broker_url()
    report = _run_admin(
        _with_admin(lambda graph: replay(broker_url, ProjectionStore(graph.read_model.db).publish)),
        broker=True,
    )
    if as_json:
        print(json.dumps(asdict(report)))  # replayed_messages, replayed_events, kept
    else:
        console.print(
            f"replayed {report.replayed_events} event(s) from {report.replayed_messages} message(s); "
            f"{len(report.kept)} message(s) kept"
        )
        for letter in report.kept:
            console.print(f"  kept {letter.message_id}: {letter.reason}")
    raise typer.Exit(1 if report.kept else 0)


@broker_app.command("migrate-queues")
def broker_migrate_queues() -> None:
    """Move the sync queue and the DLQ from classic to quorum queues, nothing lost (stop
    read_model_sync first; safe to run again)."""
    from pydist.adapters.queue_migration import migrate_queues

    moved = _run_admin(migrate_queues(_broker_url()), broker=True)
    for name, count in moved.items():
        console.print(f"{name}: quorum queue, {count} message(s) moved")


@app.command()
def cap(as_json: JsonOpt = False) -> None:
    """BTC used and still available under the cap (domain.money.BTC_CAP)."""
    from pydist.adapters.write_store import WriteStore

    status = _run_admin(_with_admin(lambda graph: WriteStore(graph.orders.db).status()))
    data = {
        "limit_btc": f"{status.limit_btc:f}",
        "used_btc": f"{status.used_btc:f}",
        "available_btc": f"{status.available_btc:f}",
    }
    if as_json:
        print(json.dumps(data))
    else:
        console.print(
            f"used [bold]{data['used_btc']}[/bold] of {data['limit_btc']} BTC; "
            f"available [bold]{data['available_btc']}[/bold] BTC"
        )


def _auth(settings: Settings) -> dict[str, str]:
    """The client's Authorization header: the first of API_KEYS, if any are set."""
    return {"Authorization": f"Bearer {sorted(settings.api_key_set)[0]}"} if settings.api_key_set else {}


def _client(url: str | None, port: int) -> httpx.Client:
    """A client of one API: at `url`, else on this host at `port`; it sends the API key, if any."""
    import httpx

    return httpx.Client(base_url=url or f"http://127.0.0.1:{port}", timeout=10, headers=_auth(get_settings()))


class _Retryable(Exception):
    """A 503: the service cannot take the order now, another attempt may."""


@orders_app.command("create")
def orders_create(
    currency: Annotated[str, typer.Option(help="EUR, GBP or USD")],
    amount: Annotated[str, typer.Option(help="Fiat amount, e.g. 10 or 123.45")],
    key: Annotated[str | None, typer.Option(help="Idempotency key (default: a new UUID)")] = None,
    url: Annotated[str | None, typer.Option(help="create service base URL")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Place an order. Retries safely (same idempotency key) on 503 and connection errors."""
    import httpx
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

    settings = get_settings()
    idem = key or str(uuid.uuid4())
    order_in = {"currency": currency, "amount": amount, "idempotence_key": idem}
    if not as_json:
        console.print(f"idempotency key: [bold]{idem}[/bold]")
    retried = (httpx.TransportError, _Retryable)
    try:
        with _client(url, settings.create_buy_order_port) as client:
            for attempt in Retrying(
                stop=stop_after_attempt(5),
                wait=wait_exponential(multiplier=0.2, max=3),
                retry=retry_if_exception_type(retried),
                reraise=True,
            ):
                with attempt:
                    response = client.put("/buy_order", json=order_in, headers={"Idempotency-Key": idem})
                    if response.status_code == 503:
                        raise _Retryable()
    except retried as exc:
        console.print(f"[red]gave up after retries: {type(exc).__name__}[/red]")
        raise typer.Exit(2) from None
    body = response.json()
    if as_json:
        print(json.dumps({"status": response.status_code, **body}))
    elif response.status_code == 200:
        order = body["buy_order"]
        replay = " (replayed)" if response.headers.get("Idempotent-Replayed") else ""
        console.print(
            f"[green]order {order['id']}{replay}[/green]: {order['currency_amount']} "
            f"{order['currency']} at {order['btc_rate']} = [bold]{order['btc_amount']} BTC[/bold]"
        )
    else:
        console.print(f"[red]{response.status_code} {body.get('title')}[/red]: {body.get('detail')}")
    raise typer.Exit(0 if response.status_code == 200 else 1)


@orders_app.command("list")
def orders_list(
    page_size: Annotated[int, typer.Option(min=1, max=100)] = 10,
    last_reference: str | None = None,
    all_pages: Annotated[bool, typer.Option("--all", help="Walk every page")] = False,
    url: Annotated[str | None, typer.Option(help="fetch service base URL")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List orders newest first (one page, or --all)."""
    from rich.table import Table

    rows: list[dict[str, str]] = []
    ref = last_reference
    with _client(url, get_settings().fetch_buy_orders_port) as client:
        while True:
            params: dict[str, Any] = {"page_size": page_size}
            if ref:
                params["last_reference"] = ref
            response = client.get("/buy_orders", params=params)
            if response.status_code != 200:
                console.print(f"[red]{response.status_code}[/red] {response.text}")
                raise typer.Exit(1)
            page = response.json()
            rows.extend(page["rows"])
            ref = page["last_reference"]
            if not all_pages or "next" not in response.links:
                break
    if as_json:
        print(json.dumps({"rows": rows, "last_reference": ref}))
        return
    columns = ("id", "created_at", "currency", "currency_amount", "btc_rate", "btc_amount")
    table = Table("id", "created_at", "currency", "amount", "rate", "btc")
    for r in rows:
        table.add_row(*(r[column] for column in columns))
    total = sum((Decimal(r["btc_amount"]) for r in rows), Decimal(0))
    console.print(table)
    console.print(f"{len(rows)} orders, {total} BTC; last_reference: {ref}")


@dev_app.command("postgres-start")
def dev_postgres_start(data_dir: DataDir = Path(".data/pg")) -> None:
    """Start the embedded PostgreSQL; prints `export` lines for both database URLs."""
    from pydist.devtools.embedded_pg import start

    urls = start(data_dir)
    print(f"export WRITE_DATABASE_URL='{urls['pydist_write']}'")
    print(f"export READ_DATABASE_URL='{urls['pydist_read']}'")


@dev_app.command("postgres-stop")
def dev_postgres_stop(data_dir: DataDir = Path(".data/pg")) -> None:
    """Stop the embedded PostgreSQL (fast shutdown; data is kept)."""
    from pydist.devtools.embedded_pg import stop

    stop(data_dir)


@dev_app.command("rabbitmq-start")
def dev_rabbitmq_start(
    data_dir: DataDir = Path(".data/rabbitmq"),
    port: Annotated[int, typer.Option(help="AMQP port; distribution and epmd ports follow")] = 5673,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for AMQP connections")] = 120.0,
) -> None:
    """Start (or reuse) a private RabbitMQ node; prints `export BROKER_URL=…`. Exit 3: not installed."""
    import sys
    import time

    from pydist.devtools import embedded_rabbitmq as rmq

    t0 = time.monotonic()
    try:
        cfg = rmq.start(data_dir, port, timeout)
    except (rmq.NotInstalledError, rmq.NodeError, ValueError) as exc:
        print(f"pydist dev rabbitmq-start: {exc}", file=sys.stderr)
        raise typer.Exit(rmq.NOT_INSTALLED_EXIT if isinstance(exc, rmq.NotInstalledError) else 1) from None
    print(
        f"pydist dev rabbitmq-start: {cfg.node_name} accepts AMQP after {time.monotonic() - t0:.1f}s",
        file=sys.stderr,
    )
    print(f"export BROKER_URL='{cfg.broker_url}'")


@dev_app.command("rabbitmq-stop")
def dev_rabbitmq_stop(data_dir: DataDir = Path(".data/rabbitmq")) -> None:
    """Stop the private RabbitMQ node and its epmd (clean shutdown; data is kept)."""
    from pydist.devtools.embedded_rabbitmq import stop

    stop(data_dir)


@dev_app.command("coinbase-stub")
def dev_coinbase_stub(port: int = 8790) -> None:
    """Serve Coinbase-compatible spot prices locally (offline demos, tests, benchmarks)."""
    import signal

    from pydist.devtools import coinbase_stub

    # SIGTERM (honcho, run.sh's Ctrl-C) ends it like Ctrl-C: the stub's main exits 0 on that.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    coinbase_stub.main(["--port", str(port)])


@app.command()
def bench(
    smoke: Annotated[bool, typer.Option(help="A few seconds, to check the bench runs")] = False,
) -> None:
    """Run the benchmark suite (same as ./bench/run.sh)."""
    import subprocess

    script = Path.cwd() / "bench" / "run.sh"
    if not script.exists():
        console.print("[red]run from the repository root (bench/run.sh not found)[/red]")
        raise typer.Exit(2)
    raise typer.Exit(subprocess.call([str(script), *(["--smoke"] if smoke else [])]))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
