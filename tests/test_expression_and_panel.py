"""Expression readers, QC, normalisation and gene panels, on real HER2+ sections where possible."""

from __future__ import annotations

import gzip
import json

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from m2ost.data import expression
from m2ost.data import panel
from m2ost.data import spots
from m2ost.errors import InputError
from realdata import HER2ST, her2st_files, needs_her2st


@pytest.fixture(scope="module")
def her2st_expr(tmp_path_factory):
    out = tmp_path_factory.mktemp("expr")
    files = {}
    for section in ("B4", "C2"):
        f = her2st_files(section)
        table = spots.read_positions("legacy_st", f["positions"], section)
        path = out / f"{section}.h5ad"
        expression.build_expression(section, "legacy_st", f["counts"], table, path, min_counts=100,
                                    target_sum=1e6)
        files[section] = (path, table)
    return files


@needs_her2st
def test_real_section_is_aligned_and_normalised(her2st_expr):
    path, table = her2st_expr["B4"]
    adata = anndata.read_h5ad(path)
    rows = adata.obs["bundle_row"].to_numpy()
    assert (np.diff(rows) > 0).all(), "spots must follow the bundle order"
    assert (table["spot_id"].to_numpy()[rows] == adata.obs_names.to_numpy()).all()
    assert np.allclose(adata.obsm["spatial"], table[["x", "y"]].to_numpy()[rows])
    counts = adata.layers["counts"]
    assert sp.issparse(adata.X) and sp.issparse(counts)
    assert np.allclose(counts.data, np.round(counts.data))
    # X = log1p(counts / library size * 1e6), the library size over all genes (not the panel)
    libsize = np.asarray(counts.sum(axis=1)).ravel()
    assert np.allclose(np.expm1(adata.X.toarray()).sum(axis=1), 1e6, rtol=1e-3)
    raw = pd.read_csv(her2st_files("B4")["counts"], sep="\t", index_col=0)
    assert np.allclose(libsize, raw.loc[adata.obs_names].sum(axis=1).to_numpy())
    assert adata.uns["m2ost"]["dropped_no_counts"] >= 0


def _positions_of(counts: pd.DataFrame) -> pd.DataFrame:
    ids = counts.index.unique().str.split("x", expand=True)
    positions = pd.DataFrame({"x": [int(a) for a, _ in ids], "y": [int(b) for _, b in ids]})
    positions["pixel_x"] = positions["x"] * 290.0
    positions["pixel_y"] = positions["y"] * 290.0
    positions["selected"] = 1
    return positions


def _legacy(tmp_path, counts: pd.DataFrame, positions: pd.DataFrame | None = None):
    if positions is None:
        positions = _positions_of(counts)
    counts_path = tmp_path / "counts.tsv.gz"
    with gzip.open(counts_path, "wt") as fh:
        counts.to_csv(fh, sep="\t")
    pos_path = tmp_path / "sel.tsv"
    positions.to_csv(pos_path, sep="\t", index=False)
    return counts_path, pos_path


def _counts(n=12, genes=("G1", "G2", "G3")):
    rng = np.random.default_rng(0)
    ids = [f"{i % 4 + 1}x{i // 4 + 1}" for i in range(n)]
    return pd.DataFrame(rng.poisson(50, (n, len(genes))), index=ids, columns=list(genes))


def _run(tmp_path, counts, positions=None, min_counts=1):
    counts_path, pos_path = _legacy(tmp_path, counts, positions)
    table = spots.read_positions("legacy_st", pos_path, "S1")
    return expression.build_expression("S1", "legacy_st", counts_path, table, tmp_path / "S1.h5ad",
                                       min_counts=min_counts)


def test_mismatched_spot_ids_say_how_many(tmp_path):
    counts = _counts()
    counts.index = [f"9{c}" for c in counts.index]
    positions = pd.DataFrame({"x": [1, 2], "y": [1, 1], "pixel_x": [10.0, 20.0], "pixel_y": [10.0, 10.0]})
    with pytest.raises(InputError, match="0 of 2 spots found among 12 count rows"):
        _run(tmp_path, counts, positions)
    assert not (tmp_path / "S1.h5ad").exists()


def _set_first(counts: pd.DataFrame, value) -> pd.DataFrame:
    out = counts.astype(object if isinstance(value, str) else float)
    out.iloc[0, 0] = value
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda c: _set_first(c, "abc"), "non-numeric counts"),
    (lambda c: _set_first(c, np.nan), "NaN or infinite"),
    (lambda c: _set_first(c, -3), "negative count"),
    (lambda c: c.iloc[:0], "empty count matrix"),
    (lambda c: pd.concat([c, c.iloc[:1]]), "duplicate spot id"),
])
def test_bad_counts(tmp_path, edit, message):
    counts = _counts()
    positions = None
    if message == "empty count matrix":
        positions = pd.DataFrame({"x": [1], "y": [1], "pixel_x": [10.0], "pixel_y": [10.0]})
    with pytest.raises(InputError, match=message) as err:
        _run(tmp_path, edit(counts), positions)
    assert "sample S1" in str(err.value) and "counts.tsv.gz" in str(err.value)


def test_spot_table_problems(tmp_path):
    bad = tmp_path / "sel.tsv"
    pd.DataFrame({"x": [1], "y": [1], "pixel_x": [3.0]}).to_csv(bad, sep="\t", index=False)
    with pytest.raises(InputError, match="lacks column.*pixel_y"):
        spots.read_positions("legacy_st", bad, "S1")
    pd.DataFrame({"x": [1, 1], "y": [1, 1], "pixel_x": [3.0, 4.0], "pixel_y": [3.0, 4.0]}).to_csv(
        bad, sep="\t", index=False)
    with pytest.raises(InputError, match="duplicate spot id.*1x1"):
        spots.read_positions("legacy_st", bad, "S1")
    pd.DataFrame({"x": [1, 2], "y": [1, 1], "pixel_x": [3.0, -4.0], "pixel_y": [3.0, np.nan]}).to_csv(
        bad, sep="\t", index=False)
    with pytest.raises(InputError, match="missing or non-numeric centre"):
        spots.read_positions("legacy_st", bad, "S1")


def test_low_count_spots_dropped_and_counted(tmp_path):
    counts = _counts()
    counts.loc["1x1"] = 0
    adata = _run(tmp_path, counts, min_counts=10)
    assert "1x1" not in adata.obs_names and adata.uns["m2ost"]["dropped_low_counts"] == 1


def _visium(tmp_path, header=True, with_scalefactors=True):
    barcodes = [f"AAAC{i:04d}-1" for i in range(8)]
    pos = pd.DataFrame({"barcode": barcodes, "in_tissue": [1] * 7 + [0], "array_row": [0, 0, 1, 1, 2, 2, 3, 3],
                        "array_col": [0, 2, 1, 3, 0, 2, 1, 3]})
    pos["pxl_row_in_fullres"] = 100 + pos["array_row"] * 173.2
    pos["pxl_col_in_fullres"] = 100 + pos["array_col"] * 100.0
    spatial = tmp_path / "outs" / "spatial"
    spatial.mkdir(parents=True)
    name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    pos.to_csv(spatial / name, index=False, header=header)
    if with_scalefactors:
        (spatial / "scalefactors_json.json").write_text(json.dumps({"spot_diameter_fullres": 110.0}))
    counts = np.arange(1, 8 * 4 + 1).reshape(4, 8)  # genes x spots, as 10x writes
    matrix = sp.csc_matrix(counts)
    with h5py.File(tmp_path / "outs" / "filtered_feature_bc_matrix.h5", "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"], g["indices"], g["indptr"] = matrix.data, matrix.indices, matrix.indptr
        g["shape"] = np.array(matrix.shape)
        feat = g.create_group("features")
        feat["id"] = np.array([f"ENSG{i}" for i in range(4)], dtype="S")
        feat["name"] = np.array(["A", "B", "C", "D"], dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * 4, dtype="S")
        feat["genome"] = np.array(["GRCh38"] * 4, dtype="S")
    return spatial / name


@pytest.mark.parametrize("header", [True, False])
def test_visium_reader_both_position_layouts(tmp_path, header):
    positions = _visium(tmp_path, header)
    table = spots.read_positions("visium", positions, "V1")
    assert len(table) == 7  # the off-tissue spot is dropped
    assert spots.estimate_mpp_from_grid(table, "visium") == pytest.approx(0.5, rel=1e-3)
    adata = expression.build_expression("V1", "visium", tmp_path / "outs" / "filtered_feature_bc_matrix.h5",
                                        table, tmp_path / "V1.h5ad", min_counts=1)
    assert adata.n_obs == 7 and list(adata.var_names) == ["A", "B", "C", "D"]
    assert adata.layers["counts"][0].toarray().ravel().tolist() == [1, 9, 17, 25]


def test_h5ad_reader_needs_spatial(tmp_path):
    adata = anndata.AnnData(X=sp.csr_matrix(np.ones((3, 2), np.float32)))
    adata.obs_names = ["a", "b", "c"]
    adata.write_h5ad(tmp_path / "no_spatial.h5ad")
    with pytest.raises(InputError, match=r'no obsm\["spatial"\]'):
        spots.read_positions("h5ad", tmp_path / "no_spatial.h5ad", "H1")
    adata.obsm["spatial"] = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    adata.write_h5ad(tmp_path / "ok.h5ad")
    table = spots.read_positions("h5ad", tmp_path / "ok.h5ad", "H1")
    assert table["x"].tolist() == [10.0, 30.0, 50.0]


def _expr_file(tmp_path, name, genes, means, n=40, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(np.asarray(means, float), (n, len(genes))).astype(np.float32)
    ids = [f"{i % 8}x{i // 8}" for i in range(n)]
    table = pd.DataFrame({"spot_id": ids, "x": [100.0 * (i % 8) for i in range(n)],
                          "y": [100.0 * (i // 8) for i in range(n)], "array_row": np.nan, "array_col": np.nan})
    path = tmp_path / f"{name}.tsv.gz"
    with gzip.open(path, "wt") as fh:
        pd.DataFrame(counts, index=ids, columns=genes).to_csv(fh, sep="\t")
    out = tmp_path / f"{name}.h5ad"
    expression.build_expression(name, "legacy_st", path, table, out, min_counts=1)
    return str(out)


def test_panel_uses_training_samples_only(tmp_path):
    genes = ["G1", "G2", "G3", "G4"]
    train = {"A": _expr_file(tmp_path, "A", genes, [50, 40, 20, 5])}
    # In the held-out sample G3 dominates: a panel that looked at it would pick G3.
    test = {"B": _expr_file(tmp_path, "B", genes, [5, 5, 500, 5], seed=1)}
    chosen = panel.select_panel("top_mean", 2, train, test)
    assert chosen == ["G1", "G2"]
    # genes must be present in every sample of the split
    test_missing = {"C": _expr_file(tmp_path, "C", ["G1", "G3", "G4"], [5, 5, 5], seed=2)}
    assert panel.select_panel("top_mean", 2, train, test_missing) == ["G1", "G3"]


def test_panel_list_file_problems(tmp_path):
    genes = ["G1", "G2", "G3"]
    train = {"A": _expr_file(tmp_path, "A", genes, [5, 5, 5])}
    listed = tmp_path / "panel.txt"
    listed.write_text("G1\nG9\n")
    with pytest.raises(InputError, match="1 of 2 panel genes missing.*G9") as err:
        panel.select_panel("list", 2, train, list_file=listed)
    assert "sample A" in str(err.value)
    listed.write_text("G1\nG2\nG1\n")
    with pytest.raises(InputError, match="twice.*G1"):
        panel.select_panel("list", 2, train, list_file=listed)


@needs_her2st
@pytest.mark.parametrize("method", ["hvg", "moran", "list"])
def test_panel_methods_on_real_sections(her2st_expr, method):
    train = {"B4": str(her2st_expr["B4"][0])}
    other = {"C2": str(her2st_expr["C2"][0])}
    listed = HER2ST / "gene-panels" / "m2ost_250.txt"
    genes = panel.select_panel(method, 30 if method != "list" else 250, train, other, list_file=listed)
    assert len(genes) == (250 if method == "list" else 30)
    assert len(set(genes)) == len(genes)
    b4 = anndata.read_h5ad(her2st_expr["B4"][0])
    if method == "moran":
        # spatially variable genes should have a clearly positive mean Moran's I
        scores = panel._moran_scores({"B4": b4}, ["B4"], genes)
        assert scores.mean() > 0.1
