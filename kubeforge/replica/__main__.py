"""`python -m kubeforge.replica --actor pkg.module:Class [--args JSON] [--kwargs JSON]`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from kubeforge import _runtime, ranks, spawn_guard, tls, tokens, values
from kubeforge.actor import load_actor_class
from kubeforge.errors import UnguardedMainError
from kubeforge.replica.gang import EXIT_SETUP_FAILED, FRAME_SLACK, RankConfig, serve_rank
from kubeforge.replica.launcher import Launcher, die_with_launcher
from kubeforge.replica.server import ReplicaConfig, ReplicaServer
from kubeforge.settings import DEFAULTS

log = logging.getLogger("kubeforge.replica")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kubeforge.replica", description=__doc__)
    p.add_argument("--actor", required=True, help="the actor class, as package.module:Class")
    p.add_argument(
        "--args", type=_runtime.json_arg(list), default=[], help="JSON list of init args"
    )
    p.add_argument(
        "--kwargs", type=_runtime.json_arg(dict), default={}, help="JSON object of kwargs"
    )
    p.add_argument(
        "--init-file",
        default=None,
        help="init args and kwargs in kubeforge's binary format (instead of --args/--kwargs)",
    )
    p.add_argument(
        "--host", default=None, help="bind address (default $KUBEFORGE_BIND_HOST or 0.0.0.0)"
    )
    p.add_argument("--port", type=int, default=DEFAULTS.replica_port)
    p.add_argument(
        "--name",
        default=os.environ.get("KUBEFORGE_REPLICA_NAME", ""),
        help="replica name in metrics and logs (default $KUBEFORGE_REPLICA_NAME)",
    )
    p.add_argument("--max-concurrent-requests", type=int, default=DEFAULTS.max_concurrent_requests)
    p.add_argument("--max-queued-requests", type=int, default=DEFAULTS.max_queued_requests)
    p.add_argument(
        "--request-timeout",
        type=_runtime.duration,
        default=DEFAULTS.request_timeout,
        help="per-call limit including queue wait, e.g. 30s",
    )
    p.add_argument(
        "--stream-idle-timeout",
        type=_runtime.duration,
        default=DEFAULTS.stream_idle_timeout,
        help="a streaming call fails when no item comes for this long, e.g. 30s",
    )
    p.add_argument(
        "--session-ttl",
        type=_runtime.duration,
        default=DEFAULTS.session_ttl,
        help="idle sessions end after this long, e.g. 30m",
    )
    p.add_argument(
        "--drain-grace",
        type=_runtime.duration,
        default=DEFAULTS.drain_grace,
        help="SIGTERM waits this long for running calls",
    )
    p.add_argument("--max-body", type=int, default=DEFAULTS.max_body, help="bytes")
    p.add_argument(
        "--share-memory",
        action="store_true",
        help="lend and borrow large bodies in shared memory (a caller on this host that asks)",
    )
    spmd = p.add_argument_group("SPMD replicas (torchforge's procs and hosts)")
    spmd.add_argument("--procs", type=int, default=1, help="ranks on this host")
    spmd.add_argument("--hosts", type=int, default=1, help="hosts (pods) of the replica")
    spmd.add_argument(
        "--host-index",
        type=int,
        default=int(os.environ.get(ranks.HOST_INDEX, "0")),
        help=f"which host this is; host 0 runs rank 0 (default ${ranks.HOST_INDEX} or 0)",
    )
    spmd.add_argument("--gpus-per-rank", type=int, default=0, help="GPUs of each rank")
    spmd.add_argument(
        "--master-addr",
        default=os.environ.get(ranks.MASTER_ADDR),
        help="rank 0's address (default $MASTER_ADDR, else the bind address or 127.0.0.1)",
    )
    spmd.add_argument("--master-port", type=int, default=DEFAULTS.master_port)
    spmd.add_argument(
        "--gang-port", type=int, default=DEFAULTS.gang_port, help="rank 0 hands calls on here"
    )
    p.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    return p


def _launch(ns: argparse.Namespace, argv: list[str]) -> None:
    """This host's share of an SPMD replica: start its ranks and keep them together."""
    host = _runtime.bind_host(ns.host)
    master = ns.master_addr or (host if host not in ("0.0.0.0", "::") else "127.0.0.1")
    visible = os.environ.get(ranks.CUDA_VISIBLE_DEVICES)
    try:
        layout = ranks.Layout(ns.procs, ns.hosts, ns.host_index, ns.gpus_per_rank)
        envs = ranks.rank_envs(
            layout,
            master,
            ns.master_port,
            None if visible is None else [g for g in visible.split(",") if g.strip()],
        )
    except ranks.RankError as exc:
        sys.exit(f"kubeforge.replica: {exc}")
    log.info(
        "host %d of %d: starting ranks %s of %d (rank 0 at %s)",
        ns.host_index,
        ns.hosts,
        list(layout.ranks),
        layout.world_size,
        master,
    )
    runner = Launcher(argv, envs, leads=ns.host_index == 0, grace=ns.drain_grace)
    sys.exit(asyncio.run(runner.run()))


def _serve_rank(ns: argparse.Namespace, actor_cls: type) -> None:
    """A rank other than 0: SIGTERM is rank 0's to act on (it drains, then lets us go)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    me = ranks.current_rank()
    config = RankConfig(
        actor=ns.actor,
        args=ns.args,
        kwargs=ns.kwargs,
        rank=me.rank,
        world_size=me.world_size,
        leader=(os.environ[ranks.MASTER_ADDR], ns.gang_port),
        token=tokens.from_environ()[0].send,
        max_frame=ns.max_body + FRAME_SLACK,
    )
    sys.exit(asyncio.run(serve_rank(config, actor_cls)))


def _read_init(path: str) -> tuple[list[Any], dict[str, Any]]:
    """Constructor arguments from whoever started this replica: trusted, so functions and
    classes in them are imported by name (calls never get that)."""
    try:
        with open(path, "rb") as f:
            init = values.decode(bytearray(f.read()), trusted=True)
    except (OSError, values.ValueFormatError) as exc:
        sys.exit(f"kubeforge.replica: --init-file {path}: {exc}")
    return list(init["args"]), dict(init["kwargs"])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ns = parser().parse_args(argv)
    world = ns.procs * ns.hosts
    if world > 1 and not ns.rank_process:
        _runtime.setup_logging("launcher")
        _launch(ns, argv)
    # Only a launcher's child reads its rank: a plain replica is rank 0 of 1 whatever RANK says.
    me = ranks.current_rank() if ns.rank_process else ranks.Rank()
    _runtime.setup_logging(f"replica rank {me.rank}" if world > 1 else "replica")
    if ns.rank_process:
        die_with_launcher()
    sys.path.insert(0, os.getcwd())  # `examples.echo:Echo` from the working directory works
    try:
        actor_cls = load_actor_class(ns.actor)
    except UnguardedMainError as exc:
        # A kubeforge parent reports it once for all its replicas (it knows the exit code);
        # N copies of the same explanation would bury it. Alone (a pod), say it here.
        if not os.environ.get(spawn_guard.SPAWNED_BY_ENV):
            print(f"kubeforge.replica: {exc}", file=sys.stderr, flush=True)
        sys.exit(spawn_guard.EXIT_UNGUARDED_MAIN)
    except ValueError as exc:
        sys.exit(f"kubeforge.replica: {exc}")
    if ns.init_file:
        ns.args, ns.kwargs = _read_init(ns.init_file)
    else:
        try:  # a manifest names functions and classes as {"$import": "module:name"}
            ns.args, ns.kwargs = values.resolve_imports([ns.args, ns.kwargs])
        except ValueError as exc:
            sys.exit(f"kubeforge.replica: --args/--kwargs: {exc}")
    if me.rank > 0:
        _serve_rank(ns, actor_cls)
    if ns.max_concurrent_requests < 1 or ns.max_queued_requests < 0:
        sys.exit(
            "kubeforge.replica: --max-concurrent-requests must be >= 1, --max-queued-requests >= 0"
        )
    initial, token_dir = tokens.from_environ()
    config = ReplicaConfig(
        actor=ns.actor,
        args=ns.args,
        kwargs=ns.kwargs,
        host=_runtime.bind_host(ns.host),
        port=ns.port,
        name=ns.name,
        max_concurrent_requests=ns.max_concurrent_requests,
        max_queued_requests=ns.max_queued_requests,
        request_timeout=ns.request_timeout,
        stream_idle_timeout=ns.stream_idle_timeout,
        session_ttl=ns.session_ttl,
        drain_grace=ns.drain_grace,
        max_body=ns.max_body,
        share_memory=ns.share_memory,
        tokens=initial,
        tls=tls.directory(),
        world_size=me.world_size,
        gang_port=ns.gang_port,
    )
    if config.tls is not None:
        tls.wait_issued(config.tls, (tls.KEY_CERT, tls.KEY_KEY))
    server = ReplicaServer(config, actor_cls)
    following: list[asyncio.Task[None]] = []

    async def start() -> None:
        if token_dir is not None:  # a rotation reaches us through the mounted Secret
            following.append(asyncio.create_task(tokens.follow(token_dir, initial, server.use)))
        try:
            port = await server.start()
            if config.tls is not None and server.tls is not None:  # a renewal reaches us too
                following.append(asyncio.create_task(tls.follow(config.tls, server.tls)))
        except Exception:
            if not ns.rank_process:
                raise
            log.exception("rank 0 could not start")
            logging.shutdown()
            os._exit(EXIT_SETUP_FAILED)  # the launcher gives up rather than restart in a loop
        log.info(
            "replica %s of %s ready on %s:%d (instance %s, endpoints %s)",
            server.name,
            ns.actor,
            config.host,
            port,
            server.instance,
            sorted(server.endpoints),
        )

    _runtime.run(start, server.drain)


if __name__ == "__main__":
    main()
