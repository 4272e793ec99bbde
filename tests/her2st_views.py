"""Real H&E views of HER2+ spots, cut straight from the section's JPEG (no pyramid conversion),
written as a spot bundle: fast fixtures for the encoder and embedding tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image
from realdata import her2st_files
from synthetic import write_bundle

MPP = 0.69  # µm/px of the HER2+ JPEGs (data README)


def section_image(section: str) -> np.ndarray:
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st_files(section)["image"]) as img:
        return np.asarray(img.convert("RGB"))


def spot_views(section: str, n_spots: int, fovs_px=(224, 448, 896), size: int = 112,
               image: np.ndarray | None = None):
    """(views: list of (n, size, size, 3) uint8, barcodes, coords) of ``n_spots`` spots spread
    over the section, each view a centred crop of ``fov_px`` resized to ``size``."""
    image = section_image(section) if image is None else image
    table = pd.read_csv(her2st_files(section)["positions"], sep="\t")
    half = max(fovs_px) / 2
    h, w = image.shape[:2]
    inside = table[(table.pixel_x > half) & (table.pixel_x < w - half) & (table.pixel_y > half)
                   & (table.pixel_y < h - half)]
    picked = inside.iloc[np.linspace(0, len(inside) - 1, n_spots).astype(int)]
    views = []
    for fov in fovs_px:
        crops = []
        for x, y in zip(picked.pixel_x, picked.pixel_y):
            x0, y0 = round(x - fov / 2), round(y - fov / 2)
            crop = Image.fromarray(image[y0:y0 + fov, x0:x0 + fov])
            crops.append(np.asarray(crop.resize((size, size), Image.BILINEAR) if fov != size else crop))
        views.append(np.stack(crops))
    barcodes = [f"{x}x{y}" for x, y in zip(picked.x, picked.y)]
    coords = np.stack([picked.pixel_x.round(), picked.pixel_y.round()], 1).astype(np.int64)
    return views, barcodes, coords


def write_section_bundle(path, section: str, n_spots: int, fovs_px=(224, 448, 896), size: int = 112,
                         image: np.ndarray | None = None):
    views, barcodes, coords = spot_views(section, n_spots, fovs_px, size, image)
    write_bundle(path, section, views, coords, barcodes, fov_um=[f * MPP for f in fovs_px], mpp=MPP)
    return views, barcodes
