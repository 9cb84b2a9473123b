"""The A/B tools' argument handling, their CPU line (bench/harness.py), the RSS row (bench/report.py)."""

from __future__ import annotations

import pytest
from bench.harness import cores_text, env_for
from bench.report import _rss_row


def test_env_for_adds_settings_to_variants_and_refuses_an_unknown_one() -> None:
    envs = {"a": {"X": "1"}, "b": {}}
    assert env_for(["b:RELAY_PACE_S=0", "b:Y=a=b"], envs, new_labels=False) == {
        "a": {"X": "1"},
        "b": {"RELAY_PACE_S": "0", "Y": "a=b"},
    }
    with pytest.raises(SystemExit, match="no variant 'c'"):
        env_for(["c:Z=1"], envs, new_labels=False)
    assert env_for(["c:Z=1"], {}, new_labels=True) == {"c": {"Z": "1"}}


def test_cores_text_names_busy_processes_the_machine_and_creates_wait() -> None:
    cpu = {"create_cpu": 0.74, "relay_cpu": 0.004, "machine_busy": 0.84, "machine_steal": 0.012}
    assert cores_text(cpu) == "create 0.74; 84% busy, 1.2% stolen"
    assert cores_text(cpu | {"create_runq": 0.063}).endswith("; create's loop waited 6.3%")


def test_create_rss_is_reported_before_the_open_loop_and_its_later_peak_apart() -> None:
    before = {"create": 78.0, "relay": 70.0}
    after = {"create": 133.0, "relay": 71.0, "hello": 52.0}
    row = _rss_row({"rss_mb": after, "rss_before_open_loop_mb": before})
    assert (
        row[1]
        == "create 78, relay 71, hello 52 MB; create 133 MB after the open loop (requests queued at 80%)"
    )
    assert row[-1] == "**met**"  # judged on 78 and 71, not on the overload's 133
    assert _rss_row({"rss_mb": {"create": 130.0}})[1] == "create 130 MB"  # no open loop ran
