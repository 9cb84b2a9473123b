"""Money rules. Everything is Decimal (or exact fractions); a float never touches an amount."""

from __future__ import annotations

import math
import re
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction


class InvalidAmountError(ValueError):
    """A fiat amount that breaks a money rule (the body's validation makes it a 422)."""


class InvalidPriceError(ValueError):
    """The upstream price is not usable (non-numeric, non-positive): the price clients make it a
    PriceUnavailableError."""


BTC_CAP = Decimal("100")
"""The sum of btc_amount over all orders may reach, never exceed, this."""

SATOSHI = Decimal("0.00000001")
MAX_FIAT_AMOUNT = Decimal("1000000000")  # exclusive
FIAT_DECIMALS = 2
_AMOUNT_TEXT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,2})?")
_PRICE_TEXT = re.compile(r"[0-9]{1,15}(\.[0-9]{1,12})?")


class Currency(StrEnum):
    EUR = "EUR"
    GBP = "GBP"
    USD = "USD"


def parse_fiat_amount(value: object) -> Decimal:
    """A decimal string or an exactly parsed JSON number, with at most 2 decimals: more is an
    error, never silent rounding."""
    if isinstance(value, int) and not isinstance(value, bool):  # True is an int, not an amount
        value = Decimal(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise InvalidAmountError("amount must be a finite number")
        exponent = value.as_tuple().exponent
        assert isinstance(exponent, int)
        if exponent < -FIAT_DECIMALS:
            raise InvalidAmountError("amount has more than 2 decimal places")
        amount = value
    elif isinstance(value, str):
        if not _AMOUNT_TEXT.fullmatch(value):
            raise InvalidAmountError(
                'amount must be a decimal string with at most 2 decimal places, e.g. "123.45"'
            )
        amount = Decimal(value)
    else:
        raise InvalidAmountError('amount must be a decimal string such as "123.45"')
    if not (0 < amount < MAX_FIAT_AMOUNT):
        raise InvalidAmountError("amount must be greater than 0 and less than 1,000,000,000")
    return amount.quantize(Decimal(1).scaleb(-FIAT_DECIMALS))


def parse_btc_price(value: object) -> Decimal:
    """Parse an upstream price exactly (Decimal from its text); reject non-numeric or non-positive."""
    if not isinstance(value, str) or not _PRICE_TEXT.fullmatch(value):
        raise InvalidPriceError(f"price is not a plain positive decimal: {value!r:.40}")
    price = Decimal(value)  # the regex admits only valid text
    if price <= 0:
        raise InvalidPriceError("price must be positive")
    return price


def btc_for_fiat(amount: Decimal, rate: Decimal) -> Decimal:
    """BTC bought by `amount` of fiat at `rate` fiat per BTC, rounded up to whole satoshis.

    Computed as an exact fraction, so no precision setting can round it the wrong way; the result
    is built from its digits (no Decimal arithmetic), so the ambient context cannot round it either.
    """
    if amount <= 0 or rate <= 0:
        raise ValueError("amount and rate must be positive")
    satoshis = math.ceil(Fraction(amount) / Fraction(rate) / Fraction(SATOSHI))
    return Decimal(f"{satoshis}E-8")
