"""Real users' data through the ``m2ost`` command (a fresh process, as the rules run it): Visium with
only Space Ranger's hires image, resolutions that are never absurd, coarse and blank slides,
HEST-1k samples, and the sample sheet columns that describe them (issue 11).

The workflow-level cases (one-slide sheets, predict-only runs, errors on the terminal) are in
test_user_data_workflow.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import tifffile
from realdata import her2st_files, needs_her2st
from robustness_helpers import (
    assert_cli_error,
    grid_spots,
    leftovers,
    pyramid_slide,
    run_m2ost,
    slide_info,
    tissue_image,
    visium_outs,
)
from user_data import hest_sample, hires_png, write_sheet

from m2ost.plan.samplesheet import read_sample_sheet

VIEWS = {"views": [{"fov_um": 112, "size_px": 32}, {"fov_um": 224, "size_px": 32}]}


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


# =============================================================================================
# 1. Visium with only Space Ranger's hires image
# =============================================================================================

def test_visium_hires_image_spots_resolution_and_tiles(tmp_path):
    """tissue_positions.csv is in full-resolution px; the slide is tissue_hires_image.png at 0.25 of
    it. The centres are scaled by tissue_hires_scalef and the µm/px is the full-resolution one
    (65 µm / spot_diameter_fullres) over that factor: 2 µm/px, which the spot grid confirms."""
    v = visium_outs(tmp_path / "V", n_rows=6, n_cols=8, mpp=0.5, origin_px=600)
    factors = json.loads(v["scalefactors"].read_text())
    factors["tissue_hires_scalef"] = 0.25
    v["scalefactors"].write_text(json.dumps(factors))
    png = hires_png(v, (2400, 1800), 0.25)
    out = tmp_path / "out"
    common = ["--sample", "V", "--scalefactors", v["scalefactors"]]
    # Without the scale, every centre lies outside the 600 x 450 px image: the error says why.
    unscaled = out / "unscaled.tsv"
    _ok(run_m2ost(["spots", *common, "--format", "visium", "--positions", v["positions"], "--out", unscaled]))
    _ok(run_m2ost(["prepare-slide", "--slide", png, "--sample", "V", "--mpp", "2", "--converted",
                   out / "V.tif", "--out", out / "V.json"]))
    proc = run_m2ost(["tile", "--sample", "V", "--slide-info", out / "V.json", "--spots", unscaled,
                      "--settings", json.dumps(VIEWS), "--no-progress", "--out", out / "bad.h5"])
    assert_cli_error(proc, sample="V", file=out / "V.tif", problem="a downscaled image needs slide_scale")

    spots_tsv = out / "V.tsv"
    err = _ok(run_m2ost(["spots", *common, "--format", "visium", "--positions", v["positions"],
                         "--slide-scale", "tissue_hires_scalef", "--out", spots_tsv]))
    assert "scaled by 0.25 (tissue_hires_scalef)" in err
    assert "WARNING" not in err  # spot diameter (65 µm) and grid agree
    table = pd.read_csv(spots_tsv, sep="\t")
    full = pd.read_csv(v["positions"])
    assert np.allclose(table["x"], full["pxl_col_in_fullres"] * 0.25, atol=1e-3)
    err = _ok(run_m2ost(["prepare-slide", "--slide", png, "--sample", "V", "--spots", spots_tsv, "--format", "visium",
                         "--scalefactors", v["scalefactors"], "--slide-scale", "tissue_hires_scalef",
                         "--converted", out / "V.tif", "--out", out / "V.json"]))
    info = json.loads((out / "V.json").read_text())
    assert info["mpp"] == pytest.approx(2.0, rel=1e-6)
    assert info["mpp_source"] == "Visium scale factors (tissue_hires_scalef)"
    assert re.search(r"resolution sources agree: Visium scale factors \(tissue_hires_scalef\) 2.0000, "
                     r"visium spot grid 2.00\d\d", err)
    err = _ok(run_m2ost(["tile", "--sample", "V", "--slide-info", out / "V.json", "--spots", spots_tsv,
                         "--settings", json.dumps(VIEWS), "--no-progress", "--out", out / "V.h5"]))
    assert "upscaled" not in err  # 112 µm = 56 px at 2 µm/px, read into 32 px
    assert (out / "V.h5").is_file()


def test_spot_diameter_is_that_of_a_65_um_spot(tmp_path):
    """10x's spot_diameter_fullres is a 65 µm spot: real geometry is silent, a 55 µm reading warns."""
    agree = visium_outs(tmp_path / "A", mpp=0.3, spot_diameter_um=65.0)
    err = _ok(run_m2ost(["spots", "--sample", "A", "--format", "visium", "--positions", agree["positions"],
                         "--out", tmp_path / "A.tsv"]))
    assert "WARNING" not in err and "0.3000 µm/px from spot_diameter_fullres" in err
    wrong = visium_outs(tmp_path / "B", mpp=0.3, spot_diameter_um=55.0)  # what a 55 µm constant assumed
    err = _ok(run_m2ost(["spots", "--sample", "B", "--format", "visium", "--positions", wrong["positions"],
                         "--out", tmp_path / "B.tsv"]))
    assert re.search(r"WARNING .*B: spot_diameter_fullres .* implies 0.3545 µm/px but the spot grid gives "
                     r"0.30\d\d µm/px \(18% apart\)", err)


# =============================================================================================
# Coarse and blank slides
# =============================================================================================

def test_upscaled_views_are_said_once_and_refused_beyond_the_limit(tmp_path):
    """At 8 µm/px a 112 µm view is 14 px: enlarged 4.6x to 64 px. Said once, with the numbers; when
    every view is enlarged beyond tiling.max_upscale the sample stops unless allowed."""
    slide = pyramid_slide(tmp_path / "coarse.tif", size=512, mpp=8.0)
    info = slide_info(tmp_path / "C.json", slide, mpp=8.0, sample="C")
    spots = grid_spots(tmp_path / "spots.tsv", 9, 150, 350)
    views = {"views": [{"fov_um": 112, "size_px": 64}, {"fov_um": 224, "size_px": 128}]}
    args = ["tile", "--sample", "C", "--slide-info", info, "--spots", spots, "--no-progress"]
    proc = run_m2ost([*args, "--settings", json.dumps(views), "--out", tmp_path / "b" / "C.h5"])
    assert_cli_error(proc, sample="C", file=slide,
                     problem=r"every view is upscaled more than 4x \(view 0: 112 µm = 14 px at 8 µm/px, "
                             r"upscaled 4.6x to 64 px\).*tiling.allow_upscale")
    assert not (tmp_path / "b").exists() or leftovers(tmp_path / "b") == []
    err = _ok(run_m2ost([*args, "--settings", json.dumps({**views, "allow_upscale": True}),
                         "--out", tmp_path / "b" / "C.h5"]))
    said = [line for line in err.splitlines() if "coarser than the views" in line]
    assert len(said) == 1 and "view 1: 224 µm = 28 px at 8 µm/px, upscaled 4.6x to 128 px" in said[0]
    # One view within the limit: a warning only.
    mixed = {"views": [{"fov_um": 112, "size_px": 64}, {"fov_um": 448, "size_px": 32}]}
    err = _ok(run_m2ost([*args, "--settings", json.dumps(mixed), "--out", tmp_path / "b" / "C2.h5"]))
    assert "upscaled 4.6x" in err and "view 1" not in err.split("coarser than the views")[1].splitlines()[0]


def test_blank_slide_is_an_error_naming_the_sample(tmp_path):
    """An all-black image (tissue fraction 0 under every spot): an error, no bundle of empty views."""
    from m2ost.data.pyramid import write_pyramidal_tiff

    slide = tmp_path / "black.tif"
    write_pyramidal_tiff(slide, np.zeros((768, 768, 3), np.uint8), 0.5, min_size=128, workers=1)
    info = slide_info(tmp_path / "K.json", slide, mpp=0.5, sample="K")
    spots = grid_spots(tmp_path / "spots.tsv", 9, 250, 500)
    proc = run_m2ost(["tile", "--sample", "K", "--slide-info", info, "--spots", spots, "--no-progress",
                      "--settings", json.dumps(VIEWS), "--out", tmp_path / "b" / "K.h5"])
    assert_cli_error(proc, sample="K", file=slide, problem="the slide is blank under every spot: tissue fraction 0 "
                                                            "in all 9 spots' views")
    assert not (tmp_path / "b").exists() or leftovers(tmp_path / "b") == []


# =============================================================================================
# 2. Resolution is never absurd
# =============================================================================================

def _plain_tiff(path, size=300):
    tifffile.imwrite(path, tissue_image(size, size))  # stripped, no resolution tags
    return path


def test_spots_on_one_pixel_are_a_degenerate_grid(tmp_path):
    """All spots on one pixel once gave 1e17 µm/px; now the grid is refused and nothing is written."""
    src = _plain_tiff(tmp_path / "he.tif", 100)
    n = 16
    table = pd.DataFrame({"spot_id": [f"{i}x{j}" for i in range(4) for j in range(4)], "x": 50.0, "y": 50.0,
                          "array_row": np.repeat(np.arange(4), 4), "array_col": np.tile(np.arange(4), 4)})
    assert len(table) == n
    table.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    out = tmp_path / "out"
    proc = run_m2ost(["prepare-slide", "--sample", "D", "--slide", src, "--spots", tmp_path / "spots.tsv",
                      "--format", "legacy_st", "--converted", out / "D.tif", "--out", out / "D.json"])
    assert_cli_error(proc, sample="D", file=src, problem=r"degenerate spot grid: 16 spots on 1 distinct pixel")
    assert not out.exists() or leftovers(out) == []


@pytest.mark.parametrize("where", ["sample sheet", "slide metadata"])
def test_implausible_resolution_stops_naming_its_source(tmp_path, where):
    slide = pyramid_slide(tmp_path / "he.tif", size=256, mpp=500.0 if where == "slide metadata" else 0.5)
    extra = ["--mpp", "1e-4"] if where == "sample sheet" else []
    proc = run_m2ost(["prepare-slide", "--sample", "R", "--slide", slide, *extra, "--out", tmp_path / "R.json"])
    value = "0.0001" if where == "sample sheet" else "500"
    assert_cli_error(proc, sample="R", file=slide, problem=rf"resolution {value} µm/px from the {where} is outside "
                                                           r"the plausible range 0.05-30 µm/px")
    assert not (tmp_path / "R.json").exists()
    # The range is a setting (slides.mpp_range).
    _ok(run_m2ost(["prepare-slide", "--sample", "R", "--slide", slide, *extra, "--settings",
                   json.dumps({"mpp_range": [1e-5, 1000]}), "--out", tmp_path / "R.json"]))


def _checkerboard(step_px: float, n: int = 10) -> pd.DataFrame:
    """A checkerboard-indexed array (x + y even, as the later ST arrays): diagonal index-neighbours
    ``step_px * sqrt(2)`` px apart."""
    rows = [(c, r) for r in range(n) for c in range(n) if (c + r) % 2 == 0]
    cols, rws = np.array(rows).T
    return pd.DataFrame({"spot_id": [f"{c}x{r}" for c, r in rows], "x": 20 + cols * step_px,
                         "y": 20 + rws * step_px, "array_row": rws.astype(float), "array_col": cols.astype(float)})


def test_legacy_st_pitch_from_index_neighbours_of_a_checkerboard(tmp_path):
    """Index-neighbours 141.4 px apart on a checkerboard with a 100 µm pitch: 0.7071 µm/px (200 µm per
    index step, the old assumption, gave 2.83 µm/px: 4x off). Detected and said; the pitch comes
    from the sheet's array_pitch_um; an implied capture area over 8 mm is warned."""
    src = _plain_tiff(tmp_path / "he.tif", 1500)
    _checkerboard(100.0).to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    base = ["prepare-slide", "--sample", "K", "--slide", src, "--spots", tmp_path / "spots.tsv",
            "--format", "legacy_st", "--converted", tmp_path / "K.tif", "--out", tmp_path / "K.json"]
    err = _ok(run_m2ost([*base, "--array-pitch-um", "100"]))
    info = json.loads((tmp_path / "K.json").read_text())
    assert info["mpp"] == pytest.approx(100 / (100 * np.sqrt(2)), rel=1e-4)
    assert info["mpp_source"] == "estimated from the legacy_st spot grid"
    assert "index-neighbours 141.4 px apart (checkerboard indexing), pitch 100 µm" in err
    assert "capture area" not in err
    err = _ok(run_m2ost([*base, "--array-pitch-um", "2000"]))
    assert re.search(r"WARNING .*K: the spot grid at 14.14 µm/px \(pitch 2000 µm\) spans 12.7 mm, more than any "
                     r"real capture area", err)


def test_three_sources_that_disagree_are_reported_together(tmp_path):
    """Sheet 0.25, metadata 0.5 and the spot grid 0.5 µm/px: one warning with all three values."""
    slide = pyramid_slide(tmp_path / "he.tif", size=1024, mpp=0.5)
    table = pd.DataFrame([(f"{c}x{r}", 100 + c * 400.0, 100 + r * 400.0, float(r), float(c))
                          for r in range(3) for c in range(3)], columns=["spot_id", "x", "y", "array_row", "array_col"])
    table.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    err = _ok(run_m2ost(["prepare-slide", "--sample", "T", "--slide", slide, "--mpp", "0.25", "--spots",
                         tmp_path / "spots.tsv", "--format", "legacy_st", "--out", tmp_path / "T.json"]))
    assert re.search(r"WARNING .*T: the resolution sources disagree by more than 10%: sample sheet 0.2500, slide "
                     r"metadata 0.5000, legacy_st spot grid 0.5000 µm/px; using the sample sheet", err)
    assert json.loads((tmp_path / "T.json").read_text())["mpp"] == 0.25


# =============================================================================================
# 3. predict-slide names its own option
# =============================================================================================

def test_predict_slide_without_resolution_names_its_mpp_option(tmp_path):
    png = tmp_path / "he.png"
    from PIL import Image

    Image.fromarray(tissue_image(200, 200)).save(png)
    proc = run_m2ost(["predict-slide", "--slide", png, "--model", tmp_path / "model.pt", "--out-dir", tmp_path / "o"])
    assert_cli_error(proc, sample="he", file=png, problem="slide has no resolution metadata and no --mpp option")
    proc = run_m2ost(["predict-slide", "--slide", png, "--mpp", "0.5", "--model", tmp_path / "model.pt",
                      "--out-dir", tmp_path / "o"])
    assert re.search(r"he: 200 x 200 px, \d levels, 0.5000 µm/px \(--mpp option\)", proc.stderr)


# =============================================================================================
# 6. HEST-1k
# =============================================================================================

def test_hest_sample_read_by_id_from_its_root(tmp_path):
    """A `format: hest` row names the HEST root; slide, counts and metadata come from st/, wsis/,
    metadata/ by id; the spots are obsm["spatial"]; µm/px agrees between HEST's metadata, the TIFF
    and the spot grid (pitch inter_spot_dist)."""
    h = hest_sample(tmp_path / "hest", "TENX_T1")
    sheet = write_sheet(tmp_path / "s.tsv", [{"sample": "T1", "patient": "P", "slide": "", "format": "hest",
                                              "counts": "hest", "hest_id": "TENX_T1"}])
    (s,) = read_sample_sheet(sheet, tmp_path)
    assert s.slide == str(h["wsi"]) and s.expression_files() == {"counts": str(h["st"]), "positions": str(h["st"]),
                                                                  "metadata": str(h["metadata"])}
    out = tmp_path / "out"
    _ok(run_m2ost(["spots", "--sample", "T1", "--format", "hest", "--positions", h["st"], "--out", out / "T1.tsv"]))
    table = pd.read_csv(out / "T1.tsv", sep="\t")
    assert len(table) == h["n_spots"]
    err = _ok(run_m2ost(["prepare-slide", "--sample", "T1", "--slide", h["wsi"], "--spots", out / "T1.tsv",
                         "--format", "hest", "--hest-metadata", h["metadata"], "--out", out / "T1.json"]))
    assert re.search(r"resolution sources agree: slide metadata 0.5000, HEST metadata 0.5000, "
                     r"hest spot grid 0.5\d+", err)
    _ok(run_m2ost(["expression", "--sample", "T1", "--format", "hest", "--counts", h["st"], "--spots", out / "T1.tsv",
                   "--settings", json.dumps({"min_counts": 10}), "--out", out / "T1.h5ad"]))
    # A damaged metadata file is one error line naming it.
    h["metadata"].write_text(json.dumps({"pixel_size_um_embedded": 0.5}))
    proc = run_m2ost(["prepare-slide", "--sample", "T1", "--slide", h["wsi"], "--hest-metadata", h["metadata"],
                      "--out", out / "T1b.json"])
    assert_cli_error(proc, sample="T1", file=h["metadata"], problem="lacks a numeric pixel_size_um_estimated")


# =============================================================================================
# Sample sheet columns
# =============================================================================================

def test_sheet_columns_for_downscaled_images_pitch_and_absolute_paths(tmp_path):
    outside = tmp_path / "elsewhere" / "spatial" / "tissue_lowres_image.png"
    rows = [{"sample": "H", "patient": "P", "slide": "V/outs/spatial/tissue_hires_image.png", "format": "visium",
             "counts": "V/outs"},
            {"sample": "L", "patient": "P", "slide": str(outside), "format": "visium",
             "counts": str(outside.parent.parent)},
            {"sample": "S", "patient": "P", "slide": "s.png", "format": "legacy_st", "counts": "c.tsv",
             "positions": "p.tsv", "slide_scale": "0.5", "array_pitch_um": "100"},
            {"sample": "E", "patient": "P", "slide": "e.png"}]
    sheet = write_sheet(tmp_path / "s.tsv", rows)
    got = {s.sample: s for s in read_sample_sheet(sheet, tmp_path / "root")}
    assert got["H"].scale_source == "tissue_hires_scalef"
    assert got["L"].scale_source == "tissue_lowres_scalef" and got["L"].slide == str(outside)  # absolute kept
    assert got["S"].scale_source == "0.5" and got["S"].array_pitch_um == 100.0
    assert got["E"].scale_source == "" and not got["E"].has_expression
    rows[2]["slide_scale"] = "2"
    write_sheet(sheet, rows)
    from m2ost.errors import InputError

    with pytest.raises(InputError, match=r"0 < slide_scale <= 1\), got 2.0"):
        read_sample_sheet(sheet, tmp_path)


# =============================================================================================
# 5. Data quality a user should see (real HER2+ sections)
# =============================================================================================

@needs_her2st
def test_data_summary_flags_the_low_library_section_b4(tmp_path):
    """Expression of B4, C2 and C3 as the workflow builds it, then ``m2ost data-summary``: one line
    per sample on stdout (spots kept and dropped, median library size, genes detected) and a
    warning for B4, whose median library size is under a fifth of the cohort's."""
    from m2ost.data import expression, spots

    pairs = []
    for section in ("B4", "C2", "C3"):
        files = her2st_files(section)
        table = spots.read_positions("legacy_st", files["positions"], section)
        expression.build_expression(section, "legacy_st", files["counts"], table, tmp_path / f"{section}.h5ad")
        pairs.append(f"{section}={tmp_path / f'{section}.h5ad'}")
    proc = run_m2ost(["data-summary", "--expression", *pairs, "--out", tmp_path / "qc.tsv"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "qc.tsv", sep="\t").set_index("sample")
    assert table.loc["B4", "median_library_size"] < 0.2 * table.loc[["C2", "C3"], "median_library_size"].min()
    assert (table["spots_kept"] + table["dropped_low_counts"] + table["dropped_no_counts"]
            == table["spots_in_table"]).all()
    assert (table["genes_detected"] > 10000).all()
    assert re.search(r"WARNING .*B4: median library size \d+ is under 20% of the cohort median \d+", proc.stderr)
    assert "C2: median library size" not in proc.stderr
    shown = proc.stdout.splitlines()
    assert shown[0].startswith("m2ost: data quality per sample") and len(shown) == 2 + 3
    assert re.match(r"\s*B4\s+\d+\s+\d+", shown[2])
