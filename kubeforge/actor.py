"""The actor SDK: subclass `Actor`, mark callable methods with `@endpoint`.

Only methods marked `@endpoint` are reachable over the wire, so helpers on an actor never become
remote entry points by accident. Sync endpoints run in a worker thread so a slow one cannot stall
health checks of the replica that hosts it.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from kubeforge import spawn_guard
from kubeforge.ranks import current_rank

if TYPE_CHECKING:
    from kubeforge.handles import ActorHandle, ServiceHandle

F = TypeVar("F", bound=Callable[..., Any])
A = TypeVar("A", bound="Actor")

_ENDPOINT_ATTR = "__kubeforge_endpoint__"
_DEVICE_ATTR = "__kubeforge_device__"
_BATCH_ATTR = "__kubeforge_batch__"
# The session of the call an endpoint is running; set by the replica on every rank.
SESSION: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kubeforge_session", default=None
)


def current_session() -> str | None:
    """The session id of the call this endpoint runs (an issued id or the caller's name), or
    None for a call without one: per-session state kept under it is freed in `on_session_end`."""
    return SESSION.get()


def endpoint(
    fn: F | None = None,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    batch_wait: float = 0.005,
) -> Any:
    """Mark an actor method (sync or async) as callable through a replica. A generator (sync
    or async) streams: its items reach the caller as they are yielded (`.stream()`).

    Tensors arrive on the CPU (a CUDA tensor travels as its bytes); `@endpoint(device="cuda")`
    moves the tensors among its arguments (in lists, tuples, dicts and dataclasses) to that
    device before the call, each rank to its own GPU.

    `@endpoint(batch_size=N, batch_wait=S)` batches: concurrent calls on one replica (each
    with one value per argument) become one call of the method with a list per argument, of
    up to N calls, gathered for at most S seconds; it returns a list of one result per call.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(batch_wait, int | float) or batch_wait < 0:
        raise ValueError(f"batch_wait must be a number of seconds >= 0, got {batch_wait!r}")

    def mark(f: F) -> F:
        if batch_size is not None and (
            inspect.isasyncgenfunction(f) or inspect.isgeneratorfunction(f)
        ):
            raise ValueError(f"{f.__qualname__}: a streaming endpoint cannot be batched")
        setattr(f, _ENDPOINT_ATTR, True)
        setattr(f, _DEVICE_ATTR, device)
        setattr(f, _BATCH_ATTR, None if batch_size is None else (batch_size, float(batch_wait)))
        return f

    return mark(fn) if fn is not None else mark


class Actor:
    """Base class of user actors. One instance lives in each replica process (each rank)."""

    # torchforge's spawn options, as `options()` sets them on a subclass it returns.
    procs: ClassVar[int] = 1
    hosts: ClassVar[int | None] = None
    with_gpus: ClassVar[bool] = False
    num_replicas: ClassVar[int] = 1
    mesh_name: ClassVar[str | None] = None
    _service_options: ClassVar[dict[str, Any]] = {}  # every option given, for ServiceConfig

    async def setup(self) -> None:
        """Load models, warm caches. The replica reports ready only after this returns."""

    async def on_session_end(self, session_id: str) -> None:
        """Free per-session state (a KV cache, say) when a session ends or expires."""

    @property
    def rank(self) -> int:
        """This process's rank in its replica (0 unless the replica has `procs`/`hosts`)."""
        return current_rank().rank

    @property
    def world_size(self) -> int:
        """Ranks in this replica: procs x hosts."""
        return current_rank().world_size

    @classmethod
    def options(cls: type[A], **config: Any) -> type[A]:
        """torchforge's `X.options(num_replicas=2, procs=2, ...)`: this class with the options
        set (any ServiceConfig field; checked here, so a typo fails now), to `.as_service()` or
        `.as_actor()`. Each call makes its own subclass: configurations never interfere."""
        from kubeforge.service import service_config  # service.py imports this module

        merged = {**cls._service_options, **config}
        cfg = service_config(merged)
        attrs: dict[str, Any] = {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__kubeforge_actor__": actor_class(cls),  # what replicas import
            "_service_options": merged,
        }
        for name in ("procs", "hosts", "with_gpus", "num_replicas", "mesh_name"):
            attrs[name] = getattr(cfg, name)
        return type(cls.__name__, (cls,), attrs)

    @classmethod
    async def as_service(cls, *args: Any, **kwargs: Any) -> ServiceHandle:
        """Start `num_replicas` replicas of this actor (default 1) as a service."""
        from kubeforge import service

        return await service.as_service(cls, cls._service_options, args, kwargs)

    @classmethod
    async def as_actor(cls, *args: Any, **kwargs: Any) -> ActorHandle:
        """Start one instance (of `procs` ranks) of this actor, with Monarch's verbs."""
        from kubeforge import service

        return await service.as_actor(cls, cls._service_options, args, kwargs)

    @classmethod
    async def shutdown(cls, handle: ActorHandle | ServiceHandle) -> None:
        """torchforge's `await X.shutdown(actor)`: stop what `as_actor`/`as_service` started."""
        await handle.shutdown()


@dataclass(frozen=True)
class EndpointInfo:
    name: str
    is_async: bool
    signature: inspect.Signature
    device: str | None = None  # where its tensor arguments go before the call
    streams: bool = False  # a generator: called with `.stream()`, POST /v1/stream/{name}
    batch: tuple[int, float] | None = None  # (batch_size, batch_wait): calls grouped

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "async": self.is_async, "signature": str(self.signature)}
        if self.streams:
            out["streams"] = True
        if self.batch is not None:
            out["batch_size"], out["batch_wait"] = self.batch
        return {**out, "device": self.device} if self.device else out


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
        device = getattr(fn, _DEVICE_ATTR, None)
        is_async = inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
        streams = inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn)
        batch = getattr(fn, _BATCH_ATTR, None)
        found[name] = EndpointInfo(name, is_async, sig, device, streams, batch)
    return found


def load_actor_class(path: str) -> type:
    """Import `package.module:Class` (or `/path/script.py:Class`), with errors that say which
    half was wrong."""
    module_name, sep, attr = path.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"actor path {path!r} must look like 'package.module:Class'")
    try:
        if module_name.endswith(".py"):
            module = _load_script(module_name)
        else:
            with spawn_guard.importing_script(module_name):  # a module can start one too
                module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:
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


def _load_script(path: str) -> ModuleType:
    """Load the user's main script the way multiprocessing's spawn does: as `__mp_main__`, so
    its `if __name__ == "__main__":` block does not run again in the replica.

    Code outside that block does run again, so starting kubeforge processes during the import
    is refused (`spawn_guard`): a Service started there would recurse in every replica.
    """
    if (
        "__mp_main__" in sys.modules
        and getattr(sys.modules["__mp_main__"], "__file__", None) == path
    ):
        return sys.modules["__mp_main__"]
    # multiprocessing's first import (torch's does it) points `__mp_main__` at `__main__`: done
    # here first, it cannot undo the script's entry while the script imports torch, and the
    # names in the script's annotations resolve in the script (its dataclasses' fields).
    import multiprocessing  # noqa: F401

    spec = importlib.util.spec_from_file_location("__mp_main__", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["__mp_main__"] = module
    try:
        with spawn_guard.importing_script(path):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop("__mp_main__", None)  # as importlib drops a module that failed
        raise
    sys.modules["__mp_main__"] = module
    return module


def actor_class(cls: type) -> type:
    """The class a replica loads: `X.options(...)` returns a subclass made at run time, which
    no replica could import; it stands for X."""
    return cls.__dict__.get("__kubeforge_actor__", cls)


def import_path_of(cls: type) -> str:
    """The actor path a replica process can load `cls` from."""
    cls = actor_class(cls)
    if "<locals>" in cls.__qualname__:
        raise ValueError(
            f"{cls.__qualname__} is defined inside a function; define actor "
            "classes at module level so replica processes can import them"
        )
    module = cls.__module__
    if module in ("__main__", "__mp_main__"):
        main_file = getattr(sys.modules[module], "__file__", None)
        if not main_file:
            raise ValueError(
                f"{cls.__qualname__} is defined in an interactive session; move it "
                "into a module or script file so replica processes can import it"
            )
        return f"{os.path.abspath(main_file)}:{cls.__qualname__}"
    return f"{module}:{cls.__qualname__}"
