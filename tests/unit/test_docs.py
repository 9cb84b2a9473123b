"""docs/architecture.md names code: every module path it cites exists, and every
`module.Name` of its step-by-step walk resolves to something in that module, so a rename that
leaves the walk behind fails here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "pydist"
DOC = (ROOT / "docs" / "architecture.md").read_text()
WALK = DOC.split("## One order, step by step", 1)[1].split("\n## ", 1)[0].split("| step | code |")[0]
MODULES = {p.relative_to(PACKAGE).with_suffix("").as_posix() for p in PACKAGE.rglob("*.py")}


def _cited_paths() -> set[str]:
    """`entrypoints/serve.py`, `adapters/db.py`, … (migrations' globs like w0002_* left out)."""
    return {m for m in re.findall(r"`((?:[a-z_]+/)*[a-z_]+)\.py`", DOC) if "*" not in m}


NOT_CODE = {"pydist.events", "pydist.read_model_sync"}
"""Dotted names in the walk that are RabbitMQ's (the exchange and the queue), not Python's."""


def _walk_names() -> set[str]:
    """`adapters/write_store.WriteStore`, `schemas.read_json_object`, `BuyOrder.to_public()`, …:
    every dotted name of the walk but file names and NOT_CODE; each must resolve."""
    names = re.findall(r"`((?:[a-z_]+/)*[A-Za-z_]+(?:\.[A-Za-z_]+)+)(?:\([^`]*\))?`", WALK)
    return {n for n in names if not n.endswith(".py") and n not in NOT_CODE}


def _module_of(short: str) -> str | None:
    """`adapters/write_store` as it is, `schemas` → `entrypoints/schemas` (the one module so named),
    `WriteStore` → the one module that defines that class."""
    if short in MODULES:
        return short
    if short[0].isupper():
        found = [
            m for m in MODULES if re.search(rf"^class {short}\b", (PACKAGE / f"{m}.py").read_text(), re.M)
        ]
    else:
        found = [m for m in MODULES if m.rsplit("/", 1)[-1] == short]
    return found[0] if len(found) == 1 else None


def test_the_walk_names_code() -> None:
    assert len(_walk_names()) >= 20, sorted(_walk_names())


@pytest.mark.parametrize("path", sorted(_cited_paths()))
def test_every_cited_module_exists(path: str) -> None:
    assert path.removeprefix("src/pydist/") in MODULES or (ROOT / f"{path}.py").exists(), path


@pytest.mark.parametrize("name", sorted(_walk_names()))
def test_every_name_of_the_walk_resolves(name: str) -> None:
    short, *attrs = name.split(".")
    module = _module_of(short)
    assert module is not None, f"{name}: no module or class {short!r} in src/pydist"
    target: object = importlib.import_module("pydist." + module.replace("/", "."))
    if short[0].isupper():
        attrs = [short, *attrs]
    for attr in attrs:
        assert hasattr(target, attr), f"{name}: {attr} not found"
        target = getattr(target, attr)
