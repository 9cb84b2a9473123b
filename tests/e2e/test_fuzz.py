"""Schema-driven fuzzing (schemathesis) of both public APIs, as real processes over real HTTP.

Every operation of create_buy_order and fetch_buy_orders is driven from the OpenAPI document the
process itself serves, with valid and invalid data. Each response must be: never 5xx, declared in
the schema (status, content type, body shape), every 4xx an RFC 9457 problem document, nothing
internal leaked, invalid data rejected and valid data accepted (see `_accepted_or_explained`).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.test_hostile_input import assert_problem, leaks
from tests.support.procs import System

pytestmark = pytest.mark.timeout(150 if os.environ.get("PYDIST_LONG") != "1" else 900)

# Per operation and mode. PYDIST_LONG=1 (the long mode of ./test.sh) fuzzes ten times as much.
MAX_EXAMPLES = 500 if os.environ.get("PYDIST_LONG") == "1" else 50
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# What the OpenAPI document cannot say, and the only reasons a schema-valid request may be refused:
# 409 the cap is full; 422 naming the idempotency key (required in the body OR the header, and the
# two must agree; the header must be a UUID) or saying it was reused with another amount (Hypothesis
# repeats values); 503 never expected here (stub healthy), so not allowed.
_CROSS_FIELD = {"idempotence_key", "Idempotency-Key"}


def _accepted_or_explained(case: Any, response: Any) -> None:
    """Schema-valid data is accepted: 200, or 404 (unknown last_reference), or 409 (cap full), or a
    422 that only names the idempotency key (see _CROSS_FIELD). Stricter than schemathesis's own
    positive_data_acceptance, which would let any 5xx and no 422 through."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return
    if response.status_code in (200, 404, 409):
        return
    assert response.status_code == 422, f"schema-valid request got {response.status_code}"
    problem = json.loads(response.content)
    if problem["type"] == "/problems/idempotency-key-reused":
        return  # an earlier example used the same key with another amount: correct refusal
    fields = {e.get("field") for e in problem.get("errors", [])}
    assert fields, response.content[:300]
    assert fields <= _CROSS_FIELD, f"schema-valid request refused for {fields}: {response.content[:300]!r}"


def _keyed(drawn: tuple[Any, uuid.UUID]) -> Any:
    """A valid order body without any idempotency key is refused (422, see _CROSS_FIELD); give
    most of them a fresh key so valid data reaches the price feed and the database."""
    case, key = drawn
    if isinstance(case.body, dict) and case.body.get("idempotence_key") is None and key.int % 4:
        case.body = {**case.body, "idempotence_key": str(key)}
    return case


def _exercise(seen: Counter[tuple[str, int]], case: Any) -> None:
    response = case.call(timeout=10)
    seen[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, checks=CHECKS)
    body = response.content.decode("utf-8", "replace")
    assert not leaks(body), f"{case.operation.label} leaked {leaks(body)} in {body[:300]!r}"
    if response.status_code >= 400:
        assert_problem(response.status_code, response.headers["content-type"][0], response.content)
    _accepted_or_explained(case, response)


def _fuzz(api: str, schema: Any) -> None:
    """Each operation, valid then invalid data, MAX_EXAMPLES each. (schemathesis's pytest plugin
    (`from_fixture`) needs a pytest internal that pytest 9.2 removed, so the documented
    `as_strategy` + Hypothesis route is used: same generators, same checks.)

    Then checks that it really fuzzed (no vacuous pass: no operation, no example run), from this
    call's own count, so each test stands alone in any order: every operation answered, at least
    MAX_EXAMPLES requests in all, none of them 5xx."""
    seen: Counter[tuple[str, int]] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/healthcheck", "/readyz"}
    for operation in operations:
        has_input = bool(list(operation.iter_parameters())) or bool(list(operation.body))
        # Nothing to get wrong in a request with no input: invalid data cannot be generated.
        modes = (
            (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_input else (GenerationMode.POSITIVE,)
        )
        for mode in modes:
            cases = operation.as_strategy(generation_mode=mode)
            if mode is GenerationMode.POSITIVE:
                cases = st.tuples(cases, st.uuids()).map(_keyed)

            @FUZZ_SETTINGS
            @given(case=cases)
            def run(case: Any) -> None:
                _exercise(seen, case)

            run()
    print(f"\n{api} fuzz responses by (operation, status): {dict(sorted(seen.items()))}")
    answered = {label for label, _ in seen}
    assert answered == {op.label for op in operations}, f"operations never called: {dict(seen)}"
    total = sum(seen.values())
    assert total >= MAX_EXAMPLES, f"only {total} requests fuzzed against {api}: {dict(seen)}"
    assert not any(status >= 500 for _, status in seen), dict(seen)


def test_fuzz_create_api(api_system: System) -> None:
    schema = schemathesis.openapi.from_url(api_system.url("create") + "/openapi.json")
    _fuzz("create", schema)


def test_fuzz_fetch_api(api_system: System) -> None:
    schema = schemathesis.openapi.from_url(api_system.url("fetch") + "/openapi.json")
    _fuzz("fetch", schema)
