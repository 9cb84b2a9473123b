"""The benchmark runs: `bench/run.sh --smoke` starts its own databases, vhost and processes, drives
every measurement briefly and writes the markdown table. No timing is asserted here: the targets
live in the benchmark (docs/benchmarks.md), never in the test suite."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = (
    "create orders/s end to end",
    "create, as a share of hello-world POST",
    "create latency p50 / p99",
    "fetch page (page_size 10) req/s",
    "page at depth",
    "read-model lag p50 / p99",
    "relay throughput",
    "peak RSS per process",
    "create orders/s, tracing on",
)


# The smoke run took 102-125 s on the shared 2-core machine at load 7-8 (2026-12-01, with the
# open-loop rows): 3x that, since the bound must hold under the suite's own load. It checks the
# benchmark, not the product, and is the default run's longest test (82 s): long mode (CI) runs it.
@pytest.mark.long
@pytest.mark.timeout(380)
def test_bench_smoke_writes_the_table(tmp_path: Path) -> None:
    out, raw = tmp_path / "smoke.md", tmp_path / "smoke.json"
    done = subprocess.run(
        [str(ROOT / "bench" / "run.sh"), "--smoke", "--out", str(out), "--json", str(raw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=370,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = out.read_text()
    assert "| figure | pydist | baseline (same run) | ratio | target | verdict |" in table
    for figure in FIGURES:
        assert figure in table, figure
    results = json.loads(raw.read_text())
    stage = results["stages"][-1]
    # Every measurement produced numbers, and the loads were served without errors.
    assert results["pgbench"]["tps"]["median"] > 0
    assert results["hello_post"]["rps"]["median"] > 0
    assert stage["create"]["rps"]["median"] > 0
    assert stage["create"]["errors"] == 0
    assert stage["create"]["batches"]["count"] > 0
    assert stage["fetch"]["rps"]["median"] > 0
    assert stage["page_deep"]["depth"] > 0
    assert stage["sustained"]["projected"] == stage["sustained"]["written"] > 0
    easy = stage["sustained_headroom"]
    assert easy["projected"] == easy["written"] > 0
    assert "read-model lag p50 / p99 below saturation" in table
    assert results["relay"]["relay_eps"]["median"] > 0
    assert results["scaling"]["create_2w"]["rps"]["median"] > 0
    assert all(mb > 0 for mb in results["rss_mb"].values())
