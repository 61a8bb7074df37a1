"""How kubeforge scales on this machine: replicas, broadcast fan-out, sessions, failure detection.

Every figure is printed beside a baseline measured in the same run:

* replicas   -- `python -m kubeforge.router` (token on, health polling on) over 1..32 no-op
                replicas (`examples.echo:Echo`), driven by wrk with 16 connections: req/s, p50,
                and the router's CPU per call (its /proc ticks over the calls it relayed), which
                should stay flat; the ratio is against 1 replica.
* broadcast  -- `call_all` to 16 replicas against one call to one replica, both through the
                router, one at a time on a keep-alive connection: p50 of each and their ratio,
                and the router's and the replicas' CPU per operation; then the same through
                16 floor replicas (bench/floor_replica.py: a canned answer, no code), in
                interleaved rounds: the ratio the machine and the router allow. CPU is
                split into the kernel's share and the rest; then both again with every
                process on one core: what the cores' number does to the ratio.
* sessions   -- 100k sessions created through the router: the creation rate, the router's and
                the replicas' resident memory before and after, and the p50 of calls in a session
                with 100k live sessions against none.
* detection  -- kill -9 of a replica, then the time until the router has it out of rotation,
                idle (active health polls only) and under load (failed calls count too), for
                healthPollRate 0.2 s and 1 s; the target is healthPollRate + 0.1 s.

Usage: `.venv/bin/python bench/scale.py [--quick] [--duration 5] [--json PATH]`. Needs wrk.
`--quick` is the smoke test's size (seconds, not minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import secrets
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import aiohttp  # noqa: E402
import router_overhead as ro  # noqa: E402
from figures import add_json_arg, emit, percentiles  # noqa: E402

from kubeforge.local import (  # noqa: E402
    LocalDeployment,
    Processes,
    ReplicaSet,
    free_port,
    free_ports,
)

FLOOR = ROOT / "bench" / "floor_replica.py"

TOKEN = secrets.token_hex(12)
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
BODY = b'{"args": ["x"], "kwargs": {}}'


@contextmanager
def deployment(
    replicas: int, poll: str = "200ms", replica_set: Any = None
) -> Iterator[LocalDeployment]:
    env = {"KUBEFORGE_TOKEN": TOKEN, "KUBEFORGE_LOG_LEVEL": "WARNING"}
    dep = LocalDeployment(
        replica_set or ReplicaSet(actor="examples.echo:Echo", replicas=replicas, env=env),
        port=free_port(),
        router_flags=["--health-poll-rate", poll],
        env=env,
    )
    try:
        dep.start(timeout=120, progress=lambda _m: None)
        yield dep
    finally:
        dep.stop(grace=5)


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def timed_calls(url: str, path: str, n: int, session: str | None = None) -> list[float]:
    """`n` calls one after another on one keep-alive connection; seconds each."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {**AUTH, **({"X-Kubeforge-Session": session} if session else {})}
    out = []
    try:
        for _ in range(n):
            started = time.perf_counter()
            conn.request("POST", path, BODY, headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{path}: HTTP {resp.status}")
            out.append(time.perf_counter() - started)
    finally:
        conn.close()
    return out


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def bench_replicas(counts: list[int], duration: int) -> dict[str, Any]:
    """Router CPU per call against the replica count, whole and net of what the router spends
    at rest (health polling every replica 5 times a second): that part is a cost per second and
    per replica, spread over however many calls the replicas can answer."""
    rows = {}
    hz = os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory(prefix="kubeforge-bench-") as tmp:
        script = Path(tmp) / "call.lua"
        ro.write_lua(script, TOKEN)
        for n in counts:
            with deployment(n) as dep:
                router = dep.router.pids[0]
                rest = max(2, duration)
                before, started = sum(ro.tree_cpu_ticks(router)), time.monotonic()
                time.sleep(rest)
                idle = (sum(ro.tree_cpu_ticks(router)) - before) / hz / (time.monotonic() - started)
                r = ro.measure([dep.url], 16, 1, duration, script, proxy_pid=router)
                if r.errors:
                    raise RuntimeError(f"{n} replicas: {r.errors} errors; the point is invalid")
                cpu = (r.proxy_user_us or 0) + (r.proxy_sys_us or 0)
                rows[n] = {
                    "rps": r.rps,
                    "p50_ms": r.p50_ms,
                    "router_cpu_us": cpu,
                    "router_idle_ms_per_s": idle * 1e3,
                    "router_cpu_net_us": cpu - idle * 1e6 / r.rps,
                }
    base, base_net = rows[counts[0]]["router_cpu_us"], rows[counts[0]]["router_cpu_net_us"]
    print(f"\nreplicas (router, token on, 16 connections, {duration}s each)")
    print(
        f"{'replicas':>8} {'req/s':>9} {'p50 ms':>8} {'router CPU us/call':>19} {'vs 1':>6}"
        f" {'at rest ms/s':>13} {'net us/call':>12} {'vs 1':>6}"
    )
    for n, row in rows.items():
        row["cpu_vs_first"] = row["router_cpu_us"] / base if base else float("nan")
        row["net_vs_first"] = row["router_cpu_net_us"] / base_net if base_net else float("nan")
        print(
            f"{n:>8} {row['rps']:>9.0f} {row['p50_ms']:>8.2f} "
            f"{row['router_cpu_us']:>19.1f} {row['cpu_vs_first']:>5.2f}x"
            f" {row['router_idle_ms_per_s']:>13.1f} {row['router_cpu_net_us']:>12.1f}"
            f" {row['net_vs_first']:>5.2f}x"
        )
    return rows


@dataclass
class FloorSet:
    """`bench/floor_replica.py` processes in a ReplicaSet's place: canned answers, no code."""

    replicas: int
    env: dict[str, str]
    host: str = "127.0.0.1"
    procs: Processes = field(default_factory=Processes)
    urls: list[str] = field(default_factory=list)

    def start(self, deadline: float, progress: Any) -> list[str]:
        for i, port in enumerate(free_ports(self.replicas)):
            self.urls.append(f"http://{self.host}:{port}")
            env = {**self.env, "KUBEFORGE_REPLICA_NAME": f"floor-{i}"}
            self.procs.spawn([str(FLOOR), "--port", str(port)], f"floor-{i}", env)
        self.procs.wait_ready(self.urls, deadline, "floor replica", progress)
        return self.urls

    def stop(self, grace: float) -> None:
        self.procs.stop(grace)


CORES = len(os.sched_getaffinity(0))


def _ticks(pids: list[int]) -> tuple[int, int]:
    """CPU clock ticks (user, system) used so far by these processes and their children."""
    ticks = [ro.tree_cpu_ticks(pid) for pid in pids]
    return sum(u for u, _ in ticks), sum(s for _, s in ticks)


def _threads(pids: list[int]) -> list[int]:
    """Every thread of these processes and of their descendants (affinity is per thread)."""
    tree, frontier = set(pids), set(pids)
    while frontier:
        children: set[int] = set()
        for pid in frontier:
            for task in Path(f"/proc/{pid}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    children |= {int(c) for c in task.read_text().split()}
        frontier = children - tree
        tree |= children
    out = []
    for pid in tree:
        with contextlib.suppress(OSError):
            out += [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    return out


@contextmanager
def on_cores(pids: list[int], cores: set[int]) -> Iterator[None]:
    """These processes (their threads, children included) and this one run on `cores` only,
    then on every core again."""
    every = os.sched_getaffinity(0)
    threads = [0, *_threads(pids)]
    for tid in threads:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(tid, cores)
    try:
        yield
    finally:
        for tid in threads:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, every)


def _broadcast_rounds(
    deps: dict[str, LocalDeployment], calls: int, rounds: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[int]]]]:
    """One call and `call_all`, `calls` each, through each deployment in turn, `rounds` times:
    their latencies, and the CPU ticks (user and system apart) the router and the replicas
    spent on them."""
    samples: dict[str, dict[str, list[float]]] = {k: {"one": [], "all": []} for k in deps}
    # Per kind and operation: router user and system ticks, replicas' the same, calls.
    cpu = {k: {op: [0, 0, 0, 0, 0] for op in ("one", "all")} for k in deps}
    for _ in range(rounds):
        for kind, dep in deps.items():
            router, reps = dep.router.pids, dep.replica_set.procs.pids
            for op, path in (("one", "/v1/call/echo"), ("all", "/v1/call_all/echo")):
                r0, p0 = _ticks(router), _ticks(reps)
                samples[kind][op] += timed_calls(dep.url, path, calls)
                (r1u, r1s), (p1u, p1s) = _ticks(router), _ticks(reps)
                acc = cpu[kind][op]
                acc[0] += r1u - r0[0]
                acc[1] += r1s - r0[1]
                acc[2] += p1u - p0[0]
                acc[3] += p1s - p0[1]
                acc[4] += calls
    return samples, cpu


def bench_broadcast(replicas: int, calls: int, rounds: int) -> dict[str, Any]:
    """One call and `call_all` through the router, to real echo replicas and to floor ones
    (bench/floor_replica.py), interleaved in `rounds`: the ratio each gets, and the CPU each
    side spends per operation, which says where the time goes. Then the same with every
    process on one core: how much of the ratio the cores set."""
    env = {"KUBEFORGE_TOKEN": TOKEN, "KUBEFORGE_LOG_LEVEL": "WARNING"}
    hz = os.sysconf("SC_CLK_TCK")
    kinds = {"echo": None, "floor": FloorSet(replicas, env)}
    with contextlib.ExitStack() as stack:
        deps = {
            kind: stack.enter_context(deployment(replicas, replica_set=floor))
            for kind, floor in kinds.items()
        }
        for dep in deps.values():
            timed_calls(dep.url, "/v1/call/echo", 50)  # warm the connections
            timed_calls(dep.url, "/v1/call_all/echo", 50)
        samples, cpu = _broadcast_rounds(deps, calls, rounds)
        everyone = [p for d in deps.values() for p in d.router.pids + d.replica_set.procs.pids]
        with on_cores(everyone, {min(os.sched_getaffinity(0))}):
            one_core, _ = _broadcast_rounds(deps, calls, rounds)
    out: dict[str, Any] = {"replicas": replicas, "rounds": rounds, "cores": CORES}
    print(f"\nbroadcast to {replicas} replicas ({rounds} rounds of {calls} calls, one at a time)")
    for kind in kinds:
        one, fan = p50_ms(samples[kind]["one"]), p50_ms(samples[kind]["all"])
        one_1, fan_1 = p50_ms(one_core[kind]["one"]), p50_ms(one_core[kind]["all"])
        us = {
            op: {
                "router_cpu_us": (ru + rs) / hz / n * 1e6,
                "replicas_cpu_us": (pu + ps) / hz / n * 1e6,
                # The kernel's share (system time: sockets, wakeups), which no code of ours runs.
                "router_system_us": rs / hz / n * 1e6,
                "replicas_system_us": ps / hz / n * 1e6,
            }
            for op, (ru, rs, pu, ps, n) in cpu[kind].items()
        }
        # What the machine sets: the CPU one broadcast needs (router and replicas), spread
        # over every core with nothing waiting, against one call's whole latency.
        need_ms = (us["all"]["router_cpu_us"] + us["all"]["replicas_cpu_us"]) / CORES / 1000
        row = {
            "one_p50_ms": one,
            "call_all_p50_ms": fan,
            "ratio": fan / one,
            "cpu_bound_ms": need_ms,
            "cpu_bound_ratio": need_ms / one,
            "one_cdf_ms": percentiles([t * 1000 for t in samples[kind]["one"]]),
            "call_all_cdf_ms": percentiles([t * 1000 for t in samples[kind]["all"]]),
            "cpu": us,
            "one_core": {"one_p50_ms": one_1, "call_all_p50_ms": fan_1, "ratio": fan_1 / one_1},
        }
        print(
            f"  {kind:>5}: one call p50 {one:.2f} ms, call_all p50 {fan:.2f} ms: "
            f"{fan / one:.2f}x one call; CPU per call_all: router "
            f"{us['all']['router_cpu_us']:.0f} µs ({us['all']['router_system_us']:.0f} of it in "
            f"the kernel), replicas {us['all']['replicas_cpu_us']:.0f} µs "
            f"({us['all']['replicas_cpu_us'] / replicas:.0f} each, "
            f"{us['all']['replicas_system_us'] / replicas:.0f} in the kernel); that CPU alone on "
            f"{CORES} cores: {need_ms:.2f} ms, {need_ms / one:.2f}x one call; on one core: "
            f"{one_1:.2f} and {fan_1:.2f} ms, {fan_1 / one_1:.2f}x"
        )
        if kind == "echo":
            out.update(row)  # the headline: real replicas
        else:
            out["floor"] = row
    return out


async def _create_sessions(url: str, n: int, concurrency: int = 64) -> list[str]:
    ids: list[str] = []
    todo = iter(range(n))
    async with aiohttp.ClientSession(headers=AUTH) as http:

        async def worker() -> None:
            for _ in todo:
                async with http.post(url + "/v1/sessions") as resp:
                    if resp.status != 201:
                        raise RuntimeError(f"session create: HTTP {resp.status}")
                    ids.append((await resp.json())["session_id"])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids


def bench_sessions(n: int, calls: int) -> dict[str, Any]:
    with deployment(4) as dep:
        router, replicas = dep.router.pids, dep.replica_set.procs.pids
        first = asyncio.run(_create_sessions(dep.url, 1))[0]
        timed_calls(dep.url, "/v1/call/echo", 50, first)
        before = p50_ms(timed_calls(dep.url, "/v1/call/echo", calls, first))
        rss0 = (rss_mib(router), rss_mib(replicas))
        started = time.perf_counter()
        asyncio.run(_create_sessions(dep.url, n))
        rate = n / (time.perf_counter() - started)
        rss1 = (rss_mib(router), rss_mib(replicas))
        after = p50_ms(timed_calls(dep.url, "/v1/call/echo", calls, first))
    out = {
        "sessions": n,
        "create_per_s": rate,
        "router_rss_mib": [rss0[0], rss1[0]],
        "replicas_rss_mib": [rss0[1], rss1[1]],
        "p50_ms": [before, after],
        "p50_ratio": after / before,
    }
    print(f"\nsessions: {n} created at {rate:.0f}/s (64 concurrent)")
    print(f"  router RSS {rss0[0]:.1f} -> {rss1[0]:.1f} MiB, ", end="")
    print(f"4 replicas {rss0[1]:.1f} -> {rss1[1]:.1f} MiB")
    print(f"  call in a session p50: {before:.3f} ms with none, ", end="")
    print(f"{after:.3f} ms with {n} ({after / before:.2f}x)")
    return out


def _states(url: str) -> dict[str, str]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/v1/replicas", headers=AUTH)
        return {r["name"]: r["state"] for r in json.loads(conn.getresponse().read())}
    finally:
        conn.close()


async def _load(url: str, stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as http:
        while not stop.is_set():
            async with http.post(url + "/v1/call/echo", data=BODY) as resp:
                await resp.read()


async def _detect(dep: LocalDeployment, loaded: bool) -> float:
    victim = dep.replica_set.procs.children[1]
    name = "replica-1"
    stop = asyncio.Event()
    load = [asyncio.create_task(_load(dep.url, stop)) for _ in range(2 if loaded else 0)]
    await asyncio.sleep(0.5)
    killed = time.perf_counter()
    os.kill(victim.pid, signal.SIGKILL)
    loop = asyncio.get_running_loop()
    while (await loop.run_in_executor(None, _states, dep.url)).get(name) == "HEALTHY":
        if time.perf_counter() - killed > 10:
            raise RuntimeError("the killed replica stayed in rotation for 10 s")
        await asyncio.sleep(0.002)
    took = time.perf_counter() - killed
    stop.set()
    await asyncio.gather(*load, return_exceptions=True)
    return took


def bench_detection(rates: list[float]) -> dict[str, Any]:
    out = {}
    print("\nfailure detection: kill -9 of a replica until it is out of rotation")
    for rate in rates:
        row = {}
        for loaded in (False, True):
            with deployment(3, f"{round(rate * 1000)}ms") as dep:
                row["loaded" if loaded else "idle"] = asyncio.run(_detect(dep, loaded))
        row["target"] = rate + 0.1
        out[str(rate)] = row
        print(
            f"  healthPollRate {rate:g}s: idle {row['idle']:.3f}s, under load "
            f"{row['loaded']:.3f}s (target <= {row['target']:.1f}s)"
        )
    return out


PARTS = ["replicas", "broadcast", "sessions", "detection"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-test size: a few seconds")
    p.add_argument("--duration", type=int, default=5, help="seconds per wrk point")
    p.add_argument(
        "--only", nargs="+", choices=PARTS, default=PARTS, help="run these parts only (all)"
    )
    add_json_arg(p)
    ns = p.parse_args(argv)
    quick = ns.quick
    parts: dict[str, Callable[[], Any]] = {
        "replicas": lambda: bench_replicas(
            [1, 4] if quick else [1, 2, 4, 8, 16, 32], 1 if quick else ns.duration
        ),
        "broadcast": lambda: bench_broadcast(
            4 if quick else 16, 20 if quick else 300, 1 if quick else 3
        ),
        "sessions": lambda: bench_sessions(500 if quick else 100_000, 20 if quick else 500),
        "detection": lambda: bench_detection([0.2] if quick else [0.2, 1.0]),
    }
    emit({name: run() for name, run in parts.items() if name in ns.only}, ns.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
