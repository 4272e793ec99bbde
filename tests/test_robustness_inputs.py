"""Bad inputs: each gives one error line naming the sample, the file and the problem (or a logged,
counted skip where skipping is right), and leaves no output that looks complete.

Cases already covered elsewhere are listed in docs/robustness.md with the test that covers them;
the tests here add the others, and drive several through the ``m2ost`` command line (a fresh
``python -m m2ost`` process) to show that the user sees exactly one line
``m2ost: error: [sample S, file F] problem`` and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from robustness_helpers import (REPO, assert_cli_error, check_error_text, cli_in_process, error_line,
                                grid_spots, h5ad_source, leftovers, pyramid_slide, run_m2ost, slide_info,
                                spots_table_for, tissue_image, visium_outs, write_raw_10x_h5)
from synthetic import TINY_MODEL, make_sample, tiny_train_cfg, write_bundle, write_genes

from m2ost.data import expression
from m2ost.data import spots
from m2ost.errors import InputError
from m2ost.plan.samplesheet import read_sample_sheet

VIEWS = json.dumps({"views": [{"fov_um": 32, "size_px": 16}, {"fov_um": 64, "size_px": 16}]})


def _expect_cli_error(argv, capsys, *, sample, file, problem) -> str:
    """In-process ``m2ost`` call: status 1 and exactly one error line, nothing after it."""
    status, err = cli_in_process(argv, capsys)
    assert status == 1, err
    line = error_line(err)
    check_error_text(line.removeprefix("m2ost: error: "), sample=sample, file=file, problem=problem)
    return line


# =============================================================================================
# Slides
# =============================================================================================

def test_truncated_jpeg(tmp_path):
    """A JPEG cut short (an interrupted copy) is refused when converted; nothing is written."""
    src = tmp_path / "he.jpg"
    Image.fromarray(tissue_image(400, 400)).save(src, quality=90)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    proc = run_m2ost(["prepare-slide", "--sample", "S1", "--slide", src, "--mpp", "0.5",
                      "--converted", out / "S1.tif", "--out", out / "S1.json"])
    assert_cli_error(proc, sample="S1", file=src, problem="cannot decode image.*truncated")
    assert leftovers(tmp_path) == ["he.jpg"]


def test_tiff_without_resolution_and_too_few_spots(tmp_path):
    """No resolution tags, no mpp in the sheet, and 3 spots: the grid cannot give the resolution."""
    from m2ost.data.slide import plain_image_mpp
    from m2ost.plan.formats import slide_needs_conversion

    src = tmp_path / "he.tif"
    tifffile.imwrite(src, tissue_image(300, 300))  # stripped, no resolution unit
    assert slide_needs_conversion(str(src)) and plain_image_mpp(src) is None
    table = pd.DataFrame({"spot_id": ["1x1", "2x1", "1x2"], "x": [50.0, 340.0, 50.0], "y": [50.0, 50.0, 340.0],
                          "array_row": [1, 1, 2], "array_col": [1, 2, 1]})
    table.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    out = tmp_path / "out"
    proc = run_m2ost(["prepare-slide", "--sample", "S2", "--slide", src, "--spots", tmp_path / "spots.tsv",
                      "--format", "legacy_st", "--converted", out / "S2.tif", "--out", out / "S2.json"])
    assert_cli_error(proc, sample="S2", file=src,
                     problem=r"no resolution metadata and no mpp in the sample sheet, and too few spots \(3\).*"
                             "give mpp in the sample sheet")
    assert not out.exists() or leftovers(out) == []


def test_slide_smaller_than_one_view(tmp_path, capsys):
    """A 448-µm view on a 256-px (128 µm) slide could never lie inside it: an error, not all-white views."""
    slide = pyramid_slide(tmp_path / "small.tif", size=256, mpp=0.5)
    info = slide_info(tmp_path / "S3.json", slide, mpp=0.5, sample="S3")
    grid_spots(tmp_path / "spots.tsv", 9, 60, 200)
    settings = json.dumps({"views": [{"fov_um": 56, "size_px": 16}, {"fov_um": 448, "size_px": 16}]})
    _expect_cli_error(["tile", "--sample", "S3", "--slide-info", info, "--spots", tmp_path / "spots.tsv",
                       "--settings", settings, "--no-progress", "--out", tmp_path / "b" / "S3.h5"], capsys,
                      sample="S3", file=slide,
                      problem=r"slide \(256 x 256 px\) is smaller than view 1 \(896 px = 448 µm")
    assert not (tmp_path / "b").exists() or leftovers(tmp_path / "b") == []


def _damage_tiles(path) -> None:
    """Overwrite the start of every third tile of every level (JPEG markers gone)."""
    with tifffile.TiffFile(path) as tif:
        spans = [(p.dataoffsets[i], p.databytecounts[i]) for p in tif.pages
                 for i in range(len(p.dataoffsets)) if i % 3 == 1]
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        data[offset:offset + min(count, 32)] = b"\0" * min(count, 32)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_pixel_data_while_tiling(tmp_path, capsys, workers):
    """A slide that opens but whose tiles do not decode: one error line (from a worker process too)."""
    slide = pyramid_slide(tmp_path / "he.tif", size=1024)
    _damage_tiles(slide)
    info = slide_info(tmp_path / "S4.json", slide, sample="S4")
    grid_spots(tmp_path / "spots.tsv", 64, 60, 960)
    out = tmp_path / "bundles"
    views = json.dumps({"views": [{"fov_um": 8, "size_px": 16}, {"fov_um": 16, "size_px": 16}]})  # levels 0, 1
    _expect_cli_error(["tile", "--sample", "S4", "--slide-info", info, "--spots", tmp_path / "spots.tsv",
                       "--settings", views, "--workers", workers, "--no-progress", "--out", out / "S4.h5"], capsys,
                      sample="S4", file=slide, problem=r"cannot decode the slide's pixels \(.*\); the slide file "
                                                       "is damaged or truncated")
    assert not out.exists() or leftovers(out) == []


def test_slide_moved_after_preparation(tmp_path, capsys):
    slide = pyramid_slide(tmp_path / "he.tif", size=256)
    info = slide_info(tmp_path / "S5.json", slide, sample="S5")
    grid_spots(tmp_path / "spots.tsv", 4, 60, 200)
    slide.rename(tmp_path / "elsewhere.tif")
    _expect_cli_error(["tile", "--sample", "S5", "--slide-info", info, "--spots", tmp_path / "spots.tsv",
                       "--settings", VIEWS, "--no-progress", "--out", tmp_path / "S5.h5"], capsys,
                      sample="S5", file=slide, problem="^.*slide not found$")
    assert not (tmp_path / "S5.h5").exists()


@pytest.mark.parametrize("content, problem", [
    (None, r"slide info not found \(run the slide preparation stage\)"),
    ("{not json", "unreadable slide info.*rerun the slide preparation stage"),
    ('{"slide": "x.tif"}', "slide info lacks mpp"),
])
def test_missing_or_damaged_slide_info(tmp_path, capsys, content, problem):
    info = tmp_path / "S6.json"
    if content is not None:
        info.write_text(content)
    grid_spots(tmp_path / "spots.tsv", 4, 60, 200)
    _expect_cli_error(["tile", "--sample", "S6", "--slide-info", info, "--spots", tmp_path / "spots.tsv",
                       "--settings", VIEWS, "--no-progress", "--out", tmp_path / "S6.h5"], capsys,
                      sample="S6", file=info, problem=problem)
    assert not (tmp_path / "S6.h5").exists()


@pytest.mark.parametrize("kind", ["corrupt", "missing"])
def test_corrupt_or_missing_slide_on_the_command_line(tmp_path, capsys, kind):
    slide = tmp_path / "he.svs"
    if kind == "corrupt":
        slide.write_bytes(b"II*\x00" + np.random.default_rng(0).bytes(4000))
    problem = "slide not found" if kind == "missing" else "OpenSlide cannot read this slide|corrupt or unreadable"
    _expect_cli_error(["prepare-slide", "--sample", "S7", "--slide", slide, "--out", tmp_path / "out" / "S7.json"],
                      capsys, sample="S7", file=slide, problem=problem)
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def test_spots_partly_outside_the_slide_are_flagged_and_counted(tmp_path, caplog):
    """Not an error: views past the edge are padded white, flagged per view, and the count is logged."""
    from m2ost.data import bundle
    from m2ost.data import tiling

    slide = pyramid_slide(tmp_path / "he.tif", size=512)
    table = spots_table_for(["in1", "in2", "out1"], [200, 300, 900], [200, 300, 250])
    with caplog.at_level(logging.WARNING):
        tiling.tile_slide("S8", slide, table, 0.5, [tiling.View(16, fov_um=32)], tmp_path / "S8.h5", progress=False)
    assert "S8: 1 of 3 spot centres lie outside the slide" in caplog.text
    meta = bundle.verify_bundle(tmp_path / "S8.h5", "S8")
    with h5py.File(tmp_path / "S8.h5") as f:
        assert f["padded"][:, 0].tolist() == [False, False, True]
    assert meta["n_spots"] == 3


# =============================================================================================
# Spot positions
# =============================================================================================

def test_negative_spot_coordinates(tmp_path):
    v = visium_outs(tmp_path / "V1")
    pos = pd.read_csv(v["positions"])
    pos.loc[3, "pxl_col_in_fullres"] = -12
    pos.to_csv(v["positions"], index=False)
    out = tmp_path / "spots" / "V1.tsv"
    proc = run_m2ost(["spots", "--sample", "V1", "--format", "visium", "--positions", v["positions"], "--out", out])
    assert_cli_error(proc, sample="V1", file=v["positions"],
                     problem=rf"1 spot\(s\) with negative pixel coordinates, e.g. {v['barcodes'][3]}")
    assert not out.parent.exists() or leftovers(out.parent) == []


def test_nan_spot_coordinates_in_h5ad(tmp_path, capsys):
    xy = np.array([[10.0, 20.0], [np.nan, 40.0], [50.0, 60.0]])
    src = h5ad_source(tmp_path / "H1.h5ad", np.ones((3, 2)), ["a", "b", "c"], spatial=xy)
    _expect_cli_error(["spots", "--sample", "H1", "--format", "h5ad", "--positions", src,
                       "--out", tmp_path / "H1.tsv"], capsys, sample="H1", file=src,
                      problem=r"1 spot\(s\) with missing or non-numeric centre, e.g. b")
    assert not (tmp_path / "H1.tsv").exists()


def test_h5ad_without_spatial_on_the_command_line(tmp_path, capsys):
    src = h5ad_source(tmp_path / "H2.h5ad", np.ones((3, 2)), ["a", "b", "c"], spatial=None)
    _expect_cli_error(["spots", "--sample", "H2", "--format", "h5ad", "--positions", src,
                       "--out", tmp_path / "H2.tsv"], capsys, sample="H2", file=src,
                      problem=r'h5ad has no obsm\["spatial"\]')
    assert not (tmp_path / "H2.tsv").exists()


def test_visium_without_scalefactors(tmp_path):
    """The spots stage needs scalefactors_json.json (beside the positions, or --scalefactors)."""
    v = visium_outs(tmp_path / "V2", scalefactors=True)
    kept = v["scalefactors"].rename(tmp_path / "scalefactors_json.json")
    out = tmp_path / "spots" / "V2.tsv"
    proc = run_m2ost(["spots", "--sample", "V2", "--format", "visium", "--positions", v["positions"], "--out", out])
    assert_cli_error(proc, sample="V2", file=v["scalefactors"],
                     problem="Visium scalefactors_json.json not found")
    assert not out.parent.exists() or leftovers(out.parent) == []
    # Given explicitly where it really is, the same positions are read.
    table = spots.read_positions("visium", v["positions"], "V2", scalefactors=kept)
    assert len(table) == len(v["barcodes"])


@pytest.mark.parametrize("content, problem", [
    ("{spot_diameter_fullres: 110", "scalefactors is not valid JSON"),
    (json.dumps({"tissue_hires_scalef": 0.1}), "scalefactors lacks spot_diameter_fullres"),
    (json.dumps({"spot_diameter_fullres": 0}), "spot_diameter_fullres must be a positive number, got 0"),
])
def test_visium_damaged_scalefactors(tmp_path, content, problem):
    v = visium_outs(tmp_path / "V3")
    v["scalefactors"].write_text(content)
    with pytest.raises(InputError) as err:
        spots.read_positions("visium", v["positions"], "V3")
    check_error_text(str(err.value), sample="V3", file=v["scalefactors"], problem=problem)


def test_visium_scalefactors_disagreeing_with_the_grid_warn(tmp_path, caplog):
    """spot_diameter_fullres implying 0.8 µm/px on a grid laid out at 0.5 µm/px: a warning with both values."""
    v = visium_outs(tmp_path / "V4", mpp=0.5, scalefactors={"spot_diameter_fullres": 65.0 / 0.8})
    with caplog.at_level(logging.INFO, logger="m2ost.data.spots"):
        table = spots.read_positions("visium", v["positions"], "V4")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert re.search(r"V4: spot_diameter_fullres in .*scalefactors_json.json implies 0.8000 µm/px but the spot "
                     r"grid gives 0.(49[89]\d|500\d) µm/px \(60% apart\)", warnings[0].getMessage())
    assert len(table) == len(v["barcodes"])  # a warning only: the tiler uses the slide's own resolution
    caplog.clear()
    agree = visium_outs(tmp_path / "V5", mpp=0.5)
    with caplog.at_level(logging.INFO, logger="m2ost.data.spots"):
        spots.read_positions("visium", agree["positions"], "V5")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "0.5000 µm/px from spot_diameter_fullres" in caplog.text


# =============================================================================================
# Counts
# =============================================================================================

def _spots_tsv(path, barcodes) -> str:
    n = len(barcodes)
    spots_table_for(barcodes, 100 + 50 * np.arange(n), np.full(n, 100.0)).to_csv(path, sep="\t", index=False)
    return str(path)


def test_nan_counts_in_h5ad(tmp_path, capsys):
    X = np.full((4, 3), 5.0)
    X[2, 1] = np.nan
    src = h5ad_source(tmp_path / "H3.h5ad", X, ["a", "b", "c", "d"], spatial=np.ones((4, 2)))
    _expect_cli_error(["expression", "--sample", "H3", "--format", "h5ad", "--counts", src,
                       "--spots", _spots_tsv(tmp_path / "s.tsv", ["a", "b", "c", "d"]),
                       "--out", tmp_path / "H3.out.h5ad"], capsys, sample="H3", file=src,
                      problem=r"^\[.*\] 1 NaN or infinite count value\(s\)$")
    assert not (tmp_path / "H3.out.h5ad").exists()


def test_negative_counts_in_10x_matrix(tmp_path, capsys):
    barcodes = ["AAA-1", "CCC-1", "GGG-1"]
    counts = np.full((2, 3), 7.0)
    counts[1, 2] = -4
    matrix = write_raw_10x_h5(tmp_path / "m.h5", counts, barcodes, ["GA", "GB"])
    _expect_cli_error(["expression", "--sample", "V6", "--format", "visium", "--counts", matrix,
                       "--spots", _spots_tsv(tmp_path / "s.tsv", barcodes), "--out", tmp_path / "V6.h5ad"], capsys,
                      sample="V6", file=matrix, problem=r"1 negative count value\(s\)")
    assert not (tmp_path / "V6.h5ad").exists()


@pytest.mark.parametrize("n_spots, n_genes", [(0, 3), (3, 0)])
def test_empty_10x_matrix(tmp_path, capsys, n_spots, n_genes):
    barcodes = [f"B{i}-1" for i in range(n_spots)]
    matrix = write_raw_10x_h5(tmp_path / "m.h5", np.zeros((n_genes, n_spots)), barcodes,
                              [f"G{i}" for i in range(n_genes)])
    _expect_cli_error(["expression", "--sample", "V7", "--format", "visium", "--counts", matrix,
                       "--spots", _spots_tsv(tmp_path / "s.tsv", ["B0-1", "B1-1", "B2-1"]),
                       "--out", tmp_path / "V7.h5ad"], capsys, sample="V7", file=matrix,
                      problem=rf"empty count matrix \({n_spots} spots x {n_genes} genes\)")
    assert not (tmp_path / "V7.h5ad").exists()


def test_visium_barcodes_of_matrix_and_positions_do_not_match(tmp_path):
    """Barcodes without Space Ranger's '-1' suffix in the matrix: nothing matches; the hint says why."""
    stripped = [b.removesuffix("-1") for b in visium_outs(tmp_path / "probe")["barcodes"]]
    v = visium_outs(tmp_path / "V8", matrix_barcodes=stripped)
    table = spots.read_positions("visium", v["positions"], "V8")
    spots.write_spots(table, tmp_path / "V8.tsv")
    proc = run_m2ost(["expression", "--sample", "V8", "--format", "visium", "--counts", v["matrix"],
                      "--spots", tmp_path / "V8.tsv", "--out", tmp_path / "expr" / "V8.h5ad"])
    assert_cli_error(proc, sample="V8", file=v["matrix"],
                     problem=rf"0 of {len(stripped)} spots found among {len(stripped)} count rows.*differ only in a "
                             r"'-N' suffix")
    assert not (tmp_path / "expr").exists() or leftovers(tmp_path / "expr") == []


def test_visium_barcodes_partly_mismatched_are_counted_and_dropped(tmp_path, caplog):
    """Some spots without counts and some counts without a spot: kept going, both counted and logged."""
    probe = visium_outs(tmp_path / "probe")
    barcodes = probe["barcodes"]
    matrix_ids = barcodes[2:] + ["TTTTTTTT-1"]  # the first two spots have no counts; one row has no spot
    v = visium_outs(tmp_path / "V9", matrix_barcodes=matrix_ids,
                    counts=np.random.default_rng(1).poisson(40, (len(matrix_ids), 5)))
    table = spots.read_positions("visium", v["positions"], "V9")
    with caplog.at_level(logging.WARNING):
        adata = expression.build_expression("V9", "visium", v["matrix"], table, tmp_path / "V9.h5ad", min_counts=1)
    assert f"V9: 2 of {len(barcodes)} spots have no counts row: dropped" in caplog.text
    assert "V9: 1 count rows have no spot position (or are off tissue): dropped" in caplog.text
    assert adata.uns["m2ost"]["dropped_no_counts"] == 2 and adata.uns["m2ost"]["dropped_no_spot"] == 1
    assert list(adata.obs_names) == barcodes[2:]
    assert adata.obs["bundle_row"].tolist() == list(range(2, len(barcodes)))


# =============================================================================================
# Gene panels
# =============================================================================================

def test_panel_genes_in_the_wrong_letter_case(tmp_path, capsys):
    v = visium_outs(tmp_path / "A")
    table = spots.read_positions("visium", v["positions"], "A")
    expression.build_expression("A", "visium", v["matrix"], table, tmp_path / "A.h5ad", min_counts=1)
    listed = write_genes(tmp_path / "panel.txt", ["GA", "gb"])
    out = tmp_path / "genes" / "split.txt"
    settings = json.dumps({"method": "list", "list_file": listed, "n_genes": 2})
    _expect_cli_error(["panel", "--train", f"A={tmp_path / 'A.h5ad'}", "--settings", settings, "--out", out], capsys,
                      sample="A", file=listed, problem=r"1 of 2 panel genes missing from this sample, e.g. gb "
                                                       r"\(letter case differs, e.g. gb vs GB in the data\)")
    assert not out.parent.exists() or leftovers(out.parent) == []


def test_duplicated_genes_in_the_panel_given_to_training(study, tmp_path, capsys):
    genes = write_genes(tmp_path / "panel.txt", ["G0", "G1", "G0"])
    out = tmp_path / "model"
    _expect_cli_error(["train", "--kind", "mean", "--bundle", f"A={study['bundles']['A']}",
                       "--expression", f"A={study['expressions']['A']}", "--genes", genes,
                       "--settings", json.dumps({"train": tiny_train_cfg()}), "--out-dir", out], capsys,
                      sample=None, file=genes, problem=r"gene panel lists 1 gene\(s\) twice, e.g. G0")
    assert not out.exists() or leftovers(out) == []


# =============================================================================================
# Sample sheets
# =============================================================================================

def _sheet(tmp_path, rows):
    path = tmp_path / "samples.tsv"
    path.write_text("sample\tpatient\tslide\tformat\tcounts\tpositions\tmpp\n" + "".join(r + "\n" for r in rows))
    return path


@pytest.mark.parametrize("second", ["link.svs", "sub/../a.svs"])
def test_two_samples_on_one_slide_by_another_name(tmp_path, second):
    (tmp_path / "a.svs").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.svs").symlink_to(tmp_path / "a.svs")
    sheet = _sheet(tmp_path, ["A\tP1\ta.svs\t\t\t\t", f"B\tP2\t{second}\t\t\t\t"])
    with pytest.raises(InputError) as err:
        read_sample_sheet(sheet, tmp_path)
    check_error_text(str(err.value), sample="B", file=sheet,
                     problem=f"line 3: slide {second} is already used by sample A")


@pytest.mark.parametrize("mpp", ["0", "-0.5"])
def test_non_positive_mpp_in_the_sheet(tmp_path, mpp):
    sheet = _sheet(tmp_path, [f"A\tP1\ta.svs\t\t\t\t{mpp}"])
    with pytest.raises(InputError) as err:
        read_sample_sheet(sheet, tmp_path)
    check_error_text(str(err.value), sample="A", file=sheet, problem="line 2: mpp must be positive")


# =============================================================================================
# Bundles, models and checkpoints
# =============================================================================================

def test_bundle_whose_views_disagree_in_spot_count(tmp_path, capsys):
    d = make_sample(tmp_path, "X", n_spots=10)
    genes = write_genes(tmp_path / "panel.txt", [f"G{i}" for i in range(4)])
    with h5py.File(d["bundle"], "r+") as f:  # view_1 lost its last rows
        data = f["view_1"][:7]
        del f["view_1"]
        f.create_dataset("view_1", data=data)
    out = tmp_path / "model"
    _expect_cli_error(["train", "--kind", "mean", "--bundle", f"X={d['bundle']}", "--expression",
                       f"X={d['expression']}", "--genes", genes, "--settings",
                       json.dumps({"train": tiny_train_cfg()}), "--out-dir", out], capsys,
                      sample="X", file=d["bundle"],
                      problem=r"corrupt bundle \(view_1 has 7 spots, expected 10 \(views disagree\)\); delete it "
                              "and rerun tiling")
    assert not out.exists() or leftovers(out) == []


@pytest.fixture(scope="module")
def mean_model(study, tmp_path_factory):
    from m2ost.learn.training.fit_on_views import fit_model

    out = tmp_path_factory.mktemp("mean")
    fit_model("mean", study["bundles"], study["expressions"], study["genes_file"], ["A", "B"], None,
              tiny_train_cfg(), out)
    return out / "model.pt"


def test_held_out_sample_with_too_few_spots(mean_model, tmp_path, capsys):
    """Two spots with expression: no per-gene correlation; refused before anything is written."""
    t = make_sample(tmp_path, "T", n_spots=8, expression_rows=[1, 5])
    out = tmp_path / "metrics"
    _expect_cli_error(["evaluate", "--model", mean_model, "--bundle", f"T={t['bundle']}", "--expression",
                       f"T={t['expression']}", "--settings", json.dumps({"device": "cpu"}), "--out-dir", out],
                      capsys, sample="T", file=t["expression"],
                      problem=r"held-out sample has 2 spot\(s\) with expression; per-gene Pearson needs at least 3")
    assert not out.exists() or leftovers(out) == []


def test_model_trained_on_other_fields_of_view(mean_model, tmp_path, capsys):
    """A model of 55/110/220-µm views scored on a bundle of 55/110/300-µm views: refused, naming the bundle."""
    t = make_sample(tmp_path, "T", n_spots=8)
    write_bundle(t["bundle"], "T", t["views"], t["coords"], t["barcodes"], fov_um=(55.0, 110.0, 300.0))
    out = tmp_path / "metrics"
    _expect_cli_error(["evaluate", "--model", mean_model, "--bundle", f"T={t['bundle']}", "--expression",
                       f"T={t['expression']}", "--settings", json.dumps({"device": "cpu"}), "--out-dir", out],
                      capsys, sample="T", file=t["bundle"],
                      problem=r"view 2 covers 300.0 um, the model's training data covers 220.0 um")
    assert not out.exists() or leftovers(out) == []


@pytest.fixture(scope="module")
def network_run(study, tmp_path_factory):
    """A finished one-epoch run of the tiny network (its checkpoints are reused)."""
    from m2ost.learn.training.fit_on_views import fit_model

    out = tmp_path_factory.mktemp("net")
    fit_model("m2ost", study["bundles"], study["expressions"], study["genes_file"], ["A", "B"], TINY_MODEL,
              tiny_train_cfg(epochs=1), out)
    return out


def _train_argv(study, out, model=TINY_MODEL, **train):
    settings = json.dumps({"model": model, "train": tiny_train_cfg(epochs=1, **train)})
    return ["train", "--kind", "m2ost", "--bundle", f"A={study['bundles']['A']}", f"B={study['bundles']['B']}",
            "--expression", f"A={study['expressions']['A']}", f"B={study['expressions']['B']}",
            "--genes", study["genes_file"], "--settings", settings, "--out-dir", out]


def test_checkpoint_of_another_model_configuration_on_the_command_line(study, network_run, tmp_path, capsys):
    shutil.copytree(network_run / "checkpoints", tmp_path / "checkpoints")
    last = tmp_path / "checkpoints" / "last.pt"
    _expect_cli_error(_train_argv(study, tmp_path, {**TINY_MODEL, "depth": 1}), capsys, sample=None, file=last,
                      problem=r"checkpoint belongs to a different run \(differs in: model config / gene panel / "
                              r"views\); delete it or use another output directory")
    assert not (tmp_path / "model.pt").exists()


def test_workflow_restarts_over_a_checkpoint_of_other_settings(study, network_run, tmp_path, capsys, caplog):
    """What the train rule does (--restart-stale-checkpoint): a changed setting reruns the job in
    the same folder, whose checkpoint is then another run's; it is replaced, with a warning, and
    the new run's checkpoint resumes as usual."""
    import torch

    shutil.copytree(network_run / "checkpoints", tmp_path / "checkpoints")
    old = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["run_parts"]
    argv = _train_argv(study, tmp_path, {**TINY_MODEL, "depth": 1}) + ["--restart-stale-checkpoint"]
    caplog.set_level(logging.INFO, logger="m2ost")
    status, err = cli_in_process(argv, capsys)
    assert status == 0, err
    assert "checkpoints/last.pt] the checkpoint of another run" in caplog.text
    assert "training starts over" in caplog.text
    assert (tmp_path / "model.pt").exists()
    new = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["run_parts"]
    assert new != old
    caplog.clear()
    status, err = cli_in_process(argv, capsys)  # the same job again: its own checkpoint, no restart
    assert status == 0, err
    assert "starts over" not in caplog.text and "resuming" in caplog.text, caplog.text


def test_truncated_checkpoint(study, network_run, tmp_path, capsys):
    shutil.copytree(network_run / "checkpoints", tmp_path / "checkpoints")
    last = tmp_path / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:2000])
    _expect_cli_error(_train_argv(study, tmp_path), capsys, sample=None, file=last,
                      problem=r"cannot read checkpoint \(.*\); delete it to start over")
    assert not (tmp_path / "model.pt").exists()


def test_nan_loss_on_the_command_line(study, tmp_path, capsys):
    """An absurd learning rate: the loss overflows; one line naming epoch and step, no model.pt."""
    line = _expect_cli_error(_train_argv(study, tmp_path, lr=1e30, init_head_bias=False), capsys, sample=None,
                             file=None, problem=r"loss is (nan|inf) at epoch 1, step \d+ of \d+; training stopped")
    assert "Lower lr" in line
    assert not (tmp_path / "model.pt").exists()


# =============================================================================================
# Configuration
# =============================================================================================

def test_gpu_requested_where_there_is_none(study, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _expect_cli_error(_train_argv(study, tmp_path / "m", device="cuda"), capsys, sample=None, file=None,
                      problem=r"^device 'cuda' requested but CUDA is not available on this machine; set device: auto "
                              r"\(uses CUDA when present\) or cpu$")
    assert not (tmp_path / "m").exists() or leftovers(tmp_path / "m") == []


SCHEMA = REPO / "m2ost" / "schemas" / "config.schema.yaml"


@pytest.mark.parametrize("config, problem", [
    ({"trian": {"epochs": 3}}, r"'trian' was unexpected"),
    ({"train": {"epoch": 3}}, r"'epoch' was unexpected"),
    ({"train": {"epochs": "ten"}}, r"'ten' is not of type 'integer'"),
    ({"train": {"epochs": 0}}, r"0 is less than the minimum of 1"),
    ({"train": {"device": "gpu"}}, r"'gpu' does not match"),
    ({"views": [{"fov_um": 112}]}, r"'size_px' is a required property"),
    ({"views": [{"fov_um": 112, "fov_px": 200, "size_px": 32}]}, r"is valid under each of"),
    ({"panel": {"method": "random"}}, r"'random' is not one of"),
    ({"samples": None}, r"None is not of type 'string'"),
])
def test_config_schema_rejects_unknown_keys_and_wrong_types(config, problem):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    with pytest.raises(WorkflowError) as err:
        validate({"samples": "samples.tsv", **config}, str(SCHEMA), set_default=True)
    assert re.search(problem, str(err.value)), str(err.value)[:2000]


def test_config_schema_requires_the_sample_sheet():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    with pytest.raises(WorkflowError, match=r"'samples' is a required property"):
        validate({"data_root": "."}, str(SCHEMA), set_default=True)


def test_config_schema_accepts_the_shipped_configs():
    import yaml
    from snakemake.utils import validate

    for name in ("config/config.yaml", "config/her2st.yaml", "tests/data/fast_config.yaml"):
        validate(yaml.safe_load((REPO / name).read_text()), str(SCHEMA), set_default=True)


def test_snakemake_reports_a_misspelt_key(tmp_path):
    import subprocess
    import sys

    (tmp_path / "samples.tsv").write_text("sample\tpatient\tslide\nA\tP1\ta.svs\n")
    (tmp_path / "bad.yaml").write_text("samples: samples.tsv\ndata_root: .\ntrian: {epochs: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "-d", tmp_path,
                           "--configfile", tmp_path / "bad.yaml", "-n"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Error validating config file" in text
    assert "Additional properties are not allowed ('trian' was unexpected)" in text


def test_settings_that_are_not_json(tmp_path, capsys):
    _expect_cli_error(["tile", "--sample", "S", "--slide-info", tmp_path / "i.json", "--spots", tmp_path / "s.tsv",
                       "--settings", "{views: [", "--out", tmp_path / "S.h5"], capsys, sample=None, file=None,
                      problem=r"^--settings is not valid JSON: ")
