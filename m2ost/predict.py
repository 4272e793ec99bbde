"""Prediction on H&E-only slides: find the tissue, lay a spot grid over it, tile, predict, map.

The grid spots are tiled into a bundle like any other slide (so the views are exactly those
the model was trained on) and predicted batch by batch from it: no slide's views are ever
held in memory at once.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

log = logging.getLogger(__name__)

# Tissue is detected on a thumbnail of about this resolution: fine enough for 55-100 µm spots.
THUMBNAIL_UM_PER_PX = 8.0


def detect_tissue(slide, mpp: float, um_per_px: float = THUMBNAIL_UM_PER_PX) -> tuple[np.ndarray, float]:
    """Boolean tissue mask of a thumbnail, and the level-0 px per thumbnail px.

    Stained tissue is saturated and darker than the glass: Otsu's threshold on the saturation
    of the thumbnail, cleaned with small-object and hole removal (scikit-image).
    """
    from skimage import color, filters, morphology

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
    from scipy import ndimage

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


def grid_spots(sample: str, slide_info: dict, spacing_um: float, min_tissue_fraction: float) -> pd.DataFrame:
    """The spot table of an H&E-only slide."""
    from .slide import open_slide

    with open_slide(slide_info["slide"], sample) as slide:
        mask, scale = detect_tissue(slide, slide_info["mpp"])
    table = spot_grid(mask, scale, slide_info["mpp"], spacing_um, min_tissue_fraction)
    if table.empty:
        raise InputError(f"no tissue found (0 grid spots with >= {min_tissue_fraction:.0%} tissue)",
                         file=slide_info["slide"], sample=sample)
    log.info("%s: tissue covers %.1f%% of the slide; %d grid spots every %.0f µm", sample,
             100 * mask.mean(), len(table), spacing_um)
    return table


def model_views(model_file) -> list:
    """The views a trained model expects, to tile a new slide the same way."""
    from .tiling import View
    from .train import load_model

    predictor = load_model(model_file, "cpu")
    meta = predictor.meta
    fov_um = list(meta["fov_um"])
    if len(fov_um) != len(predictor.views):
        fov_um = [fov_um[v] for v in predictor.views]
    return [View(predictor.img_size, fov_um=float(f)) for f in fov_um]


def plot_prediction_maps(adata, out_png, n_genes: int = 6, title: str = "") -> None:
    """Predicted expression of the most variable predicted genes, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    x = np.asarray(adata.X)
    order = np.argsort(-x.var(axis=0))[:n_genes]
    cols = min(3, len(order))
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    xy = adata.obsm["spatial"]
    for ax, g in zip(axes.ravel(), order):
        points = ax.scatter(xy[:, 0], xy[:, 1], c=x[:, g], s=8, cmap="viridis")
        ax.set_title(str(adata.var_names[g]))
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(points, ax=ax, shrink=0.7)
    for ax in axes.ravel()[len(order):]:
        ax.axis("off")
    fig.suptitle(title or "predicted expression")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def predict_slide(slide_path, model_file, out_dir, *, sample: str | None = None, mpp: float | None = None,
                  spacing_um: float = 100.0, min_tissue_fraction: float = 0.25, batch_size: int = 64,
                  workers: int = 1, device: str = "auto") -> Path:
    """Everything for one slide in one call (``m2ost predict``): prepare, grid, tile, predict, map.

    Writes ``{out_dir}/{sample}.h5ad`` and ``{out_dir}/{sample}.png``; intermediate files
    (converted pyramid, spot table, bundle) go to ``{out_dir}/work``.
    """
    from .evaluate import predict_bundle
    from .provenance import provenance
    from .slide import prepare_slide, slide_needs_conversion
    from .spots import write_spots
    from .tiling import tile_slide

    sample = sample or Path(slide_path).stem
    out_dir = Path(out_dir)
    work = out_dir / "work"
    converted = work / f"{sample}.tif" if slide_needs_conversion(str(slide_path)) else None
    info = prepare_slide(sample, slide_path, work / f"{sample}.json", converted_path=converted, sheet_mpp=mpp)
    table = grid_spots(sample, info, spacing_um, min_tissue_fraction)
    write_spots(table, work / f"{sample}.tsv")
    views = model_views(model_file)
    bundle = work / f"{sample}.h5"
    tile_slide(sample, info["slide"], table, info["mpp"], views, bundle, workers=workers,
               mpp_source=info["mpp_source"], provenance=provenance({"views": [v.__dict__ for v in views]}))
    out = out_dir / f"{sample}.h5ad"
    adata = predict_bundle(model_file, bundle, out, sample=sample, device=device, batch_size=batch_size)
    plot_prediction_maps(adata, out_dir / f"{sample}.png", title=f"{sample}: predicted expression")
    return out

