"""The bench modules that the CNTK 2.7 image runs must stay valid Python 3.6: its newest
interpreter. ast checks the grammar; the walk below catches what 3.6 would only reject at
import time (annotations are evaluated at definition time there)."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

# Everything the bench imports in a CNTK cell: the shared modules and the CNTK module.
PY36_MODULES = sorted(p for p in (REPO / "bench").glob("*.py")) + [REPO / "bench" / "frameworks" / "__init__.py",
                                                                      REPO / "bench" / "frameworks" / "cntk.py"]
# Standard-library names that appeared after 3.6.
NEWER_NAMES = {"functools.cache", "statistics.quantiles", "math.prod", "missing_ok", "capture_output",
               "removeprefix", "removesuffix", "fromisoformat", "typing.Protocol", "typing.Literal"}


def problems_for_py36(source: str) -> list[str]:
    tree = ast.parse(source, feature_version=(3, 6))  # walrus, positional-only, etc.
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "__future__" and any(a.name == "annotations" for a in node.names):
            found.append(f"line {node.lineno}: from __future__ import annotations (3.7+)")
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs + [a for a in (node.args.vararg, node.args.kwarg) if a]
            annotations = [a.annotation for a in args if a.annotation] + ([node.returns] if node.returns else [])
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for annotation in annotations:
            for part in ast.walk(annotation):
                if isinstance(part, ast.BinOp) and isinstance(part.op, ast.BitOr):
                    found.append(f"line {part.lineno}: X | Y annotation (3.10+)")
                if isinstance(part, ast.Subscript) and isinstance(part.value, ast.Name) and part.value.id in (
                        "list", "dict", "tuple", "set", "frozenset", "type"):
                    found.append(f"line {part.lineno}: {part.value.id}[...] annotation (3.9+)")
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and f"{node.value.id}.{node.attr}" in NEWER_NAMES:
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr} (newer than 3.6)")
        if isinstance(node, ast.keyword) and node.arg in NEWER_NAMES:
            found.append(f"line {node.value.lineno}: keyword {node.arg}= (newer than 3.6)")
        if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.JoinedStr) for v in node.values):
            found.append(f"line {node.lineno}: nested f-string")
    return found


@pytest.mark.parametrize("path", PY36_MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_module_is_valid_python_36(path: Path):
    assert path.is_file(), f"{path} is missing"
    assert problems_for_py36(path.read_text(encoding="utf-8")) == []


def test_the_checker_finds_what_36_rejects():
    source = ("from __future__ import annotations\nimport functools\n@functools.cache\n"
              "def f(a: list[int], b: int | None) -> dict[str, int]:\n    return {}\n")
    assert len(problems_for_py36(source)) == 5
    with pytest.raises(SyntaxError):
        problems_for_py36("if (n := 3):\n    pass\n")


# A real interpreter where there is one (pyenv's, not its shim, which needs a selected version).
PYTHON36 = next(iter(sorted(Path.home().glob(".pyenv/versions/3.6*/bin/python3.6"))), None)


@pytest.mark.skipif(PYTHON36 is None, reason="no Python 3.6 interpreter on this machine")
def test_python_36_itself_compiles_the_modules(tmp_path):
    script = ("import py_compile, sys\n"
              "for path in sys.argv[1:]:\n"
              "    py_compile.compile(path, cfile=sys.argv[0] + '.pyc', doraise=True)\n")
    done = subprocess.run([PYTHON36, "-c", script, *map(str, PY36_MODULES)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
