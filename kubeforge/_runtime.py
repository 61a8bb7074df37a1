"""Process plumbing shared by `python -m kubeforge.replica` and `python -m kubeforge.router`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(text: str | float | int) -> float:
    """Seconds from `200ms`, `1.5s`, `2m` or a bare number of seconds (as in the CRD)."""
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"bad duration {text!r}: use a number with ms, s, m or h")
    return float(m.group(1)) * _UNIT[m.group(2)]


def format_duration(seconds: float) -> str:
    """The CRD's duration form of a number of seconds: `200ms`, `60s`, `30m`, `2h`."""
    if seconds < 1 or seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"  # whole milliseconds: never an exponent
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{int(seconds) // size}{unit}"
    return f"{int(seconds)}s"


def json_arg(kind: type) -> Callable[[str], Any]:
    """An argparse type: JSON text that must decode to `kind` (list for --args, dict for
    --kwargs), so a typo fails at the command line rather than in the actor's constructor."""

    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"must be a JSON {kind.__name__}")
        return value

    return parse


def bind_host(flag: str | None) -> str:
    """`--host` wins, then KUBEFORGE_BIND_HOST (the e2e node gives each pod its own), then all."""
    return flag or os.environ.get("KUBEFORGE_BIND_HOST") or "0.0.0.0"


def setup_logging(component: str) -> None:
    logging.basicConfig(
        level=os.environ.get("KUBEFORGE_LOG_LEVEL", "INFO").upper(),
        format=f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(
    main: Callable[[], Coroutine[Any, Any, Any]],
    on_signal: Callable[[], Awaitable[None]],
) -> None:
    """Run `main` on uvloop where available; SIGTERM/SIGINT call `on_signal` once, then exit."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.Runner()

    async def wrapper() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main()
        await stop.wait()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await on_signal()

    with runner:
        runner.run(wrapper())
