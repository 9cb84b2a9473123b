"""A Coinbase-compatible spot-price server for tests, benchmarks and offline demos.

It speaks the one endpoint pydist uses (GET /v2/prices/BTC-{CCY}/spot) over real HTTP, and can be
told to misbehave: down (HTTP 500), slow, garbage, negative or zero prices, or refuse connections.
Control it in-process (`CoinbaseStub.configure(...)`) or over HTTP (POST /_control, GET /_stats).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_PRICES = {"USD": "97000.00", "EUR": "91234.56", "GBP": "76543.21"}
NOT_FOUND = {"errors": [{"id": "not_found"}]}
MODES = ("ok", "down", "slow", "garbage", "negative", "zero", "not_json", "wrong_pair")


class CoinbaseStub:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.prices = dict(DEFAULT_PRICES)
        self.mode = "ok"
        self.delay_s = 10.0
        self.hits: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def configure(
        self,
        mode: str | None = None,
        prices: dict[str, str] | None = None,
        delay_s: float | None = None,
        reset_hits: bool = False,
    ) -> None:
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        with self._lock:
            self.mode = mode or self.mode
            self.prices.update(prices or {})
            self.delay_s = self.delay_s if delay_s is None else delay_s
            if reset_hits:
                self.hits.clear()

    def reset(self) -> None:
        """Back to how it started: healthy, the default prices, no hits counted."""
        self.configure(mode="ok", prices=dict(DEFAULT_PRICES), delay_s=10.0, reset_hits=True)

    def start(self) -> CoinbaseStub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def serve_forever(self) -> None:
        self._server.serve_forever()


def _handler(stub: CoinbaseStub) -> type[BaseHTTPRequestHandler]:
    """The request handler class bound to `stub` (http.server builds one handler per request)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_: Any) -> None:
            pass

        def _send(self, status: int, body: object, ctype: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (e.g. timed out on "slow"): nothing to answer

        def do_GET(self) -> None:
            if self.path == "/_stats":
                self._send(200, {"hits": dict(stub.hits), "mode": stub.mode})
                return
            pair = re.fullmatch(r"/v2/prices/BTC-(.*)/spot", self.path)
            if pair is None:
                self._send(404, NOT_FOUND)
                return
            currency = pair[1]
            with stub._lock:
                stub.hits[currency] += 1
                mode, price = stub.mode, stub.prices.get(currency)
            if price is None:
                self._send(404, NOT_FOUND)
            elif mode == "down":
                self._send(500, {"errors": [{"id": "internal_server_error"}]})
            elif mode == "not_json":
                self._send(200, b"<html>maintenance</html>", "text/html")
            else:
                if mode == "slow":
                    time.sleep(stub.delay_s)
                amount = {"garbage": "lots", "negative": "-" + price, "zero": "0.00"}.get(mode, price)
                quoted = "JPY" if mode == "wrong_pair" else currency
                self._send(200, {"data": {"base": "BTC", "currency": quoted, "amount": amount}})

        def do_POST(self) -> None:
            if self.path != "/_control":
                self._send(404, {})
                return
            length = int(self.headers.get("Content-Length", "0"))
            stub.configure(**json.loads(self.rfile.read(length) or b"{}"))
            self._send(200, {})

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790)
    args = parser.parse_args(argv)
    stub = CoinbaseStub(args.host, args.port)
    print(json.dumps({"event": "coinbase_stub_started", "url": stub.url}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        stub.serve_forever()


if __name__ == "__main__":
    main()
