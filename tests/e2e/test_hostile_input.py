"""Hostile input and API keys, over real HTTP against real processes (uvicorn + httptools).

Part 1 (API_KEYS unset): body and header limits, strict JSON, request-id hygiene, 404/405 — each
answer a 4xx problem document, never a 5xx, and no body (every one is scanned, successes and the
HTTP parser's own answers too) holds a stack trace, exception name, SQL, table or driver name, file
path or internal host.

Part 2 (API_KEYS set, database URLs carrying a password): both APIs refuse what has no valid
bearer key (401 problem + WWW-Authenticate), accept either key, keep /healthcheck and /readyz open,
and none of the secrets (keys, DB password, a rejected token) appears in any process's log.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from pydist.devtools.coinbase_stub import CoinbaseStub
from tests.support.private_services import wait_for
from tests.support.procs import System, base_env, running
from tests.support.services import Databases

pytestmark = pytest.mark.timeout(120)

MAX_BODY = 16 * 1024  # Settings.max_body_bytes default
MAX_HEADERS = 16 * 1024  # http_app.MAX_HEADER_BYTES
PROBLEM_JSON = "application/problem+json"
JSON = {"content-type": "application/json"}
FRESH_ID = re.compile(r"[0-9a-f]{32}")

# What must never reach a client: tracebacks and frames, exception class names, SQL, drivers and
# libraries, file system paths, internal hosts and ports.
_LEAK = re.compile(
    # case-sensitive: exception class names and SQL as code writes them
    r"(?-i:\b[A-Z]\w*(Error|Exception|Warning)\b|\b(SELECT|INSERT|UPDATE|DELETE|FROM|WHERE|RETURNING)\s)"
    r"|Traceback|File \"|line \d+, in|site-packages|\w\.py\b|/work/|/usr/|/tmp/|/home/"
    r"|(?<![\w/])buy_orders\b|outbox|btc_cap|place_orders|pg_\w+"  # tables, not fetch_buy_orders
    r"|asyncpg|sqlalchemy|psycopg|aiormq|aio_pika|uvicorn|starlette|pydantic_core|httpcore"
    r"|postgres|rabbitmq|amqp://|127\.0\.0\.1|localhost|:5432|:5672|:8779",
    re.IGNORECASE,
)


def leaks(text: str) -> list[str]:
    """The leak patterns found in `text` (empty if clean)."""
    return [m.group(0) for m in _LEAK.finditer(text)]


def assert_problem(status: int, content_type: str, content: bytes) -> dict[str, Any]:
    """RFC 9457: problem+json with type, title, status (matching) and detail."""
    assert content_type.split(";")[0].strip() == PROBLEM_JSON, content_type
    doc: dict[str, Any] = json.loads(content)
    assert doc["status"] == status, doc
    for member in ("type", "title", "detail"):
        assert isinstance(doc[member], str), doc
        assert doc[member], doc
    return doc


def scanned(body: str) -> str:
    """Every response body these tests see goes through here: none may leak anything."""
    assert not leaks(body), (leaks(body), body[:500])
    return body


def problem_of(response: httpx.Response, status: int, slug: str | None = None) -> dict[str, Any]:
    scanned(response.text)
    assert response.status_code == status, response.text[:500]
    doc = assert_problem(status, response.headers["content-type"], response.content)
    if slug is not None:
        assert doc["type"] == f"/problems/{slug}", doc
    return doc


def order(amount: str = "10.00", key: uuid.UUID | None = None) -> dict[str, str]:
    return {"currency": "USD", "amount": amount, "idempotence_key": str(key or uuid.uuid4())}


# ------------------------------------------------------------------------------ raw HTTP


@dataclass
class RawResponse:
    status: int
    head: str
    headers: dict[str, str]
    body: bytes


def raw_http(url: str, request: bytes, *, timeout: float = 5.0) -> RawResponse:
    """Send `request` bytes as they are (no client fixing them up) and read one response."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    assert host is not None
    assert port is not None
    deadline = time.monotonic() + timeout
    data = b""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        # The server may answer and close before taking everything: then read the answer.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if length and len(rest) >= int(length.group(1)):
                    break
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    head = head_bytes.decode("latin-1")
    assert head.startswith("HTTP/1.1 "), f"no HTTP response: {data[:300]!r}"
    headers = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(int(head.split(" ")[1]), head, headers, body)


def chunked(chunks: Iterable[bytes]) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def put_head(extra: str = "") -> bytes:
    return (
        "PUT /buy_order HTTP/1.1\r\nHost: pydist\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\n{extra}\r\n"
    ).encode()


# ------------------------------------------------------------------------------ part 1: no keys


@pytest.fixture(scope="module")
def system(api_system: System) -> System:
    return api_system


@pytest.fixture(scope="module")
def create(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.url("create"), timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def fetch(system: System) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=system.url("fetch"), timeout=10) as client:
        yield client


def test_a_valid_order_still_goes_through(create: httpx.Client) -> None:
    """The baseline the refusals below are measured against: the same system accepts this."""
    response = create.put("/buy_order", json=order())
    scanned(response.text)
    assert response.status_code == 200, response.text


def test_body_at_the_limit_is_read_and_one_byte_more_is_413(create: httpx.Client) -> None:
    doc = json.dumps(order()).encode()
    at_limit = doc[:-1] + b" " * (MAX_BODY - len(doc)) + b"}"
    assert len(at_limit) == MAX_BODY
    ok = create.put("/buy_order", content=at_limit, headers=JSON)
    scanned(ok.text)
    assert ok.status_code == 200, ok.text
    over = doc[:-1] + b" " * (MAX_BODY + 1 - len(doc)) + b"}"
    problem_of(create.put("/buy_order", content=over, headers=JSON), 413, "body-too-large")


def test_body_too_large_with_honest_content_length_is_413(create: httpx.Client) -> None:
    for size in (MAX_BODY + 1, 1024 * 1024):
        body = b'{"pad": "' + b"x" * size + b'"}'
        problem_of(create.put("/buy_order", content=body, headers=JSON), 413, "body-too-large")


def test_body_too_large_chunked_is_413(create: httpx.Client, system: System) -> None:
    """No Content-Length: the limit is enforced while reading, not trusted from a header."""

    def stream() -> Iterator[bytes]:
        yield b'{"pad": "'
        for _ in range(64):  # 64 KiB, far past the limit
            yield b"x" * 1024
        yield b'"}'

    problem_of(create.put("/buy_order", content=stream(), headers=JSON), 413, "body-too-large")
    # The same over a raw socket: many small chunks, then one that claims 4 GiB and sends 20 KiB.
    small = raw_http(
        system.url("create"), put_head("Transfer-Encoding: chunked\r\n") + chunked([b" "] * 20000)
    )
    assert small.status == 413, small.head
    assert_problem(413, small.headers["content-type"], small.body)
    liar = put_head("Transfer-Encoding: chunked\r\n") + b"FFFFFFFF\r\n" + b" " * (MAX_BODY + 4096)
    response = raw_http(system.url("create"), liar)
    assert response.status == 413, response.head
    assert_problem(413, response.headers["content-type"], response.body)
    for r in (small, response):
        scanned(r.body.decode())


@pytest.fixture(scope="module")
def impatient_create(databases: Databases, coinbase: CoinbaseStub) -> Iterator[System]:
    """create alone, with a body timeout of 1 s instead of 5, so the stalled-body test is short."""
    env = base_env(databases.write_url, databases.read_url, coinbase.url, None)
    env["BODY_TIMEOUT_S"] = "1"
    with running(env, "create") as started:
        yield started


def test_a_body_that_stalls_is_answered_408_and_the_connection_closed(impatient_create: System) -> None:
    """A slow sender (slowloris) holds its connection for BODY_TIMEOUT_S at most: half a body, then
    silence, is answered 408 and the server closes the connection. Measured: closed 1.0-1.1 s
    after the last byte; the bound is 10 s."""
    head = put_head("Content-Length: 100\r\n").replace(b"Connection: close\r\n", b"")
    url = urlsplit(impatient_create.url("create"))
    assert url.hostname is not None
    assert url.port is not None
    data = b""
    started = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head + b'{"currency": ')
        while chunk := sock.recv(65536):  # until the server closes; a socket timeout fails the test
            data += chunk
    took = time.monotonic() - started
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 408 "), data[:300]
    assert b"\r\nconnection: close" in head_bytes.lower()
    doc = assert_problem(408, "application/problem+json", body)
    assert doc["type"] == "/problems/body-timeout"
    assert 1.0 <= took < 10, took
    scanned(body.decode())


def test_smuggling_shapes_are_refused_by_the_parser(system: System) -> None:
    """Content-Length and chunked together, or a chunk longer than its size line: 400, never
    processed (the order in the body would be valid)."""
    body = json.dumps(order()).encode()
    both = put_head(f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n") + chunked([body])
    lying_chunk = put_head("Transfer-Encoding: chunked\r\n") + b"5\r\n" + body + b"\r\n0\r\n\r\n"
    for request in (both, lying_chunk):
        response = raw_http(system.url("create"), request)
        assert response.status == 400, response.head
        scanned(response.body.decode("latin-1"))


def test_duplicate_keys_are_422(create: httpx.Client) -> None:
    body = b'{"currency": "USD", "amount": "10.00", "amount": "99999.00", "idempotence_key": "%s"}'
    doc = problem_of(
        create.put("/buy_order", content=body % str(uuid.uuid4()).encode(), headers=JSON), 422, "invalid-json"
    )
    assert "duplicate key" in doc["detail"]


@pytest.mark.parametrize(
    ("name", "body", "status"),
    [
        ("100k [", b"[" * 100_000, 413),  # over the size limit before the parser sees it
        ("16k [", b"[" * (MAX_BODY - 1), 422),  # within the limit: the parser's depth guard
        ("nested objects", b'{"a":' * 2000 + b"1" + b"}" * 2000, 422),
        ("nested in a field", b'{"currency": ' + b"[" * 5000 + b"]" * 5000 + b', "amount": "1"}', 422),
    ],
)
def test_deep_nesting_is_4xx(create: httpx.Client, name: str, body: bytes, status: int) -> None:
    problem_of(create.put("/buy_order", content=body, headers=JSON), status)


@pytest.mark.parametrize(
    "body",
    [
        b'{"currency": "\xff\xfe", "amount": "1"}',  # invalid bytes
        b'{"currency": "US\xc3", "amount": "1"}',  # truncated sequence
        b'{"currency": "\xed\xa0\x80", "amount": "1"}',  # an encoded surrogate
        b"\xef\xbb\xbf{}",  # a BOM
    ],
)
def test_invalid_utf8_is_422(create: httpx.Client, body: bytes) -> None:
    problem_of(create.put("/buy_order", content=body, headers=JSON), 422, "invalid-json")


@pytest.mark.parametrize(
    "body",
    [
        b'{"\\ud800": 1, "currency": "USD", "amount": "1"}',  # a lone surrogate as a key
        b'{"currency": "\\udfff", "amount": "1"}',  # and as a value
        b'{"currency": "USD", "amount": NaN}',
        b'{"currency": "USD", "amount": 1e999999}',
        b'{"currency": "USD", "amount": ' + b"9" * 5000 + b"}",
        b'{"currency": "USD\\u0000", "amount": "1"}',
        b"null",
        b"",
    ],
)
def test_odd_json_is_422_not_500(create: httpx.Client, body: bytes) -> None:
    problem_of(create.put("/buy_order", content=body, headers=JSON), 422)


def test_a_hostile_field_name_is_not_echoed_in_full(create: httpx.Client) -> None:
    name = "k" * 5000 + "\u202e"
    body = json.dumps({**order(), name: 1}).encode()
    doc = problem_of(create.put("/buy_order", content=body, headers=JSON), 422, "validation-error")
    assert "k" * 100 not in json.dumps(doc)
    assert all(len(e["field"]) <= 64 for e in doc["errors"])


def test_many_unknown_fields_give_a_bounded_answer(create: httpx.Client) -> None:
    body = json.dumps({**order(), **{f"x{i}": 0 for i in range(1500)}}, separators=(",", ":")).encode()
    assert len(body) < MAX_BODY
    response = create.put("/buy_order", content=body, headers=JSON)
    doc = problem_of(response, 422, "validation-error")
    assert len(doc["errors"]) <= 10
    assert len(response.content) < 4096


def test_wrong_media_type_is_415(create: httpx.Client) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        response = create.put("/buy_order", content=b"currency=USD", headers={"content-type": content_type})
        problem_of(response, 415, "unsupported-media-type")


@pytest.mark.parametrize(
    ("size", "status"),
    [(101, 422), (4096, 422), (MAX_HEADERS - 512, 422), (MAX_HEADERS + 1, 431), (1024 * 1024, 431)],
)
def test_huge_idempotency_key_is_4xx(create: httpx.Client, size: int, status: int) -> None:
    response = create.put("/buy_order", json=order(), headers={"Idempotency-Key": "7" * size})
    problem_of(response, status)
    assert "7" * 100 not in response.text


def test_too_many_headers_in_total_are_431(fetch: httpx.Client) -> None:
    headers = {f"X-Filler-{i}": "f" * 200 for i in range(100)}
    problem_of(fetch.get("/buy_orders", headers=headers), 431, "headers-too-large")


def test_a_usable_request_id_is_echoed(fetch: httpx.Client) -> None:
    response = fetch.get("/buy_orders", headers={"X-Request-ID": "trace-abc.123_X"})
    scanned(response.text)
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-abc.123_X"


@pytest.mark.parametrize(
    "sent",
    [
        "r" * 129,
        "r" * 10_000,
        "has space",
        "caf\u00e9",  # non-ASCII (sent as latin-1 by httpx)
        "tab\there",
    ],
)
def test_an_unusable_request_id_is_replaced_by_a_fresh_one(fetch: httpx.Client, sent: str) -> None:
    response = fetch.get("/buy_orders", headers={"X-Request-ID": sent.encode("latin-1")})
    scanned(response.text)
    assert response.status_code == 200
    got = response.headers["x-request-id"]
    assert got != sent
    assert FRESH_ID.fullmatch(got), got


def test_header_injection_through_the_request_id_is_not_reflected(system: System) -> None:
    url = system.url("fetch")
    attempts = [
        # a bare CR, a bare LF, obsolete line folding: the parser refuses the request (400)
        (b"X-Request-ID: abc\rSet-Cookie: injected=1\r\n", 400, None),
        (b"X-Request-ID: abc\nSet-Cookie: injected=1\r\n", 400, None),
        (b"X-Request-ID: abc\r\n Set-Cookie: injected=1\r\n", 400, None),
        # CRLF: simply two request headers; only the request id comes back
        (b"X-Request-ID: abc\r\nSet-Cookie: injected=1\r\n", 200, "abc"),
        # percent-encoded CRLF: visible ASCII, echoed as the inert text it is
        (b"X-Request-ID: abc%0d%0aSet-Cookie:%20injected=1\r\n", 200, "abc%0d%0aSet-Cookie:%20injected=1"),
    ]
    for extra, status, echoed in attempts:
        request = b"GET /buy_orders HTTP/1.1\r\nHost: pydist\r\nConnection: close\r\n" + extra + b"\r\n"
        response = raw_http(url, request)
        scanned(response.body.decode("latin-1"))
        assert response.status == status, (extra, response.head)
        assert response.headers.get("x-request-id") == echoed, (extra, response.head)
        assert "set-cookie" not in response.headers, response.head
        assert not re.search(r"(?im)^\s*set-cookie", response.head), response.head
        assert "injected" not in response.head.replace("%20injected", ""), response.head


@pytest.mark.parametrize(
    ("service", "method", "path", "status"),
    [
        ("create", "GET", "/nope", 404),
        ("create", "GET", "/buy_order/../../etc/passwd", 404),
        ("create", "POST", "/buy_order", 405),
        ("create", "GET", "/buy_order", 405),
        ("create", "DELETE", "/buy_order", 405),
        ("fetch", "GET", "/buy_orders/extra", 404),
        ("fetch", "PUT", "/buy_orders", 405),
        ("fetch", "DELETE", "/buy_orders", 405),
    ],
)
def test_404_and_405_are_problems(system: System, service: str, method: str, path: str, status: int) -> None:
    response = httpx.request(method, system.url(service) + path, timeout=10)
    problem_of(response, status)
    if status == 405:
        assert response.headers["allow"], response.headers


@pytest.mark.parametrize(
    ("service", "path"),
    [("fetch", "/buy_orders?page_size=2"), ("fetch", "/healthcheck"), ("create", "/readyz")],
)
def test_head_is_get_without_the_body(system: System, service: str, path: str) -> None:
    """RFC 9110: a server MUST support HEAD where it supports GET: the same status and headers
    (the length of the body it would send among them), and no body."""
    url = system.url(service) + path
    got, head = httpx.get(url, timeout=10), httpx.head(url, timeout=10)
    assert (head.status_code, got.status_code) == (200, 200), head.headers
    assert head.content == b""
    assert head.headers["content-length"] == str(len(got.content))
    assert head.headers["content-type"] == got.headers["content-type"]


@pytest.mark.parametrize(
    "query",
    [
        "page_size=" + "9" * 5000,
        "page_size=-1",
        "page_size=1e3",
        "last_reference=" + "a" * 5000,
        "last_reference=%00",
        "last_reference=%ED%A0%80",  # an encoded surrogate
        "last_reference='%20OR%201=1--",
    ],
)
def test_hostile_queries_are_422(fetch: httpx.Client, query: str) -> None:
    problem_of(fetch.get(f"/buy_orders?{query}"), 422, "validation-error")


def test_price_feed_down_is_a_clean_503(create: httpx.Client, system: System, coinbase: CoinbaseStub) -> None:
    """A failure deep inside (upstream 500 behind btc_price) says nothing about the inside."""
    coinbase.configure(mode="down")
    try:
        deadline = time.monotonic() + 20  # the cached quote must first grow older than its max age
        while True:
            response = create.put("/buy_order", json=order())
            if response.status_code == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        problem_of(response, 503, "price-unavailable")
    finally:
        coinbase.configure(mode="ok")
        # Leave the system as the next test (in any order) expects it: taking orders again. btc_price
        # and create's price client each remember a failure for a moment: 0.42 s measured (5 runs
        # after this test); bound 20 s.

        def accepted() -> bool:
            return create.put("/buy_order", json=order()).status_code == 200

        wait_for(accepted, timeout=20, what="orders accepted again after the price feed came back")


# ------------------------------------------------------------------------------ part 2: API keys

KEYS = ("k-alpha-7Q2xZ9vLm4", "k-beta-9Rt4WpX2c8")
DB_PASSWORD = "pw-SeCrEt-5150-token"
WRONG_TOKEN = "wrong-token-H7d2Kq"


def with_password(url: str) -> str:
    """Trust auth ignores it, so the processes still connect: it is there to be looked for."""
    parts = urlsplit(url)
    netloc = f"{parts.username}:{DB_PASSWORD}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture(scope="class")
def keyed(databases: Databases, coinbase: CoinbaseStub) -> Iterator[System]:
    coinbase.reset()
    env = base_env(with_password(databases.write_url), with_password(databases.read_url), coinbase.url, None)
    env.update(API_KEYS=f" {KEYS[0]} ,{KEYS[1]}", LOG_LEVEL="DEBUG")
    with running(env, "price", "create", "fetch", "relay") as started:
        yield started


@pytest.mark.usefixtures("keyed")
class TestApiKeys:
    @pytest.mark.parametrize(
        "authorization",
        [
            None,
            "",
            "Bearer",
            f"Bearer {WRONG_TOKEN}",
            f"Bearer {KEYS[0]}x",
            f"Bearer {KEYS[0][:-1]}",
            f"Bearer {KEYS[0]},{KEYS[1]}",
            f"Basic {KEYS[0]}",
            f"Token {KEYS[0]}",
            KEYS[0],
        ],
    )
    def test_no_valid_bearer_is_401(self, keyed: System, authorization: str | None) -> None:
        headers = {} if authorization is None else {"Authorization": authorization}
        put = httpx.put(keyed.url("create") + "/buy_order", json=order(), headers=headers, timeout=10)
        get = httpx.get(keyed.url("fetch") + "/buy_orders", headers=headers, timeout=10)
        for response in (put, get):
            problem_of(response, 401, "unauthorized")
            assert response.headers["www-authenticate"].startswith("Bearer"), response.headers

    @pytest.mark.parametrize("key", KEYS)
    def test_either_key_works(self, keyed: System, key: str) -> None:
        for scheme in ("Bearer", "bearer"):
            auth = {"Authorization": f"{scheme} {key}"}
            put = httpx.put(keyed.url("create") + "/buy_order", json=order(), headers=auth, timeout=10)
            assert put.status_code == 200, put.text
            get = httpx.get(keyed.url("fetch") + "/buy_orders", headers=auth, timeout=10)
            assert get.status_code == 200, get.text
            scanned(put.text + get.text)

    def test_health_is_open_and_the_rest_is_not(self, keyed: System) -> None:
        for name in ("create", "fetch"):
            for path in ("/healthcheck", "/readyz"):
                response = httpx.get(keyed.url(name) + path, timeout=10)
                assert response.status_code == 200, (name, path, response.text)
            assert httpx.get(keyed.url(name) + "/openapi.json", timeout=10).status_code == 401
            schema = httpx.get(
                keyed.url(name) + "/openapi.json", headers={"Authorization": f"Bearer {KEYS[1]}"}, timeout=10
            ).json()
            assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
            assert schema["paths"]["/healthcheck"]["get"]["security"] == []


class TestSecretsInLogs:
    """Its own `keyed` stack (the fixture is class-scoped): the test stops the processes to read
    their whole logs, which would take the stack away from any TestApiKeys test run after it."""

    def test_no_secret_is_ever_logged(self, keyed: System) -> None:
        auth = {"Authorization": f"Bearer {KEYS[0]}"}
        for _ in range(3):  # some traffic of every kind, then a clean stop so every line is out
            httpx.put(keyed.url("create") + "/buy_order", json=order(), headers=auth, timeout=10)
            httpx.put(keyed.url("create") + "/buy_order", json={"amount": "x"}, headers=auth, timeout=10)
            httpx.get(keyed.url("fetch") + "/buy_orders", headers={"Authorization": WRONG_TOKEN}, timeout=10)
        # And the error path, where connection strings like to leak: a fetch process whose
        # database does not exist keeps retrying (and logging) while /readyz says 503.
        broken_url = with_password(keyed.env["READ_DATABASE_URL"].rsplit("/", 1)[0] + "/pydist_no_such_db")
        broken = System({**keyed.env, "READ_DATABASE_URL": broken_url}, log_dir=keyed.log_dir)
        broken.start("fetch", wait=False)
        try:
            deadline = time.monotonic() + 30
            ready = None
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    ready = httpx.get(broken.url("fetch") + "/readyz", timeout=2)
                    if "dependency_unavailable" in broken.procs["fetch"].log():
                        break
                time.sleep(0.2)
            assert ready is not None
            problem_of(ready, 503)
            assert "dependency_unavailable" in broken.procs["fetch"].log()
        finally:
            broken_proc = broken.procs["fetch"]
            broken.stop_all()
        procs = dict(keyed.procs)
        keyed.stop_all()
        logs = {name: proc.log() for name, proc in procs.items()}
        logs["fetch (no database)"] = broken_proc.log()
        assert set(logs) == {"price", "create", "fetch", "relay", "fetch (no database)"}
        for name, text in logs.items():
            assert "_started" in text, (name, text[-2000:])
            for secret in (*KEYS, DB_PASSWORD, WRONG_TOKEN):
                assert secret not in text, f"{secret!r} appears in the {name} log"
