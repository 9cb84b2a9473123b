"""The HTTP edge of the create and fetch services, in process and without any database.

The apps are the real ones from `create_app(Settings(...))`, driven through `httpx.ASGITransport`
(which does not run the lifespan, so nothing connects at start-up). Two things keep it I/O-free:
- every socket connect is refused and recorded (`no_network`), and the test fails if one was tried;
- the create use case is an in-memory fake, handed to the wiring (`bootstrap.create(settings,
  create_order=fake)`), so a request that *passes* the edge is answered by the fake, never by a
  store. That is what lets the tests prove acceptance (e.g. of a quoted Idempotency-Key) and not
  only refusals. The fetch service's store is faked the same way (`bootstrap.fetch(settings,
  pages=fake)`) for its one success-path test.

Every response of every test is also checked for leaks (stack traces, driver or SQL text).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from pydantic import SecretStr
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from pydist import bootstrap
from pydist.adapters.listing import Page
from pydist.config import GRACEFUL_SHUTDOWN_S, Settings
from pydist.domain.money import Currency
from pydist.domain.order import BuyOrder, CapExceededError, IdempotencyKeyReusedError, OrderRequest
from pydist.entrypoints import create_api, fetch_api
from pydist.entrypoints.create_api import _refusal_reason
from pydist.entrypoints.http_app import EdgeMiddleware, _api_routes_first
from pydist.service.create_order import CreateBuyOrderCommand, Outcome
from pydist.service.ports import PriceUnavailableError, StoreUnavailableError, UnknownReferenceError

KEY = uuid.UUID("0b6f3c5e-8d1a-4f5e-9c7b-2a4d6e8f0a1b")
OTHER_KEY = uuid.UUID("11111111-2222-4333-8444-555555555555")
ORDER_ID = uuid.UUID("5d1c9a9e-1f0b-4c55-8a0e-6c1f2b3d4e5f")
MAX_BODY = 16 * 1024
PROBLEM_JSON = "application/problem+json"
# Port 9 (discard) on loopback: never reached, because every connect is refused below.
UNREACHABLE_DB = SecretStr("postgresql://unit:unit@127.0.0.1:9/never")
LEAKS = ("Traceback", "SELECT", "INSERT", 'File "', "sqlalchemy", "asyncpg", "psycopg", "site-packages")


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "write_database_url": UNREACHABLE_DB,
        "read_database_url": UNREACHABLE_DB,
        "btc_price_url": "http://127.0.0.1:9",
        "api_keys": None,
        "max_body_bytes": MAX_BODY,
        "fluentd_host": None,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)


def stored_order(key: uuid.UUID = KEY) -> BuyOrder:
    return BuyOrder(
        id=ORDER_ID,
        idempotence_key=key,
        created_at=datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC),
        currency=Currency.USD,
        currency_amount=Decimal("123.45"),
        btc_rate=Decimal("97000.00"),
        btc_amount=Decimal("0.00127269"),
    )


# --- fakes and fixtures ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    attempts: list[object] = []

    def refuse(_sock: socket.socket, address: object) -> None:
        attempts.append(address)
        raise ConnectionRefusedError(f"unit tests do no network I/O (tried {address!r})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield attempts
    assert attempts == [], f"a unit test tried to connect to {attempts}"


@dataclass
class FakeCreate:
    """Stands in for CreateBuyOrder: decides the key by the command's own rule (so a missing or
    conflicting key is refused as the real use case refuses it, and never recorded), records each
    request, answers with a stored order for its key (marked replayed when `replayed`), or raises
    `error`."""

    replayed: bool = False
    error: Exception | None = None
    calls: list[tuple[OrderRequest, str | None]] = field(default_factory=list)

    async def __call__(self, command: CreateBuyOrderCommand, request_id: str | None = None) -> Outcome:
        request = command.request()
        self.calls.append((request, request_id))
        if self.error is not None:
            raise self.error
        return Outcome(stored_order(request.idempotence_key), replayed=self.replayed)


_FAKE = FakeCreate()


def build_create_app(settings: Settings) -> FastAPI:
    """The real create app, with the shared fake in place of the use case it would wire up."""
    return create_api.create_app(settings, graph=bootstrap.create(settings, create_order=_FAKE))


@pytest.fixture
def fake_create() -> FakeCreate:
    _FAKE.replayed = False
    _FAKE.error = None
    _FAKE.calls.clear()
    return _FAKE


# Building an app costs far more than a request: one of each per module.
@pytest.fixture(scope="module")
def create_app_() -> FastAPI:
    return build_create_app(make_settings())


@pytest.fixture(scope="module")
def fetch_app_() -> FastAPI:
    return fetch_api.create_app(make_settings())


async def _leak_check(response: httpx.Response) -> None:
    await response.aread()
    for marker in LEAKS:
        assert marker not in response.text, f"response leaks {marker!r}: {response.text[:300]}"
    assert response.status_code < 500 or response.headers["content-type"] == PROBLEM_JSON


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://testserver",
        event_hooks={"response": [_leak_check]},
    )


@pytest.fixture
async def create_client(create_app_: FastAPI, fake_create: FakeCreate) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app_) as client:
        yield client


@pytest.fixture
async def fetch_client(fetch_app_: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(fetch_app_) as client:
        yield client


def body(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"currency": "USD", "amount": "123.45", "idempotence_key": str(KEY)}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _MISSING}


_MISSING = object()
JSON = {"content-type": "application/json"}


async def put(
    client: httpx.AsyncClient,
    payload: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    content = raw if raw is not None else json.dumps(payload).encode()
    return await client.put("/buy_order", content=content, headers={**JSON, **(headers or {})})


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict[str, Any]:
    """RFC 9457: the status, the media type, type/title/status/detail; for validation, `errors`."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == PROBLEM_JSON
    doc = response.json()
    assert isinstance(doc, dict)
    for member in ("type", "title", "detail"):
        assert isinstance(doc.get(member), str)
        assert doc[member]
    assert doc["status"] == status
    assert response.headers.get("x-request-id")
    if field is not None:
        errors = doc.get("errors")
        assert isinstance(errors, list)
        assert errors
        for error in errors:
            assert isinstance(error["field"], str)
            assert isinstance(error["message"], str)
        assert field in [e["field"] for e in errors], errors
    return dict(doc)


# --- bad bodies ------------------------------------------------------------------------------

_BAD_VALUES: dict[str, tuple[Any, ...]] = {
    "amount": (
        *("abc", "NaN", "nan", "Infinity", "-Infinity", "-0", "", " 1", "0", "0.00", "-1"),
        *("1.234", "1e3", "1000000000", "99999999999", "1" * 400),
        *(True, False, None, [], ["1"], {}, {"value": "1"}, 0, -5, 10**30, _MISSING),
    ),
    "currency": ("usd", "JPY", "", "US D", 1, None, ["USD"], True, _MISSING),
    "idempotence_key": ("abc", "", str(KEY)[:-1], str(KEY) + "0", 123, True, [], {}, "x" * 5000),
}
BAD_FIELDS: list[tuple[str, dict[str, Any]]] = [
    *[(name, body(**{name: value})) for name, values in _BAD_VALUES.items() for value in values],
    ("price", body(price="1")),  # unknown field
    ("buy_order", body(buy_order={})),  # unknown field
]


def _field_id(case: tuple[str, dict[str, Any]]) -> str:
    name, payload = case
    return f"{name}={payload.get(name, '<missing>')!r:.30}"


@pytest.mark.parametrize(("field", "payload"), BAD_FIELDS, ids=[_field_id(c) for c in BAD_FIELDS])
async def test_bad_field_is_a_422_naming_it(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, field: str, payload: dict[str, Any]
) -> None:
    assert_problem(await put(create_client, payload), 422, field)
    assert fake_create.calls == []


GOOD = json.dumps(body()).encode()
BAD_RAW: dict[str, bytes] = {
    "empty": b"",
    "whitespace": b"   ",
    "truncated": GOOD[:-5],
    "trailing garbage": GOOD + b"x",
    "two documents": GOOD + GOOD,
    "single quotes": GOOD.replace(b'"', b"'"),
    "NaN literal": b'{"currency": "USD", "amount": NaN, "idempotence_key": "%s"}' % str(KEY).encode(),
    "Infinity literal": b'{"currency": "USD", "amount": Infinity}',
    "-Infinity literal": b'{"currency": "USD", "amount": -Infinity}',
    "duplicate key": b'{"currency": "USD", "currency": "EUR", "amount": "1"}',
    "duplicate key nested": b'{"currency": "USD", "amount": {"a": 1, "a": 2}}',
    "array": b"[]",
    "array of body": b"[" + GOOD + b"]",
    "string": b'"USD"',
    "number": b"1",
    "null": b"null",
    "true": b"true",
    "invalid utf-8": b'{"currency": "\xff\xfe", "amount": "1"}',
    "lone surrogate escape": b'{"currency": "\\ud800", "amount": "1"}',
    "lone surrogate as a key": b'{"\\udc80": 1, "currency": "USD", "amount": "1"}',
    "lone surrogate duplicate key": b'{"\\ud800": 1, "\\ud800": 2}',
    "utf-8 bom": b"\xef\xbb\xbf" + GOOD,
    "utf-16": GOOD.decode().encode("utf-16"),
    "deep nesting": b"[" * 5000 + b"]" * 5000,
    "deep object nesting": b'{"a":' * 2500 + b"1" + b"}" * 2500,
    "5000-digit number": b'{"currency": "USD", "amount": 1' + b"0" * 5000 + b"}",
    "huge exponent": b'{"currency": "USD", "amount": 1e999999999, "idempotence_key": "%s"}'
    % str(KEY).encode(),
    "tiny exponent": b'{"currency": "USD", "amount": 1e-999999999, "idempotence_key": "%s"}'
    % str(KEY).encode(),
    "float amount, 3 decimals": b'{"currency": "USD", "amount": 1.234, "idempotence_key": "%s"}'
    % str(KEY).encode(),
    "negative zero": b'{"currency": "USD", "amount": -0.0, "idempotence_key": "%s"}' % str(KEY).encode(),
    "nul byte": b'{"currency": "USD\x00", "amount": "1"}',
}


@pytest.mark.parametrize("raw", BAD_RAW.values(), ids=BAD_RAW.keys())
async def test_bad_json_is_a_422_problem(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, raw: bytes
) -> None:
    doc = assert_problem(await put(create_client, raw=raw), 422)
    assert doc["errors"]  # names the body or the field
    assert fake_create.calls == []


async def test_amount_as_an_exact_json_number_is_accepted(
    create_client: httpx.AsyncClient, fake_create: FakeCreate
) -> None:
    raw = b'{"currency": "EUR", "amount": 10.5, "idempotence_key": "%s"}' % str(KEY).encode()
    response = await put(create_client, raw=raw)
    assert response.status_code == 200
    assert fake_create.calls[0][0].amount == Decimal("10.50")
    assert fake_create.calls[0][0].currency is Currency.EUR


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml"],
)
async def test_non_json_content_type_is_415(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, content_type: str
) -> None:
    response = await put(create_client, raw=GOOD, headers={"content-type": content_type})
    assert_problem(response, 415)
    assert fake_create.calls == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json; charset=utf-8",
        "application/merge-patch+json",
        "Application/Json",
        "APPLICATION/JSON",
    ],
)
async def test_json_content_types_are_accepted(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, content_type: str
) -> None:
    response = await put(create_client, raw=GOOD, headers={"content-type": content_type})
    assert response.status_code == 200
    assert len(fake_create.calls) == 1


async def test_a_body_without_content_type_is_read_as_json(
    create_client: httpx.AsyncClient, fake_create: FakeCreate
) -> None:
    response = await create_client.put("/buy_order", content=GOOD)
    assert "content-type" not in response.request.headers
    assert response.status_code == 200
    assert len(fake_create.calls) == 1


async def test_body_over_the_limit_is_413(create_client: httpx.AsyncClient, fake_create: FakeCreate) -> None:
    padded = GOOD[:-1] + b" " * (MAX_BODY + 1 - len(GOOD)) + b"}"
    assert len(padded) == MAX_BODY + 1
    assert_problem(await put(create_client, raw=padded), 413)
    assert fake_create.calls == []


async def test_body_of_exactly_the_limit_is_read(
    create_client: httpx.AsyncClient, fake_create: FakeCreate
) -> None:
    padded = GOOD[:-1] + b" " * (MAX_BODY - len(GOOD)) + b"}"
    assert len(padded) == MAX_BODY
    response = await put(create_client, raw=padded)
    assert response.status_code == 200
    assert len(fake_create.calls) == 1


async def test_chunked_body_over_the_limit_is_413_without_reading_it_all(
    create_client: httpx.AsyncClient, fake_create: FakeCreate
) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(1000):  # up to 1 MB, with no Content-Length
            sent += 1024
            yield b" " * 1024

    response = await create_client.put("/buy_order", content=chunks(), headers=JSON)
    assert "content-length" not in response.request.headers
    assert_problem(response, 413)
    assert sent < 100 * 1024  # stopped soon after the limit
    assert fake_create.calls == []


async def test_huge_declared_length_is_413(create_client: httpx.AsyncClient) -> None:
    # A client may declare anything; the server refuses before reading.
    response = await put(create_client, raw=GOOD, headers={"content-length": "99999999999999999999"})
    assert_problem(response, 413)


# --- the idempotency key ---------------------------------------------------------------------


async def test_missing_key_is_422(create_client: httpx.AsyncClient, fake_create: FakeCreate) -> None:
    assert_problem(await put(create_client, body(idempotence_key=_MISSING)), 422, "idempotence_key")
    assert_problem(await put(create_client, body(idempotence_key=None)), 422, "idempotence_key")
    assert fake_create.calls == []


@pytest.mark.parametrize(
    "header",
    ["abc", "", '"abc"', '"', '""', f'"{KEY}', f'{KEY}"', f"'{KEY}'", f"{KEY}, {KEY}", "x" * 100],
)
async def test_non_uuid_header_is_422(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, header: str
) -> None:
    response = await put(create_client, body(idempotence_key=_MISSING), headers={"Idempotency-Key": header})
    # Present but not a UUID (an empty header too): the header is what is wrong.
    assert_problem(response, 422, "Idempotency-Key")
    assert fake_create.calls == []


async def test_huge_header_is_422(create_client: httpx.AsyncClient, fake_create: FakeCreate) -> None:
    response = await put(create_client, body(), headers={"Idempotency-Key": "a" * 10_000})
    assert_problem(response, 422, "Idempotency-Key")
    assert fake_create.calls == []


@pytest.mark.parametrize("header", [str(KEY), f'"{KEY}"', str(KEY).upper(), f'"{str(KEY).upper()}"'])
async def test_header_alone_bare_or_quoted_is_used(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, header: str
) -> None:
    response = await put(create_client, body(idempotence_key=_MISSING), headers={"Idempotency-Key": header})
    assert response.status_code == 200, response.text
    assert fake_create.calls[0][0].idempotence_key == KEY
    assert response.json()["idempotence_key"] == str(KEY)


@pytest.mark.parametrize("header", [str(KEY), f'"{KEY}"', str(KEY).upper()])
async def test_header_matching_the_body_key_is_not_a_mismatch(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, header: str
) -> None:
    response = await put(create_client, body(), headers={"Idempotency-Key": header})
    assert response.status_code == 200, response.text
    assert [c[0].idempotence_key for c in fake_create.calls] == [KEY]


@pytest.mark.parametrize("second", [KEY, OTHER_KEY])
async def test_a_repeated_key_header_is_one_list_and_422(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, second: uuid.UUID
) -> None:
    """Two Idempotency-Key lines are one list, "a, b" (RFC 9110): not a UUID, whichever line a
    framework would have kept, even when both lines carry the same key."""
    lines = [("Idempotency-Key", str(KEY)), ("Idempotency-Key", str(second))]
    content = json.dumps(body(idempotence_key=_MISSING)).encode()
    response = await create_client.put("/buy_order", content=content, headers=[*JSON.items(), *lines])
    assert_problem(response, 422, "Idempotency-Key")
    assert fake_create.calls == []


@pytest.mark.parametrize("header", [str(OTHER_KEY), f'"{OTHER_KEY}"'])
async def test_header_differing_from_the_body_key_is_422(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, header: str
) -> None:
    response = await put(create_client, body(), headers={"Idempotency-Key": header})
    doc = assert_problem(response, 422, "idempotence_key")
    # The quoted form was understood as a UUID: the complaint is the mismatch, not the format.
    assert "Idempotency-Key" not in [e["field"] for e in doc["errors"]]
    assert "differ" in doc["detail"]
    assert fake_create.calls == []


# --- what the use case answers, as HTTP ------------------------------------------------------


async def test_created_order_is_200_with_string_amounts(
    create_client: httpx.AsyncClient, fake_create: FakeCreate
) -> None:
    response = await put(create_client, body(), headers={"X-Request-ID": "req-42"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert "idempotent-replayed" not in response.headers
    assert response.json() == {
        "idempotence_key": str(KEY),
        "buy_order": {
            "id": str(ORDER_ID),
            "created_at": "2026-11-30T12:00:00.123456Z",
            "currency": "USD",
            "currency_amount": "123.45",
            "btc_rate": "97000.00",
            "btc_amount": "0.00127269",
        },
    }
    request, request_id = fake_create.calls[0]
    assert request == OrderRequest(KEY, Currency.USD, Decimal("123.45"))
    assert request_id == "req-42"


async def test_replay_is_marked(create_client: httpx.AsyncClient, fake_create: FakeCreate) -> None:
    first = await put(create_client, body())
    fake_create.replayed = True
    again = await put(create_client, body())
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()


@pytest.mark.parametrize(
    ("requested", "left"),
    [("0.00127269", "0.00100000"), ("0.00000006", "0.00000005"), ("1.00000000", "0E-8")],
)
async def test_cap_exceeded_is_409_with_what_is_left(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, requested: str, left: str
) -> None:
    """Amounts are plain decimals everywhere, the detail too: "0.00000005", never "5E-8"."""
    fake_create.error = CapExceededError(Decimal(requested), Decimal(left))
    doc = assert_problem(await put(create_client, body()), 409)
    plain_left = f"{Decimal(left):f}"
    assert doc["available_btc"] == plain_left
    assert doc["requested_btc"] == requested
    assert f"needs {requested} BTC but only {plain_left} BTC" in doc["detail"]
    assert "E-" not in doc["detail"]


async def test_key_reuse_is_422(create_client: httpx.AsyncClient, fake_create: FakeCreate) -> None:
    fake_create.error = IdempotencyKeyReusedError()
    doc = assert_problem(await put(create_client, body()), 422)
    assert "different request" in doc["detail"]


@pytest.mark.parametrize("error", [PriceUnavailableError("feed down"), StoreUnavailableError("db down")])
async def test_unavailable_is_503_retry_after(
    create_client: httpx.AsyncClient, fake_create: FakeCreate, error: Exception
) -> None:
    fake_create.error = error
    response = await put(create_client, body())
    assert_problem(response, 503)
    assert response.headers["retry-after"]


async def test_an_unexpected_error_is_a_500_problem_that_leaks_nothing(
    create_client: httpx.AsyncClient, fake_create: FakeCreate
) -> None:
    fake_create.error = RuntimeError('SELECT secret FROM asyncpg; File "/x/sqlalchemy/engine.py"')
    response = await put(create_client, body())
    assert response.status_code == 500
    assert response.headers["content-type"] == PROBLEM_JSON
    doc = response.json()
    assert doc["status"] == 500
    assert doc["type"].endswith("internal-error")
    assert "secret" not in response.text


async def test_an_unexpected_error_still_carries_the_request_id(
    create_client: httpx.AsyncClient, fake_create: FakeCreate
) -> None:
    fake_create.error = RuntimeError("boom")
    response = await put(create_client, body(), headers={"X-Request-ID": "trace-500"})
    assert response.status_code == 500
    assert response.headers.get("x-request-id") == "trace-500"


# --- routing, request ids, keys --------------------------------------------------------------


async def test_unknown_route_is_404_problem(
    create_client: httpx.AsyncClient, fetch_client: httpx.AsyncClient
) -> None:
    assert_problem(await create_client.get("/nope"), 404)
    assert_problem(await fetch_client.get("/buy_orders/extra"), 404)


async def test_wrong_method_is_405_problem(
    create_client: httpx.AsyncClient, fetch_client: httpx.AsyncClient
) -> None:
    assert_problem(await create_client.post("/buy_order", json=body()), 405)
    assert_problem(await fetch_client.delete("/buy_orders"), 405)


async def test_request_id_is_echoed(create_client: httpx.AsyncClient) -> None:
    ok = await create_client.get("/healthcheck", headers={"X-Request-ID": "abc-123_XYZ.7"})
    assert ok.headers["x-request-id"] == "abc-123_XYZ.7"
    refused = await put(create_client, raw=b"[]", headers={"X-Request-ID": "trace-9"})
    assert refused.status_code == 422
    assert refused.headers["x-request-id"] == "trace-9"


async def test_request_id_is_generated_when_absent_or_unusable(create_client: httpx.AsyncClient) -> None:
    seen = set()
    for sent in (None, "has space", "x" * 500, ""):
        headers = {} if sent is None else {"X-Request-ID": sent}
        response = await create_client.get("/healthcheck", headers=headers)
        made = response.headers["x-request-id"]
        assert made
        assert made != sent
        assert re.fullmatch(r"[\x21-\x7e]{1,128}", made)
        seen.add(made)
    assert len(seen) == 4  # a fresh one each time


async def test_healthcheck_and_openapi_need_no_database(
    create_client: httpx.AsyncClient, fetch_client: httpx.AsyncClient
) -> None:
    for client in (create_client, fetch_client):
        health = await client.get("/healthcheck")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        schema = await client.get("/openapi.json")
        assert schema.status_code == 200
        assert schema.json()["paths"]


@pytest.fixture(scope="module")
def keyed_apps() -> tuple[FastAPI, FastAPI]:
    settings = make_settings(api_keys=SecretStr("k-one, k-two"))
    return build_create_app(settings), fetch_api.create_app(settings)


@pytest.fixture
async def keyed_clients(
    keyed_apps: tuple[FastAPI, FastAPI], fake_create: FakeCreate
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    async with client_for(keyed_apps[0]) as create, client_for(keyed_apps[1]) as fetch:
        yield create, fetch


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Bearer wrong", "Bearer k-one2", "Bearer k-on", "Basic k-one", "k-one"],
)
async def test_api_keys_refuse_without_a_valid_bearer(
    keyed_clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
    fake_create: FakeCreate,
    authorization: str | None,
) -> None:
    create, fetch = keyed_clients
    headers = {} if authorization is None else {"Authorization": authorization}
    refused = await put(create, body(), headers=headers)
    assert_problem(refused, 401)
    assert refused.headers["www-authenticate"].lower().startswith("bearer")
    assert_problem(await fetch.get("/buy_orders", headers=headers), 401)
    assert fake_create.calls == []


@pytest.mark.parametrize("key", ["k-one", "k-two"])
async def test_api_keys_let_a_valid_bearer_through(
    keyed_clients: tuple[httpx.AsyncClient, httpx.AsyncClient], fake_create: FakeCreate, key: str
) -> None:
    create, fetch = keyed_clients
    auth = {"Authorization": f"Bearer {key}"}
    response = await put(create, body(), headers=auth)
    assert response.status_code == 200
    assert len(fake_create.calls) == 1
    # Through the key check, into validation: still no database needed.
    assert_problem(await fetch.get("/buy_orders?page_size=0", headers=auth), 422, "page_size")


async def test_healthcheck_stays_open_with_api_keys(
    keyed_clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    for client in keyed_clients:
        response = await client.get("/healthcheck")
        assert response.status_code == 200


# --- fetch -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("page_size=0", "page_size"),
        ("page_size=101", "page_size"),
        ("page_size=-1", "page_size"),
        ("page_size=abc", "page_size"),
        ("page_size=1.5", "page_size"),
        ("page_size=" + "9" * 5000, "page_size"),
        ("last_reference=abc", "last_reference"),
        ("last_reference=0b6f3c5e-8d1a-4f5e-9c7b", "last_reference"),
        ("last_reference=" + "a" * 5000, "last_reference"),
        ("page_size=0&last_reference=abc", "last_reference"),
    ],
)
async def test_fetch_bad_query_is_422(fetch_client: httpx.AsyncClient, query: str, field: str) -> None:
    assert_problem(await fetch_client.get(f"/buy_orders?{query}"), 422, field)


@dataclass
class FakeReadStore:
    pages: list[Page]
    calls: list[tuple[int, uuid.UUID | None]] = field(default_factory=list)

    async def page(self, page_size: int, last_reference: uuid.UUID | None) -> Page:
        self.calls.append((page_size, last_reference))
        if last_reference == OTHER_KEY:
            raise UnknownReferenceError(f"no buy order with id {last_reference}")
        return self.pages.pop(0)

    async def ping(self) -> None:
        return None


async def test_fetch_pages_link_to_the_next_one() -> None:
    older = stored_order(OTHER_KEY)
    store = FakeReadStore(
        [Page([stored_order().to_public()], has_more=True), Page([older.to_public()], has_more=False)]
    )
    settings = make_settings()
    app = fetch_api.create_app(settings, graph=bootstrap.fetch(settings, pages=store))
    async with client_for(app) as client:
        first = await client.get("/buy_orders?page_size=1")
        assert first.status_code == 200
        assert first.json() == {"rows": [stored_order().to_public()], "last_reference": str(ORDER_ID)}
        assert first.headers["link"] == f'</buy_orders?page_size=1&last_reference={ORDER_ID}>; rel="next"'
        last = await client.get(f"/buy_orders?page_size=1&last_reference={ORDER_ID}")
        assert last.status_code == 200
        assert "link" not in last.headers
        assert store.calls == [(1, None), (1, ORDER_ID)]
        unknown = await client.get(f"/buy_orders?last_reference={OTHER_KEY}")
        assert_problem(unknown, 404)


@pytest.mark.parametrize(
    ("factory", "api_path"), [(create_api.create_app, "/buy_order"), (fetch_api.create_app, "/buy_orders")]
)
async def test_the_api_route_is_tried_first_and_every_other_route_still_answers(
    factory: Any, api_path: str
) -> None:
    """build_app reorders the routes at start-up (the router tries them in order): the service's
    API first, then FastAPI's docs and the ops routes, all still reachable."""
    app = factory(make_settings())
    before = {getattr(r, "path", None) for r in app.router.routes}
    _api_routes_first(app)
    paths = [getattr(r, "path", None) for r in app.router.routes]
    assert paths[0] == api_path
    assert set(paths) == before
    async with client_for(app) as client:
        for path in ("/openapi.json", "/docs", "/redoc", "/healthcheck", "/metrics"):
            assert (await client.get(path)).status_code == 200, path


def test_fastapi_native_telemetry_is_off_unless_asked_for() -> None:
    """OTel lookups cost three environment reads per request; pydist configures no OTel provider."""
    assert Settings().otel_telemetry is False
    off = fetch_api.create_app(make_settings())
    on = fetch_api.create_app(make_settings(otel_telemetry=True))
    flags = ("tracing", "metrics", "logs")
    assert [off._telemetry[f] for f in flags] == [False, False, False]
    assert [on._telemetry[f] for f in flags] == [True, True, True]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (CapExceededError(Decimal(1), Decimal(0)), "cap_exceeded"),
        (IdempotencyKeyReusedError(), "idempotency_key_reused"),
        (PriceUnavailableError("down"), "price_unavailable"),
        (StoreUnavailableError("down"), "store_unavailable"),
    ],
)
def test_each_refusal_is_counted_under_its_problem_slug(error: Exception, reason: str) -> None:
    """pydist_orders_refused_total's `reason` values are a contract (alerts, dashboards)."""
    assert _refusal_reason(error) == reason


@dataclass
class HeldCreate:
    """A use case that holds every order until `release` is set, counting those it holds."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def holding(self, n: int) -> None:
        """Return once `n` orders are held: each arrival wakes the wait (the caller bounds it)."""
        while self.held < n:
            self._arrived.clear()
            await self._arrived.wait()

    async def __call__(self, command: CreateBuyOrderCommand, request_id: str | None = None) -> Outcome:
        self.held += 1
        self._arrived.set()
        await self.release.wait()
        return Outcome(stored_order(command.request().idempotence_key), replayed=False)


async def test_past_max_in_flight_a_request_is_shed_with_a_503_and_the_ops_paths_still_answer() -> None:
    settings = make_settings(max_in_flight=3)
    held = HeldCreate()
    app = create_api.create_app(settings, graph=bootstrap.create(settings, create_order=held))
    async with client_for(app) as client:
        orders = [asyncio.create_task(put(client, body(idempotence_key=str(uuid.uuid4())))) for _ in range(3)]
        await asyncio.wait_for(held.holding(3), 30)  # all three inside the use case
        shed = await asyncio.wait_for(put(client, body(idempotence_key=str(uuid.uuid4()))), 30)
        problem_doc = assert_problem(shed, 503)
        assert problem_doc["type"] == "/problems/overloaded"
        assert shed.headers["retry-after"] == "1"
        assert held.held == 3  # refused before it reached the use case
        assert (await client.get("/healthcheck")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        held.release.set()
        assert [r.status_code for r in await asyncio.gather(*orders)] == [200, 200, 200]
        assert (await put(client, body(idempotence_key=str(uuid.uuid4())))).status_code == 200


async def test_a_client_stalled_in_its_body_holds_no_slot() -> None:
    """With room for one request, a client that sent half its body and stalls is not counted:
    the next order is served; once the body arrives whole it is served too."""
    settings = make_settings(max_in_flight=1)
    held = HeldCreate()
    held.release.set()
    app = create_api.create_app(settings, graph=bootstrap.create(settings, create_order=held))
    whole = json.dumps(body(idempotence_key=str(uuid.uuid4()))).encode()
    rest = asyncio.Event()
    sent_half = asyncio.Event()

    async def stalled_body() -> AsyncIterator[bytes]:
        yield whole[:10]
        sent_half.set()
        await rest.wait()
        yield whole[10:]

    async with client_for(app) as client:
        stalled = asyncio.create_task(client.put("/buy_order", content=stalled_body(), headers=JSON))
        await asyncio.wait_for(sent_half.wait(), 30)
        other = await asyncio.wait_for(put(client, body(idempotence_key=str(uuid.uuid4()))), 30)
        assert other.status_code == 200, other.text
        rest.set()
        assert (await asyncio.wait_for(stalled, 30)).status_code == 200
    assert held.held == 2


async def test_shed_requests_are_counted() -> None:
    settings = make_settings(max_in_flight=1)
    held = HeldCreate()
    app = create_api.create_app(settings, graph=bootstrap.create(settings, create_order=held))
    before = REGISTRY.get_sample_value("pydist_http_requests_shed_total", {"service": "create_buy_order"})
    async with client_for(app) as client:
        first = asyncio.create_task(put(client, body(idempotence_key=str(uuid.uuid4()))))
        await asyncio.wait_for(held.holding(1), 30)
        assert (await put(client, body(idempotence_key=str(uuid.uuid4())))).status_code == 503
        held.release.set()
        assert (await first).status_code == 200
    after = REGISTRY.get_sample_value("pydist_http_requests_shed_total", {"service": "create_buy_order"})
    assert (after or 0.0) - (before or 0.0) == 1


def put_scope() -> dict[str, Any]:
    """The ASGI scope of a PUT /buy_order, for tests that drive the app's receive and send by hand
    (a client that hangs up or stalls, which an HTTP client library would not do)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PUT",
        "scheme": "http",
        "path": "/buy_order",
        "raw_path": b"/buy_order",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }


async def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_500(
    create_app_: FastAPI, fake_create: FakeCreate
) -> None:
    """Half a body, then the connection closes (the server sees http.disconnect): nothing is
    stored, nothing is sent, and the request is counted as the client's 499 (a status set only
    where the disconnect is caught), not as an unhandled 500."""
    messages = [
        {"type": "http.request", "body": GOOD[:10], "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    labels = {"service": "create_buy_order", "method": "PUT", "route": "/buy_order", "status": "499"}
    before = REGISTRY.get_sample_value("pydist_http_request_duration_seconds_count", labels) or 0.0
    await create_app_(put_scope(), receive, send)
    assert sent == []  # no one is left to read an answer
    assert fake_create.calls == []
    after = REGISTRY.get_sample_value("pydist_http_request_duration_seconds_count", labels)
    assert after == before + 1


async def test_a_body_that_stalls_past_the_timeout_is_a_408_and_the_connection_closes(
    fake_create: FakeCreate,
) -> None:
    """Half a body, then nothing: after BODY_TIMEOUT_S the client is answered 408 with
    `Connection: close` (so the server drops the connection) and nothing reaches the use case."""
    app = build_create_app(make_settings(body_timeout_s=0.2))
    stalled = asyncio.Event()  # never set: the rest of the body never comes
    first = [{"type": "http.request", "body": GOOD[:10], "more_body": True}]
    sent: list[Message] = []

    async def receive() -> Message:
        if first:
            return first.pop()
        await stalled.wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(app(put_scope(), receive, send), 30)
    start = sent[0]
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    doc = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert doc["type"] == "/problems/body-timeout"
    assert doc["detail"] == "the body did not arrive whole within 0.2 s"
    assert fake_create.calls == []


async def test_head_is_routed_as_get_and_counted_as_head(fetch_client: httpx.AsyncClient) -> None:
    labels = {"service": "fetch_buy_orders", "method": "HEAD", "route": "/healthcheck", "status": "200"}
    before = REGISTRY.get_sample_value("pydist_http_request_duration_seconds_count", labels) or 0.0
    assert (await fetch_client.head("/healthcheck")).status_code == 200
    assert (await fetch_client.head("/buy_orders/extra")).status_code == 404
    after = REGISTRY.get_sample_value("pydist_http_request_duration_seconds_count", labels)
    assert after == before + 1


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_get_with_a_body_is_counted_in_flight_at_once(method: str) -> None:
    """A GET's body is never read; a Content-Length on one must not keep it out of the count
    that MAX_IN_FLIGHT sheds by (a client could otherwise pass the limit by adding one)."""
    seen: list[int] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(edge._in_flight)  # what the edge counts while the app runs
        await Response(b"ok")(scope, receive, send)

    edge = EdgeMiddleware(inner, service="fetch_buy_orders", api_keys=frozenset(), max_in_flight=5)
    scope = {**put_scope(), "method": method, "path": "/buy_orders", "raw_path": b"/buy_orders"}
    scope["headers"] = [(b"content-length", b"1"), (b"host", b"testserver")]
    sent: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("a GET's body is never read")

    async def send(message: Message) -> None:
        sent.append(message)

    await edge(scope, receive, send)
    assert seen == [1]
    assert sent[0]["status"] == 200
    assert edge._in_flight == 0


async def test_a_405_on_a_get_route_allows_head_too(fetch_client: httpx.AsyncClient) -> None:
    response = await fetch_client.put("/buy_orders", content=b"{}", headers=JSON)
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET, HEAD"


def test_the_body_timeout_stays_below_the_graceful_shutdown() -> None:
    """A body stalled at a shutdown must get its 408 before uvicorn cancels what is in flight."""
    assert make_settings().body_timeout_s < GRACEFUL_SHUTDOWN_S
    with pytest.raises(ValueError, match="body_timeout_s"):
        make_settings(body_timeout_s=GRACEFUL_SHUTDOWN_S)
