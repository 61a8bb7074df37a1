"""Arguments against an endpoint's type hints, checked before the call runs.

A wrong type gets a 422 that names the argument, instead of whatever the actor raises halfway
through (or, worse, a wrong answer). The check is shallow on purpose: the argument itself
against its hint (unions, Optional, Literal and containers by their outer type), not every
element of a list: it costs a few isinstance calls, never a walk over a batch.
"""

from __future__ import annotations

import inspect
import numbers
import types
import typing
from collections.abc import Callable
from typing import Any

from kubeforge.errors import InvalidArgumentsError
from kubeforge.values import type_hints

Check = Callable[[list[Any], dict[str, Any]], None]

# Numbers as PEP 484 reads hints (an int is a fine float), numpy's scalars included.
_NUMERIC: dict[Any, Any] = {
    int: numbers.Integral,
    float: numbers.Real,
    complex: numbers.Complex,
}


def matches(value: Any, hint: Any) -> bool:
    """Whether `value` fits `hint` at its outer level; hints it cannot judge pass."""
    if hint is Any or isinstance(hint, str | typing.TypeVar | typing.ForwardRef):
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Annotated:
        return matches(value, typing.get_args(hint)[0])
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is not None:
        hint = origin
    if hint is bool:
        return isinstance(value, bool) or type(value).__name__ == "bool_"
    if hint in _NUMERIC:
        return isinstance(value, _NUMERIC[hint])
    if isinstance(hint, type):
        try:
            return isinstance(value, hint)
        except TypeError:  # a class that refuses isinstance (some typing constructs)
            return True
    return True


def describe(hint: Any) -> str:
    return hint.__qualname__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def checker(
    endpoint: str,
    fn: Callable[..., Any],
    signature: inspect.Signature,
    batched: bool = False,
    quick: bool = True,
) -> Check:
    """A function that binds a call's arguments to `signature` and checks each against its
    hint, raising InvalidArgumentsError (422) that names the first that does not fit. A call
    of a batched endpoint passes one element of each list the method takes: `list[X]` is
    checked as X. `quick=False` gives the full check alone, without the positional fast path
    (the reference that path is tested against)."""
    hints = {k: v for k, v in type_hints(fn).items() if k != "return"}
    if batched:
        hints = {k: _element(v) for k, v in hints.items()}
    kinds = {p.name: p.kind for p in signature.parameters.values()}

    def refuse(name: str, hint: Any, item: Any) -> typing.NoReturn:
        raise InvalidArgumentsError(
            f"argument {name!r} of {endpoint} must be {describe(hint)}, "
            f"got {type(item).__qualname__}",
            argument=name,
        )

    def check(args: list[Any], kwargs: dict[str, Any]) -> None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArgumentsError(f"TypeError: {endpoint}{signature}: {exc}") from None
        for name, value in bound.arguments.items():
            hint = hints.get(name)
            if hint is None:
                continue
            kind = kinds[name]
            items = (
                value
                if kind is inspect.Parameter.VAR_POSITIONAL
                else value.values()
                if kind is inspect.Parameter.VAR_KEYWORD
                else (value,)
            )
            for item in items:
                if not matches(item, hint):
                    refuse(name, hint, item)

    params = list(signature.parameters.values())
    if not quick or any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return check
    # The common case, on every call: plain parameters passed by position. They bind as
    # `signature.bind` would bind them (a required one never follows one with a default), so
    # only their hints are checked here; anything else takes the full check above.
    required = sum(p.default is inspect.Parameter.empty for p in params)
    hinted = [
        (i, p.name, hints[p.name])
        for i, p in enumerate(params)
        if p.name in hints and not _always(hints[p.name])
    ]

    def check_positional(args: list[Any], kwargs: dict[str, Any]) -> None:
        if kwargs or not required <= len(args) <= len(params):
            check(args, kwargs)
            return
        for i, name, hint in hinted:
            if i < len(args) and not matches(args[i], hint):
                refuse(name, hint, args[i])

    return check_positional


def _always(hint: Any) -> bool:
    """A hint every value fits (`matches` would say True for any)."""
    return (
        hint is Any or hint is object or isinstance(hint, str | typing.TypeVar | typing.ForwardRef)
    )


def _element(hint: Any) -> Any:
    """What one call passes where a batched method takes `hint`: X for list[X], else anything."""
    if typing.get_origin(hint) is list:
        (element,) = typing.get_args(hint) or (Any,)
        return element
    return Any
