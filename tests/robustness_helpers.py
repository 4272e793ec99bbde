"""Small generated inputs for the robustness tests, and checks on what the user sees.

Everything here is written in a few milliseconds: tiny pyramidal slides, Visium ``outs``
folders (positions, scale factors, 10x HDF5), legacy ST tables and h5ad files, with one thing
wrong at a time in the tests that use them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from synthetic import subprocess_env

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# What the user sees
# ---------------------------------------------------------------------------------------------

def run_m2ost(args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m m2ost ARGS`` in a fresh process, from the repository (as the rules run it)."""
    return subprocess.run([sys.executable, "-m", "m2ost", *map(str, args)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def error_line(stderr: str) -> str:
    """The single ``m2ost: error:`` line of a failed command, checked: no traceback, nothing after it."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("m2ost: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert lines[-1] == errors[0], f"the error must be the last line:\n{stderr[-3000:]}"
    return errors[0]


def assert_cli_error(proc: subprocess.CompletedProcess, *, sample: str | None, file=None,
                     problem: str) -> str:
    """Exit status 1 and exactly one line ``m2ost: error: [sample S, file F] problem``."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    line = error_line(proc.stderr)
    check_error_text(line.removeprefix("m2ost: error: "), sample=sample, file=file, problem=problem)
    return line


def check_error_text(text: str, *, sample: str | None, file=None, problem: str) -> None:
    """``[sample S, file F] ...problem...`` on one line (``problem`` is a regular expression)."""
    assert "\n" not in text, text
    where = []
    if sample:
        where.append(f"sample {sample}")
    if file is not None:
        where.append(f"file {file}")
    if where:
        assert text.startswith(f"[{', '.join(where)}] "), text
    assert re.search(problem, text), (problem, text)


def cli_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """``m2ost.cli.main(argv)``; returns (status, stderr)."""
    from m2ost.cli import main

    status = main([str(a) for a in argv])
    return status, capsys.readouterr().err


def leftovers(folder: Path) -> list[str]:
    """Every file under ``folder`` (temporaries included), relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# Slides
# ---------------------------------------------------------------------------------------------

def tissue_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An H&E-coloured RGB uint8 image (smooth pink/purple pattern with grain)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    t = (0.5 + 0.5 * np.sin(xx / 23.0 + seed) * np.cos(yy / 17.0))[..., None]
    pink, purple = np.array([228, 160, 196.0]), np.array([118, 64, 158.0])
    img = pink * t + purple * (1 - t) + rng.normal(0, 4, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def pyramid_slide(path, size: int = 768, mpp: float = 0.5, seed: int = 0) -> Path:
    """A pyramidal JPEG TIFF that OpenSlide reads, with its resolution in the metadata."""
    from m2ost.data.pyramid import write_pyramidal_tiff

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(path, tissue_image(size, size, seed), mpp, min_size=128, workers=1)
    return path


def slide_info(path, slide, mpp: float = 0.5, sample: str = "S1") -> Path:
    """The JSON of the slide preparation stage, written by hand."""
    path = Path(path)
    path.write_text(json.dumps({"sample": sample, "slide": str(slide), "source_slide": str(slide), "mpp": mpp,
                                "mpp_source": "test"}))
    return path


def grid_spots(path, n: int, lo: float, hi: float, fmt_ids: str = "s{}") -> Path:
    """A spot table (results/spots layout) of about ``n`` spots on a square grid in [lo, hi]^2."""
    side = int(np.ceil(np.sqrt(n)))
    xs, ys = np.meshgrid(np.linspace(lo, hi, side), np.linspace(lo, hi, side))
    table = pd.DataFrame({"spot_id": [fmt_ids.format(i) for i in range(xs.size)], "x": xs.ravel(),
                          "y": ys.ravel(), "array_row": np.nan, "array_col": np.nan}).iloc[:n]
    table.to_csv(path, sep="\t", index=False)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Expression sources
# ---------------------------------------------------------------------------------------------

def visium_hex(n_rows: int, n_cols: int, mpp: float, origin_px: float) -> pd.DataFrame:
    """Visium's hexagonal grid (checkerboard indices, 100 µm pitch) in full-resolution px."""
    rows, cols = [], []
    for r in range(n_rows):
        for c in range(r % 2, 2 * n_cols, 2):
            rows.append(r)
            cols.append(c)
    rows, cols = np.array(rows), np.array(cols)
    return pd.DataFrame({"array_row": rows, "array_col": cols,
                         "pxl_row_in_fullres": np.round(origin_px + rows * 50 * np.sqrt(3) / mpp).astype(int),
                         "pxl_col_in_fullres": np.round(origin_px + cols * 50 / mpp).astype(int)})


def visium_outs(root, n_rows: int = 4, n_cols: int = 6, mpp: float = 0.5, spot_diameter_um: float = 65.0,
                genes=("GA", "GB", "GC", "GD", "GE"), seed: int = 0, counts: np.ndarray | None = None,
                matrix_barcodes: list[str] | None = None, scalefactors: dict | None | bool = True,
                origin_px: float = 200.0) -> dict:
    """A Space Ranger ``outs`` folder: tissue_positions.csv, scalefactors_json.json, 10x HDF5.

    Spots sit on the Visium hexagonal grid (100 µm pitch) at ``mpp`` µm per pixel; all are in
    tissue. ``counts`` (spots x genes) and ``matrix_barcodes`` replace those of the matrix;
    ``scalefactors`` False leaves the JSON out, a dict replaces it.
    """
    from m2ost.data.demo.writers import write_10x_h5

    root = Path(root)
    spatial = root / "outs" / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    pos = visium_hex(n_rows, n_cols, mpp, origin_px)
    barcodes = [f"AC{r:02d}{c:02d}GT-1" for r, c in zip(pos["array_row"], pos["array_col"])]
    pos.insert(0, "in_tissue", 1)
    pos.insert(0, "barcode", barcodes)
    pos.to_csv(spatial / "tissue_positions.csv", index=False)
    if scalefactors is True:
        scalefactors = {"spot_diameter_fullres": spot_diameter_um / mpp, "tissue_hires_scalef": 0.1,
                        "fiducial_diameter_fullres": 89.0 / mpp, "tissue_lowres_scalef": 0.03}
    if isinstance(scalefactors, dict):
        (spatial / "scalefactors_json.json").write_text(json.dumps(scalefactors))
    if counts is None:
        counts = np.random.default_rng(seed).poisson(30, (len(barcodes), len(genes)))
    gene_table = pd.DataFrame({"gene": list(genes), "gene_id": [f"ENSG{i:05d}" for i in range(len(genes))]})
    matrix = root / "outs" / "filtered_feature_bc_matrix.h5"
    write_10x_h5(matrix, np.asarray(counts), matrix_barcodes or barcodes, gene_table, "S")
    return {"positions": spatial / "tissue_positions.csv", "scalefactors": spatial / "scalefactors_json.json",
            "matrix": matrix, "barcodes": barcodes, "spatial": spatial}


def write_raw_10x_h5(path, counts_genes_by_spots, barcodes, genes) -> Path:
    """A 10x HDF5 matrix with arbitrary (even invalid) values, bypassing any checks."""
    import h5py
    import scipy.sparse as sp

    m = sp.csc_matrix(np.asarray(counts_genes_by_spots, dtype=np.float64).reshape(len(genes), len(barcodes)))
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        feat = g.create_group("features")

        def strings(values):
            return np.array([str(v).encode() for v in values], dtype="S32")

        feat["id"] = strings(f"ENSG{i}" for i in range(len(genes)))
        feat["name"] = strings(genes)
        feat["feature_type"] = strings(["Gene Expression"] * len(genes))
        feat["genome"] = strings(["GRCh38"] * len(genes))
        feat["_all_tag_keys"] = np.array([b"genome"])
    return Path(path)


def spots_table_for(barcodes, x, y) -> pd.DataFrame:
    return pd.DataFrame({"spot_id": list(barcodes), "x": np.asarray(x, float), "y": np.asarray(y, float),
                         "array_row": np.nan, "array_col": np.nan})


def h5ad_source(path, X, obs_names, spatial=None, genes=None) -> Path:
    """An h5ad expression source (HEST-style): counts in X, centres in obsm["spatial"]."""
    import anndata
    import scipy.sparse as sp

    X = np.asarray(X, np.float32)
    genes = genes or [f"G{i}" for i in range(X.shape[1])]
    adata = anndata.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame(index=pd.Index(list(obs_names))),
                            var=pd.DataFrame(index=pd.Index(genes)))
    if spatial is not None:
        adata.obsm["spatial"] = np.asarray(spatial, float)
    adata.write_h5ad(path)
    return Path(path)
