"""`pydist broker migrate-queues`: move the sync queue and the DLQ from classic to quorum queues,
with nothing lost.

A queue's type cannot be changed in place, so each queue is moved through a temporary quorum
queue: the temporary one is bound before the old one is unbound (a message published meanwhile
lands in both: a duplicate, which projection ignores), the old one's messages are moved over
(published with confirms, then acked), the old queue is deleted and declared again as a quorum
queue, and the messages come back. Every step checks the state first, so an interrupted run is
finished by running the command again, and a run on migrated queues changes nothing.

read_model_sync must be stopped while it runs (it holds the old queue); relays may keep running.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from pydist.adapters.rabbit import DEAD_LETTERS, SYNC, BoundQueue, BrokerLink, declare_topology

log = structlog.get_logger()


async def migrate_queues(urls: str | Sequence[str]) -> dict[str, int]:
    """Move both queues; returns how many messages each one carried over."""
    link = BrokerLink(urls, name="pydist migrate-queues")
    try:
        moved = {target.name: await _migrate(link, target) for target in (DEAD_LETTERS, SYNC)}
        await declare_topology(await link.channel())  # everything else, as both sides expect
        return moved
    finally:
        await link.close()


async def _migrate(link: BrokerLink, target: BoundQueue) -> int:
    temp = f"{target.name}.migrating"
    moved = 0
    kind = await _kind(link, target.name, target.arguments)
    if kind == "other":
        channel = await link.channel()
        await target.declare(channel, temp)
        moved = await _move(channel, target, target.name, temp)
        await channel.queue_delete(target.name, if_unused=True, if_empty=True)
        # A channel that delivered to the classic queue crashes (RabbitMQ 3.10) when it delivers
        # to the quorum queue of the same name: go on with a new one.
        await link.reset()
        log.info("queue_moved_aside", queue=target.name, messages=moved)
    if kind != "quorum":
        await target.declare(await link.channel())
    if await _kind(link, temp, target.arguments) != "missing":
        channel = await link.channel()
        moved = await _move(channel, target, temp, target.name)
        await channel.queue_delete(temp)  # unbound and drained (quorum queues know no if_empty)
        log.info("queue_migrated", queue=target.name, messages=moved)
    return moved


async def _kind(link: BrokerLink, name: str, arguments: dict[str, Any]) -> str:
    """'missing', 'quorum' (it accepts the target arguments) or 'other'. A refused declare closes
    the channel, so the link opens a new one afterwards."""
    try:
        await (await link.channel()).declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelClosed:
        return "missing"
    try:
        await (await link.channel()).declare_queue(name, durable=True, arguments=arguments)
    except aio_pika.exceptions.ChannelClosed:
        return "other"
    return "quorum"


async def _move(channel: AbstractChannel, target: BoundQueue, source: str, destination: str) -> int:
    """Unbind `source` from the target's exchange (by the binding key, and by "", what an earlier
    migration bound the DLQ with; unbinding what is not bound is a no-op), then move each of its
    messages into `destination`: published with confirms, then acked."""
    queue = await channel.declare_queue(source, passive=True)
    for key in dict.fromkeys((target.binding_key, "")):
        await queue.unbind(target.exchange, key)
    moved = 0
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        await channel.default_exchange.publish(_copy(message), routing_key=destination, mandatory=True)
        await message.ack()
        moved += 1
    return moved


def _copy(message: AbstractIncomingMessage) -> aio_pika.Message:
    headers = {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"}
    return aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        timestamp=message.timestamp,
    )
