"""The Visium-style spot grid of a demo slide and each spot's ground-truth features."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from m2ost.data.demo.params import FIELD_UM, MPP, OWN_RADIUS_UM, REGION_TYPES, RING_UM, SPOT_DIAMETER_UM, SPOT_PITCH_UM
from m2ost.data.demo.slides import SlideTruth


def _barcode(array_row: int, array_col: int) -> str:
    """A 16-base barcode tied to the array position (as on real Visium slides).

    An odd multiplier modulo 2**32 is a bijection, so distinct positions never collide.
    """
    idx = (array_row * 128 + array_col) * 2654435761 % 2**32
    bases = "ACGT"
    return "".join(bases[(idx >> (2 * i)) & 3] for i in range(15, -1, -1)) + "-1"


def spot_grid(rng, height_px: int, width_px: int) -> pd.DataFrame:
    """Visium hexagonal grid positions covering the slide, slightly rotated."""
    row_um = SPOT_PITCH_UM * math.sqrt(3) / 2
    col_um = SPOT_PITCH_UM / 2
    theta = math.radians(rng.uniform(-1.5, 1.5))
    r0, c0 = int(rng.integers(4, 30)), int(rng.integers(4, 40))
    oy, ox = rng.uniform(10, 60), rng.uniform(10, 60)  # µm, first spot near a corner
    h_um, w_um = height_px * MPP, width_px * MPP
    rows, cols, ys, xs = [], [], [], []
    inset = SPOT_DIAMETER_UM / 2 + 5
    for i in range(-2, int(h_um / row_um) + 3):
        for j in range(-2, int(w_um / col_um) + 3):
            r, c = r0 + i, c0 + j
            if (c % 2) != (r % 2):  # hexagonal: odd rows hold odd columns
                continue
            u, v = j * col_um, i * row_um
            x = ox + u * math.cos(theta) - v * math.sin(theta)
            y = oy + u * math.sin(theta) + v * math.cos(theta)
            if inset <= x <= w_um - inset and inset <= y <= h_um - inset:
                rows.append(r), cols.append(c), ys.append(y), xs.append(x)
    grid = pd.DataFrame(
        {
            "barcode": [_barcode(r, c) for r, c in zip(rows, cols)],
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": np.round(np.array(ys) / MPP).astype(int),
            "pxl_col_in_fullres": np.round(np.array(xs) / MPP).astype(int),
        }
    )
    return grid.sort_values(["array_row", "array_col"], kind="stable").reset_index(drop=True)


def _disc_mean(maps: np.ndarray, cy: np.ndarray, cx: np.ndarray, r_in: float, r_out: float) -> np.ndarray:
    """Mean of each map over an annulus (r_in..r_out, field pixels) around each centre.

    Pixels outside the map count as background (zero), like empty glass.
    """
    R = int(math.ceil(r_out))
    yy, xx = np.mgrid[-R : R + 1, -R : R + 1]
    d = np.hypot(yy, xx)
    kernel = ((d <= r_out) & (d >= r_in)).astype(np.float32)
    kernel /= kernel.sum()
    pad = np.pad(maps.astype(np.float32), ((0, 0), (R, R), (R, R)))
    out = np.empty((len(cy), maps.shape[0]), np.float64)
    for i, (y, x) in enumerate(zip(cy, cx)):
        win = pad[:, y : y + 2 * R + 1, x : x + 2 * R + 1]
        out[i] = np.tensordot(win, kernel, axes=([1, 2], [0, 1]))
    return out


def spot_features(truth: SlideTruth, grid: pd.DataFrame) -> pd.DataFrame:
    """Ground-truth features of every grid spot: own, neighbourhood, in_tissue."""
    cy = np.round(grid["pxl_row_in_fullres"].to_numpy() * MPP / FIELD_UM).astype(int)
    cx = np.round(grid["pxl_col_in_fullres"].to_numpy() * MPP / FIELD_UM).astype(int)
    k = len(REGION_TYPES)
    onehot = np.stack([truth.labels == i for i in range(k)] + [truth.labels >= 0]).astype(np.float32)
    nuc = np.zeros(truth.labels.shape, np.float32)
    ny = np.clip((truth.nuclei_yx_um[:, 0] / FIELD_UM).astype(int), 0, nuc.shape[0] - 1)
    nx = np.clip((truth.nuclei_yx_um[:, 1] / FIELD_UM).astype(int), 0, nuc.shape[1] - 1)
    np.add.at(nuc, (ny, nx), 1.0)
    maps = np.concatenate([onehot, nuc[None]])

    spot_r = SPOT_DIAMETER_UM / 2 / FIELD_UM
    own_r = OWN_RADIUS_UM / FIELD_UM
    ring = (RING_UM[0] / FIELD_UM, RING_UM[1] / FIELD_UM)
    spot = _disc_mean(maps[k : k + 1], cy, cx, 0, spot_r)[:, 0]
    own = _disc_mean(maps, cy, cx, 0, own_r)
    nbr = _disc_mean(maps[:k], cy, cx, *ring)
    px_area_mm2 = (FIELD_UM * 1e-3) ** 2

    feats = grid.copy()
    feats.insert(1, "in_tissue", (spot >= 0.5).astype(int))
    for i, name in enumerate(REGION_TYPES):
        feats[f"own_{name}"] = own[:, i]
    feats["own_tissue"] = own[:, k]
    feats["own_nuclei_per_mm2"] = own[:, k + 1] / px_area_mm2
    for i, name in enumerate(REGION_TYPES):
        feats[f"ring_{name}"] = nbr[:, i]
    return feats
