"""The package as a user installs it: a wheel built from the checkout, installed into a fresh
folder and run from elsewhere, with nothing of the checkout on the path.

The wheel is built from a copy of the package's files (no build/ or egg-info left in the
checkout), installed with ``pip install --no-deps --target``; this interpreter provides the
dependencies. Every command runs the installed ``m2ost`` script with PYTHONPATH holding the
install folder alone and the working directory outside the checkout, so a file the package
reads from its repository instead of from itself (the config schema, once) fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
import tifffile

from realdata import SVS
from test_cli import _subcommands

import m2ost
from m2ost.plan.outputs import PREDICTION_MAP

REPO = Path(__file__).resolve().parent.parent
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE")


def _pip(*args, cwd):
    out = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0, f"pip {' '.join(args)} failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the wheel from a copy of the package, install it into ``site/``; the run folder and env."""
    root = tmp_path_factory.mktemp("installed")
    src = root / "src"
    shutil.copytree(REPO / "m2ost", src / "m2ost", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(root / "wheel"), ".", cwd=src)
    (wheel,) = (root / "wheel").glob("m2ost-*.whl")
    site = root / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel), cwd=root)
    run_dir = root / "run"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "M2OST_CONFIG_SCHEMA")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return {"root": root, "site": site, "wheel": wheel, "run": run_dir, "env": env,
            "script": site / "bin" / "m2ost"}


def m2ost_cli(installed, *args, timeout=300) -> subprocess.CompletedProcess:
    """The installed ``m2ost`` script, run from outside the checkout."""
    out = subprocess.run([str(installed["script"]), *map(str, args)], cwd=installed["run"], env=installed["env"],
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"m2ost {' '.join(map(str, args))} failed:\n{out.stderr[-3000:]}"
    return out


def subcommands() -> list[str]:
    """Every subcommand's name (not its aliases)."""
    return sorted({p.prog.split()[-1] for p in _subcommands().values()})


def test_the_wheel_holds_the_package_and_its_schemas(installed):
    assert installed["wheel"].name == f"m2ost-{m2ost.__version__}-py3-none-any.whl"
    out = subprocess.run([sys.executable, "-c", "import json, m2ost, m2ost.defaults as d; print(m2ost.__file__); "
                          "print(d.schema_path()); print(json.dumps(sorted(d.config_defaults())))"],
                         cwd=installed["run"], env=installed["env"], capture_output=True, text=True, check=True)
    module, schema, sections = out.stdout.splitlines()
    assert Path(module).is_relative_to(installed["site"]), module
    assert Path(schema).is_relative_to(installed["site"]) and Path(schema).is_file()
    assert {"train", "views", "encoder", "predict"} <= set(json.loads(sections))
    assert (installed["site"] / "m2ost" / "schemas" / "samples.schema.yaml").is_file()


def test_version_and_every_subcommands_help(installed):
    assert installed["script"].is_file()
    assert m2ost_cli(installed, "--version").stdout.strip() == f"m2ost {m2ost.__version__}"
    top = m2ost_cli(installed, "--help").stdout
    names = subcommands()
    assert len(names) >= 10
    for name in names:
        assert name in top
        out = m2ost_cli(installed, name, "--help").stdout
        assert out.startswith(f"usage: m2ost {name}"), out[:200]


def test_model_info(installed):
    out = m2ost_cli(installed, "model-info").stdout
    for variant in ("tiny", "small", "paper"):
        assert any(line.split()[:1] == [variant] for line in out.splitlines()), out


def _synthetic_slide(path: Path) -> Path:
    """A plain RGB TIFF: white glass around an H&E-coloured disc with texture."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1600, 0:1600]
    tissue = (yy - 800) ** 2 + (xx - 800) ** 2 < 600**2
    img = np.full((1600, 1600, 3), 240, np.uint8)
    stain = np.stack([200 + 30 * np.sin(xx / 23), 120 + 40 * np.cos(yy / 31), 190 + 20 * np.sin((xx + yy) / 17)], -1)
    img[tissue] = np.clip(stain[tissue] + rng.normal(0, 8, (tissue.sum(), 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, img, photometric="rgb")
    return path


def test_train_then_predict_slide_with_the_installed_cli(installed, study):
    """A mean model trained by the installed ``m2ost train``, then ``predict-slide`` on a real slide."""
    run = installed["run"]
    m2ost_cli(installed, "train", "--kind", "mean", "--bundle", *(f"{s}={study['bundles'][s]}" for s in "AB"),
              "--expression", *(f"{s}={study['expressions'][s]}" for s in "AB"),
              "--genes", study["genes_file"], "--out-dir", run / "mean")
    if SVS.is_file():
        slide, extra = SVS, []
    else:  # no ../shared/data: a plain TIFF, whose resolution is given
        slide, extra = _synthetic_slide(run / "slide.tif"), ["--mpp", "0.5"]
    m2ost_cli(installed, "predict-slide", "--slide", slide, "--model", run / "mean" / "model.pt", "--sample", "S1",
              "--device", "cpu", "--out-dir", run / "pred", *extra)
    adata = anndata.read_h5ad(run / "pred" / "S1.h5ad")
    assert adata.n_obs >= 10 and list(adata.var_names) == list(study["genes"])
    assert np.isfinite(np.asarray(adata.X)).all()
    assert f'"m2ost": "{m2ost.__version__}"' in adata.uns["m2ost"]["provenance_json"]
    maps = Path(PREDICTION_MAP).suffix  # the image format of the maps, as the workflow names them
    for suffix in (maps, ".geojson"):
        assert (run / "pred" / f"S1{suffix}").stat().st_size > 0
