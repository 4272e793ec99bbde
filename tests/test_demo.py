"""Tests of m2ost.data.demo: the synthetic cohort the default workflow runs on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from m2ost.data.demo import MPP, REGION_TYPES, make_demo_cohort

openslide = pytest.importorskip("openslide")

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Two patients with one slide each plus the H&E-only slide, kept small for speed."""
    out = tmp_path_factory.mktemp("demo")
    return make_demo_cohort(out, seed=7, n_patients=2, slides_per_patient=1, n_genes=24, slide_um=(1400, 1500))


def read_10x(path: Path):
    """Counts (spots x genes), barcodes and gene names from a 10x HDF5 v3 file."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        n_genes, n_spots = m["shape"][:]
        csc = sparse.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_genes, n_spots))
        barcodes = [b.decode() for b in m["barcodes"][:]]
        names = [b.decode() for b in m["features"]["name"][:]]
        assert [b.decode() for b in m["features"]["feature_type"][:]] == ["Gene Expression"] * n_genes
        assert len(m["features"]["id"]) == len(m["features"]["genome"]) == n_genes
    return csc.T.toarray(), barcodes, names


def visium_samples(cohort):
    return cohort.samples[cohort.samples["format"] == "visium"]


def test_sample_sheet(cohort):
    sheet = pd.read_csv(cohort.sample_sheet, sep="\t", dtype=str, keep_default_na=False)
    assert list(sheet.columns) == ["sample", "patient", "slide", "format", "counts", "positions", "mpp"]
    assert sheet["sample"].tolist() == ["P1_S1", "P2_S1", "P3_HE"]
    assert sheet["patient"].tolist() == ["P1", "P2", "P3"]
    assert sheet["format"].tolist() == ["visium", "visium", ""]
    assert (sheet["mpp"] == "").all()  # the workflow reads the mpp from the TIFF
    he = sheet.iloc[-1]
    assert he["counts"] == he["positions"] == ""
    assert not (cohort.out_dir / "P3_HE" / "outs").exists()
    for col in ("slide", "counts", "positions"):
        for rel in sheet[col]:
            if rel:
                assert not Path(rel).is_absolute()
                assert (cohort.out_dir / rel).is_file(), rel


def test_images_open_with_openslide(cohort):
    for rel in cohort.samples["slide"]:
        slide = openslide.OpenSlide(str(cohort.out_dir / rel))
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP)
        assert slide.level_count >= 3
        np.testing.assert_allclose(slide.level_downsamples[:3], [1, 2, 4], rtol=0.01)
        w, h = slide.dimensions
        assert 2700 <= w <= 3000 and 2700 <= h <= 3000
        # Tissue in the middle (stained, darker), glass in the corner (near white).
        thumb = np.asarray(slide.get_thumbnail((256, 256)).convert("RGB")).astype(float)
        assert thumb[:8, :8].mean() > 225
        assert thumb[100:156, 100:156].mean() < 215


def test_10x_h5_and_positions(cohort):
    for _, row in visium_samples(cohort).iterrows():
        counts, barcodes, names = read_10x(cohort.out_dir / row["counts"])
        assert names == [f"GENE{i:03d}" for i in range(1, 25)]
        assert len(set(barcodes)) == len(barcodes)
        assert all(len(b) == 18 and b.endswith("-1") and set(b[:16]) <= set("ACGT") for b in barcodes)

        pos = pd.read_csv(cohort.out_dir / row["positions"])
        assert list(pos.columns) == POSITION_COLUMNS
        assert pos["barcode"].is_unique
        assert set(barcodes) == set(pos.loc[pos["in_tissue"] == 1, "barcode"])
        assert (pos["in_tissue"] == 0).sum() > 20  # off-tissue spots are listed too
        assert 60 <= len(barcodes) <= 250
        assert counts.dtype.kind == "i" and (counts >= 0).all() and (counts.sum(axis=1) > 0).all()

        # Spot centres lie inside the image; the full 448 µm view fits around in-tissue spots.
        w, h = openslide.OpenSlide(str(cohort.out_dir / row["slide"])).dimensions
        assert pos["pxl_row_in_fullres"].between(0, h - 1).all()
        assert pos["pxl_col_in_fullres"].between(0, w - 1).all()
        inside = pos[pos["in_tissue"] == 1]
        half = 224 / MPP
        assert inside["pxl_row_in_fullres"].between(half, h - half).all()
        assert inside["pxl_col_in_fullres"].between(half, w - half).all()

        # Visium hexagonal geometry: odd rows hold odd columns, 100 µm between neighbours.
        assert ((pos["array_row"] % 2) == (pos["array_col"] % 2)).all()
        key = pos.set_index(["array_row", "array_col"])[["pxl_row_in_fullres", "pxl_col_in_fullres"]]
        pairs = [
            (key.loc[(r, c)].to_numpy(), key.loc[(r, c + 2)].to_numpy())
            for r, c in key.index
            if (r, c + 2) in key.index
        ]
        dist_um = np.array([np.hypot(*(a - b)) for a, b in pairs]) * MPP
        np.testing.assert_allclose(dist_um, 100, atol=1.5)

        scale = json.loads((cohort.out_dir / row["positions"]).with_name("scalefactors_json.json").read_text())
        assert scale["spot_diameter_fullres"] == pytest.approx(65 / MPP)  # 10x: a 65 µm spot
        assert {"tissue_hires_scalef", "tissue_lowres_scalef", "fiducial_diameter_fullres"} <= set(scale)


@pytest.mark.filterwarnings("ignore:Use `squidpy.read.visium`:FutureWarning")
def test_scanpy_reads_the_outputs(cohort):
    sc = pytest.importorskip("scanpy")
    row = visium_samples(cohort).iloc[0]
    counts, barcodes, _ = read_10x(cohort.out_dir / row["counts"])
    adata = sc.read_10x_h5(cohort.out_dir / row["counts"])
    assert adata.obs_names.tolist() == barcodes
    assert adata.var_names.tolist()[0] == "GENE001"
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    vis = sc.read_visium(cohort.out_dir / row["sample"] / "outs")
    assert vis.n_obs == len(barcodes) and "spatial" in vis.obsm


def test_expression_follows_the_generative_model(cohort):
    """Own genes follow the spot's own region; neighbourhood genes the ring around it."""
    genes = cohort.genes
    exprs, feats = [], []
    for _, row in visium_samples(cohort).iterrows():
        counts, barcodes, _ = read_10x(cohort.out_dir / row["counts"])
        exprs.append(np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4))
        feats.append(cohort.spots[row["sample"]].set_index("barcode").loc[barcodes])
    y = np.vstack(exprs)
    f = pd.concat(feats)

    def corr_with_primary(role: str, prefix: str) -> np.ndarray:
        sub = genes[genes["role"] == role]
        out = []
        for g, gene in sub.iterrows():
            if prefix == "own" and gene["w_own_nuclei"] ** 2 > 0.5:
                continue  # nucleus-density genes are checked below
            w = gene[[f"w_{prefix}_{t}" for t in REGION_TYPES]].to_numpy(float)
            feature = f[f"{prefix}_{REGION_TYPES[int(np.argmax(w))]}"].to_numpy()
            out.append(np.corrcoef(y[:, g], feature)[0, 1])
        return np.array(out)

    assert np.median(corr_with_primary("own", "own")) > 0.5
    assert np.median(corr_with_primary("neighbourhood", "ring")) > 0.4

    nuc_genes = genes[(genes["role"] == "own") & (genes["w_own_nuclei"] ** 2 > 0.5)]
    for g, gene in nuc_genes.iterrows():
        r = np.corrcoef(y[:, g], f["own_nuclei_per_mm2"])[0, 1]
        assert np.sign(r) == np.sign(gene["w_own_nuclei"]) and abs(r) > 0.2

    # The ring adds information that the spot's own content does not carry.
    def r2(x: np.ndarray, target: np.ndarray) -> float:
        x = np.c_[x, np.ones(len(x))]
        resid = target - x @ np.linalg.lstsq(x, target, rcond=None)[0]
        return 1 - resid.var() / target.var()

    own_cols = [c for c in f.columns if c.startswith("own_")]
    ring_cols = [c for c in f.columns if c.startswith("ring_")]
    nbr = np.flatnonzero(genes["role"] == "neighbourhood")
    gain = [r2(f[own_cols + ring_cols].to_numpy(), y[:, g]) - r2(f[own_cols].to_numpy(), y[:, g]) for g in nbr]
    assert np.mean(gain) > 0.1


def digest_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_from_seed(tmp_path):
    kwargs = dict(n_patients=1, slides_per_patient=1, n_genes=8, slide_um=(700, 760), he_only=False)
    a = digest_tree(make_demo_cohort(tmp_path / "a", seed=3, **kwargs).out_dir)
    b = digest_tree(make_demo_cohort(tmp_path / "b", seed=3, **kwargs).out_dir)
    c = digest_tree(make_demo_cohort(tmp_path / "c", seed=4, **kwargs).out_dir)
    assert a == b
    assert "P1_S1/image.tif" in a and "P1_S1/outs/filtered_feature_bc_matrix.h5" in a
    assert not any(name.startswith(".") or "/." in name for name in a)  # no temporaries left
    assert a["P1_S1/image.tif"] != c["P1_S1/image.tif"]
    assert a["P1_S1/outs/filtered_feature_bc_matrix.h5"] != c["P1_S1/outs/filtered_feature_bc_matrix.h5"]


def test_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="slide_um"):
        make_demo_cohort(tmp_path, slide_um=(300, 400))
    with pytest.raises(ValueError, match="n_genes"):
        make_demo_cohort(tmp_path, n_genes=2)
