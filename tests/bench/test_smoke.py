"""Every benchmark script runs, for a few seconds, and prints its figures: none can rot.

The figures themselves are the benchmarks' business (`make bench`); here a script passes when
it exits 0 and its `RESULT` line is JSON with the parts it promises. Optional peers (Ray Serve,
vllm-router) are skipped by the scripts themselves with a printed line when not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# script, its smoke-sized arguments, the keys its RESULT must have, seconds it may take
SCRIPTS = [
    (
        "router_overhead.py",
        ["--quick", "--duration", "1", "--connections", "16", "--token", "smoke"],
        [],
        240,
    ),
    ("service_calls.py", ["--quick", "--duration", "1"], [], 240),
    ("spmd_calls.py", ["--duration", "0.5"], ["incr x1", "gather x1"], 240),
    ("scale.py", ["--quick"], ["replicas", "broadcast", "sessions", "detection"], 300),
    ("operator_memory.py", ["--services", "2"], ["rss_mib", "ready_s"], 300),
    (
        "operator_scale.py",
        ["--services", "1", "--window", "2", "--settle", "1"],
        [],
        300,
    ),
]


@pytest.mark.parametrize(("script", "args", "keys", "limit"), SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_benchmark_script_runs(script: str, args: list[str], keys: list[str], limit: int) -> None:
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: `make bench-deps` installs it")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=limit,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, done.stdout[-3000:]
    figures = json.loads(lines[0].removeprefix("RESULT "))
    assert figures and all(k in figures for k in keys), figures
