"""Streaming and batching, against their peers, in one run on this machine.

Streaming: a generator endpoint yielding 1,000 small items (examples/tokens.py `generate`),
read by one caller:
* kf-router  -- ServiceClient through a kubeforge router process to one replica process;
* nginx      -- the same replica's stream through nginx (`proxy_buffering off`, keep-alive),
                read with aiohttp and kubeforge's frame reader;
* ray-serve  -- a Ray Serve deployment whose method is a generator, through a streaming handle
                (`handle.options(stream=True)`), Ray pinned by the `bench` extra.
Figures per target: first-item latency (median over rounds of a 1-item stream, beside a plain
call's latency through the same path) and items/s for the 1,000.

Batching: a method with a fixed 2 ms cost per call plus 0.05 ms per item (examples/batched.py),
64 concurrent callers for `--duration` seconds:
* kf-batched / kf-unbatched -- `@endpoint(batch_size=16, batch_wait=0.005)` against the same
  cost one call at a time, through the router;
* ray-batched / ray-unbatched -- Ray Serve's `@serve.batch(max_batch_size=16,
  batch_wait_timeout_s=0.005)` against the same without it, through a handle.
Ratios: kf-batched over kf-unbatched, and over ray-batched (target: at least 1.0).

Usage: `.venv/bin/python bench/streams.py [--rounds 5] [--duration 5] [--quick] [--no-ray]
[--json PATH]`. One `RESULT {json}` line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from figures import add_json_arg, emit  # noqa: E402
from peers import ray_started  # noqa: E402
from router_overhead import nginx_conf  # noqa: E402

from examples.batched import PER_CALL, PER_ITEM  # noqa: E402
from kubeforge import ServiceClient, streams  # noqa: E402
from kubeforge.local import LocalDeployment, ReplicaSet, free_port  # noqa: E402

ITEMS = 1000
CALLERS = 64
BATCH, BATCH_WAIT = 16, 0.005

# A stream target: (items, then) -> seconds to the first item and to the last.
Stream = Callable[[int], Awaitable[tuple[float, float]]]
Call = Callable[[], Awaitable[Any]]


@asynccontextmanager
async def deployed(actor: str) -> AsyncIterator[LocalDeployment]:
    dep = LocalDeployment(ReplicaSet(actor=actor, replicas=1), port=free_port())
    await asyncio.to_thread(dep.start, progress=lambda _m: None)
    try:
        yield dep
    finally:
        await asyncio.to_thread(dep.stop)


async def timed(items: AsyncIterator[Any]) -> tuple[float, float]:
    started = time.perf_counter()
    first = None
    n = 0
    async for _ in items:
        n += 1
        if first is None:
            first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


@asynccontextmanager
async def nginx_in_front(replica: str) -> AsyncIterator[str]:
    binary = shutil.which("nginx")
    if binary is None:
        raise RuntimeError("nginx is missing: `make bench-deps` installs it")
    with tempfile.TemporaryDirectory(prefix="kf-streams-nginx-") as tmp:
        port = free_port()
        conf = Path(tmp) / "nginx.conf"
        text = nginx_conf(Path(tmp), [replica.removeprefix("http://")], port)
        conf.write_text(
            text.replace(
                "proxy_http_version 1.1;",
                "proxy_http_version 1.1;\n            proxy_buffering off;",
            )
        )
        proc = subprocess.Popen(
            [binary, "-p", tmp, "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(100):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(url + "/readyz") as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


def frames_over_http(http: aiohttp.ClientSession, url: str) -> Stream:
    async def run(n: int) -> tuple[float, float]:
        async def items() -> AsyncIterator[bytes]:
            body = {"args": ["t"], "kwargs": {"n": n}}
            async with http.post(url + "/v1/stream/generate", json=body) as resp:
                reader = streams.FrameReader()
                async for chunk in resp.content.iter_any():
                    for kind, payload in reader.feed(chunk):
                        if kind == streams.ITEM:
                            yield payload

        return await timed(items())

    return run


@asynccontextmanager
async def ray_serve() -> AsyncIterator[Any]:
    """Ray Serve deployments of the same three methods: a generator, and the 2 ms + 0.05 ms per
    item cost batched and not."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    quiet = LoggingConfig(enable_access_log=False, log_level="WARNING")
    serve.start(proxy_location="Disabled", logging_config=quiet)

    @serve.deployment(
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        logging_config=quiet,
        max_ongoing_requests=CALLERS * 2,
    )
    class Peer:
        async def generate(self, prompt: str, n: int) -> AsyncIterator[str]:
            for i in range(n):
                yield f"{prompt}-{i}"

        async def plain(self, x: int) -> int:
            return x + 1

        @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=BATCH_WAIT)
        async def score(self, texts: list[str]) -> list[float]:
            await asyncio.sleep(PER_CALL + PER_ITEM * len(texts))
            return [float(len(t)) for t in texts]

        async def score_one(self, text: str) -> float:
            await asyncio.sleep(PER_CALL + PER_ITEM)
            return float(len(text))

    handle = serve.run(Peer.bind(), name="streams-peer", route_prefix=None)
    await asyncio.wait_for(handle.plain.remote(1), 120)
    try:
        yield handle
    finally:
        with contextlib.suppress(Exception):
            await serve.shutdown_async()


async def first_items(stream: Stream, plain: Call, rounds: int) -> dict[str, float]:
    firsts, calls, rates = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        await plain()
        calls.append(time.perf_counter() - started)
        first, _ = await stream(1)
        firsts.append(first)
        _, total = await stream(ITEMS)
        rates.append(ITEMS / total)
    return {
        "first_item_ms": statistics.median(firsts) * 1e3,
        "plain_call_ms": statistics.median(calls) * 1e3,
        "items_per_s": statistics.median(rates),
    }


async def calls_per_second(call: Call, seconds: float) -> float:
    stop = time.perf_counter() + seconds
    done = 0

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CALLERS)))
    return done / (time.perf_counter() - started)


async def main_async(args: argparse.Namespace) -> int:
    skipped: dict[str, str] = {}
    streaming: dict[str, dict[str, float]] = {}
    batching: dict[str, float] = {}
    async with AsyncExitStack() as stack:
        tokens = await stack.enter_async_context(deployed("examples.tokens:Tokens"))
        scorer = await stack.enter_async_context(deployed("examples.batched:Scorer"))
        client = await stack.enter_async_context(ServiceClient(tokens.url))
        scores = await stack.enter_async_context(ServiceClient(scorer.url, connections=CALLERS))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        nginx = await stack.enter_async_context(nginx_in_front(tokens.replica_set.urls[0]))

        async def nginx_plain() -> Any:
            async with http.post(nginx + "/v1/call/plain", json={"args": [1]}) as resp:
                return await resp.read()

        targets: dict[str, tuple[Stream, Call]] = {
            "kf-router": (
                lambda n: timed(client.generate.stream("t", n=n)),
                lambda: client.plain(None, 1),
            ),
            "nginx": (frames_over_http(http, nginx), nginx_plain),
        }
        calls: dict[str, Call] = {
            "kf-batched": lambda: scores.score.route("text"),
            "kf-unbatched": lambda: scores.score_one.route("text"),
        }
        if args.no_ray or importlib.util.find_spec("ray") is None:
            skipped["ray"] = (
                "--no-ray" if args.no_ray else "not installed (pip install -e '.[bench]')"
            )
            print(f"ray-serve: skipped ({skipped['ray']})", flush=True)
        else:
            await stack.enter_async_context(ray_started())
            handle = await stack.enter_async_context(ray_serve())
            streaming_handle = handle.options(stream=True)
            targets["ray-serve"] = (
                lambda n: timed(streaming_handle.generate.remote("t", n)),
                lambda: handle.plain.remote(1),
            )
            calls["ray-batched"] = lambda: handle.score.remote("text")
            calls["ray-unbatched"] = lambda: handle.score_one.remote("text")
        for name, (stream, plain) in targets.items():
            await stream(10)  # warm: connections open, code paths taken
            streaming[name] = await first_items(stream, plain, args.rounds)
            s = streaming[name]
            print(
                f"  stream {name:<10} first item {s['first_item_ms']:6.2f} ms (a call: "
                f"{s['plain_call_ms']:5.2f} ms), {s['items_per_s']:8.0f} items/s",
                flush=True,
            )
        for name, call in calls.items():
            await calls_per_second(call, 0.3)  # warm
            batching[name] = await calls_per_second(call, args.duration)
            print(f"  batch  {name:<13} {batching[name]:8.0f} calls/s", flush=True)
    ratios: dict[str, float | None] = {
        "kf_batched_over_unbatched": batching["kf-batched"] / batching["kf-unbatched"],
        "kf_first_item_minus_call_ms": streaming["kf-router"]["first_item_ms"]
        - streaming["kf-router"]["plain_call_ms"],
        "kf_items_per_s_over_nginx": streaming["kf-router"]["items_per_s"]
        / streaming["nginx"]["items_per_s"],
    }
    if "ray-serve" in streaming:
        ratios["kf_items_per_s_over_ray"] = (
            streaming["kf-router"]["items_per_s"] / streaming["ray-serve"]["items_per_s"]
        )
        ratios["kf_batched_over_ray_batched"] = batching["kf-batched"] / batching["ray-batched"]
    for key, value in ratios.items():
        print(f"{key}: {value:.2f}" if value is not None else f"{key}: -", flush=True)
    emit(
        {"streaming": streaming, "batching": batching, "ratios": ratios, "skipped": skipped},
        args.json,
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per batching run")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 s runs")
    parser.add_argument("--no-ray", action="store_true", help="leave Ray Serve out")
    add_json_arg(parser)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 1.0
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
