"""What one call costs when a replica has ranks: `procs` 1, 2 and 4 against 1 in the same run.

A local `Service` of one replica of `examples.spmd:RankCounter`; callers make `incr` calls (no
collective: the cost measured is rank 0 handing the call to every rank, their answers, and the
one order) for a fixed time with 1 and 8 concurrent callers, and `gather` calls (an all-gather
through the ranks' own store) with 1. Ratios are against procs=1 measured in the same run.
On a 2-core machine, 4 ranks share 2 cores with the caller.
Usage: `.venv/bin/python bench/spmd_calls.py [--duration 3] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from figures import add_json_arg, emit  # noqa: E402

from examples.spmd import RankCounter  # noqa: E402
from kubeforge import Service, ServiceConfig  # noqa: E402

PROCS = (1, 2, 4)


async def drive(svc: Service, endpoint: str, callers: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def caller() -> None:
        nonlocal errors
        handle = getattr(svc, endpoint)
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                await (handle.route("b") if endpoint == "gather" else handle.route())
            except Exception:  # a failed call is not a call
                errors += 1
                continue
            latencies.append(time.monotonic() - started)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return {
        "calls_per_s": len(latencies) / seconds,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else 0.0,
        "errors": errors,
    }


async def main(duration: float) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for procs in PROCS:
        cfg = ServiceConfig(num_replicas=1, procs=procs, replica_max_concurrent_requests=8)
        async with Service(cfg, RankCounter) as svc:
            for name, endpoint, callers in (
                ("incr x1", "incr", 1),
                ("incr x8", "incr", 8),
                ("gather x1", "gather", 1),
            ):
                point = await drive(svc, endpoint, callers, duration)
                results.setdefault(name, {})[procs] = point
    print(f"{'calls':<10}" + "".join(f"{f'procs={p}':>26}" for p in PROCS))
    for name, by_procs in results.items():
        base = by_procs[1]["calls_per_s"]
        cells = []
        for p in PROCS:
            point = by_procs[p]
            ratio = point["calls_per_s"] / base if base else 0.0
            bad = f" {point['errors']} errors" if point["errors"] else ""
            cells.append(
                f"{point['calls_per_s']:>8.0f}/s {point['p50_ms']:5.2f}ms {ratio:4.2f}x{bad}"
            )
        print(f"{name:<10}" + "".join(f"{c:>26}" for c in cells))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per point")
    add_json_arg(parser)
    ns = parser.parse_args()
    emit(asyncio.run(main(ns.duration)), ns.json)
