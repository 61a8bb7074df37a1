"""Calls per second through the Python API: `Service`, `ServiceClient`, and Ray Serve.

One Python process makes no-op calls with 1 and 32 concurrent callers (asyncio tasks) through:

* service      -- `kubeforge.Service`: 3 local replica processes, the router engine in-process;
* client       -- `kubeforge.ServiceClient` against `kubeforge run examples/echo.yaml`
                  (3 replicas behind a router process);
* ray-serve    -- a Ray Serve deployment of 3 no-op replicas called through its handle
                  (`await handle.remote(x)`), the peer torchforge users know, tuned as Ray's
                  performance guide advises for throughput: `RAY_SERVE_THROUGHPUT_OPTIMIZED=1`
                  (user code and router on the replica's own loop, buffered request logs,
                  direct ingress), access logs off, no HTTP proxy (`proxy_location="Disabled"`),
                  Ray pinned by the `bench` extra. Without Ray it is skipped with a printed line.

All three are up for the whole run. `--rounds` (5) interleaved rounds measure them in an order
that rotates each round; each point is the median calls/s with its min and max. A failed call
is not a call: it counts as an error, and a point with errors is invalid (its ratio is n/a).
The ratios to Ray Serve are printed with the figures, then one `RESULT {json}` line.
Usage: `.venv/bin/python bench/service_calls.py [--duration 5] [--rounds 5] [--quick]
[--json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from figures import CDF_PERCENTILES, add_json_arg, emit, median_curve, percentiles  # noqa: E402

from examples.echo import Echo  # noqa: E402
from kubeforge import Service, ServiceClient, ServiceConfig  # noqa: E402
from kubeforge.local import free_port, is_ready  # noqa: E402

CONCURRENCY = (1, 32)
Call = Callable[[], Awaitable[Any]]


@dataclass
class Run:
    """One measurement of one target: successful calls only."""

    calls: int
    seconds: float
    errors: int
    cdf_ms: list[float]  # latency at figures.CDF_PERCENTILES

    @property
    def rate(self) -> float:
        return self.calls / self.seconds


async def drive(call: Call, callers: int, seconds: float) -> Run:
    """`callers` tasks call back to back for `seconds`; a failed call is an error, not a call."""
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
                continue
            latencies.append((time.perf_counter() - start) * 1e3)

    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    latencies.sort()
    return Run(len(latencies), time.perf_counter() - began, errors, percentiles(latencies))


@dataclass
class Point:
    """One target at one concurrency over the rounds."""

    rate: float  # median calls/s
    rate_min: float
    rate_max: float
    p50_ms: float
    p99_ms: float
    errors: int
    cdf_ms: list[float]

    @property
    def valid(self) -> bool:
        return self.errors == 0 and self.rate > 0

    @classmethod
    def of(cls, runs: list[Run]) -> Point:
        cdf = median_curve([r.cdf_ms for r in runs])
        at = {p: i for i, p in enumerate(CDF_PERCENTILES)}
        return cls(
            rate=statistics.median(r.rate for r in runs),
            rate_min=min(r.rate for r in runs),
            rate_max=max(r.rate for r in runs),
            p50_ms=cdf[at[50]] if cdf else float("nan"),
            p99_ms=cdf[at[99]] if cdf else float("nan"),
            errors=sum(r.errors for r in runs),
            cdf_ms=cdf,
        )


@asynccontextmanager
async def kubeforge_service() -> AsyncIterator[Call]:
    cfg = ServiceConfig(num_replicas=3, replica_max_concurrent_requests=64)
    async with Service(cfg, Echo) as svc:
        yield lambda: svc.echo(None, "x")


@asynccontextmanager
async def kubeforge_client() -> AsyncIterator[Call]:
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
            yield lambda: client.echo(None, "x")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@asynccontextmanager
async def ray_serve() -> AsyncIterator[Call]:
    # Read when ray.serve is imported, and passed on to the workers Ray starts.
    tuned = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    os.environ.update(tuned)
    import ray
    from ray import serve
    from ray.serve.schema import LoggingConfig

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": tuned},
    )
    try:
        quiet = LoggingConfig(enable_access_log=False, log_level="WARNING")
        serve.start(proxy_location="Disabled", logging_config=quiet)

        # No CPU reservation: three 1-CPU replicas would never fit a 2-core machine.
        @serve.deployment(
            num_replicas=3,
            max_ongoing_requests=64,
            ray_actor_options={"num_cpus": 0},
            logging_config=quiet,
        )
        class Noop:
            async def __call__(self, value: Any) -> Any:
                return value

        handle = serve.run(Noop.bind(), name="noop", route_prefix=None)
        await asyncio.wait_for(handle.remote("x"), 120)
        yield lambda: handle.remote("x")
    finally:
        with contextlib.suppress(Exception):
            await serve.shutdown_async()  # on this loop, where the handle's long-poll runs
        ray.shutdown()


def report(
    points: dict[str, dict[int, Point]], skipped: dict[str, str], args: argparse.Namespace
) -> None:
    print()
    print(
        f"no-op calls, 3 replicas, {args.rounds} interleaved round(s) of {args.duration:g}s; "
        "median [min - max]"
    )
    print(
        f"{'target':<10} {'callers':>7} {'calls/s':>9} {'[min - max]':>17} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'errors':>6}"
    )
    for name, per in points.items():
        for callers, p in per.items():
            spread = f"[{p.rate_min:.0f} - {p.rate_max:.0f}]"
            flag = "" if p.valid else "  <-- INVALID (errors)"
            print(
                f"{name:<10} {callers:>7} {p.rate:>9.0f} {spread:>17} {p.p50_ms:>8.2f} "
                f"{p.p99_ms:>8.2f} {p.errors:>6}{flag}"
            )
    for name, why in skipped.items():
        print(f"{name:<10} skipped: {why}")
    ratios: dict[str, dict[str, float | None]] = {}
    ray_points = points.get("ray-serve")
    if ray_points:
        print()
        for callers in CONCURRENCY:
            ray_point = ray_points[callers]
            ratios[str(callers)] = {
                f"{name}_over_ray": per[callers].rate / ray_point.rate
                if per[callers].valid and ray_point.valid
                else None
                for name, per in points.items()
                if name != "ray-serve"
            }
            shown = "  ".join(
                f"{k.replace('_over_ray', '')}/ray " + ("n/a" if v is None else f"{v:.1f}x")
                for k, v in ratios[str(callers)].items()
            )
            print(f"callers={callers:<3} {shown}")
    try:
        ray_version: str | None = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray_version = None
    emit(
        {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "versions": {"ray": ray_version, "kubeforge": importlib.metadata.version("kubeforge")},
            "targets": {
                n: {str(c): {**vars(p), "valid": p.valid} for c, p in per.items()}
                for n, per in points.items()
            },
            "ratios": ratios,
            "skipped": skipped,
            "cdf_percentiles": list(CDF_PERCENTILES),
        },
        args.json,
    )


async def main_async(args: argparse.Namespace) -> int:
    skipped: dict[str, str] = {}
    targets: dict[str, Callable[[], Any]] = {
        "service": kubeforge_service,
        "client": kubeforge_client,
    }
    if importlib.util.find_spec("ray") is None:
        skipped["ray-serve"] = "Ray not installed (pip install -e '.[bench]')"
        print("ray-serve: not installed", flush=True)
    else:
        targets["ray-serve"] = ray_serve
    runs: dict[str, dict[int, list[Run]]] = {n: {c: [] for c in CONCURRENCY} for n in targets}
    async with AsyncExitStack() as stack:
        calls: dict[str, Call] = {}
        for name, up in targets.items():  # every target up for the whole run
            calls[name] = await stack.enter_async_context(up())
            print(f"{name}: up", flush=True)
        names = list(calls)
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            print(f"round {rnd + 1}/{args.rounds}: {' '.join(order)}", flush=True)
            for callers in CONCURRENCY:
                for name in order:
                    await drive(calls[name], callers, min(1.0, args.duration))  # warm-up
                    run = await drive(calls[name], callers, args.duration)
                    runs[name][callers].append(run)
                    print(
                        f"  {name:<10} callers={callers:<3} {run.rate:>9.0f} calls/s  "
                        f"errors {run.errors}",
                        flush=True,
                    )
    points = {n: {c: Point.of(rs) for c, rs in per.items()} for n, per in runs.items()}
    report(points, skipped, args)
    return 1 if any(not p.valid for per in points.values() for p in per.values()) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (order rotates)")
    p.add_argument("--quick", action="store_true", help="2 s measurements, one round")
    add_json_arg(p)
    args = p.parse_args()
    if args.quick:
        args.duration, args.rounds = min(args.duration, 2.0), 1
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
