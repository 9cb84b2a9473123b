"""Configuration comes from the environment, with coherent values only."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pydist.config import Settings, async_url, plain_url


def test_settings_read_the_contract_names_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRITE_DATABASE_URL", "postgresql://u:p@db:5432/w")
    monkeypatch.setenv("PRICE_MAX_AGE_S", "7")
    monkeypatch.setenv("CREATE_BUY_ORDER_PORT", "9001")
    monkeypatch.setenv("API_KEYS", "a, b ,,c")
    settings = Settings()
    assert settings.write_database_url.get_secret_value() == "postgresql://u:p@db:5432/w"
    assert settings.price_max_age_s == 7
    assert settings.create_buy_order_port == 9001
    assert settings.api_key_set == frozenset({"a", "b", "c"})
    assert "p@db" not in repr(settings)  # secrets are not printed


def test_min_interval_longer_than_max_age_is_refused() -> None:
    with pytest.raises(ValidationError, match="PRICE_MIN_INTERVAL_S"):
        Settings(price_min_interval_s=11, price_max_age_s=10)


@pytest.mark.parametrize("timeout", [0, 4.5])
def test_price_timeout_leaves_room_for_a_5_second_answer(timeout: float) -> None:
    with pytest.raises(ValidationError):
        Settings(price_timeout_s=timeout)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgres://u@h/db", "postgresql+asyncpg://u@h/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_plain_postgres_urls_select_asyncpg(url: str, expected: str) -> None:
    assert async_url(url) == expected


def test_a_non_postgres_url_is_refused_without_echoing_credentials() -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL URL") as err:
        async_url("mysql://user:secret@h/db")
    assert "secret" not in str(err.value)


@pytest.mark.parametrize(
    "url", ["postgresql+asyncpg://u@h/db?host=/s", "postgres://u@h/db?host=/s", "postgresql://u@h/db?host=/s"]
)
def test_plain_url_is_what_asyncpg_connect_takes(url: str) -> None:
    assert plain_url(url) == "postgresql://u@h/db?host=/s"


def test_the_cli_client_sends_one_of_the_api_keys_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydist.entrypoints.cli import _auth

    monkeypatch.delenv("API_KEYS", raising=False)
    assert _auth(Settings(api_keys="k2, k1")) == {"Authorization": "Bearer k1"}
    assert _auth(Settings()) == {}
