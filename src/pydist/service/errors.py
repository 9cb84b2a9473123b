"""Errors of the ports: what adapters raise through them and the use cases and the edge handle.
They are about infrastructure (a store that cannot be reached, data a read model cannot hold, a
listing reference that does not exist), so they live here rather than among the domain's rules."""

from __future__ import annotations


class StoreUnavailableError(Exception):
    """The write or read model cannot be reached; the outcome of a write is unknown, retry with the key."""


class UnknownReferenceError(Exception):
    """A listing's `last_reference` names no order."""


class EventRejectedError(Exception):
    """The read model refuses the data of these events (a value it cannot store): retrying the
    same events can never succeed, unlike a connection failure. A consumer isolates and
    dead-letters the offending ones instead of redelivering them for ever."""
