"""The manual cannot rot silently: what README.md, CHANGELOG.md, docs/*.md and config/README.md
name must exist.

- every relative link resolves to a file of the repository, and its ``#anchor`` to a heading;
- every ``m2ost <subcommand>`` in code is a subcommand of the command line;
- every dotted config key in backticks (``train.epochs``, ``encoder.input_px``) is in the
  config schema, m2ost/schemas/config.schema.yaml;
- every repository path in backticks (``m2ost/...``, ``tests/...``, ``workflow/...``) exists;
- every dotted module name (``m2ost.data.bundle``), in the docs and in the package's own
  docstrings and comments, imports.

The last test feeds each check a page with one mistake of each kind, so they are known to bite.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from test_cli import _subcommands

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "m2ost" / "schemas" / "config.schema.yaml"
PAGES = sorted({REPO / "README.md", REPO / "CHANGELOG.md", REPO / "config" / "README.md",
                *(REPO / "docs").glob("*.md")})
# Outputs of a run (not in the repository): their paths are described, not linked.
OUTPUT_DIRS = ("benchmarks/results/",)
REPO_DIRS = ("m2ost/", "tests/", "workflow/", "config/", "envs/", "docs/", "benchmarks/", ".ci/")
FILE_SUFFIXES = {"pt", "yaml", "yml", "tsv", "json", "h5", "h5ad", "png", "jpg", "md", "txt", "csv", "geojson",
                 "smk", "html", "py", "svs", "tif", "tiff", "gz", "log", "sh", "toml", "whl"}

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.M)
SUBCOMMAND = re.compile(r"(?:^|[\s`(;&|])m2ost\s+([a-z][a-z0-9-]*)")
CONFIG_KEY = re.compile(r"^[a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)+$")
MODULE = re.compile(r"(?<![\w/.-])m2ost(?:\.[A-Za-z_]\w*)+")


def prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", text)


def code(text: str) -> list[str]:
    """Inline code spans and fenced blocks."""
    blocks = [m.group(0) for m in FENCE.finditer(text)]
    return SPAN.findall(prose(text)) + blocks


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup and punctuation dropped, lower case, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(prose(path.read_text())):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path, root: Path = REPO) -> list[str]:
    text = page.read_text()
    found = []
    for groups in LINK.findall(prose(text)):
        target = groups[0] or groups[1]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists() or not dest.resolve().is_relative_to(root.resolve()):
            found.append(f"{page.name}: link to {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            found.append(f"{page.name}: link to {target}: no heading #{anchor} in {dest.name}")
    return found


def unknown_subcommands(page: Path) -> list[str]:
    known = set(_subcommands())  # aliases included
    return [f"{page.name}: `m2ost {name}` is not a subcommand" for snippet in code(page.read_text())
            for name in SUBCOMMAND.findall(snippet) if name not in known]


def schema_has(schema: dict, dotted: str) -> bool:
    node = schema
    for key in dotted.split("."):
        if node.get("type") == "array" and "items" in node:
            node = node["items"]
        props = node.get("properties")
        if props is None:  # an open mapping (encoder.kwargs): anything below it is the user's
            return node.get("type") == "object" and node.get("additionalProperties", True) is not False
        if key not in props:
            return False
        node = props[key]
    return True


def unknown_config_keys(page: Path, schema: dict) -> list[str]:
    top = set(schema["properties"])
    found = []
    for span in SPAN.findall(prose(page.read_text())):
        span = span.strip()
        if not CONFIG_KEY.match(span) or span.split(".")[0] not in top or span.rsplit(".", 1)[1] in FILE_SUFFIXES:
            continue
        if not schema_has(schema, span):
            found.append(f"{page.name}: `{span}` is not a config key of {SCHEMA.name}")
    return found


def missing_paths(page: Path, root: Path = REPO) -> list[str]:
    found = []
    for span in SPAN.findall(prose(page.read_text())):
        words = span.split("::")[0].split()
        path = words[0] if words else ""
        if not path.startswith(REPO_DIRS) or path.startswith(OUTPUT_DIRS) or re.search(r"[{*<]|\.\.\.", path):
            continue
        if not (root / path).exists():
            found.append(f"{page.name}: `{span}` does not exist")
    return found


def resolves(name: str) -> bool:
    """Whether ``m2ost.a.b.c`` is a module, or an attribute of the longest module prefix."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:i]))
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            continue
        obj = importlib.import_module(".".join(parts[:i]))
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def unknown_modules(path: Path) -> list[str]:
    return [f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path.name}: {name} does not import"
            for name in sorted(set(MODULE.findall(path.read_text()))) if not resolves(name)]


@pytest.fixture(scope="module")
def schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


def test_the_pages_exist():
    names = {p.relative_to(REPO).as_posix() for p in PAGES}
    assert {"README.md", "CHANGELOG.md", "docs/user-guide.md", "docs/models.md", "docs/benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_links_commands_keys_and_paths_exist(page, schema):
    problems = (broken_links(page) + unknown_subcommands(page) + unknown_config_keys(page, schema)
                + missing_paths(page) + unknown_modules(page))
    assert not problems, "\n".join(problems)


def test_module_names_in_the_package_import():
    problems = [p for path in sorted((REPO / "m2ost").rglob("*.py")) for p in unknown_modules(path)]
    assert not problems, "\n".join(problems)


def test_the_checks_catch_each_kind_of_mistake(tmp_path, schema):
    (tmp_path / "other.md").write_text("# Other page\n\n## Its section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Our section\n\n"
        "Good: [a](other.md), [b](other.md#its-section), [c](#our-section), [d](https://example.org/x), "
        "`m2ost predict-slide`, `train.epochs`, `encoder.kwargs.init_values`, `model.pt`, `m2ost.defaults`.\n"
        "Bad: [e](missing.md), [f](other.md#nowhere), [g](#nowhere), `m2ost learn-everything`, "
        "`train.epochz`, `m2ost.learn.train`, `m2ost/tiling.py`.\n\n"
        "```bash\nm2ost predict-slide --help\nm2ost fly\n[h](also-missing.md)\n```\n")
    assert broken_links(page, tmp_path) == [
        "page.md: link to missing.md: no such file",
        "page.md: link to other.md#nowhere: no heading #nowhere in other.md",
        "page.md: link to #nowhere: no heading #nowhere in page.md"]
    assert unknown_subcommands(page) == ["page.md: `m2ost learn-everything` is not a subcommand",
                                         "page.md: `m2ost fly` is not a subcommand"]
    assert unknown_config_keys(page, schema) == ["page.md: `train.epochz` is not a config key of config.schema.yaml"]
    assert missing_paths(page) == ["page.md: `m2ost/tiling.py` does not exist"]
    assert unknown_modules(page) == ["page.md: m2ost.learn.train does not import"]
    assert slug("Run on SLURM (and a GPU)") == "run-on-slurm-and-a-gpu"
    assert slug("`train`: the settings") == "train-the-settings"
