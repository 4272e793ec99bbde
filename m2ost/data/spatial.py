"""What the viewers need to draw spots over the tissue: the H&E thumbnail, spot sizes, units.

Every h5ad of the workflow carries ``uns["spatial"][sample]`` in scanpy's Visium layout, so
``sc.pl.spatial(adata, color=gene)`` and ``squidpy.pl.spatial_scatter`` draw over the H&E with
no extra argument: ``images/hires`` (a downsampled RGB image of level 0) and ``scalefactors``
(``tissue_hires_scalef`` = hires px per level-0 px, ``spot_diameter_fullres`` in level-0 px).
"""

from __future__ import annotations

import logging

import h5py
import numpy as np
import openslide
from anndata.io import read_elem

from m2ost.data.slide import open_slide
from m2ost.errors import InputError

log = logging.getLogger(__name__)

# Space Ranger's "hires" image is 2000 px on its long side; the same here, but never finer than
# 2 µm per pixel (a 55 µm spot is still 27 px wide; a small slide's image stays small).
HIRES_MAX_PX = 2000
HIRES_FINEST_UM_PER_PX = 2.0
# Spot diameters of the platforms, µm: Visium 55 µm, legacy ST 100 µm (HEST-1k h5ad holds both;
# its sample sheet names no platform, so the Visium size is assumed).
SPOT_DIAMETER_UM = {"visium": 55.0, "legacy_st": 100.0, "h5ad": 55.0}


def spot_diameter_um(fmt: str, pitch_um: float | None = None) -> float:
    """The physical spot diameter of a platform. HEST-1k holds both platforms: its spot diameter
    follows the array pitch (Visium 55 µm at 100 µm, legacy ST 100 µm at 200 µm)."""
    if fmt == "hest":
        if pitch_um and pitch_um > 150:
            return SPOT_DIAMETER_UM["legacy_st"] * pitch_um / 200.0
        return SPOT_DIAMETER_UM["visium"] * (pitch_um or 100.0) / 100.0
    if fmt not in SPOT_DIAMETER_UM:
        raise InputError(f"no known spot diameter for format {fmt!r}")
    return SPOT_DIAMETER_UM[fmt]


def expression_unit(target_sum: float) -> str:
    """The unit of the expression stage's X: log1p of counts scaled to ``target_sum`` per spot."""
    per = {1e4: "log1p CP10k", 1e6: "log1p CPM"}.get(float(target_sum))
    return per or f"log1p(counts per {float(target_sum):g})"


def tissue_image(slide_path, sample: str | None = None, mpp: float | None = None,
                 max_px: int = HIRES_MAX_PX) -> tuple[np.ndarray, float]:
    """A downsampled RGB image of the whole slide (uint8, long side ``max_px`` at most, and no
    finer than :data:`HIRES_FINEST_UM_PER_PX` where ``mpp`` is given), read through OpenSlide,
    and its scale factor (image px per level-0 px)."""
    with open_slide(slide_path, sample) as slide:
        width, height = slide.dimensions
        scale = min(1.0, max_px / max(width, height), (mpp or 0) / HIRES_FINEST_UM_PER_PX or 1.0)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = slide.get_thumbnail(size).convert("RGB")
        if image.size != size:  # OpenSlide keeps the aspect ratio, which may round a pixel off
            image = image.resize(size)
    return np.asarray(image, dtype=np.uint8), size[0] / width


def spatial_entry(image: np.ndarray, scalef: float, spot_diameter_px: float) -> dict:
    """One sample's ``uns["spatial"]`` entry (scanpy's Visium layout)."""
    return {"images": {"hires": np.ascontiguousarray(image, dtype=np.uint8)},
            "scalefactors": {"tissue_hires_scalef": float(scalef),
                             "spot_diameter_fullres": float(spot_diameter_px)},
            "metadata": {}}


def slide_spatial(slide_path, mpp: float, diameter_um: float, sample: str | None = None) -> dict | None:
    """The entry of a slide, or None (with a warning) when the slide cannot be read: the viewers
    then draw the spots without the H&E, which is no reason to fail a finished prediction or
    the expression stage (which needs no pixel of the slide otherwise)."""
    try:
        image, scalef = tissue_image(slide_path, sample, mpp)
    except (InputError, openslide.OpenSlideError) as err:  # a damaged slide fails its tiling, not this
        log.warning("%s: no H&E image for the viewers (%s)", sample, err)
        return None
    return spatial_entry(image, scalef, diameter_um / mpp)


def bundle_slide(bundle, sample: str | None = None) -> tuple[str | None, float]:
    """The slide a bundle was tiled from (as the tiler read it; None if not recorded) and its µm per pixel."""
    try:
        with h5py.File(bundle, "r") as f:
            slide, mpp = f.attrs.get("slide"), float(f.attrs["mpp"])
    except (OSError, KeyError) as err:
        raise InputError(f"bundle does not state its resolution ({err})", file=bundle, sample=sample) from None
    return (slide.decode() if isinstance(slide, bytes) else slide and str(slide)), mpp


def sample_spatial(sample: str, bundle, expression=None,
                   diameter_um: float = SPOT_DIAMETER_UM["visium"]) -> tuple[dict | None, float, float]:
    """(``uns["spatial"]`` entry or None, µm per px, spot diameter in level-0 px) of a sample.

    The entry comes from the expression file when it has one (image and the platform's spot
    size), else from the bundle's slide with spots of ``diameter_um``.
    """
    slide, mpp = bundle_slide(bundle, sample)
    entry = None
    if expression is not None:
        entry = (read_uns(expression).get("spatial") or {}).get(sample)
        if entry and "hires" not in entry.get("images", {}):
            entry = None
    if entry is None and slide:
        entry = slide_spatial(slide, mpp, diameter_um, sample)
    diameter_px = entry["scalefactors"]["spot_diameter_fullres"] if entry else diameter_um / mpp
    return entry, mpp, float(diameter_px)


def recorded_unit(expression) -> str:
    """The unit the expression stage recorded for X (``uns["m2ost"]["unit"]``)."""
    record = read_uns(expression).get("m2ost", {})
    unit = record.get("unit") if isinstance(record, dict) else None
    return str(unit) if unit else "log1p-normalised expression"


def read_uns(path) -> dict:
    """An h5ad's ``uns`` alone (not its matrices)."""
    try:
        with h5py.File(path, "r") as f:
            return read_elem(f["uns"]) if "uns" in f else {}
    except OSError as err:
        raise InputError(f"unreadable h5ad ({err})", file=path) from None
