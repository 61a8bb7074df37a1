"""Everything this process started or connected to, so that one call can stop it all.

torchforge programs end with the provisioner's `shutdown()`; kubeforge's is `kubeforge.shutdown()`.
A program that forgets it (or dies of an exception) must not leave replica processes behind,
so at interpreter exit whatever is still running is stopped without the event loop, which is
gone by then: local replicas are plain child processes, and stopping them needs no loop.
"""

from __future__ import annotations

import atexit
import logging
from typing import Protocol

log = logging.getLogger("kubeforge")


class Stoppable(Protocol):
    async def stop(self) -> None:
        """Stop it, draining what it runs."""

    def stop_at_exit(self) -> None:
        """Stop it without an event loop: the interpreter is exiting."""


_live: list[Stoppable] = []  # in start order; stopped newest first


def started(thing: Stoppable) -> None:
    if thing not in _live:
        _live.append(thing)


def stopped(thing: Stoppable) -> None:
    if thing in _live:
        _live.remove(thing)


def live() -> list[Stoppable]:
    return list(_live)


async def shutdown() -> None:
    """Stop every service and actor this process started, and close every connection it made
    to a cluster's routers (the Services there keep running: kubectl owns them). Newest first,
    as a stack unwinds; one that fails to stop does not keep the others running."""
    errors: list[BaseException] = []
    for thing in reversed(_live.copy()):
        try:
            await thing.stop()
        except Exception as exc:  # the next one still stops
            log.exception("stopping %r failed", thing)
            errors.append(exc)
        stopped(thing)
    if errors:
        raise errors[0]


@atexit.register
def _stop_at_exit() -> None:
    if _live:
        log.warning(
            "%d service(s)/actor(s) still running at exit: stopping them "
            "(call `await kubeforge.shutdown()` at the end of the program)",
            len(_live),
        )
    for thing in reversed(_live.copy()):
        try:
            thing.stop_at_exit()
        except Exception:
            log.exception("stopping %r at exit failed", thing)
        stopped(thing)
