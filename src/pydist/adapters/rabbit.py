"""RabbitMQ: the connection to one of several cluster nodes, and the topology both sides declare.

`BROKER_URL` may list several nodes (`amqp://a:5672/,amqp://b:5672/`). A `BrokerLink` holds one
plain (not self-reconnecting) connection: when its node goes away the next `channel()` call
connects to the next node that answers. aio-pika's robust connection would only ever retry the
node it first reached, which for a cluster is the one that is down.

The sync queue and its dead-letter queue are quorum queues: replicated over the cluster, with a
delivery limit on the sync queue, so a message that makes the consumer fail every time ends in the
DLQ after `DELIVERY_LIMIT` + 1 deliveries (the limit counts redeliveries) instead of looping for
ever. Dead-lettering is at-least-once (the broker keeps the message until the DLQ confirms it), so
nothing is lost on the way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aio_pika.connection import make_url

log = structlog.get_logger()

EXCHANGE = "pydist.events"
DEAD_LETTER_EXCHANGE = "pydist.events.dlx"
QUEUE = "pydist.read_model_sync"
DEAD_LETTER_QUEUE = "pydist.read_model_sync.dlq"
ROUTING_KEY = "buy_order.created"
DELIVERY_LIMIT = 5
CONNECT_TIMEOUT_S = 5.0
HEARTBEAT_S = 10
"""A node that vanishes without closing its socket (kill -9 of a VM, a partition) is noticed after
aiormq's grace of (10 + 1) x 3 = 33 s without a frame, instead of the (60 + 1) x 3 s the server's
default 60 s would give."""

QUEUE_ARGUMENTS: dict[str, Any] = {
    "x-queue-type": "quorum",
    "x-delivery-limit": DELIVERY_LIMIT,
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",  # at-least-once dead-lettering requires it
}
DLQ_ARGUMENTS: dict[str, Any] = {"x-queue-type": "quorum"}
"""No delivery limit on the DLQ: `pydist dlq list` reads it by taking and returning messages, and
every return counts as a delivery; with a limit, listing it often enough would drop messages."""

TRANSIENT = (
    OSError,  # ConnectionError and TimeoutError among them
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,  # a RuntimeError: a channel already closed
)
"""What a lost node, a closed channel or a broker still starting raise."""


def broker_urls(value: str) -> list[str]:
    """`BROKER_URL` as a list of node URLs (comma-separated; blanks ignored)."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls or not all(u.startswith(("amqp://", "amqps://")) for u in urls):
        raise ValueError("BROKER_URL must be one or more comma-separated amqp:// URLs")
    return urls


class BrokerLink:
    """One connection and one channel to the first node of the list that answers; after a
    failure `reset()` closes them and the next `channel()` tries the nodes after the failed one.

    `name` is the connection's name on the broker (`rabbitmqctl list_connections
    client_properties`, the management UI), so an operator sees which one is blocked or busy."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        name: str = "pydist",
        publisher_confirms: bool = True,
        close_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self.urls = broker_urls(urls) if isinstance(urls, str) else list(urls)
        self.name = name
        self._confirms = publisher_confirms
        self._close_timeout_s = close_timeout_s
        self._current = 0
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lost = False  # a connection that had worked was dropped: try the next node first
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def node(self) -> str:
        return _host(self.urls[self._current])

    @property
    def is_open(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    async def channel(self) -> AbstractChannel:
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        await self.reset()  # a channel that went away: its node failed us
        start = self._current + 1 if self._lost else self._current
        self._lost = False
        errors: list[str] = []
        for offset in range(len(self.urls)):
            index = (start + offset) % len(self.urls)
            try:
                self._connection = self._new_connection(self.urls[index])
                await self._connection.connect(timeout=CONNECT_TIMEOUT_S)
                self._channel = await self._connection.channel(
                    publisher_confirms=self._confirms, on_return_raises=self._confirms
                )
            except Exception as exc:  # aiormq also raises StopAsyncIteration for a link closed mid-handshake
                errors.append(f"{_host(self.urls[index])}: {type(exc).__name__}")
                await self.close()
                continue
            self._current = index
            log.info("broker_connected", node=self.node, connection=self.name)
            return self._channel
        raise ConnectionError("no broker node answered: " + "; ".join(errors))

    def _new_connection(self, url: str) -> aio_pika.Connection:
        """A connection not yet connected. `aio_pika.connect()` would build and connect it in one
        call, and on a failure drop it unclosed: its `__del__` then schedules the close, which the
        garbage collector running outside the event loop leaves as a coroutine never awaited. Held
        in `_connection` first, a failed attempt is closed by `close()` like any other."""
        return aio_pika.Connection(
            make_url(url, heartbeat=HEARTBEAT_S),
            client_properties={"connection_name": self.name},
        )

    async def reset(self) -> None:
        """Drop the connection after a failure and wait for its close."""
        self.drop()
        await self.close()

    def drop(self) -> None:
        """Drop the connection after a failure: the next `channel()` starts with the next node.
        Its close runs in the background, because a node that stopped reading it (a resource
        alarm) holds a graceful close for `close_timeout_s`; `close()` waits for it."""
        connection, channel = self._connection, self._channel
        self._connection, self._channel = None, None
        if connection is None:
            return
        if channel is not None:  # it had worked (not an attempt cut short mid-connect)
            self._lost = True
        closing = asyncio.create_task(self._close(connection))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        await asyncio.gather(self._close(connection), *self._closing)

    async def _close(self, connection: AbstractConnection | None) -> None:
        if connection is not None and not connection.is_closed:
            try:
                await asyncio.wait_for(connection.close(), timeout=self._close_timeout_s)
            except Exception as exc:  # already half-gone: nothing to keep
                log.debug("broker_close_failed", error=type(exc).__name__)
                # aio-pika let go of the transport as the first close began (aiormq's writer closes
                # the socket on its own); this one only marks the connection closed, or `__del__`
                # would schedule another close, never awaited if the collector runs outside the loop.
                await connection.close()


def _host(url: str) -> str:
    return url.rsplit("@", 1)[-1].split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class BoundQueue:
    """A queue, its arguments, and the exchange and binding key it receives from."""

    name: str
    arguments: dict[str, Any]
    exchange: str
    exchange_type: aio_pika.ExchangeType
    binding_key: str

    async def declare(
        self, channel: AbstractChannel, name: str | None = None
    ) -> tuple[AbstractExchange, AbstractQueue]:
        """The exchange, and the queue (or another of the same kind, `name`) bound to it."""
        exchange = await channel.declare_exchange(self.exchange, self.exchange_type, durable=True)
        queue = await channel.declare_queue(name or self.name, durable=True, arguments=self.arguments)
        await queue.bind(exchange, self.binding_key)
        return exchange, queue


DEAD_LETTERS = BoundQueue(
    DEAD_LETTER_QUEUE, DLQ_ARGUMENTS, DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, DEAD_LETTER_QUEUE
)
"""A fanout exchange ignores the key, but a binding is named by it. The key is the queue's name,
what aio-pika binds with when given none: brokers set up before it was explicit have that binding,
and the queue migration unbinds exactly it."""
SYNC = BoundQueue(QUEUE, QUEUE_ARGUMENTS, EXCHANGE, aio_pika.ExchangeType.TOPIC, "buy_order.#")


async def declare_topology(channel: AbstractChannel) -> tuple[AbstractExchange, AbstractQueue]:
    """Both sides declare everything, so no message is unroutable whichever starts first; returns
    the events exchange and the sync queue.

    A sync queue that still exists as a classic queue (from before quorum queues) makes this fail
    with PRECONDITION_FAILED: `pydist broker migrate-queues` moves it first (README, "Operating pydist")."""
    await DEAD_LETTERS.declare(channel)
    return await SYNC.declare(channel)


async def depth(channel: AbstractChannel, name: str) -> int:
    """Messages ready in a queue (a passive declare: it creates nothing)."""
    queue = await channel.declare_queue(name, passive=True)
    return int(queue.declaration_result.message_count or 0)
