"""Slides: open them with OpenSlide, resolve their resolution, convert plain images."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from m2ost.atomic import atomic_path
from m2ost.data.resolution import (
    MPP_RANGE,
    check_plausible,
    estimate_mpp_from_grid,
    reconcile,
)
from m2ost.data.spots import (
    SPOT_DIAMETER_FULLRES_UM,
    read_spots,
    read_visium_scalefactors,
    slide_scale_factor,
)
from m2ost.errors import InputError
from m2ost.plan.formats import TIFF_EXTENSIONS

log = logging.getLogger(__name__)

def open_slide(path, sample: str | None = None):
    """Open a slide with OpenSlide, or raise InputError naming the file and the problem."""
    import openslide

    if not os.path.isfile(path):
        raise InputError("slide not found", file=path, sample=sample)
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise InputError("OpenSlide cannot read this slide (unsupported or not a pyramidal image)",
                         file=path, sample=sample) from None
    except openslide.OpenSlideError as err:
        raise InputError(f"slide is corrupt or unreadable: {err}", file=path, sample=sample) from None


def metadata_mpp(slide) -> float | None:
    """µm per pixel from the slide's metadata (``openslide.mpp-x``/``-y``), or None."""
    import openslide

    values = []
    for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
        try:
            values.append(float(slide.properties[key]))
        except (KeyError, ValueError):
            return None
    if not all(v > 0 for v in values):
        return None
    return sum(values) / len(values)


def plain_image_mpp(path) -> float | None:
    """µm per pixel from a plain TIFF's resolution tags (JPEG/PNG densities are unreliable: often 72 dpi)."""
    if Path(path).suffix.lower() not in TIFF_EXTENSIONS:
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            tags = tif.pages[0].tags
            unit = tags.get("ResolutionUnit")
            xres = tags.get("XResolution")
            if unit is None or xres is None:
                return None
            num, den = xres.value
            per_unit = num / den if den else 0
            scale = {2: 25400.0, 3: 10000.0}.get(int(unit.value))
            if not per_unit or scale is None:
                return None
            return scale / per_unit
    except (tifffile.TiffFileError, OSError, ValueError):
        return None


def read_hest_metadata(path, sample: str | None = None) -> dict:
    """A HEST-1k ``metadata/{id}.json``: ``pixel_size_um_estimated`` (the µm/px HEST's own reader
    uses) must be a number; ``inter_spot_dist`` (µm) is the array's pitch when present."""
    try:
        with open(path) as handle:
            meta = json.load(handle)
    except FileNotFoundError:
        raise InputError("HEST metadata not found (HEST-1k keeps it in metadata/{id}.json)", file=path,
                         sample=sample) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"HEST metadata is not valid JSON: {err}", file=path, sample=sample) from None
    try:
        meta["pixel_size_um_estimated"] = float(meta["pixel_size_um_estimated"])
    except (TypeError, KeyError, ValueError):
        raise InputError("HEST metadata lacks a numeric pixel_size_um_estimated", file=path, sample=sample) from None
    return meta


def resolve_mpp(sample: str, metadata: float | None, sheet: float | None, spots=None, fmt: str = "",
                file=None, *, override_name: str = "sample sheet", extra: list | None = None,
                pitch_um: float | None = None, mpp_range=MPP_RANGE) -> tuple[float, str]:
    """Choose the resolution: the override (sample sheet or ``--mpp``), else slide metadata, else
    ``extra`` sources in order (HEST metadata, Visium scale factors), else the spot grid.

    Every source that gives a value is compared (a disagreement is logged with all values), and
    the chosen one must be plausible (``mpp_range``). Returns (mpp, source), logged and stored.
    """
    missing = "no mpp in the sample sheet" if override_name == "sample sheet" else f"no {override_name}"
    candidates = []
    if sheet:
        candidates.append((override_name, float(sheet)))
    if metadata:
        candidates.append(("slide metadata", float(metadata)))
    candidates += [(name, float(value)) for name, value in (extra or [])]
    if spots is not None and fmt:
        try:
            candidates.append((f"{fmt} spot grid", estimate_mpp_from_grid(spots, fmt, sample, pitch_um)))
        except InputError as err:
            if not candidates:
                raise InputError(f"slide has no resolution metadata and {missing}, and "
                                 f"{err.problem}", file=file, sample=sample) from None
            log.info("%s: no grid estimate of the resolution (%s)", sample, err.problem)
    if not candidates:
        raise InputError(f"slide has no resolution metadata and {missing} "
                         "(and no spot grid to estimate it from)", file=file, sample=sample)
    mpp, source = reconcile(sample, candidates)
    check_plausible(mpp, source, mpp_range, file=file, sample=sample)
    if source.endswith("spot grid"):
        source = f"estimated from the {source}"
    return mpp, source


def describe_slide(slide) -> dict:
    return {"width": int(slide.dimensions[0]), "height": int(slide.dimensions[1]),
            "level_count": int(slide.level_count),
            "level_downsamples": [float(d) for d in slide.level_downsamples],
            "vendor": slide.properties.get("openslide.vendor", "")}


def extra_mpp_sources(sample: str, fmt: str, *, scalefactors=None, slide_scale=None, hest_metadata=None) -> list:
    """Resolutions the expression source states: HEST's ``pixel_size_um_estimated``, and for Visium
    the full-resolution µm/px of ``spot_diameter_fullres`` (a 65 µm spot) over the slide's scale."""
    out = []
    if hest_metadata:
        out.append(("HEST metadata", read_hest_metadata(hest_metadata, sample)["pixel_size_um_estimated"]))
    if fmt == "visium" and scalefactors:
        factors = read_visium_scalefactors(scalefactors, sample)
        scale = slide_scale_factor(slide_scale, factors, scalefactors, sample)
        what = "Visium scale factors" + (f" ({slide_scale})" if scale != 1.0 else "")
        out.append((what, SPOT_DIAMETER_FULLRES_UM / (float(factors["spot_diameter_fullres"]) * scale)))
    return out


def prepare_slide(sample: str, slide_path, out_json, *, converted_path=None, sheet_mpp: float | None = None,
                  spots_tsv=None, fmt: str = "", tile_size: int = 256, jpeg_quality: int = 90,
                  override_name: str = "sample sheet", scalefactors=None, slide_scale=None, hest_metadata=None,
                  array_pitch_um: float | None = None, mpp_range=MPP_RANGE) -> dict:
    """Make a slide readable by OpenSlide and record its resolution in ``out_json``.

    With ``converted_path`` the slide is a plain image and is written there as a pyramidal
    TIFF carrying the resolution. The JSON names the slide the later stages read.
    """
    spots = read_spots(spots_tsv, sample) if spots_tsv else None
    if not os.path.isfile(slide_path):
        raise InputError("slide not found", file=slide_path, sample=sample)
    if hest_metadata and not array_pitch_um:
        try:  # HEST's inter_spot_dist (µm) is the array's pitch; absent or odd, the platform default holds
            array_pitch_um = float(read_hest_metadata(hest_metadata, sample).get("inter_spot_dist")) or None
        except (TypeError, ValueError):
            array_pitch_um = None
    extra = extra_mpp_sources(sample, fmt, scalefactors=scalefactors, slide_scale=slide_scale,
                              hest_metadata=hest_metadata)
    choose = {"override_name": override_name, "extra": extra, "pitch_um": array_pitch_um,
              "mpp_range": tuple(mpp_range)}
    if converted_path:
        from m2ost.data.convert import convert_to_pyramid

        mpp, source = resolve_mpp(sample, plain_image_mpp(slide_path), sheet_mpp, spots, fmt, slide_path, **choose)
        log.info("%s: converting %s to a pyramidal TIFF at %.4f µm/px (%s)", sample, slide_path, mpp, source)
        try:
            convert_to_pyramid(slide_path, converted_path, mpp, tile=tile_size, quality=jpeg_quality)
        except InputError as err:
            raise InputError(err.problem, file=err.file or slide_path, sample=sample) from None
        readable = converted_path
    else:
        readable = slide_path
        with open_slide(slide_path, sample) as slide:
            mpp, source = resolve_mpp(sample, metadata_mpp(slide), sheet_mpp, spots, fmt, slide_path, **choose)
    with open_slide(readable, sample) as slide:
        info = {"sample": sample, "slide": str(readable), "source_slide": str(slide_path),
                "mpp": mpp, "mpp_source": source, "array_pitch_um": array_pitch_um, **describe_slide(slide)}
    log.info("%s: %d x %d px, %d levels, %.4f µm/px (%s)", sample, info["width"], info["height"],
             info["level_count"], mpp, source)
    with atomic_path(out_json) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def read_slide_info(path, sample: str | None = None) -> dict:
    """The JSON written by :func:`prepare_slide`, checked for the keys the later stages use."""
    try:
        with open(path) as handle:
            info = json.load(handle)
    except FileNotFoundError:
        raise InputError("slide info not found (run the slide preparation stage)", file=path, sample=sample) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"unreadable slide info ({err}); delete it and rerun the slide preparation stage",
                         file=path, sample=sample) from None
    missing = [k for k in ("slide", "mpp") if not isinstance(info, dict) or k not in info]
    if missing:
        raise InputError(f"slide info lacks {', '.join(missing)}; delete it and rerun the slide preparation stage",
                         file=path, sample=sample)
    info.setdefault("mpp_source", "")
    return info
