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
        ["--quick", "--duration", "1", "--connections", "16", "--token", "smoke", "--tls"],
        [],
        240,
    ),
    ("service_calls.py", ["--quick", "--duration", "1"], [], 240),
    ("spmd_calls.py", ["--duration", "0.5"], ["incr x1", "gather x1"], 240),
    (
        "payloads.py",
        ["--quick", "--no-ray"],
        ["targets", "broadcast", "memory", "ratios"],
        300,
    ),
    ("scale.py", ["--quick"], ["replicas", "broadcast", "sessions", "detection"], 300),
    ("streams.py", ["--quick", "--no-ray"], ["streaming", "batching", "ratios"], 240),
    ("gpu_check.py", ["--cpu"], ["ranks", "all_reduce", "tensors", "model"], 240),
    ("operator_memory.py", ["--services", "2"], ["rss_mib", "ready_s"], 300),
    (
        "operator_scale.py",
        ["--services", "1", "--window", "2", "--settle", "1"],
        [],
        300,
    ),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the scripts write their figures (`--json`), as `make bench` does under bench/."""
    return tmp_path_factory.mktemp("results")


@pytest.mark.parametrize(("script", "args", "keys", "limit"), SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_benchmark_script_runs(
    script: str, args: list[str], keys: list[str], limit: int, results: Path
) -> None:
    for tool in ("wrk", "nginx", "haproxy"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: `make bench-deps` installs it")
    out = results / script.replace(".py", ".json")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)],
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
    assert json.loads(out.read_text()) == figures, "--json wrote other figures than RESULT"


def test_plots_draw_the_scripts_figures(results: Path) -> None:
    """Runs after the scripts (file order): their JSON becomes the PNGs and the headline table."""
    if not list(results.glob("*.json")):
        pytest.fail("no figures: the script tests above did not run first")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plots.py"), "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for png in ("router_rps.png", "latency_cdf.png", "scale.png", "payloads.png"):
        assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    table = (results / "summary.md").read_text()
    rows = ["router / nginx, 16 conns", "sessions: router / nginx hash", "call_all to 4 replicas"]
    if "ray-serve" not in json.loads((results / "service_calls.json").read_text())["skipped"]:
        rows.append("local Service / Ray Serve, 32 caller(s)")
    for row in rows:
        assert row in table, table
    assert "not measured" not in table, table
