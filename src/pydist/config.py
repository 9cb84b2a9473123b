"""Configuration from the environment only (12-factor). Names are a contract: keep them."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def async_url(url: str) -> str:
    """Accept a plain postgresql:// URL (what operators write) and select the asyncpg driver."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url.split('@')[-1]}")


def plain_url(url: str) -> str:
    """The driver-neutral form of a URL (for asyncpg.connect, which knows no `+asyncpg`)."""
    return "postgresql://" + async_url(url).removeprefix("postgresql+asyncpg://")


MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's multiprocess directory (read by prometheus_client itself, at import)."""
GRACEFUL_SHUTDOWN_S = 8
"""How long in-flight requests get after SIGTERM before uvicorn cancels them (not a setting: the
body timeout below and run.sh's supervisor are sized by it)."""


class Settings(BaseSettings):
    """Each field is the environment variable of its name in capitals, described (with its
    default) in README.md's configuration table and in .env.example."""

    model_config = SettingsConfigDict(extra="ignore")

    write_database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/pydist_write")
    read_database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/pydist_read")
    broker_url: SecretStr | None = None
    coinbase_api_url: str = "https://api.coinbase.com"
    price_max_age_s: float = Field(default=10.0, gt=0)
    price_timeout_s: float = Field(default=2.0, gt=0, le=4.0)
    price_min_interval_s: float = Field(default=1.0, ge=0)
    btc_price_url: str | None = None
    create_buy_order_port: int = 8777
    fetch_buy_orders_port: int = 8778
    btc_price_port: int = 8779
    relay_metrics_port: int = 8780
    sync_metrics_port: int = 8781
    bind_host: str = "127.0.0.1"
    web_concurrency: int = Field(default=1, ge=1, le=64)
    prometheus_multiproc_dir: str | None = None
    db_pool_size: int = Field(default=10, ge=1)
    max_batch: int = Field(default=256, ge=1, le=5000)
    write_window_s: float = Field(default=0.002, ge=0, le=0.05)
    relay_batch: int = Field(default=500, ge=1)
    relay_pace_s: float = Field(default=0.02, ge=0, le=0.1)
    sync_prefetch: int = Field(default=16, ge=1)
    max_body_bytes: int = 16 * 1024
    # Below GRACEFUL_SHUTDOWN_S: a body stalled at a shutdown still gets its 408 before uvicorn
    # cancels what is in flight (which would be a 500).
    body_timeout_s: float = Field(default=5.0, gt=0, lt=GRACEFUL_SHUTDOWN_S)
    max_in_flight: int = Field(default=1000, ge=1)
    api_keys: SecretStr | None = None
    log_level: str = "INFO"
    fluentd_host: str | None = None
    fluentd_port: int = 24224
    service_name: str = "pydist"
    otel_telemetry: bool = False

    @model_validator(mode="after")
    def _price_timing_is_coherent(self) -> Settings:
        # A quote that expires before another upstream call is allowed would make btc_price
        # answer 503 while the feed is healthy.
        if self.price_min_interval_s > self.price_max_age_s:
            raise ValueError("PRICE_MIN_INTERVAL_S must not exceed PRICE_MAX_AGE_S")
        return self

    @property
    def price_service_url(self) -> str:
        return self.btc_price_url or f"http://127.0.0.1:{self.btc_price_port}"

    @property
    def api_key_set(self) -> frozenset[str]:
        keys = self.api_keys.get_secret_value().split(",") if self.api_keys is not None else []
        return frozenset(k.strip() for k in keys if k.strip())


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
