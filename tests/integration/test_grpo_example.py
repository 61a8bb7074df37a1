"""examples/grpo.py, run as a user runs it: torchforge's GRPO loop shape on local processes."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.procs import REPO

pytestmark = pytest.mark.timeout(120)


def result_of(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout[-3000:]
    return json.loads(lines[0].removeprefix("RESULT "))


def check_learned(result: dict, steps: int) -> None:
    """Every step trained on both ranks, pushed to both policy replicas, and the policy got
    better: the loop's calls did what the loop meant."""
    assert result["steps"] == steps
    assert result["trainer_ranks"] == 2
    assert all(len(per_rank) == 2 for per_rank in result["losses"])
    assert result["policy_versions"] == [steps, steps]  # update_weights.fanout reached both
    rewards = result["batch_rewards"]
    assert len(rewards) == steps
    assert statistics.fmean(rewards[-3:]) > statistics.fmean(rewards[:2]) + 0.15, rewards


def test_grpo_example_runs_locally_and_learns() -> None:
    proc = subprocess.Popen(
        [sys.executable, "examples/grpo.py", "--steps", "8"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    check_learned(result_of(out), 8)
    assert "still running at exit" not in err  # the program's kubeforge.shutdown() did it
    assert replicas_of_the_example() == []


def replicas_of_the_example() -> list[int]:
    """Living processes whose command line loads an actor of examples/grpo.py."""
    actor = f"{REPO / 'examples' / 'grpo.py'}:".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and actor in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found
