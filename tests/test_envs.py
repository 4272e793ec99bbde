"""Conda environments of the rules, and `snakemake --lint`.

Every rule that runs a command names an environment in envs/; every environment pins each
package (python=3.11, everything else ==) at the version pyproject.toml pins; and each
environment holds every package that the `m2ost` subcommands of its rules import (found by
following the imports of the package's source from the subcommand's function).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from functools import lru_cache, cache
from pathlib import Path

import pytest
import yaml

from workflow_helpers import FAST_CONFIG, REPO, copy_repo, snakemake

RULE_FILES = sorted((REPO / "workflow/rules").glob("*.smk")) + [REPO / "Snakefile"]
ENV_DIR = REPO / "envs"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --------------------------------------------------------------------------- rule files


@lru_cache(maxsize=1)
def rules() -> dict[str, dict]:
    """{rule: {"conda": path or None, "command": m2ost subcommand or None, "file": name}}."""
    out = {}
    for path in RULE_FILES:
        text = path.read_text()
        starts = list(re.finditer(r"^[ \t]*(?:rule|checkpoint) (\w+):", text, re.MULTILINE))
        for i, m in enumerate(starts):
            block = text[m.end():starts[i + 1].start() if i + 1 < len(starts) else len(text)]
            conda = re.search(r"^\s*conda:\s*\n\s*[\"']([^\"']+)[\"']", block, re.MULTILINE)
            # ``python``, or the launcher param (python or torchrun: train_launcher in m2ost/plan/settings.py)
            command = re.search(r"^\s*shell:\s*\n\s*[\"'](?:[^\"']*?)(?:python|\{params\.launcher\}) -m m2ost ([\w-]+)",
                                block, re.MULTILINE)
            out[m.group(1)] = {
                "conda": (path.parent / conda.group(1)).resolve() if conda else None,
                "command": command.group(1) if command else None,
                "runs": bool(re.search(r"^\s*(shell|run|script|notebook|wrapper):", block, re.MULTILINE)),
                "file": path.name,
            }
    return out


@cache
def env_packages(path: Path) -> dict[str, str]:
    """{normalised name: pinned version} of a conda env file (conda and pip entries)."""
    spec = yaml.safe_load(path.read_text())
    out = {}
    for entry in spec["dependencies"]:
        items = entry["pip"] if isinstance(entry, dict) else [entry]
        for item in items:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(==|=)\s*([\w.+\-]+)", item.strip())
            assert m, f"{path.name}: {item!r} is not pinned"
            name, op, version = m.groups()
            if op == "=":
                assert name == "python", f"{path.name}: pin {item!r} with =="
            out[norm(name)] = version
    return out


@lru_cache(maxsize=1)
def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([\w.+\-]+)", dep.strip())
        assert m, f"pyproject.toml: {dep!r} is not pinned with =="
        pins[norm(m.group(1))] = m.group(2)
    return pins


def test_rule_parser_sees_every_rule(tmp_path):
    """The rules found in the files are the rules Snakemake lists (default and fast config)."""
    wd = copy_repo(tmp_path / "repo", commit=False)
    for extra in ([], ["--configfile", FAST_CONFIG]):
        lines = snakemake(wd, "--list-rules", *extra).stdout.splitlines()
        listed = {line.strip() for line in lines if re.fullmatch(r"\w+", line.strip())}
        assert listed == set(rules()), listed ^ set(rules())


def test_every_rule_names_an_env_in_envs():
    used = set()
    for name, rule in rules().items():
        if not rule["runs"]:
            continue  # target rules (all) run nothing
        assert rule["conda"] is not None, f"rule {name} ({rule['file']}) has no conda: directive"
        assert rule["conda"].parent == ENV_DIR.resolve(), f"rule {name}: {rule['conda']} is not in envs/"
        assert rule["conda"].exists(), f"rule {name}: {rule['conda']} does not exist"
        assert rule["command"], f"rule {name} does not run `python -m m2ost`"
        used.add(rule["conda"].name)
    assert used == {p.name for p in ENV_DIR.glob("*.yaml")}, "an env file no rule uses"


@pytest.mark.parametrize("env", sorted(p.name for p in ENV_DIR.glob("*.yaml")))
def test_env_pins_every_package_at_the_pyproject_version(env):
    spec = yaml.safe_load((ENV_DIR / env).read_text())
    assert spec["channels"] == ["conda-forge", "nodefaults"]
    packages = env_packages(ENV_DIR / env)
    assert packages.pop("python") == "3.11"
    packages.pop("pip")  # the installer: pinned, but not a dependency of the package
    pins = pyproject_pins()
    assert re.search(r">=\s*3\.11", tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    for name, version in packages.items():
        assert name in pins, f"{env}: {name} is not a pinned dependency in pyproject.toml"
        assert version == pins[name], f"{env}: {name}=={version} but pyproject.toml pins {pins[name]}"


# --------------------------------------------------------------------------- imports of each subcommand

PACKAGE = "m2ost"


def module_path(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(node):
    """Import statements under ``node``, leaving out `if TYPE_CHECKING:` and optional ones
    (in a `try:` whose handler catches ImportError)."""
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
        for child in node.orelse:
            yield from _imports(child)
        return
    if isinstance(node, ast.Try) and any(
            h.type is not None and re.search(r"ImportError|ModuleNotFoundError", ast.unparse(h.type))
            for h in node.handlers):
        for child in node.handlers + node.orelse + node.finalbody:
            yield from _imports(child)
        for child in node.body:
            if not isinstance(child, (ast.Import, ast.ImportFrom)):
                yield from _imports(child)
        return
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
        return
    for child in ast.iter_child_nodes(node):
        yield from _imports(child)


class Module:
    """One module of the package: its top-level definitions and what its names are bound to."""

    def __init__(self, name: str):
        self.name = name
        path = module_path(name)
        self.package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.tree = ast.parse(path.read_text())
        self.defs = {n.name: n for n in self.tree.body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        self.toplevel = [n for n in self.tree.body if n.__class__.__name__ not in
                         ("FunctionDef", "AsyncFunctionDef", "ClassDef")]
        self.bindings: dict[str, tuple[str, str | None]] = {}  # name -> (module, name in it)
        for stmt in self.toplevel:
            for imp in _imports(stmt):
                for name, target in self.resolve(imp)[1]:
                    self.bindings[name] = target

    def resolve(self, imp):
        """(third-party top-level modules, [(bound name, (m2ost module, attribute or None))])."""
        external, bound = set(), []
        if isinstance(imp, ast.Import):
            for alias in imp.names:
                if alias.name.split(".")[0] == PACKAGE:
                    bound.append((alias.asname or alias.name.split(".")[0], (alias.name, None)))
                else:
                    external.add(alias.name.split(".")[0])
            return external, bound
        if imp.level:
            parts = self.package.split(".")
            base = ".".join(parts[:len(parts) - imp.level + 1])
            base = f"{base}.{imp.module}" if imp.module else base
        else:
            base = imp.module
        if base.split(".")[0] != PACKAGE:
            return {base.split(".")[0]}, []
        for alias in imp.names:
            sub = f"{base}.{alias.name}"
            target = (sub, None) if module_path(sub) else (base, alias.name)
            bound.append((alias.asname or alias.name, target))
        return external, bound


@cache
def _module(name: str) -> Module:
    return Module(name)


def third_party_imports(subcommand: str) -> set[str]:
    """Top-level third-party modules that `python -m m2ost SUBCOMMAND` can import.

    Follows, from ``m2ost/__main__.py``, the module-level code of every module reached and the
    functions and classes that reached code names (directly or as ``module.attribute``),
    starting from the function the parser names for the subcommand (``handler``). Imports
    inside a followed function count as used.
    """
    external: set[str] = set()
    # The parser modules (argparse only), then the function that runs the subcommand.
    todo: list[tuple[str, str | None]] = [(f"{PACKAGE}.__main__", None), subcommand_functions()[subcommand]]
    seen = set()
    while todo:
        unit = todo.pop()
        if unit in seen:
            continue
        seen.add(unit)
        name, attr = unit
        parts = name.split(".")
        todo += [(".".join(parts[:i]), None) for i in range(1, len(parts))]  # parent packages
        mod = _module(name)
        if attr is None:
            nodes = mod.toplevel
        elif attr in mod.defs:
            nodes = [mod.defs[attr]]
            todo.append((name, None))
        elif attr in mod.bindings:  # a name the module imports (re-exports)
            todo.append(mod.bindings[attr])
            continue
        else:  # a module-level variable
            todo.append((name, None))
            continue
        local: dict[str, tuple[str, str | None]] = {}
        for node in nodes:
            for imp in _imports(node):
                ext, bound = mod.resolve(imp)
                external |= ext
                for bname, target in bound:
                    local[bname] = target
                    todo.append((target[0], None) if attr is None else target)
            for ref in ast.walk(node):
                if isinstance(ref, ast.Name):
                    ident = ref.id
                    if ident in mod.defs and (attr is None or ident != attr):
                        todo.append((name, ident))
                    elif ident in local or ident in mod.bindings:
                        todo.append(local.get(ident) or mod.bindings[ident])
                elif isinstance(ref, ast.Attribute) and isinstance(ref.value, ast.Name):
                    target = local.get(ref.value.id) or mod.bindings.get(ref.value.id)
                    if target and target[1] is None:
                        todo.append((target[0], ref.attr))
    return {m for m in external if m not in sys.stdlib_module_names and m != "__future__"}


@lru_cache(maxsize=1)
def subcommand_functions() -> dict[str, tuple[str, str]]:
    """{subcommand: (module, function)} from the real command-line parser."""
    from m2ost.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: tuple(p.get_default("handler").split(":")) for name, p in sub.choices.items()}


@lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return md.packages_distributions()


def distribution_of(module: str) -> str:
    dists = _distributions().get(module)
    assert dists, f"no installed distribution provides the module {module!r}"
    return norm(dists[0])


def test_import_scanner_follows_the_cli():
    assert subcommand_functions()["tile"] == ("m2ost.cli.run_slides", "tile")
    assert subcommand_functions()["train"] == ("m2ost.cli.run_learn", "train")
    assert "torch" not in third_party_imports("tile") | third_party_imports("summary")
    assert "torch" in third_party_imports("train")
    assert {"scanpy", "squidpy"} <= third_party_imports("panel")
    assert "openslide" in third_party_imports("tile")


@pytest.mark.parametrize("rule", sorted(name for name, r in rules().items() if r["command"]))
def test_env_holds_what_the_rule_imports(rule):
    spec = rules()[rule]
    packages = env_packages(spec["conda"])
    needed = {distribution_of(m) for m in third_party_imports(spec["command"])}
    if "openslide-python" in needed:
        needed.add("openslide-bin")  # the OpenSlide library itself
    missing = needed - set(packages)
    assert not missing, (f"rule {rule} runs `m2ost {spec['command']}` in {spec['conda'].name}, "
                         f"which lacks {sorted(missing)}")


def test_envs_hold_the_key_packages():
    envs = {name: set(env_packages(ENV_DIR / f"{name}.yaml")) for name in ("torch", "slides", "expression")}
    assert "torch" in envs["torch"]
    assert {"openslide-python", "openslide-bin"} <= envs["slides"]
    assert {"scanpy", "squidpy"} <= envs["expression"]
    by_rule = {name: r["conda"].stem for name, r in rules().items() if r["conda"]}
    assert by_rule["train"] == by_rule["evaluate"] == by_rule["predict"] == "torch"
    assert by_rule["tile"] == "slides" and by_rule["expression"] == by_rule["panel"] == "expression"


# --------------------------------------------------------------------------- lint


@pytest.mark.parametrize("config", [None, FAST_CONFIG], ids=["default-config", "fast-config"])
def test_snakemake_lint_is_clean(config, tmp_path):
    wd = copy_repo(tmp_path / "repo", commit=False)
    args = ["--lint"] + (["--configfile", config] if config else [])
    proc = snakemake(wd, *args, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Lints for" not in proc.stdout, proc.stdout[-4000:]
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout
