"""Fixtures for fault tests on real engines: a private 3-node RabbitMQ cluster and a private
PostgreSQL server, started once per session, only when a test asks for them, from the machine's
installed binaries (tests/support/private_services.py). A missing binary fails the tests, loudly;
they are never skipped. Start-up times go to the terminal summary and to
``<pytest basetemp>/private_services_timings.json``."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support.private_services import MissingBinaryError, PrivatePostgres, RabbitCluster

S = TypeVar("S")


class Timings:
    """Start-up and step durations of the session, printed at the end and kept as JSON."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.path: Path | None = None

    def record(self, key: str, value: Any) -> None:
        self.data[key] = value
        print(f"[private services] {key}: {value}")
        self.flush()

    def flush(self) -> None:
        if self.path is not None:
            self.path.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")


_TIMINGS = Timings()


@pytest.fixture(scope="session")
def service_timings(tmp_path_factory: pytest.TempPathFactory) -> Timings:
    _TIMINGS.path = tmp_path_factory.getbasetemp() / "private_services_timings.json"
    return _TIMINGS


def _start(factory: Callable[[], S]) -> S:
    """Start a private service; a missing binary fails the test (never a skip)."""
    try:
        return factory()
    except MissingBinaryError as exc:
        message = str(exc)
    pytest.fail(f"fault tests need the machine's real engines: {message}", pytrace=False)


@contextlib.contextmanager
def _running(service: Any, timings: Timings, name: str, what: str) -> Iterator[Any]:
    """A started private service, recorded and closed at the end: nothing of it may be left."""
    try:
        timings.record(f"{name}_startup_s", round(service.startup_seconds or 0.0, 3))
        yield service
    finally:
        timings.record(f"{name}_timings_s", service.timings)
        service.close()
        leaked = service.leaked_processes()
        assert not leaked, f"{what} processes left after close(): {leaked}"
        assert not service.base.exists(), f"{service.base} left behind"


@pytest.fixture(scope="session")
def rabbit_cluster(service_timings: Timings) -> Iterator[RabbitCluster]:
    with _running(_start(RabbitCluster.create), service_timings, "rabbit_cluster", "RabbitMQ") as cluster:
        yield cluster


@pytest.fixture
def cluster_all_up(rabbit_cluster: RabbitCluster) -> Iterator[RabbitCluster]:
    """The session cluster with its 3 nodes running, before and after the test (a test that
    failed half-way through a kill does not leave the next one a broken cluster)."""
    _heal(rabbit_cluster)
    yield rabbit_cluster
    _heal(rabbit_cluster)


def _heal(cluster: RabbitCluster) -> None:
    down = [n for n in cluster.names if n not in cluster.running()]
    if len(down) == len(cluster.names):
        cluster.start_all()
    else:
        for node in down:
            cluster.start(node)
    cluster.wait_running(cluster.names)


@pytest.fixture(scope="session")
def private_pg(service_timings: Timings) -> Iterator[PrivatePostgres]:
    with _running(_start(PrivatePostgres.create), service_timings, "private_pg", "PostgreSQL") as pg:
        yield pg


_test_durations: dict[str, float] = {}
_test_started: dict[str, float] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    _test_started[item.nodeid] = time.monotonic()


def pytest_runtest_teardown(item: pytest.Item) -> None:
    started = _test_started.pop(item.nodeid, None)
    if started is not None:
        _test_durations[item.name] = round(time.monotonic() - started, 3)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not (_TIMINGS.data or _test_durations):
        return
    _TIMINGS.data["test_durations_s (setup+call, session fixtures in the first user)"] = _test_durations
    _TIMINGS.flush()
    terminalreporter.section("private services timings")
    for key, value in _TIMINGS.data.items():
        terminalreporter.write_line(f"{key}: {value}")
    if _TIMINGS.path is not None:
        terminalreporter.write_line(f"(written to {_TIMINGS.path})")
