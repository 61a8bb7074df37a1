"""Refuse process starts that would make kubeforge start itself recursively.

A replica imports the user's script to find its actor class, as multiprocessing's spawn start
method imports the main module. A script that starts a Service at its top level, outside
`if __name__ == "__main__":`, would start one again in every replica, whose replicas would do
the same: a fork bomb. Two guards stop that:

- While a replica imports the script (`importing_script`), every start is refused with
  `UnguardedMainError`, and the refusal is remembered, so a script that swallows the error
  still fails the replica once the import returns.
- Every process `Processes.spawn` starts carries `KUBEFORGE_SPAWNED_BY=<parent pid>`, and a
  process with that marker refuses to start kubeforge processes (`NestedSpawnError`): replicas
  and routers never start replicas, so whatever slips past the first guard stops one level down.

A replica that refuses exits with `EXIT_UNGUARDED_MAIN`. When a kubeforge parent started it, it
prints nothing: the parent recognises the code and raises the full error once, instead of one
copy per replica. Without a parent (a pod), the replica prints the full error itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from kubeforge.errors import NestedSpawnError, UnguardedMainError

SPAWNED_BY_ENV = "KUBEFORGE_SPAWNED_BY"
# The replica's exit status for "the script starts kubeforge processes when imported". Chosen
# away from 1 and 2 (Python's uncaught exception and usage errors) and from 128+N (signals).
EXIT_UNGUARDED_MAIN = 87


@dataclass
class _ScriptImport:
    script: str
    refused: bool = False


_importing: _ScriptImport | None = None


def unguarded_main_message(script: str) -> str:
    """The one explanation of the mistake, shared by the replica and its parent."""
    return (
        f"{script} starts kubeforge processes (a Service) when it is imported, and every "
        "replica imports it to find its actor class.\n"
        "A replica loads the script that defines its actor as `__mp_main__`, the way "
        "multiprocessing's spawn start method does, so the script's top-level code runs again "
        "in each replica. A Service started there would start replicas of its own, and they "
        "would do the same without end; kubeforge refused to start it.\n"
        "Start the Service only when the script runs as the program: put the call that starts "
        "it under the main guard, for example\n\n"
        '    if __name__ == "__main__":\n'
        "        asyncio.run(main())"
    )


def script_of_actor(actor: str) -> str | None:
    """The script file in a replica's `--actor /path/script.py:Class`, None for a module path."""
    module, _, _ = actor.rpartition(":")
    return module if module.endswith(".py") else None


@contextmanager
def importing_script(script: str) -> Iterator[None]:
    """Refuse every kubeforge process start while `script` is imported for a replica.

    Raises `UnguardedMainError` on the way out if any start was refused, even when the script
    caught the error (or raised something else instead): the replica must not serve an actor
    whose script tried to start its own replicas.
    """
    global _importing
    outer, state = _importing, _ScriptImport(script)
    _importing = state
    try:
        yield
    except BaseException:
        if not state.refused:
            raise
    finally:
        _importing = outer
    if state.refused:
        raise UnguardedMainError(unguarded_main_message(script)) from None


def can_spawn() -> bool:
    """Whether `check_can_spawn` would let a start through (it records nothing)."""
    return _importing is None and not os.environ.get(SPAWNED_BY_ENV)


def check_can_spawn(what: str) -> None:
    """Raise instead of starting `what` when that would start kubeforge recursively."""
    if _importing is not None:
        _importing.refused = True
        raise UnguardedMainError(unguarded_main_message(_importing.script))
    parent = os.environ.get(SPAWNED_BY_ENV)
    if parent:
        raise NestedSpawnError(
            f"refusing to start {what}: this process was started by kubeforge "
            f"({SPAWNED_BY_ENV}={parent}; a replica, a router, or a process one of them "
            "started), and kubeforge processes never start kubeforge processes, so that one "
            "Service cannot multiply into many. Start Services from your own program, not from "
            "an actor or a replica. If this process is really meant to start its own kubeforge "
            f"processes, remove {SPAWNED_BY_ENV} from its environment."
        )
