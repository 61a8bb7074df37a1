"""The argument check every call passes (kubeforge.argcheck): its quick path for arguments
passed by position decides exactly as the full check does."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubeforge.argcheck import checker
from kubeforge.errors import InvalidArgumentsError


class Actor:
    def plain(self, a: int, b: str = "x", c: object = None) -> None: ...
    def untyped(self, a, b=1): ...  # type: ignore[no-untyped-def]
    def starred(self, a: int, *rest: int, **named: str) -> None: ...
    def keyword(self, a: int, *, b: float) -> None: ...
    def nothing(self) -> None: ...


def _outcome(check: Any, args: list[Any], kwargs: dict[str, Any]) -> str:
    try:
        check(args, kwargs)
    except InvalidArgumentsError as exc:
        return f"{exc.status}: {exc}"
    return "ok"


values = st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats(), st.booleans())


@pytest.mark.parametrize("name", ["plain", "untyped", "starred", "keyword", "nothing"])
@given(
    args=st.lists(values, max_size=4),
    kwargs=st.dictionaries(st.sampled_from(["a", "b", "c", "z"]), values, max_size=2),
)
def test_the_quick_path_agrees_with_the_full_check(
    name: str, args: list[Any], kwargs: dict[str, Any]
) -> None:
    fn = getattr(Actor(), name)
    quick = checker(name, fn, inspect.signature(fn))
    full = checker(name, fn, inspect.signature(fn), quick=False)
    assert _outcome(quick, args, kwargs) == _outcome(full, args, kwargs)


def test_a_wrong_positional_argument_is_named() -> None:
    fn = Actor().plain
    check = checker("plain", fn, inspect.signature(fn))
    check([1], {})
    check([1, "y", object()], {})
    with pytest.raises(InvalidArgumentsError, match="argument 'b' of plain must be str, got int"):
        check([1, 2], {})
    with pytest.raises(InvalidArgumentsError, match="TypeError"):
        check([], {})  # a is required
    with pytest.raises(InvalidArgumentsError, match="TypeError"):
        check([1, "y", None, 4], {})  # one too many
