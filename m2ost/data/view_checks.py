"""Checks of a slide's views that the tiler reports: coarse (upscaled) views and blank slides."""

from __future__ import annotations

import logging

import numpy as np

from m2ost import defaults
from m2ost.errors import InputError

log = logging.getLogger(__name__)

# Default of tiling.max_upscale: a sample whose every view is enlarged more than this is refused.
MAX_UPSCALE = defaults.section("tiling")["max_upscale"]


def check_upscaling(sample: str, plans, mpp: float, *, max_upscale: float = MAX_UPSCALE,
                    allow: bool = False, file=None) -> list[float]:
    """Say once per sample which views have fewer source pixels than output pixels (a low-resolution
    slide, such as Space Ranger's lowres image); refuse the sample when every view is enlarged more
    than ``max_upscale`` times, unless ``allow``. Returns the upscaling factor of each view."""
    factors = [p.size_px / (p.fov0) for p in plans]
    coarse = [f"view {v}: {p.fov0 * mpp:.0f} µm = {p.fov0:.0f} px at {mpp:.3g} µm/px, upscaled {f:.1f}x to "
              f"{p.size_px} px" for v, (p, f) in enumerate(zip(plans, factors)) if f > 1.0]
    if coarse:
        log.warning("%s: the slide is coarser than the views: %s", sample, "; ".join(coarse))
    if min(factors) > max_upscale and not allow:
        raise InputError(f"every view is upscaled more than {max_upscale:g}x ({coarse[0]}): the slide is too coarse "
                         "for these views (a lowres image?); use a higher-resolution image, or set "
                         "tiling.allow_upscale", file=file, sample=sample)
    return factors


def check_not_blank(sample: str, tissue: np.ndarray, file=None) -> None:
    """A slide on which no spot's view holds any stained pixel (an all-black or all-white image,
    or spots placed off the image) is an error, not a bundle of empty views."""
    if len(tissue) and not np.any(np.asarray(tissue) > 0):
        raise InputError(f"the slide is blank under every spot: tissue fraction 0 in all {len(tissue)} spots' views "
                         "(an empty or black image, or positions of another image?)", file=file, sample=sample)
