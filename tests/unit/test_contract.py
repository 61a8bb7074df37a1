"""Names are defined once (kubeforge/contract.toml): no code types them again as literals, in
Python or in Rust, and shared helpers exist once."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

from kubeforge import contract

ROOT = Path(__file__).resolve().parents[2]
_DATA = tomllib.loads((ROOT / "kubeforge" / "contract.toml").read_text())
NAMES = [
    _DATA["api"]["group"],
    *_DATA["headers"].values(),
    *(contract.LABEL_PREFIX + key for key in _DATA["labels"].values()),
]
PYTHON = [
    p
    for d in ("kubeforge", "devcluster")
    for p in sorted((ROOT / d).rglob("*.py"))
    if p.name != "contract.py"
]


def _literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String and bytes constants that are code, not docstrings."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in docstrings:
            value = node.value
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            if isinstance(value, str):
                out.append((node.lineno, value))
    return out


@pytest.mark.parametrize("path", PYTHON, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_never_retypes_a_shared_name(path: Path) -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text!r}"
        for line, text in _literals(ast.parse(path.read_text()))
        for name in NAMES
        if name in text.lower()
    ]
    assert not found, "use kubeforge.contract instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "relay" / "src").glob("*.rs")), ids=lambda p: p.name
)
def test_rust_never_retypes_a_shared_name(path: Path) -> None:
    code = path.read_text().split("#[cfg(test)]")[0]
    code = re.sub(r"//.*", "", code)  # comments and doc comments
    literals = re.findall(r'"((?:[^"\\]|\\.)*)"', code)
    found = [text for text in literals for name in NAMES if name in text.lower()]
    assert not found, f"{path.name}: use crate::names instead: {found}"


def test_names_reach_rust_from_the_same_file() -> None:
    build = (ROOT / "relay" / "build.rs").read_text()
    assert "kubeforge/contract.toml" in build


@pytest.mark.parametrize(
    ("pattern", "what"),
    [
        (r"^def free_port\(", "free_port"),
        (r"load_incluster_config\(", "the in-cluster client bootstrap"),
        (r"^class Defaults\b", "the defaults"),
    ],
)
def test_helpers_exist_once(pattern: str, what: str) -> None:
    files = [
        p
        for d in ("kubeforge", "devcluster", "tests", "bench")
        for p in (ROOT / d).rglob("*.py")
        if p.name != Path(__file__).name
    ]
    hits = [p for p in files if re.search(pattern, p.read_text(), re.MULTILINE)]
    assert len(hits) == 1, f"{what} is defined in {[str(p.relative_to(ROOT)) for p in hits]}"
