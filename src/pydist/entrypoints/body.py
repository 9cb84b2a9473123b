"""Strict, bounded JSON bodies: no floats, no NaN, no duplicate keys, no unbounded reads."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

from starlette.requests import Request

from pydist.entrypoints.problems import ProblemError

_JSON_TYPES = ("application/json",)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r:.40}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if content_type not in _JSON_TYPES and not content_type.endswith("+json"):
        raise ProblemError(415, "unsupported-media-type", "send the body as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise ProblemError(413, "body-too-large", f"the body may be at most {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ProblemError(413, "body-too-large", f"the body may be at most {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
        parsed = json.loads(
            text,
            parse_float=Decimal,
            parse_constant=_no_constants,
            object_pairs_hook=_no_duplicates,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = "body is not UTF-8" if isinstance(exc, UnicodeDecodeError) else "body is not valid JSON"
        if isinstance(exc, ValueError) and "duplicate key" in str(exc):
            reason = str(exc)
        raise ProblemError(
            422,
            "invalid-json",
            reason,
            errors=[{"field": "body", "message": reason}],
        ) from None
    if not isinstance(parsed, dict):
        raise ProblemError(
            422,
            "validation-error",
            "body must be a JSON object",
            errors=[{"field": "body", "message": "must be a JSON object"}],
        )
    return parsed
