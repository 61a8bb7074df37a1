"""The launcher of an SPMD replica's ranks on one host (what torchrun's agent is to torch).

`python -m kubeforge.replica --procs N` becomes this process when the replica has more than one
rank. It holds no actor: it starts this host's ranks (the same command with `--rank-process`
and each rank's environment), and when any rank exits it kills the others and starts them all
again, since ranks that lost a peer can be stuck in a collective for good. Backoff between
restarts grows to 10 s and resets after a run of a minute. SIGTERM reaches rank 0, which
drains; the other ranks end when rank 0 closes their connections.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys

from kubeforge import spawn_guard
from kubeforge.replica.gang import EXIT_SETUP_FAILED
from kubeforge.settings import TERMINATION_SLACK

log = logging.getLogger("kubeforge.replica.launcher")

LAUNCHER_PID_ENV = "KUBEFORGE_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1
_STABLE_AFTER = 60.0  # seconds of running that reset the restart backoff
_MAX_BACKOFF = 10.0
_PEERS_FOLLOW = 0.5  # seconds the other ranks get to end on their own after one ended
# Exit statuses that mean "this actor cannot start here": a first start that ends so gives up.
_FATAL = (EXIT_SETUP_FAILED, spawn_guard.EXIT_UNGUARDED_MAIN)


def die_with_launcher() -> None:
    """In a rank: be killed when the launcher dies, even by SIGKILL, so no rank is orphaned."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(launcher):  # it died before prctl took effect
        os._exit(1)


class Launcher:
    def __init__(self, argv: list[str], envs: list[dict[str, str]], leads: bool, grace: float):
        self.argv = [sys.executable, "-m", "kubeforge.replica", *argv, "--rank-process"]
        self.envs = envs
        self.leads = leads  # this host runs rank 0 (local rank 0 is global rank 0)
        self.grace = grace + TERMINATION_SLACK
        self.stopping = asyncio.Event()
        self.restarts = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        backoff = 0.5
        while True:
            started = loop.time()
            ranks = await self._start()
            exited = await self._until_exit_or_stop(ranks)
            if exited is None:
                return await self._stop(ranks)
            local, code = exited
            await self._kill(ranks)
            if self.restarts == 0 and code in _FATAL:
                log.error("rank %d could not start the actor (exit %d); giving up", local, code)
                return code
            if loop.time() - started > _STABLE_AFTER:
                backoff = 0.5
            self.restarts += 1
            log.warning(
                "local rank %d exited with %s; restarting all %d ranks of this host in %.1fs "
                "(restart %d)",
                local,
                f"signal {-code}" if code < 0 else f"code {code}",
                len(self.envs),
                backoff,
                self.restarts,
            )
            try:
                await asyncio.wait_for(self.stopping.wait(), backoff)
                return 0
            except TimeoutError:
                backoff = min(backoff * 2, _MAX_BACKOFF)

    async def _start(self) -> list[asyncio.subprocess.Process]:
        base = {**os.environ, LAUNCHER_PID_ENV: str(os.getpid())}
        return [
            await asyncio.create_subprocess_exec(*self.argv, env={**base, **env})
            for env in self.envs
        ]

    async def _until_exit_or_stop(
        self, ranks: list[asyncio.subprocess.Process]
    ) -> tuple[int, int] | None:
        """(local rank, exit status) of the rank that ended first, or None on SIGTERM."""
        waits = [asyncio.ensure_future(p.wait()) for p in ranks]
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([*waits, stop], return_when=asyncio.FIRST_COMPLETED)
        if stop.done():
            for fut in waits:
                fut.cancel()
            return None
        stop.cancel()
        first = next(i for i, fut in enumerate(waits) if fut.done())
        # Its peers follow it within moments (rank 0 exits when it loses a rank): wait for
        # them briefly, so that a failed setup() is told apart from the peers it took down.
        _, pending = await asyncio.wait(waits, timeout=_PEERS_FOLLOW)
        for fut in pending:
            fut.cancel()
        codes = [p.returncode for p in ranks]
        fatal = [i for i, code in enumerate(codes) if code in _FATAL]
        chosen = fatal[0] if fatal else first
        return chosen, codes[chosen] or 0

    async def _stop(self, ranks: list[asyncio.subprocess.Process]) -> int:
        """Rank 0 drains (the others follow it); on other hosts the ranks wait for rank 0."""
        if self.leads and ranks[0].returncode is None:
            ranks[0].send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in ranks)), self.grace)
        except TimeoutError:
            log.warning("ranks still running after %.0fs; killing them", self.grace)
        await self._kill(ranks)
        return 0

    async def _kill(self, ranks: list[asyncio.subprocess.Process]) -> None:
        for proc in ranks:
            if proc.returncode is None:
                proc.kill()
        await asyncio.gather(*(p.wait() for p in ranks))
