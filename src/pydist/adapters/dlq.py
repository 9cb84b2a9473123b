"""`pydist dlq list` and `pydist dlq replay`: what the dead-letter queue holds and why, and sending
its events back through the projector once the cause is fixed.

Both take the messages with `basic.get` and hold them unacked, so each message is seen once per
run; closing the channel returns every message not acked to the queue. `list` acks nothing.
`replay` acks (removes) a message only after every event in it was projected; projection is
idempotent, so replaying twice, or a message whose events are already in the read model, changes
nothing. A message that still cannot be projected stays, and the report says why.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage

from pydist.adapters.consumer import EVENT_INDEX, REASON, SOURCE_MESSAGE, Handler
from pydist.adapters.messages import decode
from pydist.adapters.rabbit import DEAD_LETTER_QUEUE, BrokerLink
from pydist.service.ports import EventRejectedError, StoreUnavailableError

log = structlog.get_logger()


@dataclass(frozen=True)
class DeadLetter:
    message_id: str | None
    type: str | None
    reason: str
    source_message_id: str | None
    event_index: int | None
    event_ids: list[str]
    body_prefix: str


@dataclass
class ReplayReport:
    replayed_messages: int = 0
    replayed_events: int = 0
    kept: list[DeadLetter] = field(default_factory=list)


def describe(message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers or {}
    decoded = decode(message)
    index = headers.get(EVENT_INDEX)
    return DeadLetter(
        message_id=message.message_id,
        type=message.type,
        reason=str(headers.get(REASON) or _death_reason(headers)),
        source_message_id=str(headers[SOURCE_MESSAGE]) if headers.get(SOURCE_MESSAGE) else None,
        event_index=index if isinstance(index, int) else None,
        event_ids=[] if isinstance(decoded, str) else [str(e.event_id) for e in decoded.events],
        body_prefix=message.body[:120].decode("utf-8", "replace"),
    )


def _death_reason(headers: dict[str, Any]) -> str:
    """Dead-lettered by the broker itself (the delivery limit): its x-death header says why."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return f"broker: {deaths[0].get('reason')} (queue {deaths[0].get('queue')})"
    return "unknown"


@asynccontextmanager
async def _dead_letters(
    urls: str | Sequence[str], limit: int
) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """Up to `limit` of the messages the DLQ holds now (never what arrives meanwhile), unacked;
    leaving closes the link, which returns every one not acked to the queue."""
    link = BrokerLink(urls, name="pydist dlq", publisher_confirms=False)
    try:
        queue = await (await link.channel()).declare_queue(DEAD_LETTER_QUEUE, passive=True)
        depth = min(int(queue.declaration_result.message_count or 0), limit)
        taken: list[AbstractIncomingMessage] = []
        while len(taken) < depth and (message := await queue.get(no_ack=False, fail=False)) is not None:
            taken.append(message)
        yield taken
    finally:
        await link.close()


async def list_dead_letters(urls: str | Sequence[str], *, limit: int = 10_000) -> list[DeadLetter]:
    async with _dead_letters(urls, limit) as messages:
        return [describe(m) for m in messages]


async def replay(urls: str | Sequence[str], handler: Handler, *, limit: int = 10_000) -> ReplayReport:
    """Project what the DLQ holds now (so it always ends)."""
    report = ReplayReport()
    async with _dead_letters(urls, limit) as messages:
        for message in messages:
            decoded = decode(message)
            if isinstance(decoded, str) or decoded.poison:
                report.kept.append(describe(message))
                continue
            try:
                await handler(decoded.events)
            except (EventRejectedError, StoreUnavailableError) as exc:
                report.kept.append(replace(describe(message), reason=f"still refused: {exc}"))
                continue
            await message.ack()
            report.replayed_messages += 1
            report.replayed_events += len(decoded.events)
        log.info("dlq_replayed", messages=report.replayed_messages, kept=len(report.kept))
    return report
