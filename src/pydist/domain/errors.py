"""Domain errors: the edge maps each that reaches it to an HTTP problem type
(entrypoints/problems.PROBLEM_TYPES); the money errors never reach it (the body's validation
and the price clients turn them into a 422 and a PriceUnavailableError first)."""

from __future__ import annotations

from decimal import Decimal


class InvalidAmountError(ValueError):
    pass


class InvalidPriceError(ValueError):
    """The upstream price is not usable (non-numeric, non-positive)."""


class IdempotencyKeyReusedError(Exception):
    def __init__(self) -> None:
        super().__init__("idempotency key reused with a different request")


class IdempotencyKeyMissingError(Exception):
    def __init__(self) -> None:
        super().__init__(
            "an idempotency key is required: idempotence_key in the body or the Idempotency-Key header"
        )


class IdempotencyKeysDifferError(Exception):
    def __init__(self) -> None:
        super().__init__("idempotence_key in the body and the Idempotency-Key header differ")


class CapExceededError(Exception):
    def __init__(self, requested_btc: Decimal, available_btc: Decimal) -> None:
        self.requested_btc = requested_btc
        self.available_btc = available_btc
        super().__init__(
            f"order needs {requested_btc:f} BTC but only {available_btc:f} BTC "
            "is still available under the cap"
        )


class PriceUnavailableError(Exception):
    """No price younger than the allowed age can be had right now."""
