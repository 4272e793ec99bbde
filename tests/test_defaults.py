"""One set of defaults: a call without settings uses exactly what the workflow runs.

The workflow fills its config from m2ost/schemas/config.schema.yaml (Snakemake's validate with
set_default); the package's fallbacks come from the same file (m2ost.defaults). Each test runs a
subcommand or library call without settings and checks what it used against the schema's
defaults as Snakemake fills them.
"""

from __future__ import annotations

import json

import yaml
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest
import torch

from realdata import SVS, her2st_files, needs_her2st, needs_svs
from robustness_helpers import cli_in_process

from m2ost import defaults
from m2ost.learn.training.identity import train_settings
from m2ost.plan.settings import eval_batch_size

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "m2ost" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module")
def workflow_config() -> dict:
    """The config the workflow runs with when it sets nothing but the sample sheet."""
    from snakemake.utils import validate

    config = {"samples": "samples.tsv"}
    validate(config, str(SCHEMA), set_default=True)
    return config


def _ok(argv, capsys):
    status, err = cli_in_process(argv, capsys)
    assert status == 0, err[-3000:]


def test_the_package_reads_the_schema_as_snakemake_fills_it(workflow_config):
    assert defaults.config_defaults() == {k: v for k, v in workflow_config.items() if k != "samples"}
    assert workflow_config["train"] == defaults.section("train")
    assert train_settings({}) == train_settings(None) == workflow_config["train"]
    assert train_settings({"epochs": 3})["epochs"] == 3 and train_settings({"patience": 0})["patience"] == 0


def test_a_missing_schema_is_one_clear_error(tmp_path, monkeypatch):
    from m2ost.errors import InputError

    monkeypatch.setenv(defaults.SCHEMA_ENV, str(tmp_path / "nowhere.yaml"))
    with pytest.raises(InputError, match=r"nowhere\.yaml\] config schema not found.*M2OST_CONFIG_SCHEMA"):
        defaults.section("train")


def test_train_and_evaluate_without_settings(study, tmp_path, capsys, workflow_config):
    """``train`` (a baseline: seconds) and ``evaluate`` without --settings record the workflow's settings."""
    bundles = [f"{s}={study['bundles'][s]}" for s in ("A", "B", "C")]
    expressions = [f"{s}={study['expressions'][s]}" for s in ("A", "B", "C")]
    _ok(["train", "--kind", "mean", "--bundle", *bundles[:2], "--expression", *expressions[:2],
         "--genes", study["genes_file"], "--out-dir", tmp_path / "mean"], capsys)
    meta = torch.load(tmp_path / "mean" / "model.pt", weights_only=True)
    used = dict(meta["train_cfg"])
    assert used.pop("augment") is None  # baselines see the spots as they are
    assert used == {k: v for k, v in workflow_config["train"].items() if k != "augment"}
    _ok(["evaluate", "--model", tmp_path / "mean" / "model.pt", "--bundle", bundles[2], "--expression",
         expressions[2], "--out-dir", tmp_path / "eval"], capsys)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    used = summary["provenance"]["settings"]
    train = workflow_config["train"]
    assert (used["device"], used["batch_size"]) == (train["device"], eval_batch_size(train))


def test_predict_without_settings(study, tmp_path, capsys, monkeypatch, workflow_config):
    import m2ost.learn.inference.new_slides as predict

    _ok(["train", "--kind", "mean", "--bundle", f"A={study['bundles']['A']}", "--expression",
         f"A={study['expressions']['A']}", "--genes", study["genes_file"], "--out-dir", tmp_path / "mean"], capsys)
    seen = {}
    real_load, real_predict = predict.load_model, predict.predict_sample
    monkeypatch.setattr(predict, "load_model", lambda f, device: seen.update(device=device) or real_load(f, device))
    monkeypatch.setattr(predict, "predict_sample", lambda p, d, batch_size, *a: seen.update(batch_size=batch_size)
                        or real_predict(p, d, batch_size, *a))
    _ok(["predict", "--model", tmp_path / "mean" / "model.pt", "--bundle", study["bundles"]["C"], "--sample", "C",
         "--out", tmp_path / "C.h5ad"], capsys)
    assert seen == {"device": workflow_config["train"]["device"],
                    "batch_size": workflow_config["predict"]["batch_size"]}


@needs_svs
def test_tiling_and_grid_without_settings(tmp_path, capsys, monkeypatch, workflow_config):
    """The real SVS: ``grid-spots`` and ``tile`` without settings use the workflow's grid and views."""
    import m2ost.cli.run_slides as run_slides

    info = tmp_path / "slide.json"
    _ok(["prepare-slide", "--sample", "S", "--slide", SVS, "--out", info], capsys)
    _ok(["grid-spots", "--sample", "S", "--slide-info", info, "--out", tmp_path / "grid.tsv"], capsys)
    explicit = tmp_path / "explicit.tsv"
    _ok(["grid-spots", "--sample", "S", "--slide-info", info, "--out", explicit, "--settings",
         json.dumps({k: workflow_config["predict"][k] for k in ("spot_spacing_um", "min_tissue_fraction")})], capsys)
    assert (tmp_path / "grid.tsv").read_text() == explicit.read_text()

    table = (tmp_path / "grid.tsv").read_text().splitlines()
    (tmp_path / "two.tsv").write_text("\n".join(table[: 1 + 2]) + "\n")  # two spots are enough
    workers = []
    real = run_slides.tile_slide
    monkeypatch.setattr(run_slides, "tile_slide", lambda *a, **k: workers.append(k["workers"]) or real(*a, **k))
    _ok(["tile", "--sample", "S", "--slide-info", info, "--spots", tmp_path / "two.tsv", "--no-progress",
         "--out", tmp_path / "S.h5"], capsys)
    assert workers == [workflow_config["tiling"]["threads"]]
    with h5py.File(tmp_path / "S.h5") as f:
        mpp = float(f.attrs["mpp"])
        assert [int(s) for s in f.attrs["size_px"]] == [v["size_px"] for v in workflow_config["views"]]
        assert np.allclose(f.attrs["fov_um"], [v["fov_um"] for v in workflow_config["views"]], rtol=1 / 500 / mpp)


@needs_her2st
def test_expression_and_panel_without_settings(tmp_path, capsys, workflow_config):
    """Real HER2+ section B4: ``expression`` and ``panel`` without settings."""
    files = her2st_files("B4")
    spots, out = tmp_path / "B4.tsv", tmp_path / "B4.h5ad"
    _ok(["spots", "--sample", "B4", "--format", "legacy_st", "--positions", files["positions"], "--out", spots], capsys)
    _ok(["expression", "--sample", "B4", "--format", "legacy_st", "--counts", files["counts"], "--spots", spots,
         "--out", out], capsys)
    adata = anndata.read_h5ad(out)
    expected = workflow_config["expression"]
    assert adata.uns["m2ost"]["min_counts"] == expected["min_counts"]
    assert adata.uns["m2ost"]["target_sum"] == expected["target_sum"]
    assert adata.obs["total_counts"].min() >= expected["min_counts"]
    assert np.allclose(np.expm1(adata.X.toarray()).sum(axis=1), expected["target_sum"], rtol=1e-3)
    panel = tmp_path / "genes.txt"
    _ok(["panel", "--train", f"B4={out}", "--out", panel], capsys)
    assert len(panel.read_text().split()) == workflow_config["panel"]["n_genes"]


# --------------------------------------------------------------------------- one place for each default

# Literals in the package that equal a schema default next to its key without restating it.
NOT_DEFAULTS = {
    ("m2ost/data/demo/params.py", "spot_diameter_um"): "the demo cohort simulates Visium, whose spots are 55 µm",
    ("m2ost/learn/inference/heldout.py", "drop_padded"): "held-out samples are scored on every spot",
    ("m2ost/learn/inference/new_slides.py", "drop_padded"): "new slides are predicted on every spot",
    ("m2ost/learn/inputs/augment.py", "flip"): "the library's augment=True shorthand (the config's is an object)",
    ("m2ost/learn/inputs/augment.py", "rot90"): "the library's augment=True shorthand",
    ("m2ost/model/m2ost.py", "enabled"): "torch.autocast's argument",
    ("m2ost/model/variants.py", "depth"): "the size of the network variant tiny",
    **{("m2ost/learn/features/encoders.py", k): "what encoder records written before the key existed were "
       "computed with" for k in ("preset", "pool", "token_grid")},
    **{("m2ost/learn/features/presets.py", k): "the preset table's efficientnet-lite0 row, which describes "
       "the default and is never applied" for k in ("name", "levels", "token_levels", "tf_efficientnet_lite0")},
}


def _schema_defaults(schema: dict, prefix: str = ""):
    """(dotted key, key, default, schema) of every setting with a default, nested ones too."""
    for key, sub in schema.get("properties", {}).items():
        if "default" in sub and sub["default"] not in ({}, []):
            yield f"{prefix}{key}", key, sub["default"], sub
        yield from _schema_defaults(sub, f"{prefix}{key}.")


def _equal(a, b) -> bool:
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return type(a) in (int, float, str, bool, type(None)) and a == b


def restated_defaults(root: Path) -> list[tuple[str, str, str]]:
    """(file:line, key, the schema key) of every literal in ``root``'s package that pairs a config
    key with its schema default (a dict entry, ``.get(key, value)``, a keyword argument, an
    assignment ``KEY = value``), and of every long string default written out in the package or
    the rules (enum values are names the code compares against and are not counted)."""
    import ast

    schema = yaml.safe_load((root / "m2ost" / "schemas" / "config.schema.yaml").read_text())
    by_key: dict[str, list] = {}
    strings = {}
    for dotted, key, default, sub in _schema_defaults(schema):
        by_key.setdefault(key, []).append((dotted, default))
        if isinstance(default, str) and len(default) >= 12 and "enum" not in sub:
            strings[default] = dotted
    hits = []

    def pair(where, key, node):
        try:
            value = ast.literal_eval(node)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return
        hits.extend((where(node), key, dotted) for dotted, d in by_key.get(key, ()) if _equal(value, d))

    for path in sorted((root / "m2ost").rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        where = lambda node, rel=rel: f"{rel}:{node.lineno}"  # noqa: E731
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and isinstance(k.value, str):
                        pair(where, k.value, v)
            elif isinstance(node, ast.Call):
                if (isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop", "setdefault")
                        and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)):
                    pair(where, node.args[0].value, node.args[1])
                for kw in node.keywords:
                    if kw.arg:
                        pair(where, kw.arg, kw.value)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        pair(where, target.id.lower(), node.value)
            elif isinstance(node, ast.Constant) and node.value in strings:
                hits.append((where(node), node.value, strings[node.value]))
    for path in sorted((root / "workflow").rglob("*.smk")) + [root / "Snakefile"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            hits += [(f"{path.relative_to(root).as_posix()}:{n}", s, d) for s, d in strings.items() if s in line]
    return hits


def test_no_default_is_restated_in_the_package():
    """Every default is written once, in the schema: the package reads it from there (m2ost.defaults)."""
    hits = [h for h in restated_defaults(REPO) if (h[0].split(":")[0], h[1]) not in NOT_DEFAULTS]
    assert not hits, "defaults restated (read them through m2ost.defaults instead):\n" + "\n".join(
        f"  {where}: {key} restates {dotted}" for where, key, dotted in hits)
    assert all(reason for reason in NOT_DEFAULTS.values())


def test_the_settings_helper_merges_and_checks_from_the_schema():
    from m2ost.errors import InputError

    got = defaults.settings("train", {"lr": 0.001, "augment": {"flip": False}})
    assert got["lr"] == 0.001 and got["epochs"] == defaults.section("train")["epochs"]
    assert got["augment"] == {**defaults.section("train")["augment"], "flip": False}  # nested: key by key
    refused = [("train", {"epoch": 3}, r"unknown setting train\.epoch \(train takes epochs, "),
               ("train", {"augment": {"blur": 1}}, r"unknown setting train\.augment\.blur"),
               ("train", {"lr": 0}, r"setting train\.lr must be > 0, got 0"),
               ("train", {"val_fraction": 1}, r"train\.val_fraction must be < 1"),
               ("train", {"epochs": 2.5}, r"train\.epochs must be of type integer"),
               ("train", {"epochs": True}, r"train\.epochs must be of type integer"),
               ("train", {"scheduler": "step"}, r"train\.scheduler must be one of cosine, none"),
               ("train", {"device": "gpu"}, r"train\.device must match"),
               ("slides", {"jpeg_quality": 101}, r"slides\.jpeg_quality must be <= 100"),
               ("slides", {"mpp_range": [0.1]}, r"slides\.mpp_range needs at least 2 values"),
               ("encoder", {"mean": [0.5] * 4}, r"encoder\.mean takes at most 3 values"),
               ("encoder", {"std": [0.5, -1, 0.5]}, r"encoder\.std\[1\] must be > 0"),
               ("ensemble", {"members": ["ridge", "ridge"]}, r"ensemble\.members must not repeat"),
               ("ensemble", {"members": ["lasso"]}, r"ensemble\.members\[0\] must be one of")]
    for section, given, message in refused:
        with pytest.raises(InputError, match=message):
            defaults.settings(section, given, where="run.json")
    with pytest.raises(InputError, match=r"^\[file run\.json\] "):
        defaults.settings("train", {"lr": 0}, where="run.json")
    assert defaults.settings("encoder", {"mpp": 0.5, "kwargs": {"any": 1}})["kwargs"] == {"any": 1}


def test_errors_inside_nested_objects_and_alternatives_are_one_line_naming_the_dotted_path():
    """jsonschema's errors under an object in an object, an ``additionalProperties`` schema, an
    ``anyOf`` (encoder.batch_size) or a ``oneOf`` (each view: fov_um or fov_px) are one line
    naming the setting by its dotted path and what each alternative found wrong."""
    from m2ost.errors import InputError

    refused = [("splits", {"explicit": {"s1": {"train": ["a"]}}}, r"setting splits\.explicit\.s1 needs the key test$"),
               ("splits", {"explicit": {"s1": {"train": [], "test": ["b"]}}},
                r"setting splits\.explicit\.s1\.train needs at least 1 values, got \[\]$"),
               ("splits", {"explicit": {"s1": {"train": ["a"], "test": ["b"], "val": 1}}},
                r"unknown setting splits\.explicit\.s1\.val \(splits\.explicit\.s1 takes train, test\)$"),
               ("train", {"augment": {"flip": 1}}, r"setting train\.augment\.flip must be of type boolean, got 1$"),
               ("encoder", {"batch_size": -1},
                r"setting encoder\.batch_size must be >= 0, got -1 or must be of type string, got -1$"),
               ("encoder", {"batch_size": "big"},
                r"setting encoder\.batch_size must be of type integer, got 'big' or must be one of auto, got 'big'$")]
    for section, given, message in refused:
        with pytest.raises(InputError, match=r"^\[file run\.json\] " + message) as err:
            defaults.settings(section, given, where="run.json")
        assert "\n" not in str(err.value)
    views = defaults.section_schema("views")
    for given, message in [([{"fov_um": 112, "size_px": 224}, {"size_px": 224}],
                            r"^setting views\[1\] needs the key fov_um or needs the key fov_px$"),
                           ([{"fov_um": 112, "fov_px": 400, "size_px": 224}],
                            r"^setting views\[0\] matches more than one of "),
                           ([{"fov_um": 112, "size_px": 4}], r"^setting views\[0\]\.size_px must be >= 8, got 4$")]:
        with pytest.raises(InputError, match=message):
            defaults.check(views, given, "views")
    defaults.check(views, defaults.section("views"), "views")  # the defaults pass
    assert defaults.settings("train", {"seed": np.int64(3)})["seed"] == 3  # numpy integers are integers
    assert defaults.settings("encoder", {"mean": (0.5, 0.5, 0.5)})["mean"] == (0.5, 0.5, 0.5)  # tuples are arrays
