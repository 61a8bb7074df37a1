"""Large payloads: round trips of float32 arrays through kubeforge, Ray, and a raw socket.

Each size (4 KB, 1 MB, 16 MB, 256 MB, 1 GB by default) is sent and sent back, in one run, by:

* raw-socket   -- a loopback TCP echo to a process of its own (length-prefixed, `recv_into`
                  buffers reused warm on both sides): the limit here;
* service      -- `kubeforge.Service`, 1 local replica of examples.tensors:Tensors (`echo`);
* router       -- `ServiceClient` -> router process (native relay) -> 1 replica;
* ray-actor    -- a Ray actor's method (`ray.get(actor.echo.remote(arr))`), Ray pinned by the
                  `bench` extra;
* ray-serve    -- a Ray Serve handle (`await handle.echo.remote(arr)`).
Without Ray the two Ray targets are skipped with a printed line.

Then a broadcast of 256 MB to 4 replicas through the router (`call_all("nbytes", arr)`) against
4 raw socket sends running in parallel; the router's peak RSS growth during the 1 GB call; and
the replica's peak RSS growth per payload byte (what decoding costs beyond the body itself).

Every target is up for the whole run; `--rounds` rounds rotate the order, each figure is the
median MB/s (payload bytes each way / round-trip time) with min and max. Ratios: service/Ray
actor, router/raw socket, broadcast/parallel raw. One `RESULT {json}` line at the end.
Usage: `.venv/bin/python bench/payloads.py [--sizes 4K,1M,16M,256M,1G] [--rounds 3] [--quick]
[--json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from figures import add_json_arg, emit  # noqa: E402
from peers import ray_started  # noqa: E402

from examples.tensors import Tensors  # noqa: E402
from kubeforge import Service, ServiceClient, ServiceConfig  # noqa: E402
from kubeforge.local import LocalDeployment, ReplicaSet, free_port  # noqa: E402

Echo = Callable[[np.ndarray], Awaitable[Any]]
_UNITS = {"K": 1000, "M": 1000**2, "G": 1000**3}
_LEN = struct.Struct("<Q")


def size_of(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * _UNITS[text[-1]]) if text[-1] in _UNITS else int(text)


def label(n: int) -> str:
    for unit, scale in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def peak_rss(pid: int) -> int:
    """Peak resident memory of a process so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak(pid: int) -> None:
    """Start VmHWM again from the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


# raw sockets: the machine's limit ---------------------------------------------------------


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    while view.nbytes:
        n = sock.recv_into(view)
        if not n:
            raise ConnectionError("peer closed")
        view = view[n:]


def serve_raw(reply: bool) -> None:
    """The raw peer, a process of its own as a replica is: read a length-prefixed message, send
    it back (or an 8-byte ack). Its buffer is reused from call to call, warm: no receiver can do
    better, which makes it the limit."""
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)

    def one(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            head = bytearray(_LEN.size)
            buf = bytearray()
            try:
                while True:
                    _recv_exactly(conn, memoryview(head))
                    size = _LEN.unpack(head)[0]
                    if len(buf) < size:
                        buf = bytearray(size)
                    view = memoryview(buf)[:size]
                    _recv_exactly(conn, view)
                    conn.sendall(_LEN.pack(size if reply else 0))
                    if reply:
                        conn.sendall(view)
            except (ConnectionError, OSError):
                pass

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=one, args=(conn,), daemon=True).start()


class RawPeer:
    """A raw echo (or sink) process and one kept-open connection to it."""

    def __init__(self, reply: bool = True) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--raw-peer", "echo" if reply else "sink"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()  # the reply's buffer, reused (warm) as the peer's is

    def round_trip(self, arr: np.ndarray) -> None:
        self.sock.sendall(_LEN.pack(arr.nbytes))
        self.sock.sendall(memoryview(arr).cast("B"))
        head = bytearray(_LEN.size)
        _recv_exactly(self.sock, memoryview(head))
        size = _LEN.unpack(head)[0]
        if len(self.buf) < size:
            self.buf = bytearray(size)
        _recv_exactly(self.sock, memoryview(self.buf)[:size])

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


# targets --------------------------------------------------------------------------------------


@asynccontextmanager
async def raw_socket() -> AsyncIterator[Echo]:
    peer = RawPeer()
    try:
        yield lambda arr: asyncio.to_thread(peer.round_trip, arr)
    finally:
        peer.close()


@asynccontextmanager
async def service() -> AsyncIterator[Echo]:
    async with Service(ServiceConfig(num_replicas=1), Tensors) as svc:
        yield lambda arr: svc.echo(None, arr)


@asynccontextmanager
async def routed(replicas: int) -> AsyncIterator[tuple[ServiceClient, LocalDeployment]]:
    dep = LocalDeployment(
        ReplicaSet(actor="examples.tensors:Tensors", replicas=replicas), port=free_port()
    )
    await asyncio.to_thread(dep.start, progress=lambda _m: None)
    try:
        async with ServiceClient(dep.url, actor=Tensors, timeout=600) as client:
            yield client, dep
    finally:
        await asyncio.to_thread(dep.stop)


@asynccontextmanager
async def ray_actor(ray: Any) -> AsyncIterator[Echo]:
    @ray.remote(num_cpus=0)
    class RayEcho:
        def echo(self, value: Any) -> Any:
            return value

    actor = RayEcho.remote()
    ray.get(actor.echo.remote(1))
    yield lambda arr: actor.echo.remote(arr)  # an ObjectRef is awaitable
    ray.kill(actor)


@asynccontextmanager
async def ray_serve(ray: Any) -> AsyncIterator[Echo]:
    from ray import serve
    from ray.serve.schema import LoggingConfig

    quiet = LoggingConfig(enable_access_log=False, log_level="WARNING")
    serve.start(proxy_location="Disabled", logging_config=quiet)

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, logging_config=quiet)
    class ServeEcho:
        async def echo(self, value: Any) -> Any:
            return value

    handle = serve.run(ServeEcho.bind(), name="payload-echo", route_prefix=None)
    await asyncio.wait_for(handle.echo.remote(1), 120)
    try:
        yield lambda arr: handle.echo.remote(arr)
    finally:
        with contextlib.suppress(Exception):
            await serve.shutdown_async()


# measurement ----------------------------------------------------------------------------------


def repeats(nbytes: int) -> int:
    """Round trips per measurement: enough to time small payloads, one for a gigabyte."""
    return max(1, min(200, int(64e6 // max(nbytes, 1))))


async def measure(echo: Echo, arr: np.ndarray) -> float:
    """MB/s of payload (each way) over `repeats` round trips, after two untimed warm-ups:
    every path keeps memory for the next call of the size (Ray its object store, kubeforge
    its pools and shared segments, the raw peer its buffers), and a caller that keeps the
    last result while it makes the next call needs two of them."""
    await echo(arr)
    await echo(arr)
    n = repeats(arr.nbytes)
    started = time.perf_counter()
    for _ in range(n):
        await echo(arr)
    return arr.nbytes * n / (time.perf_counter() - started) / 1e6


def point(rates: list[float]) -> dict[str, float]:
    return {"mbps": statistics.median(rates), "min": min(rates), "max": max(rates)}


async def broadcast(arr: np.ndarray, rounds: int) -> dict[str, Any]:
    """call_all of `arr` to 4 replicas through the router, against 4 parallel raw sends."""
    peers = [RawPeer(reply=False) for _ in range(4)]
    kf: list[float] = []
    raw: list[float] = []
    try:
        async with routed(4) as (client, _dep):
            await client.call_all("nbytes", arr)
            for _ in range(rounds):
                started = time.perf_counter()
                sizes = await client.call_all("nbytes", arr)
                kf.append(time.perf_counter() - started)
                assert sizes == [arr.nbytes] * 4, sizes
                started = time.perf_counter()
                await asyncio.gather(*(asyncio.to_thread(p.round_trip, arr) for p in peers))
                raw.append(time.perf_counter() - started)
    finally:
        for p in peers:
            p.close()
    kf_s, raw_s = statistics.median(kf), statistics.median(raw)
    return {
        "bytes": arr.nbytes,
        "replicas": 4,
        "kubeforge_s": kf_s,
        "raw_parallel_s": raw_s,
        "ratio": raw_s / kf_s,  # throughput ratio: >= 0.7 is the target
    }


async def memory(arr: np.ndarray, replica_arr: np.ndarray) -> dict[str, Any]:
    """Router peak RSS growth during a call of `arr`; replica peak growth per payload byte."""
    async with routed(1) as (client, dep):
        await client.echo(None, replica_arr[:1024])
        router_pid = dep.router.pids[0]
        replica_pid = dep.replica_set.procs.pids[0]
        reset_peak(router_pid)
        before = peak_rss(router_pid)
        await client.nbytes(None, arr)
        router_growth = peak_rss(router_pid) - before
        reset_peak(replica_pid)
        before = peak_rss(replica_pid)
        await client.nbytes(None, replica_arr)
        replica_growth = peak_rss(replica_pid) - before
    return {
        "router_call_bytes": arr.nbytes,
        "router_rss_growth_mib": router_growth / 2**20,
        "replica_call_bytes": replica_arr.nbytes,
        "replica_bytes_per_payload_byte": replica_growth / replica_arr.nbytes,
    }


async def main_async(args: argparse.Namespace) -> int:
    sizes = [size_of(s) for s in args.sizes.split(",")]
    skipped: dict[str, str] = {}
    rates: dict[str, dict[int, list[float]]] = {}
    async with AsyncExitStack() as stack:
        echoes: dict[str, Echo] = {
            "raw-socket": await stack.enter_async_context(raw_socket()),
            "service": await stack.enter_async_context(service()),
        }
        client, _dep = await stack.enter_async_context(routed(1))
        echoes["router"] = lambda arr: client.echo(None, arr)
        if args.no_ray or importlib.util.find_spec("ray") is None:
            skipped["ray"] = (
                "--no-ray" if args.no_ray else "not installed (pip install -e '.[bench]')"
            )
            print(f"ray-actor, ray-serve: skipped ({skipped['ray']})", flush=True)
        else:
            ray = await stack.enter_async_context(ray_started(object_store_memory=8 * 1024**3))
            echoes["ray-actor"] = await stack.enter_async_context(ray_actor(ray))
            echoes["ray-serve"] = await stack.enter_async_context(ray_serve(ray))
        names = list(echoes)
        print(f"up: {', '.join(names)}", flush=True)
        for nbytes in sizes:
            arr = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
            for rnd in range(args.rounds):
                order = names[rnd % len(names) :] + names[: rnd % len(names)]
                for name in order:
                    rate = await measure(echoes[name], arr)
                    rates.setdefault(name, {}).setdefault(nbytes, []).append(rate)
                    print(f"  {label(nbytes):>8} {name:<11} {rate:9.1f} MB/s", flush=True)
            del arr
    figures: dict[str, Any] = {
        "sizes": sizes,
        "targets": {
            name: {str(n): point(r) for n, r in per.items()} for name, per in rates.items()
        },
        "skipped": skipped,
    }
    big = max(sizes)
    bcast = min(256_000_000, big)
    figures["broadcast"] = await broadcast(
        np.ones(bcast // 4, dtype=np.float32), max(1, args.rounds)
    )
    figures["memory"] = await memory(
        np.ones(big // 4, dtype=np.float32), np.ones(bcast // 4, dtype=np.float32)
    )
    figures["ratios"] = ratios(figures["targets"], sizes)
    report(figures)
    emit(figures, args.json)
    return 0


def ratios(targets: dict[str, Any], sizes: list[int]) -> dict[str, dict[str, float | None]]:
    def over(a: str, b: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for n in sizes:
            if a in targets and b in targets:
                out[str(n)] = targets[a][str(n)]["mbps"] / targets[b][str(n)]["mbps"]
        return out

    return {
        "service_over_ray_actor": over("service", "ray-actor"),
        "router_over_raw_socket": over("router", "raw-socket"),
        "service_over_raw_socket": over("service", "raw-socket"),
    }


def report(figures: dict[str, Any]) -> None:
    sizes = figures["sizes"]
    print("\nround trip, MB/s of payload each way (median [min-max])")
    print(f"{'target':<12}" + "".join(f"{label(n):>22}" for n in sizes))
    for name, per in figures["targets"].items():
        cells = [
            f"{p['mbps']:.0f} [{p['min']:.0f}-{p['max']:.0f}]" for p in (per[str(n)] for n in sizes)
        ]
        print(f"{name:<12}" + "".join(f"{c:>22}" for c in cells))
    for key, per in figures["ratios"].items():
        cells = " ".join(f"{label(int(n))}: {v:.2f}x" for n, v in per.items() if v is not None)
        print(f"{key}: {cells or 'n/a'}")
    b = figures["broadcast"]
    print(
        f"broadcast {label(b['bytes'])} to {b['replicas']} replicas: kubeforge "
        f"{b['kubeforge_s'] * 1e3:.0f} ms, 4 parallel raw sends {b['raw_parallel_s'] * 1e3:.0f} "
        f"ms: {b['ratio']:.2f}x (target >= 0.7)"
    )
    m = figures["memory"]
    print(
        f"router peak RSS growth during a {label(m['router_call_bytes'])} call: "
        f"{m['router_rss_growth_mib']:.1f} MiB (target <= 64); replica: "
        f"{m['replica_bytes_per_payload_byte']:.2f} bytes per payload byte (target <= 1.2)"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4K,1M,16M,256M,1G", help="payload sizes, comma separated")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (order rotates)")
    p.add_argument("--quick", action="store_true", help="4 KB and 1 MB, one round")
    p.add_argument("--no-ray", action="store_true", help="leave out the Ray peers")
    p.add_argument("--raw-peer", choices=["echo", "sink"], help=argparse.SUPPRESS)
    add_json_arg(p)
    args = p.parse_args()
    if args.raw_peer:
        serve_raw(args.raw_peer == "echo")
    if args.quick:
        args.sizes, args.rounds = "4K,1M", 1
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
