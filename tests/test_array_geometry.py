"""The two legacy ST arrays (issue 21): the resolution from a spot grid takes the array's geometry
from its indexing, the given pitch still wins, and the capture-area warning holds for both.

Array definitions (as STUtility encodes them, R/Staffli.R and R/image_processing.R): the 1k array
has 33 x 35 square indices 200 µm apart; the 2k array 67 x 64 checkerboard indices (x + y of one
parity) 100 µm per step, its nearest spots 100·√2 ≈ 141 µm apart on the diagonal.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import tifffile
from realdata import HER2ST_SECTIONS, her2st_files, needs_her2st
from robustness_helpers import run_m2ost
from scipy.spatial import cKDTree

from m2ost.data import spots
from m2ost.data.resolution import grid_geometry

ARRAYS = {"1k": {"shape": (33, 35), "checkerboard": False, "step_um": 200.0},
          "2k": {"shape": (67, 64), "checkerboard": True, "step_um": 100.0}}


def st_array(kind: str, mpp: float, origin_px: float = 40.0) -> pd.DataFrame:
    """Every spot of a legacy ST array (indices from 1, as the ST spot files) at ``mpp`` µm/px."""
    a = ARRAYS[kind]
    cols, rows = a["shape"]
    idx = [(c, r) for r in range(1, rows + 1) for c in range(1, cols + 1)
           if not a["checkerboard"] or (c + r) % 2 == 0]
    c, r = np.array(idx, float).T
    step_px = a["step_um"] / mpp
    return pd.DataFrame({"spot_id": [f"{int(i)}x{int(j)}" for i, j in idx], "x": origin_px + (c - 1) * step_px,
                         "y": origin_px + (r - 1) * step_px, "array_row": r, "array_col": c})


def nearest_px(table: pd.DataFrame) -> float:
    """Median distance in px from each spot to its nearest spot, by pixel position alone."""
    dist, _ = cKDTree(table[["x", "y"]].to_numpy(float)).query(table[["x", "y"]].to_numpy(float), k=2)
    return float(np.median(dist[:, 1]))


def test_1k_and_2k_arrays_of_the_same_pixel_spacing_differ_by_sqrt2():
    """Nearest spots 290 px apart (as on the HER2+ sections) on both arrays: 200/290 µm/px on the 1k
    array, 141.4/290 on the 2k array; each estimate is the array's true µm/px."""
    truth = {"1k": 200.0 / 290.0, "2k": 100.0 * math.sqrt(2) / 290.0}
    got = {}
    for kind, mpp in truth.items():
        table = st_array(kind, mpp)
        assert nearest_px(table) == pytest.approx(290.0)
        geometry = grid_geometry(table, "legacy_st", kind)
        assert geometry["checkerboard"] is ARRAYS[kind]["checkerboard"]
        assert geometry["array"] == f"legacy ST {kind} array"
        assert geometry["spacing_px"] == pytest.approx(290.0)
        got[kind] = geometry["mpp"]
        assert got[kind] == pytest.approx(mpp, rel=1e-9)
        assert spots.estimate_mpp_from_grid(table, "legacy_st", kind) == got[kind]
    assert got["1k"] / got["2k"] == pytest.approx(math.sqrt(2), rel=1e-9)


def test_the_given_pitch_wins_over_the_2k_default():
    table = st_array("2k", 0.5)
    geometry = grid_geometry(table, "legacy_st", "S", pitch_um=200.0)
    assert geometry["array"] == "array_pitch_um" and geometry["pitch_um"] == 200.0
    assert geometry["mpp"] == pytest.approx(200.0 / (100.0 * math.sqrt(2) / 0.5))
    # Visium keeps 100 µm (its checkerboard is a hexagonal grid, not the 2k array).
    assert grid_geometry(table, "visium", "V")["mpp"] == pytest.approx(0.5 / math.sqrt(2))


@pytest.mark.parametrize("kind", ["1k", "2k"])
def test_capture_area_warning_for_both_arrays(kind, caplog):
    """A whole array spans about 6.6 mm: no warning at its own pitch; 1.5 times the pitch (for the
    2k array: 200 µm between nearest spots, the old default, 1.41 times) implies a grid over 8 mm."""
    table = st_array(kind, 1.0)
    with caplog.at_level(logging.WARNING, logger="m2ost"):
        geometry = grid_geometry(table, "legacy_st", kind)
    assert 6000 < geometry["extent_um"] < 7000
    assert not caplog.records
    wrong = 200.0 if kind == "2k" else 300.0
    with caplog.at_level(logging.WARNING, logger="m2ost"):
        geometry = grid_geometry(table, "legacy_st", kind, pitch_um=wrong)
    assert geometry["extent_um"] > 8000
    (record,) = caplog.records
    assert f"{kind}: the spot grid at" in record.getMessage()
    assert f"(pitch {wrong:.0f} µm) spans {geometry['extent_um'] / 1000:.1f} mm, more than any real capture area" \
        in record.getMessage()


def test_prepare_slide_on_a_2k_array_and_the_pitch_option(tmp_path):
    """The command the workflow runs: a 2k array at 2 µm/px comes out at 2 µm/px and says which array
    it took; ``--array-pitch-um`` (the sheet's array_pitch_um or spots.array_pitch_um) still wins."""
    table = st_array("2k", 2.0)
    table.to_csv(tmp_path / "spots.tsv", sep="\t", index=False)
    side = int(table[["x", "y"]].to_numpy().max()) + 40
    tifffile.imwrite(tmp_path / "he.tif", np.full((side, side, 3), 200, np.uint8))
    base = ["prepare-slide", "--sample", "K2", "--slide", tmp_path / "he.tif", "--spots", tmp_path / "spots.tsv",
            "--format", "legacy_st", "--converted", tmp_path / "K2.tif", "--out", tmp_path / "K2.json"]
    proc = run_m2ost(base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "K2.json").read_text())["mpp"] == pytest.approx(2.0, rel=1e-6)
    assert "(checkerboard indexing), pitch 141 µm (legacy ST 2k array) -> 2.0000 µm/px" in proc.stderr
    assert "capture area" not in proc.stderr
    proc = run_m2ost([*base, "--array-pitch-um", "200"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "K2.json").read_text())["mpp"] == pytest.approx(2.0 * math.sqrt(2), rel=1e-6)
    assert "pitch 200 µm (array_pitch_um)" in proc.stderr and "more than any real capture area" in proc.stderr


@needs_her2st
@pytest.mark.parametrize("section", HER2ST_SECTIONS)
def test_her2st_sections_are_1k_arrays(section):
    table = spots.read_positions("legacy_st", her2st_files(section)["positions"], section)
    geometry = grid_geometry(table, "legacy_st", section)
    assert not geometry["checkerboard"] and geometry["array"] == "legacy ST 1k array"
    assert geometry["pitch_um"] == 200.0
    # The spot nearest on the image is one index step away (a 2k array's would be a diagonal step).
    px, idx = table[["x", "y"]].to_numpy(float), table[["array_col", "array_row"]].to_numpy(float)
    _, nearest = cKDTree(px).query(px, k=2)
    assert np.median(np.linalg.norm(idx[nearest[:, 1]] - idx, axis=1)) == 1.0


@needs_her2st
def test_b4_resolution_unchanged():
    """B4's estimate before the 2k default existed: 200 µm over 290.41 px."""
    table = spots.read_positions("legacy_st", her2st_files("B4")["positions"], "B4")
    assert spots.estimate_mpp_from_grid(table, "legacy_st", "B4") == pytest.approx(0.688671, rel=1e-5)
