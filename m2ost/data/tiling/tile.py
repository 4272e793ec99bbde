"""Tile every spot of a slide into a spot bundle (:mod:`m2ost.data.bundle`)."""

from __future__ import annotations

import logging
import os

import numpy as np
import openslide
from tqdm import tqdm

from m2ost.data.bundle import BundleWriter
from m2ost.data.slide import open_slide
from m2ost.data.tiling.parallel import iter_chunks
from m2ost.data.tiling.views import View, plan_views, view_origin
from m2ost.data.view_checks import MAX_UPSCALE, check_not_blank, check_upscaling
from m2ost.errors import InputError

log = logging.getLogger(__name__)


def _damaged_slide_is_input_error(chunks, slide_path, sample):
    """Pass ``chunks`` through; a decoder's error on damaged pixel data becomes an InputError.

    Only errors raised while reading (not while writing the bundle) are converted; workers report
    theirs as ``RuntimeError("tiling worker failed: Type: message")``. Workers that died are not.
    """
    try:
        yield from chunks
    except (openslide.OpenSlideError, OSError, RuntimeError) as err:
        text = str(err)
        if isinstance(err, RuntimeError) and text.startswith("tiling workers died"):
            raise
        detail = text.removeprefix("tiling worker failed: ") if text.startswith("tiling worker failed: ") \
            else f"{type(err).__name__}: {text}"
        raise InputError(f"cannot decode the slide's pixels ({detail.splitlines()[0]}); the slide file is damaged "
                         "or truncated", file=slide_path, sample=sample) from None


def _check_spots_inside(xy: np.ndarray, dims, slide_path, sample: str) -> None:
    """All centres outside the slide is an error; some outside are warned (their views are padded)."""
    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < dims[0]) & (xy[:, 1] < dims[1])
    if not inside.any():
        raise InputError(f"all {len(xy)} spot centres lie outside the {dims[0]} x {dims[1]} px slide "
                         "(wrong slide or wrong coordinate scale? a downscaled image needs slide_scale)",
                         file=slide_path, sample=sample)
    if not inside.all():
        log.warning("%s: %d of %d spot centres lie outside the slide; their views are white and flagged",
                    sample, int((~inside).sum()), len(xy))


def _check_plans(plans, dims, mpp: float, slide_path, sample: str, max_upscale: float, allow_upscale: bool) -> None:
    """Refuse a view larger than the slide, or upscaled beyond ``max_upscale``; log each view's reading."""
    largest = max(range(len(plans)), key=lambda v: plans[v].fov0)
    if plans[largest].fov0 > min(dims):
        # No spot could have that view inside the slide: every spot would be padded in it.
        raise InputError(f"the slide ({dims[0]} x {dims[1]} px) is smaller than view {largest} "
                         f"({plans[largest].fov0:.0f} px = {plans[largest].fov0 * mpp:.0f} µm at {mpp:.4g} µm/px); "
                         "check the slide's resolution and the views' fields of view", file=slide_path, sample=sample)
    check_upscaling(sample, plans, mpp, max_upscale=max_upscale, allow=allow_upscale, file=slide_path)
    for v, p in enumerate(plans):
        log.info("%s: view %d: %.1f level-0 px read at level %d (downsample %.2f) as %d px -> %d px",
                 sample, v, p.fov0, p.level, p.downsample, p.read_px, p.size_px)


def _bundle_attrs(sample: str, slide_path, mpp: float, mpp_source: str, plans, strategy: str, dims) -> dict:
    return {"sample": sample, "slide": str(slide_path), "mpp": float(mpp), "mpp_source": mpp_source,
            "fov_um": [p.fov0 * mpp for p in plans], "fov_px": [p.fov0 for p in plans],
            "size_px": [p.size_px for p in plans], "levels": [p.level for p in plans],
            "strategy": strategy, "slide_bytes": os.path.getsize(slide_path),
            "slide_width": int(dims[0]), "slide_height": int(dims[1])}


def tile_slide(sample: str, slide_path, spots, mpp: float, views: list[View], out_path, *,
               workers: int = 1, strategy: str = "pyramid", provenance: dict | None = None,
               mpp_source: str = "", progress: bool = True, max_upscale: float = MAX_UPSCALE,
               allow_upscale: bool = False) -> dict:
    """Tile every spot of ``spots`` (DataFrame with spot_id, x, y) into the bundle ``out_path``.

    Rows of the bundle follow the rows of ``spots``. Spots whose views reach outside the slide
    are padded with white and flagged; all spots outside the slide is an error.
    """
    with open_slide(slide_path, sample) as slide:
        dims = slide.dimensions
        downsamples = list(slide.level_downsamples)
    xy = spots[["x", "y"]].to_numpy(np.float64)
    _check_spots_inside(xy, dims, slide_path, sample)
    plans = plan_views(views, mpp, downsamples, strategy)
    _check_plans(plans, dims, mpp, slide_path, sample, max_upscale, allow_upscale)
    attrs = _bundle_attrs(sample, slide_path, mpp, mpp_source, plans, strategy, dims)
    padded_any = 0
    stats: dict = {}
    # HEST's coords: the top-left corner of view 0, exactly where the reader starts it.
    corners = np.array([view_origin(cx, cy, plans[0])[:2] for cx, cy in xy.tolist()], np.int64).reshape(-1, 2)
    with BundleWriter(out_path, spots["spot_id"].astype(str).tolist(), np.round(xy).astype(np.int64), corners,
                      [p.size_px for p in plans], attrs, provenance,
                      patch_size_level0=int(round(plans[0].fov0))) as writer:
        bar = tqdm(total=len(xy), desc=f"tiling {sample}", unit="spot", disable=not progress, mininterval=2)
        chunks = iter_chunks(str(slide_path), xy, plans, workers, stats)
        for idx, arrays, padded, tissue, digests in _damaged_slide_is_input_error(chunks, slide_path, sample):
            writer.write(idx, arrays, padded, tissue, digests)
            padded_any += int(padded.any(axis=1).sum())
            bar.update(len(idx))
        bar.close()
        check_not_blank(sample, writer._tissue, slide_path)
    log.info("%s: %d spots tiled, %d with a view padded past the slide edge (read through %s, %d tiles decoded)",
             sample, len(xy), padded_any, stats.get("reader"), stats.get("tiles_decoded", 0))
    return {"n_spots": len(xy), "n_padded": padded_any, "plans": plans, "reader": stats.get("reader"),
            "tiles_decoded": stats.get("tiles_decoded", 0)}
