"""Spot grids for H&E-only slides: find the tissue on a thumbnail, lay a Visium-like grid over it."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage import color, filters, morphology

from m2ost import defaults
from m2ost.data.slide import open_slide
from m2ost.errors import InputError

log = logging.getLogger(__name__)

# Tissue is detected on a thumbnail of about this resolution: fine enough for 55-100 µm spots.
THUMBNAIL_UM_PER_PX = 8.0



def detect_tissue(slide, mpp: float, um_per_px: float = THUMBNAIL_UM_PER_PX) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a thumbnail, and the level-0 px per thumbnail px.

    Stained tissue is saturated and darker than the glass: Otsu's threshold on the saturation
    of the thumbnail, cleaned with small-object and hole removal (scikit-image).
    """

    width, height = slide.dimensions
    scale = max(1.0, um_per_px / mpp)
    size = (max(1, int(width / scale)), max(1, int(height / scale)))
    thumb = np.asarray(slide.get_thumbnail(size).convert("RGB"))
    scale = width / thumb.shape[1]
    hsv = color.rgb2hsv(thumb)
    saturation, value = hsv[..., 1], hsv[..., 2]
    try:
        threshold = max(filters.threshold_otsu(saturation), 0.05)
    except ValueError:  # a constant image
        threshold = 1.0
    mask = (saturation > threshold) & (value < 0.95)
    min_area = max(4, int((200 / (scale * mpp)) ** 2))  # drop specks smaller than ~200 µm square
    mask = morphology.remove_small_objects(mask, max_size=min_area)
    mask = morphology.remove_small_holes(mask, max_size=min_area)
    return mask, scale


def spot_grid(mask: np.ndarray, scale: float, mpp: float, spacing_um: float,
              min_tissue_fraction: float = 0.25) -> pd.DataFrame:
    """A hexagonal (Visium-like) grid of spot centres over the tissue, in level-0 px.

    A spot is kept when the tissue covers at least ``min_tissue_fraction`` of a disc of half
    the spacing around it.
    """

    spacing = spacing_um / mpp / scale  # thumbnail px
    radius = max(1, int(round(spacing / 2)))
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disc = (xx ** 2 + yy ** 2 <= radius ** 2).astype(float)
    cover = ndimage.convolve(mask.astype(float), disc / disc.sum(), mode="constant")
    rows = []
    dy = spacing * math.sqrt(3) / 2
    for r in range(int(mask.shape[0] / dy) + 1):
        y = r * dy + dy / 2
        offset = spacing / 2 if r % 2 else 0.0
        for c in range(int(mask.shape[1] / spacing) + 1):
            x = c * spacing + offset + spacing / 4
            iy, ix = int(y), int(x)
            if iy < mask.shape[0] and ix < mask.shape[1] and cover[iy, ix] >= min_tissue_fraction:
                rows.append((f"r{r}c{2 * c + (r % 2)}", x * scale, y * scale, r, 2 * c + (r % 2)))
    return pd.DataFrame(rows, columns=["spot_id", "x", "y", "array_row", "array_col"])


def grid_spots(sample: str, slide_info: dict, spacing_um: float | None = None,
               min_tissue_fraction: float | None = None) -> pd.DataFrame:
    """The spot table of an H&E-only slide (settings default to the workflow's ``predict`` ones)."""
    predict = defaults.section("predict")
    spacing_um = predict["spot_spacing_um"] if spacing_um is None else spacing_um
    min_tissue_fraction = predict["min_tissue_fraction"] if min_tissue_fraction is None else min_tissue_fraction

    with open_slide(slide_info["slide"], sample) as slide:
        mask, scale = detect_tissue(slide, slide_info["mpp"])
    table = spot_grid(mask, scale, slide_info["mpp"], spacing_um, min_tissue_fraction)
    if table.empty:
        raise InputError(f"no tissue found (0 grid spots with >= {min_tissue_fraction:.0%} tissue)",
                         file=slide_info["slide"], sample=sample)
    log.info("%s: tissue covers %.1f%% of the slide; %d grid spots every %.0f µm", sample,
             100 * mask.mean(), len(table), spacing_um)
    return table

