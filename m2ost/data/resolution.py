"""Resolution (µm per pixel): estimated from a spot grid, checked for plausibility, and reconciled
when several sources (sample sheet, slide metadata, HEST metadata, Visium scale factors, spot
grid) give a value."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from m2ost.errors import InputError

log = logging.getLogger(__name__)

# Centre-to-centre distance of the nearest spots, µm (the array's pitch), by platform and indexing.
# Legacy ST comes in two arrays, told apart by their indices: the 1k array has square indices, its
# nearest spots 200 µm apart; the 2k array has checkerboard indices (x + y of one parity) 100 µm
# per index step, so its nearest spots (diagonal index-neighbours) are 100·√2 ≈ 141 µm apart.
# Visium: 100 µm (a hexagonal grid indexed as a checkerboard). STUtility encodes the same:
# jbergenstrahle/STUtility, R/image_processing.R, LoadImages.Staffli (min.spot.distance 200 "1k",
# 141 "2k", 100 "Visium"), and R/Staffli.R, CreateStaffliObject (index limits 33 x 35 "1k",
# 67 x 64 "2k": both arrays about 6.6 mm across). Other arrays give their pitch (array_pitch_um).
ARRAY_PITCH_UM = {("legacy_st", False): 200.0, ("legacy_st", True): 100.0 * math.sqrt(2),
                  ("visium", False): 100.0, ("visium", True): 100.0}
ARRAY_NAMES = {("legacy_st", False): "legacy ST 1k array", ("legacy_st", True): "legacy ST 2k array",
               ("visium", False): "Visium", ("visium", True): "Visium"}
# No capture area of a real array is wider than this (Visium 6.5 mm, legacy ST about 6.6 mm).
MAX_CAPTURE_AREA_UM = 8000.0
# Default plausible range of µm per pixel (slides.mpp_range): from 200x scans to a 30 µm/px thumbnail.
MPP_RANGE = (0.05, 30.0)
# Relative disagreement between two resolution sources above which all are reported.
MPP_DISAGREEMENT = 0.10


def _grid_points(table: pd.DataFrame, sample: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Array indices (col, row) and pixel centres of the spots with both, checked for a usable grid."""
    grid = table[["array_col", "array_row"]].to_numpy(float)
    px = table[["x", "y"]].to_numpy(float)
    ok = np.isfinite(grid).all(axis=1) & np.isfinite(px).all(axis=1)
    grid, px = grid[ok], px[ok]
    if len(grid) < 6 or len(np.unique(grid[:, 0])) < 2 or len(np.unique(grid[:, 1])) < 2:
        raise InputError(f"too few spots ({len(grid)}) on the grid to estimate the resolution; "
                         "give mpp in the sample sheet", sample=sample)
    distinct = len(np.unique(np.round(px, 1), axis=0))
    if distinct < 3:
        raise InputError(f"degenerate spot grid: {len(px)} spots on {distinct} distinct pixel position(s); "
                         "the positions file does not match the array", sample=sample)
    return grid, px


def _index_neighbours(grid: np.ndarray, px: np.ndarray, sample: str | None) -> dict:
    """The median pixel distance of index-neighbours, the index step between them, and whether the
    indexing is a checkerboard (neighbours one row and one column apart, x + y of one parity)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(grid)
    dist, _ = tree.query(grid, k=2)
    step = float(np.min(dist[:, 1]))
    if not step > 0:
        raise InputError("degenerate spot grid: two spots share one array index", sample=sample)
    pairs = np.array(sorted(tree.query_pairs(step * 1.001)))
    spacing_px = float(np.median(np.linalg.norm(px[pairs[:, 0]] - px[pairs[:, 1]], axis=1)))
    if not spacing_px >= 1.0:
        raise InputError(f"degenerate spot grid: neighbouring spots are {spacing_px:.3g} px apart (under 1 px); "
                         "the positions are not in this slide's pixels", sample=sample)
    parity = np.mod(np.round(grid.sum(axis=1)), 2)
    checkerboard = bool(abs(step - np.sqrt(2)) < 1e-3 and len(np.unique(parity)) == 1)
    return {"spacing_px": spacing_px, "index_step": step, "checkerboard": checkerboard}


def grid_geometry(table: pd.DataFrame, fmt: str, sample: str | None = None,
                  pitch_um: float | None = None) -> dict:
    """The spot grid's geometry: µm/px, index-neighbour distance in px, checkerboard indexing, and
    the pitch used with where it came from (``array`` is the platform's array, or array_pitch_um).

    Index-neighbours are the pairs of spots nearest to each other in array-index space (one
    column apart on a square grid; one row and one column apart on a checkerboard, as Visium and
    the legacy ST 2k array index theirs). Their median pixel distance is one array pitch, which
    ``pitch_um`` gives, else the platform's for the indexing found (:data:`ARRAY_PITCH_UM`).
    """
    if not (pitch_um or (fmt, False) in ARRAY_PITCH_UM):
        raise InputError(f"cannot estimate the resolution from the spot grid of format {fmt!r} without the "
                         "array's pitch; give mpp (or array_pitch_um) in the sample sheet", sample=sample)
    grid, px = _grid_points(table, sample)
    geometry = _index_neighbours(grid, px, sample)
    key = (fmt, geometry["checkerboard"])
    pitch, array = (pitch_um, "array_pitch_um") if pitch_um else (ARRAY_PITCH_UM[key], ARRAY_NAMES[key])
    mpp = pitch / geometry["spacing_px"]
    extent_um = float(np.ptp(px, axis=0).max()) * mpp
    if extent_um > MAX_CAPTURE_AREA_UM:
        log.warning("%s: the spot grid at %.4g µm/px (pitch %.0f µm) spans %.1f mm, more than any real capture "
                    "area (about %.0f mm): is the array's centre-to-centre distance (array_pitch_um) right?",
                    sample, mpp, pitch, extent_um / 1000, MAX_CAPTURE_AREA_UM / 1000)
    return {"mpp": mpp, "pitch_um": pitch, "array": array, "extent_um": extent_um, **geometry}


def estimate_mpp_from_grid(table: pd.DataFrame, fmt: str, sample: str | None = None,
                           pitch_um: float | None = None) -> float:
    """µm per pixel from the spot grid: the array pitch over the index-neighbour distance in px."""
    geometry = grid_geometry(table, fmt, sample, pitch_um)
    log.info("%s: spot grid: index-neighbours %.1f px apart (%s indexing), pitch %.0f µm (%s) -> %.4f µm/px",
             sample, geometry["spacing_px"], "checkerboard" if geometry["checkerboard"] else "square",
             geometry["pitch_um"], geometry["array"], geometry["mpp"])
    return geometry["mpp"]


def check_plausible(mpp: float, source: str, mpp_range=MPP_RANGE, *, file=None, sample=None) -> float:
    """Stop unless ``mpp`` lies in the plausible range, naming where the value came from."""
    lo, hi = mpp_range
    if not (np.isfinite(mpp) and lo <= mpp <= hi):
        raise InputError(f"resolution {mpp:.4g} µm/px from the {source} is outside the plausible range "
                         f"{lo:g}-{hi:g} µm/px (slides.mpp_range); check the {source}", file=file, sample=sample)
    return mpp


def reconcile(sample: str, candidates: list[tuple[str, float]], tolerance: float = MPP_DISAGREEMENT
              ) -> tuple[float, str]:
    """The first candidate (highest priority); a disagreement between any two beyond ``tolerance``
    is reported with every value, so the user sees which source is wrong."""
    mpp, source = candidates[0][1], candidates[0][0]
    values = [v for _, v in candidates]
    if len(values) > 1 and max(values) / min(values) - 1 > tolerance:
        listed = ", ".join(f"{name} {value:.4f}" for name, value in candidates)
        log.warning("%s: the resolution sources disagree by more than %.0f%%: %s µm/px; using the %s",
                    sample, 100 * tolerance, listed, source)
    elif len(values) > 1:
        log.info("%s: resolution sources agree: %s µm/px", sample,
                 ", ".join(f"{name} {value:.4f}" for name, value in candidates))
    return float(mpp), source
