"""Money rules (domain/money.py): the ceiling to satoshis, and what counts as an amount or a price.

Expectations are computed independently of the code under test: with exact `Fraction` arithmetic
(never a Decimal context, which could round the check itself) or by hand.
"""

from __future__ import annotations

from decimal import Context, Decimal, localcontext
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pydist.domain.money import (
    InvalidAmountError,
    InvalidPriceError,
    btc_for_fiat,
    parse_btc_price,
    parse_fiat_amount,
)

ONE_SATOSHI = Fraction(1, 10**8)


def _cents_to_decimal(cents: int) -> Decimal:
    return Decimal(f"{cents // 100}.{cents % 100:02d}")


# 0.01 .. 999,999,999.99, always written with exactly two decimals.
amounts = st.integers(min_value=1, max_value=99_999_999_999).map(_cents_to_decimal)


@st.composite
def rates(draw: st.DrawFn) -> Decimal:
    """A positive price with 0..12 decimals and up to 15 integer digits: 1e-12 .. ~1e15."""
    scale = draw(st.integers(min_value=0, max_value=12))
    units = draw(st.integers(min_value=1, max_value=10 ** (15 + scale) - 1))
    return Decimal(f"{units}E-{scale}")  # exact: the constructor never rounds


def _check_ceiling(amount: Decimal, rate: Decimal, btc: Decimal) -> None:
    exact_btc = Fraction(btc)
    # Whole satoshis: at most 8 decimals, as a value and as written.
    assert (exact_btc / ONE_SATOSHI).denominator == 1
    exponent = btc.as_tuple().exponent
    assert isinstance(exponent, int)
    assert exponent >= -8
    assert btc > 0
    # Enough BTC to cover the amount, and one satoshi less would not be.
    assert exact_btc * Fraction(rate) >= Fraction(amount)
    assert (exact_btc - ONE_SATOSHI) * Fraction(rate) < Fraction(amount)


@given(amount=amounts, rate=rates())
@example(amount=Decimal("999999999.99"), rate=Decimal("0.000000000001"))  # the largest BTC amount
@example(amount=Decimal("999999999.99"), rate=Decimal("0.000000000007"))  # 30-digit satoshi count
@example(amount=Decimal("0.01"), rate=Decimal("999999999999999.999999999999"))  # the smallest
@example(amount=Decimal("123.45"), rate=Decimal("97000.00"))
def test_btc_is_the_ceiling_to_whole_satoshis(amount: Decimal, rate: Decimal) -> None:
    _check_ceiling(amount, rate, btc_for_fiat(amount, rate))


@given(amount=amounts, rate=rates())
def test_btc_does_not_depend_on_the_ambient_decimal_context(amount: Decimal, rate: Decimal) -> None:
    expected = btc_for_fiat(amount, rate)
    with localcontext(Context(prec=8)):
        assert btc_for_fiat(amount, rate) == expected


def test_classic_example_rounds_up_not_to_eight_significant_digits() -> None:
    # 123.45 / 97000 = 0.00127268041237... (= 2469/1940000 exactly). In satoshis that is
    # 127268.041237..., and the ceiling is 127269 satoshis = 0.00127269 BTC.
    #   check: 0.00127269 * 97000 = 123.45093 >= 123.45, and 0.00127268 * 97000 = 123.44996 < 123.45.
    assert btc_for_fiat(Decimal("123.45"), Decimal("97000.00")) == Decimal("0.00127269")
    assert str(btc_for_fiat(Decimal("123.45"), Decimal("97000.00"))) == "0.00127269"

    # The common mistake: a Decimal context with prec=8 means 8 *significant* digits, so the
    # quotient is already rounded to 0.0012726804, and putting it on the satoshi grid with the
    # default rounding (half-even) then gives 0.00127268: one satoshi short of the amount.
    with localcontext(Context(prec=8)):
        wrong = (Decimal("123.45") / Decimal("97000.00")).quantize(Decimal("0.00000001"))
    assert wrong == Decimal("0.00127268")
    assert Fraction(wrong) * 97000 < Fraction(Decimal("123.45"))


@pytest.mark.parametrize(
    ("amount", "rate", "expected"),
    [
        ("100", "50000", "0.002"),  # 100 / 50000 = 0.002 exactly: no extra satoshi
        ("100.00", "50000.00", "0.002"),
        ("97000.00", "97000.00", "1"),
        ("0.01", "1", "0.01"),
        ("1", "0.00000001", "100000000"),  # 1 / 1e-8 = 1e8 BTC exactly
        ("12.34", "0.5", "24.68"),
        ("0.01", "1000000", "0.00000001"),  # exactly one satoshi
    ],
)
def test_exact_divisions_get_no_extra_satoshi(amount: str, rate: str, expected: str) -> None:
    btc = btc_for_fiat(Decimal(amount), Decimal(rate))
    assert btc == Decimal(expected)


@pytest.mark.parametrize(
    ("amount", "rate", "expected"),
    [
        ("0.01", "1000000.01", "0.00000001"),  # just under one satoshi → one satoshi
        ("0.01", "97000", "0.00000011"),  # 0.01/97000 = 1.0309e-7 → 10.309 sat → 11
        ("1", "3", "0.33333334"),  # 33333333.33 sat → 33333334
        ("2", "3", "0.66666667"),  # 66666666.67 sat → 66666667
    ],
)
def test_inexact_divisions_round_up(amount: str, rate: str, expected: str) -> None:
    assert btc_for_fiat(Decimal(amount), Decimal(rate)) == Decimal(expected)


@pytest.mark.parametrize(("amount", "rate"), [("0", "1"), ("-1", "1"), ("1", "0"), ("1", "-5")])
def test_btc_for_fiat_refuses_non_positive_inputs(amount: str, rate: str) -> None:
    with pytest.raises(ValueError, match="positive"):
        btc_for_fiat(Decimal(amount), Decimal(rate))


# --- parse_fiat_amount -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("123.45", "123.45"),
        ("10", "10.00"),
        ("10.5", "10.50"),
        ("0.01", "0.01"),
        ("999999999.99", "999999999.99"),
        ("0000000001", "1.00"),
        (Decimal("123.45"), "123.45"),
        (Decimal("10"), "10.00"),
        (Decimal("10.0"), "10.00"),
        (Decimal("1E+2"), "100.00"),  # what a JSON number 1e2 parses to
        (10, "10.00"),
        (999_999_999, "999999999.00"),
    ],
)
def test_parse_fiat_amount_accepts_and_quantizes_to_cents(value: object, expected: str) -> None:
    parsed = parse_fiat_amount(value)
    assert isinstance(parsed, Decimal)
    assert str(parsed) == expected  # the value *and* the two-decimal form


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "NaN",
        "nan",
        "Infinity",
        "-Infinity",
        "inf",
        "-0",
        "0",
        "0.00",
        "-1",
        "+1",
        "",
        " ",
        " 1",
        "1 ",
        "1\n",
        "1e3",
        "1E3",
        "1.234",
        "1.",
        ".5",
        "1,00",
        "1_000",
        "0x10",
        "١٢٣",  # Arabic-Indic digits: Decimal() would accept them, the wire format does not
        "\uff11\uff12",  # full-width digits
        "1000000000",
        "1000000000.00",
        "99999999999",
        "1" * 50,
        "1" + "0" * 5000,
        True,
        False,
        1.5,
        10.0,
        float("nan"),
        None,
        [],
        ["1"],
        {"amount": "1"},
        b"1",
        0,
        -1,
        1_000_000_000,
        10**40,
        Decimal("NaN"),
        Decimal("sNaN"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
        Decimal("1.234"),
        Decimal("1.000"),  # three decimals written, even if the third is zero
        Decimal("0"),
        Decimal("-0"),
        Decimal("0.00"),
        Decimal("-5"),
        Decimal("1E+9"),
        Decimal("1E+999999"),
        Decimal("1E-999999"),
    ],
)
def test_parse_fiat_amount_rejects(value: object) -> None:
    with pytest.raises(InvalidAmountError):
        parse_fiat_amount(value)


@given(cents=st.integers(min_value=1, max_value=99_999_999_999))
def test_parse_fiat_amount_round_trips_every_valid_string(cents: int) -> None:
    text = f"{cents // 100}.{cents % 100:02d}"
    parsed = parse_fiat_amount(text)
    assert Fraction(parsed) == Fraction(cents, 100)
    assert str(parsed) == text


@given(
    units=st.integers(min_value=1, max_value=10**12),
    extra=st.integers(min_value=1, max_value=9),
)
def test_parse_fiat_amount_never_rounds_a_third_decimal(units: int, extra: int) -> None:
    # units/100 plus a non-zero third decimal: would round silently if accepted.
    text = f"{units // 100}.{units % 100:02d}{extra}"
    with pytest.raises(InvalidAmountError):
        parse_fiat_amount(text)
    with pytest.raises(InvalidAmountError):
        parse_fiat_amount(Decimal(text))


json_like: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.decimals(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children),
    max_leaves=5,
)


@given(value=json_like)
def test_parse_fiat_amount_only_ever_returns_a_valid_amount_or_refuses(value: Any) -> None:
    try:
        parsed = parse_fiat_amount(value)
    except InvalidAmountError:
        return
    assert isinstance(parsed, Decimal)
    assert 0 < Fraction(parsed) < 1_000_000_000
    assert parsed.as_tuple().exponent == -2
    assert not isinstance(value, bool | float)
    # Nothing was rounded away: the parsed value equals the input's exact value.
    assert Fraction(parsed) == Fraction(value if not isinstance(value, str) else Decimal(value))


# --- parse_btc_price -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("97000.00", "97000.00"),
        ("0.5", "0.5"),
        ("1", "1"),
        ("0.000000000001", "0.000000000001"),
        ("999999999999999.999999999999", "999999999999999.999999999999"),
    ],
)
def test_parse_btc_price_keeps_the_text_exactly(text: str, expected: str) -> None:
    price = parse_btc_price(text)
    assert isinstance(price, Decimal)
    assert f"{price:f}" == expected  # stored exactly as received, trailing zeros included


@pytest.mark.parametrize(
    "value",
    [
        "lots",
        "-1",
        "-97000.00",
        "0",
        "0.00",
        "0.000000000000",
        "",
        " 97000",
        "97000 ",
        None,
        97000,
        97000.0,
        Decimal("97000"),
        True,
        ["97000"],
        "1e5",
        "NaN",
        "Infinity",
        "0x10",
        "1.0000000000001",  # 13 decimals
        "1" * 16,  # 16 integer digits
    ],
)
def test_parse_btc_price_rejects(value: object) -> None:
    with pytest.raises(InvalidPriceError):
        parse_btc_price(value)


@given(rate=rates())
def test_parse_btc_price_round_trips_plain_decimals(rate: Decimal) -> None:
    text = f"{rate:f}"
    assert Fraction(parse_btc_price(text)) == Fraction(rate)
    assert f"{parse_btc_price(text):f}" == text
