"""`python -m kubeforge.replica --actor pkg.module:Class [--args JSON] [--kwargs JSON]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kubeforge import _runtime, spawn_guard
from kubeforge.actor import load_actor_class
from kubeforge.errors import UnguardedMainError
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
    return p


def main(argv: list[str] | None = None) -> None:
    ns = parser().parse_args(argv)
    _runtime.setup_logging("replica")
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
    if ns.max_concurrent_requests < 1 or ns.max_queued_requests < 0:
        sys.exit(
            "kubeforge.replica: --max-concurrent-requests must be >= 1, --max-queued-requests >= 0"
        )
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
        session_ttl=ns.session_ttl,
        drain_grace=ns.drain_grace,
        max_body=ns.max_body,
        token=os.environ.get("KUBEFORGE_TOKEN") or None,
    )
    server = ReplicaServer(config, actor_cls)

    async def start() -> None:
        port = await server.start()
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
