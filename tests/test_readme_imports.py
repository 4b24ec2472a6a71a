"""Every import statement in README.md's ```python blocks imports, as the README writes it.

Only the ``import`` / ``from ... import`` statements are executed (the rest of a block needs data,
GPUs or time); a name imported from a module may be an attribute or a submodule, as in Python.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def import_statements(block: str) -> list[str]:
    """The import statements of a block, one string each (parenthesised ones may span lines)."""
    out, lines, i = [], block.splitlines(), 0
    while i < len(lines):
        line = lines[i].split("#", 1)[0].rstrip()
        i += 1
        if not re.match(r"\s*(import|from)\s+\S", line):
            continue
        stmt = line.strip()
        while stmt.count("(") > stmt.count(")") or stmt.endswith("\\"):
            if i >= len(lines):
                break
            stmt = stmt.rstrip("\\") + " " + lines[i].split("#", 1)[0].strip()
            i += 1
        out.extend(s.strip() for s in stmt.split(";") if s.strip())
    return out


def check_import(stmt: str) -> None:
    tree = ast.parse(stmt)
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in the README: {stmt}"
            module = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name == "*" or hasattr(module, alias.name):
                    continue
                try:  # `from pkg import submodule`
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ModuleNotFoundError as exc:
                    raise AssertionError(f"README: `{stmt}`: {node.module} has no {alias.name!r} "
                                         f"({exc})") from None
        else:
            raise AssertionError(f"not an import statement: {stmt}")


STATEMENTS = sorted({s for b in python_blocks(README.read_text()) for s in import_statements(b)})


def test_readme_has_python_imports():
    assert len(STATEMENTS) >= 10, STATEMENTS


@pytest.mark.parametrize("stmt", STATEMENTS)
def test_readme_import(stmt):
    check_import(stmt)


def test_parser_finds_multiline_and_skips_code():
    block = ("import torch\nx = 1  # from a import b\nfrom a.b import (c,\n    d)\n"
             "y = f(import_ok)\n    from e import f  # indented\n")
    assert import_statements(block) == ["import torch", "from a.b import (c, d)", "from e import f"]


def test_missing_name_is_reported():
    with pytest.raises(AssertionError, match="no 'does_not_exist'"):
        check_import("from asvit_kernels.models import does_not_exist")
