"""The actor SDK: subclass `Actor`, mark callable methods with `@endpoint`.

Only methods marked `@endpoint` are reachable over the wire, so helpers on an actor never become
remote entry points by accident. Sync endpoints run in a worker thread so a slow one cannot stall
health checks of the replica that hosts it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_ENDPOINT_ATTR = "__kubeforge_endpoint__"


def endpoint(fn: F) -> F:
    """Mark an actor method (sync or async) as callable through a replica."""
    setattr(fn, _ENDPOINT_ATTR, True)
    return fn


class Actor:
    """Base class of user actors. One instance lives in each replica process."""

    async def setup(self) -> None:
        """Load models, warm caches. The replica reports ready only after this returns."""

    async def on_session_end(self, session_id: str) -> None:
        """Free per-session state (a KV cache, say) when a session ends or expires."""


@dataclass(frozen=True)
class EndpointInfo:
    name: str
    is_async: bool
    signature: inspect.Signature

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "async": self.is_async, "signature": str(self.signature)}


def endpoints_of(cls: type) -> dict[str, EndpointInfo]:
    """Every `@endpoint` of an actor class, by name, with its call signature (self removed)."""
    found: dict[str, EndpointInfo] = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        fn = inspect.getattr_static(cls, name, None)
        if isinstance(fn, staticmethod | classmethod):
            fn = fn.__func__
        if not callable(fn) or not getattr(fn, _ENDPOINT_ATTR, False):
            continue
        sig = inspect.signature(getattr(cls, name))
        params = list(sig.parameters.values())
        if (
            params
            and params[0].name == "self"
            and not isinstance(inspect.getattr_static(cls, name), staticmethod | classmethod)
        ):
            sig = sig.replace(parameters=params[1:])
        found[name] = EndpointInfo(name, inspect.iscoroutinefunction(fn), sig)
    return found


def load_actor_class(path: str) -> type:
    """Import `package.module:Class`, with errors that say which half was wrong."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"actor path {path!r} must look like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import actor module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, type):
        raise ValueError(f"{path!r} is not a class")
    if not endpoints_of(obj):
        raise ValueError(f"actor {path!r} has no @endpoint methods")
    return obj
