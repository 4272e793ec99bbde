"""Every function of the package reads in one screen: under 50 lines from ``def`` to its last
line, docstring included (docs/ARCHITECTURE.md, rules of the layout)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AREAS = sorted((REPO / "m2ost").rglob("*.py"))
MAX_FUNCTION_LINES = 49


def long_functions(paths, root: Path = REPO) -> dict[str, int]:
    out = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out[f"{path.relative_to(root)}:{node.lineno} {node.name}"] = n
    return out


def test_every_function_reads_in_one_screen():
    assert len(AREAS) > 80
    assert not long_functions(AREAS), f"functions over {MAX_FUNCTION_LINES} lines: {long_functions(AREAS)}"


def test_the_count_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    (tmp_path / "m.py").write_text(f"def f():\n{body}\n\n\ndef g():\n    return 1\n")
    assert long_functions([tmp_path / "m.py"], tmp_path) == {"m.py:1 f": 61}
