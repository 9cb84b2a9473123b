"""The A/B tools' argument handling and the CPU line they log (bench/harness.py)."""

from __future__ import annotations

import pytest
from bench.harness import cores_text, env_for


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
