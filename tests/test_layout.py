"""The package layout keeps its promises (docs/ARCHITECTURE.md).

- ``m2ost.plan`` imports the standard library only: the Snakefile imports it while planning,
  from an environment that may hold snakemake and nothing else;
- ``m2ost.data`` and ``m2ost.eval`` never import torch: their rules run in the slides and
  expression environments, which have none;
- the subpackages import each other without a cycle, and never from inside a function (an import
  deferred across subpackages hides a dependency from the reader and from tests/test_envs.py);
- no module is longer than 400 lines;
- the model kinds of the registry (m2ost.plan.kinds) are those the config schema accepts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synthetic import subprocess_env

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "m2ost"
SUBPACKAGES = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
MAX_LINES = 400


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _subpackage(module: str) -> str | None:
    """``m2ost.learn.training.trainer`` -> ``learn``; None for the top-level modules (errors, atomic, ...)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else None


def _m2ost_imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(imported m2ost module, imported inside a function?) of every import in ``path``."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    deferred = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(f)}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name == "m2ost" or name.startswith("m2ost."):
                out.append((name, id(node) in deferred))
    return out


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)


def test_plan_imports_the_standard_library_only():
    """Every module of m2ost.plan imports with every third-party package blocked."""
    plan = list(_modules(PACKAGE / "plan"))
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top != "m2ost" and top not in sys.stdlib_module_names:
            raise ImportError(f"m2ost.plan imported the third-party module {{name}}")
        return None
sys.meta_path.insert(0, Block())
import importlib
for name in {plan!r}:
    importlib.import_module(name)
print("ok", len({plan!r}))
"""
    done = _run_isolated(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", str(len(plan))]


@pytest.mark.parametrize("subpackage", ["data", "eval"])
def test_data_and_eval_never_import_torch(subpackage):
    modules = list(_modules(PACKAGE / subpackage))
    code = f"""
import importlib, sys
for name in {modules!r}:
    importlib.import_module(name)
heavy = sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules)
print(",".join(heavy) or "none")
"""
    done = _run_isolated(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "none", f"m2ost.{subpackage} imported {done.stdout.strip()}"


def _subpackage_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {s: set() for s in SUBPACKAGES}
    for module, path in _modules().items():
        source = _subpackage(module)
        for name, _ in _m2ost_imports(module, path):
            target = _subpackage(name)
            if source and target and target != source:
                graph[source].add(target)
    return graph


def test_no_import_cycle_between_subpackages():
    graph = _subpackage_graph()
    assert graph["plan"] <= set(), graph["plan"]  # plan is the floor: the Snakefile's own
    assert "learn" not in graph["data"] | graph["eval"] | graph["model"] | graph["plan"]
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(trail + [node, nxt])}")
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in SUBPACKAGES:
        if node not in state:
            visit(node, [])


def test_no_deferred_import_across_subpackages():
    found = []
    for module, path in _modules().items():
        source = _subpackage(module)
        for name, deferred in _m2ost_imports(module, path):
            target = _subpackage(name)
            if deferred and target and target != source:
                found.append(f"{path.relative_to(REPO)}: {name}")
    assert not found, "imports inside functions across subpackages (move them to the module top):\n" + \
        "\n".join(found)


def test_the_scanner_sees_deferred_and_relative_imports(tmp_path):
    """The AST scan above would catch what it looks for."""
    path = tmp_path / "probe.py"
    path.write_text("from .variants import build_model\n\n"
                    "def f():\n    from m2ost.learn.training.fit_on_views import fit_model\n")
    assert _m2ost_imports("m2ost.model.probe", path) == [
        ("m2ost.model.variants", False), ("m2ost.model.variants.build_model", False),
        ("m2ost.learn.training.fit_on_views", True), ("m2ost.learn.training.fit_on_views.fit_model", True)]


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_model_kinds_match_the_config_schema():
    from m2ost.plan.kinds import KINDS

    schema = yaml.safe_load((REPO / "m2ost" / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]
    assert props["models"]["items"]["enum"] == list(KINDS)
    assert props["predict"]["properties"]["model"]["enum"] == list(KINDS)
    assert set(props["models"]["default"]) <= set(KINDS)


def test_learn_is_split_into_its_four_parts():
    """learn/ holds only its parts (docs/ARCHITECTURE.md): data in, training, pretrained features,
    prediction out; no module sits beside them, and none of their names repeats another subpackage's."""
    learn = PACKAGE / "learn"
    parts = sorted(p.name for p in learn.iterdir() if (p / "__init__.py").is_file())
    assert parts == ["features", "inference", "inputs", "training"]
    assert sorted(p.name for p in learn.glob("*.py")) == ["__init__.py"]
    names = {p.stem for part in parts for p in (learn / part).glob("*.py")} - {"__init__"}
    assert not names & set(SUBPACKAGES), "a learn module named like a subpackage of m2ost"
