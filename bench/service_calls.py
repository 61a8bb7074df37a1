"""Calls per second through the Python API: `Service`, `ServiceClient`, and Ray Serve.

One Python process makes no-op calls with 1 and 32 concurrent callers (asyncio tasks) for a
fixed time, through:

* service      -- `kubeforge.Service`: 3 local replica processes, the router engine in-process;
* client       -- `kubeforge.ServiceClient` against `kubeforge run examples/echo.yaml`
                  (3 replicas behind a router process);
* ray-serve    -- a Ray Serve deployment of 3 no-op replicas, called through its handle
                  (`await handle.remote(x)`), the peer torchforge users know; skipped with a
                  printed line when Ray is not installed (`pip install 'ray[serve]'`).

All three run in one invocation on the same machine, one after another, and the ratios to Ray
Serve are printed with the figures, then one `RESULT {json}` line.
Usage: `.venv/bin/python bench/service_calls.py [--duration 5] [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.echo import Echo  # noqa: E402
from kubeforge import Service, ServiceClient, ServiceConfig  # noqa: E402
from kubeforge.local import free_port, is_ready  # noqa: E402

CONCURRENCY = (1, 32)


@dataclass
class Point:
    calls: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


async def drive(call: Callable[[], Awaitable[Any]], callers: int, seconds: float) -> Point:
    """`callers` tasks call back to back for `seconds`; every latency is kept."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal errors
        while (start := time.perf_counter()) < stop_at:
            try:
                await call()
            except Exception:
                errors += 1
            latencies.append(time.perf_counter() - start)

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - began
    latencies.sort()
    if not latencies:
        return Point(0, elapsed, errors, 0.0, 0.0)
    return Point(
        len(latencies),
        elapsed,
        errors,
        latencies[len(latencies) // 2] * 1e3,
        latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
    )


async def measure(
    name: str,
    call: Callable[[], Awaitable[Any]],
    seconds: float,
    results: dict[str, dict[int, Point]],
) -> None:
    results[name] = {}
    for callers in CONCURRENCY:
        await drive(call, callers, min(1.0, seconds))  # warm-up: connections, caches
        point = await drive(call, callers, seconds)
        results[name][callers] = point
        print(
            f"  {name:<10} callers={callers:<3} {point.rate:>9.0f} calls/s  "
            f"p50 {point.p50_ms:.2f} ms  p99 {point.p99_ms:.2f} ms  errors {point.errors}",
            flush=True,
        )


async def bench_service(seconds: float, results: dict[str, dict[int, Point]]) -> None:
    cfg = ServiceConfig(num_replicas=3, replica_max_concurrent_requests=64)
    async with Service(cfg, Echo) as svc:
        await measure("service", lambda: svc.echo(None, "x"), seconds, results)


async def bench_client(seconds: float, results: dict[str, dict[int, Point]]) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubeforge.cli", "run", "examples/echo.yaml", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        process_group=0,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not is_ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("kubeforge run did not become ready")
            await asyncio.sleep(0.1)
        async with ServiceClient(url) as client:
            await measure("client", lambda: client.echo(None, "x"), seconds, results)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def bench_ray(seconds: float, results: dict[str, dict[int, Point]]) -> None:
    import ray
    from ray import serve

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        # No CPU reservation: three 1-CPU replicas would never fit a 2-core machine.
        @serve.deployment(
            num_replicas=3, max_ongoing_requests=64, ray_actor_options={"num_cpus": 0}
        )
        class Noop:
            async def __call__(self, value: Any) -> Any:
                return value

        handle = serve.run(Noop.bind(), name="noop", route_prefix=None)
        await asyncio.wait_for(handle.remote("x"), 120)
        await measure("ray-serve", lambda: handle.remote("x"), seconds, results)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def report(results: dict[str, dict[int, Point]], skipped: dict[str, str]) -> None:
    print()
    print(f"{'target':<10} {'callers':>7} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, per in results.items():
        for callers, p in per.items():
            print(
                f"{name:<10} {callers:>7} {p.rate:>9.0f} {p.p50_ms:>8.2f} {p.p99_ms:>8.2f} "
                f"{p.errors:>6}"
            )
    for name, why in skipped.items():
        print(f"{name:<10} skipped: {why}")
    ratios: dict[str, dict[str, float]] = {}
    ray_points = results.get("ray-serve")
    if ray_points:
        print()
        for callers in CONCURRENCY:
            ray_rate = ray_points[callers].rate
            ratios[str(callers)] = {
                f"{name}_over_ray": per[callers].rate / ray_rate
                for name, per in results.items()
                if name != "ray-serve"
            }
            shown = "  ".join(
                f"{k.replace('_over_ray', '')}/ray {v:.1f}x"
                for k, v in ratios[str(callers)].items()
            )
            print(f"callers={callers:<3} {shown}")
    out = {
        "targets": {
            n: {str(c): {**asdict(p), "rate": p.rate} for c, p in per.items()}
            for n, per in results.items()
        },
        "ratios": ratios,
        "skipped": skipped,
    }
    print("RESULT " + json.dumps(out, sort_keys=True))


async def main_async(args: argparse.Namespace) -> int:
    seconds = 2.0 if args.quick else args.duration
    results: dict[str, dict[int, Point]] = {}
    skipped: dict[str, str] = {}
    print(f"no-op calls, 3 replicas, {seconds:g}s per point, callers {CONCURRENCY}", flush=True)
    await bench_service(seconds, results)
    await bench_client(seconds, results)
    if importlib.util.find_spec("ray") is None:
        skipped["ray-serve"] = "Ray not installed (pip install 'ray[serve]')"
        print("ray-serve: not installed", flush=True)
    else:
        await bench_ray(seconds, results)
    report(results, skipped)
    return 1 if any(p.errors for per in results.values() for p in per.values()) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--quick", action="store_true", help="2 s per measurement")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
