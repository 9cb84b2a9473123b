"""RFC 9457 problem details: every error leaves as application/problem+json, never a stack trace."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from pydist.domain.order import CapExceededError, IdempotencyKeyReusedError
from pydist.service.create_order import IdempotencyKeyMissingError, IdempotencyKeysDifferError
from pydist.service.ports import PriceUnavailableError, StoreUnavailableError, UnknownReferenceError

log = structlog.get_logger()
PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    409: "Conflict",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Unprocessable request",
    431: "Request header fields too large",
    500: "Internal error",
    503: "Service unavailable",
}


_MAX_FIELD = 64
_MAX_MESSAGE = 200


def safe_text(value: object, limit: int) -> str:
    """Client-influenced text made safe to echo: valid UTF-8 (lone surrogates escaped), no control
    characters, at most `limit` characters. Keeps a hostile key or value from growing, breaking or
    smuggling anything into a problem document."""
    text = str(value).encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def problem(
    status: int,
    slug: str,
    detail: str,
    *,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> Response:
    body = {
        "type": f"/problems/{slug}",
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        **extensions,
    }
    return Response(
        orjson.dumps(body), status_code=status, media_type=PROBLEM_JSON, headers=dict(headers or {})
    )


class ProblemError(Exception):
    """Raise anywhere in a handler to answer with `problem(status, slug, detail, **fields)`."""

    def __init__(self, status: int, slug: str, detail: str, **fields: Any) -> None:
        super().__init__(detail)
        self.response = problem(status, slug, detail, **fields)


def validation_problem(errors: Sequence[Any]) -> Response:
    """422 with an `errors` list naming each field, without echoing what the client sent."""
    listed = []
    for err in errors[:10]:
        field = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "header"))
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        listed.append(
            {"field": safe_text(field or "body", _MAX_FIELD), "message": safe_text(message, _MAX_MESSAGE)}
        )
    detail = "; ".join(f"{e['field']}: {e['message']}" for e in listed)
    return problem(422, "validation-error", detail, errors=listed)


@dataclass(frozen=True)
class ProblemType:
    """How one exception leaves: status, `type` slug, title, and a fixed detail (None: the
    exception's own text). 503s say when to retry and are logged."""

    status: int
    slug: str
    title: str | None = None
    detail: str | None = None
    extensions: Callable[[Any], dict[str, Any]] | None = None

    def response(self, exc: Exception) -> Response:
        headers = None
        if self.status == 503:
            log.warning("upstream_unavailable", error=str(exc))
            headers = {"Retry-After": "1"}
        extensions = self.extensions(exc) if self.extensions else {}
        detail = str(exc) if self.detail is None else self.detail
        return problem(self.status, self.slug, detail, title=self.title, headers=headers, **extensions)


def field_error(field: str, message: str) -> dict[str, Any]:
    """The `errors` extension of a 422 problem about one field."""
    return {"errors": [{"field": field, "message": message}]}


def invalid(field: str, message: str, detail: str, slug: str = "validation-error") -> ProblemError:
    """A 422 problem about one field: raise it."""
    return ProblemError(422, slug, detail, **field_error(field, message))


PROBLEM_TYPES: dict[type[Exception], ProblemType] = {
    CapExceededError: ProblemType(
        409,
        "cap-exceeded",
        "BTC cap exceeded",
        extensions=lambda exc: {
            "available_btc": f"{exc.available_btc:f}",
            "requested_btc": f"{exc.requested_btc:f}",
        },
    ),
    IdempotencyKeyReusedError: ProblemType(
        422,
        "idempotency-key-reused",
        "Idempotency key reused with a different request",
        "idempotency key reused with a different request: the first request with this key "
        "had another currency or amount",
    ),
    IdempotencyKeyMissingError: ProblemType(
        422, "validation-error", extensions=lambda _: field_error("idempotence_key", "required")
    ),
    IdempotencyKeysDifferError: ProblemType(
        422,
        "validation-error",
        extensions=lambda _: field_error("idempotence_key", "differs from Idempotency-Key"),
    ),
    PriceUnavailableError: ProblemType(
        503,
        "price-unavailable",
        detail="the BTC price is unavailable right now; nothing was stored. "
        "Retry with the same idempotency key.",
    ),
    StoreUnavailableError: ProblemType(
        503,
        "store-unavailable",
        detail="the order store is unavailable right now; the order may or may not have been "
        "stored. Retry with the same idempotency key: that is safe either way.",
    ),
    UnknownReferenceError: ProblemType(404, "unknown-reference"),
}
"""The one table from exception to problem type (besides the validation and HTTP handlers; any
other exception is a 500 problem from http_app.EdgeMiddleware)."""


def problem_type(exc: Exception) -> ProblemType:
    """The problem type of `exc`: its class's, or its nearest base class's, in PROBLEM_TYPES."""
    return next(PROBLEM_TYPES[c] for c in type(exc).__mro__ if c in PROBLEM_TYPES)


def install_problem_handlers(app: FastAPI) -> None:
    async def on_problem(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProblemError)
        return exc.response

    async def on_validation(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError | ValidationError)
        return validation_problem(list(exc.errors()))

    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "")
        headers = dict(exc.headers or {})
        if "GET" in headers.get("Allow", "").split(", "):  # the edge answers HEAD as GET
            headers["Allow"] += ", HEAD"
        return problem(exc.status_code, slug, detail, headers=headers)

    async def on_mapped(_: Request, exc: Exception) -> Response:
        return problem_type(exc).response(exc)

    app.add_exception_handler(ProblemError, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    for error in PROBLEM_TYPES:
        app.add_exception_handler(error, on_mapped)
