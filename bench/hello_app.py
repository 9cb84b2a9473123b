"""The hello-world baselines: a FastAPI POST with a pydantic body, and a GET. bench/harness.py
serves them with uvicorn's command line and the settings pydist's HTTP processes use
(entrypoints/serve.py: uvloop, httptools, no access log, one worker)."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel


class HelloIn(BaseModel):
    currency: str
    amount: str


app = FastAPI(title="hello")


@app.post("/hello")
async def hello_post(body: HelloIn) -> dict[str, str]:
    return {"currency": body.currency, "amount": body.amount, "hello": "world"}


@app.get("/hello")
async def hello_get() -> dict[str, str]:
    return {"hello": "world"}
