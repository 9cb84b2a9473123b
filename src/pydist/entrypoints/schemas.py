"""What travels over HTTP: the request body, read as strict, bounded JSON (no floats, no NaN, no
duplicate keys, no unbounded reads), and the wire models of what clients send and get back.
Amounts are strings on the wire, always."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, WithJsonSchema
from starlette.requests import Request

from pydist.domain.money import BTC_CAP, Currency, parse_fiat_amount
from pydist.entrypoints.problems import ProblemError, invalid

# Exactly what parse_fiat_amount accepts, so a schema-driven client (or fuzzer) and the server agree:
# a decimal string of at most 10 integer digits and 2 decimals, not zero, below 1,000,000,000; or a
# JSON number with at most 2 decimals in the same range (parsed as Decimal, never as a float).
AMOUNT_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "string",
            "pattern": r"^[0-9]{1,10}(\.[0-9]{1,2})?$",
            "not": {"pattern": r"^(0+(\.0*)?|[1-9][0-9]{9}(\.[0-9]*)?)$"},
        },
        {
            "type": "number",
            "exclusiveMinimum": 0,
            "exclusiveMaximum": 1000000000,
            "multipleOf": 0.01,
        },
    ],
    "description": "0 < amount < 1,000,000,000 with at most 2 decimals: a string (preferred), "
    "or a JSON number written with at most 2 decimals",
    "examples": ["123.45"],
}

_EXAMPLE: dict[str, JsonValue] = {
    "currency": "USD",
    "amount": "123.45",
    "idempotence_key": "0b6f3c5e-8d1a-4f5e-9c7b-2a4d6e8f0a1b",
}


class BuyOrderIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_EXAMPLE]})

    # Inline enum, not a $ref: create_api embeds this schema in the OpenAPI document as is, where
    # a "#/$defs/..." reference would point at the document root and not resolve.
    currency: Annotated[Currency, WithJsonSchema({"type": "string", "enum": [c.value for c in Currency]})] = (
        Field(description="ISO 4217 code: EUR, GBP or USD")
    )
    amount: Annotated[Decimal, BeforeValidator(parse_fiat_amount), WithJsonSchema(AMOUNT_JSON_SCHEMA)]
    # "idempotence_key" is the API contract's name for it (body, responses, both databases); the
    # IETF header is Idempotency-Key, and the code speaks of the idempotency key.
    idempotence_key: uuid.UUID | None = Field(
        default=None, description="Client-chosen UUID; or send it as the Idempotency-Key header"
    )


class BuyOrderOut(BaseModel):
    id: uuid.UUID
    created_at: str = Field(examples=["2026-11-30T12:00:00.123456Z"])
    currency: Currency
    currency_amount: str = Field(examples=["123.45"])
    btc_rate: str = Field(examples=["97000.00"], description="Fiat price of 1 BTC, as received")
    btc_amount: str = Field(examples=["0.00127269"], description="Rounded up to 8 decimals")


class CreateBuyOrderOut(BaseModel):
    idempotence_key: uuid.UUID
    buy_order: BuyOrderOut


class PageQuery(BaseModel):
    """GET /buy_orders' query. Validated by the handler itself rather than by FastAPI's `Query`
    parameters: the same pydantic rules and 422 problems, and 1.19x the pages/s end to end (A/B in
    docs/benchmarks.md, "FastAPI's own parameters"). Unknown parameters are ignored; a repeated
    one: the last wins."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    page_size: int = Field(default=10, ge=1, le=100, description="Rows per page, 1..100")
    last_reference: uuid.UUID | None = Field(
        default=None, description="id of the last row of the previous page"
    )

    @classmethod
    def openapi_parameters(cls) -> list[dict[str, Any]]:
        """The query parameters as OpenAPI declares them, from the model's own JSON schema."""
        schema = cls.model_json_schema()
        return [
            {
                "name": name,
                "in": "query",
                "required": False,
                "description": prop.pop("description", ""),
                "schema": {k: v for k, v in prop.items() if k != "title"},
            }
            for name, prop in schema["properties"].items()
        ]


class BuyOrderPage(BaseModel):
    rows: list[BuyOrderOut]
    last_reference: uuid.UUID | None = Field(
        description="id of the last row of this page; pass it to get the next page"
    )


_FIELD_ERROR = {"type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}
PROBLEM_SCHEMA: dict[str, Any] = {
    "application/problem+json": {
        "schema": {
            "type": "object",
            "required": ["type", "title", "status", "detail"],
            "properties": {
                "type": {"type": "string"},
                "title": {"type": "string"},
                "status": {"type": "integer"},
                "detail": {"type": "string"},
                "errors": {"type": "array", "items": _FIELD_ERROR},
            },
        }
    }
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        401: "Missing or wrong API key (only when API_KEYS is set)",
        404: "Unknown last_reference",
        409: f"The order would take the total past {BTC_CAP} BTC",
        413: "Body larger than the limit",
        408: "The body did not arrive whole within BODY_TIMEOUT_S; the connection is closed",
        415: "Body is not JSON",
        422: "Invalid request, or idempotency key reused with a different request",
        503: "Price feed or database unavailable; retry with the same idempotency key",
    }
    return {s: {"description": descriptions[s], "content": PROBLEM_SCHEMA} for s in statuses}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r:.40}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


async def _read_body(request: Request, max_bytes: int, timeout_s: float) -> bytearray:
    """The whole body, cut at `max_bytes`. A client that stalls in it is answered 408 and the
    connection closed after `timeout_s`, so a slow sender holds a connection for a bounded time
    (uvicorn has no body timeout of its own)."""
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    raise ProblemError(413, "body-too-large", f"the body may be at most {max_bytes} bytes")
    except TimeoutError:
        detail = f"the body did not arrive whole within {timeout_s:g} s"
        raise ProblemError(408, "body-timeout", detail, headers={"Connection": "close"}) from None
    return body


async def read_json_object(request: Request, max_bytes: int, timeout_s: float) -> dict[str, Any]:
    # Media types are case-insensitive (RFC 9110 section 8.3.1): "Application/JSON" is JSON.
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json" and not content_type.endswith("+json"):
        raise ProblemError(415, "unsupported-media-type", "send the body as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise ProblemError(413, "body-too-large", f"the body may be at most {max_bytes} bytes")
    body = await _read_body(request, max_bytes, timeout_s)
    try:
        text = body.decode("utf-8")
        parsed = json.loads(
            text, parse_float=Decimal, parse_constant=_no_constants, object_pairs_hook=_no_duplicates
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reason = "body is not UTF-8" if isinstance(exc, UnicodeDecodeError) else "body is not valid JSON"
        if isinstance(exc, ValueError) and "duplicate key" in str(exc):
            reason = str(exc)
        raise invalid("body", reason, reason, slug="invalid-json") from None
    if not isinstance(parsed, dict):
        raise invalid("body", "must be a JSON object", "body must be a JSON object")
    return parsed
