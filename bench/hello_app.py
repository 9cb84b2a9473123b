"""The hello-world baselines: a FastAPI POST with a pydantic body, and a GET, served by uvicorn
with exactly the settings pydist's HTTP processes use (entrypoints/serve.py).

    python -m bench.hello_app --port 8790 [--workers 2]
"""

from __future__ import annotations

import argparse
import signal

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class HelloIn(BaseModel):
    currency: str
    amount: str


def create_app() -> FastAPI:
    app = FastAPI(title="hello")

    @app.post("/hello")
    async def hello_post(body: HelloIn) -> dict[str, str]:
        return {"currency": body.currency, "amount": body.amount, "hello": "world"}

    @app.get("/hello")
    async def hello_get() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/healthcheck")
    async def healthcheck() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    uvicorn.run(
        "bench.hello_app:create_app",
        factory=True,
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=8,
        lifespan="on",
        backlog=4096,
    )


if __name__ == "__main__":
    main()
