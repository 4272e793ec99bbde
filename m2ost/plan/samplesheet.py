"""The sample sheet: one row per slide, read with the standard library only.

The Snakefile imports this module while it plans the workflow, possibly from an
environment that has snakemake but none of the scientific packages, so nothing
here may import numpy, pandas or the like.

Columns
-------
sample      unique name (letters, digits, ``_ . -``)
patient     patient (or donor) the slide comes from; leave-one-patient-out groups on it
slide       path of the H&E slide (any OpenSlide format, or a plain JPEG/PNG/TIFF)
slide       path of the H&E slide (any OpenSlide format, or a plain JPEG/PNG/TIFF); for Visium also
            Space Ranger's ``tissue_hires_image.png`` / ``tissue_lowres_image.png`` (the spot
            centres are scaled by ``tissue_hires_scalef`` / ``tissue_lowres_scalef``); for
            ``hest`` it may be empty (``wsis/{id}.tif`` of the HEST root)
format      expression source: ``visium``, ``legacy_st``, ``h5ad``, ``hest``, or empty (H&E only)
counts      visium: ``filtered_feature_bc_matrix.h5`` or the Space Ranger ``outs`` folder;
            legacy_st: the spots x genes count table (.tsv or .tsv.gz); h5ad: the .h5ad file;
            hest: the HEST-1k root folder (with ``st/``, ``wsis/``, ``metadata/``)
positions   visium: ``tissue_positions.csv`` / ``tissue_positions_list.csv`` (found in
            ``outs/spatial`` when empty); legacy_st: the spot selection table; h5ad, hest: empty
mpp         optional µm per pixel; overrides the slide's metadata when given
slide_scale optional: the slide is the full-resolution image downscaled by this factor (0 < f <= 1);
            the spot centres of the positions file are multiplied by it
array_pitch_um  optional centre-to-centre distance of neighbouring spots of the array, µm
            (default: 200 legacy ST, 100 Visium); used to estimate the resolution from the grid
hest_id     optional HEST-1k sample id (default: the sample name)

Relative paths resolve against ``data_root``; absolute paths are kept.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from m2ost.errors import InputError

FORMATS = ("visium", "legacy_st", "h5ad", "hest")
REQUIRED_COLUMNS = ("sample", "patient", "slide")
OPTIONAL_COLUMNS = ("format", "counts", "positions", "mpp", "slide_scale", "array_pitch_um", "hest_id")
# Space Ranger's downscaled images and the scale factor (in scalefactors_json.json) of each.
SPACE_RANGER_IMAGES = {"tissue_hires_image.png": "tissue_hires_scalef",
                       "tissue_lowres_image.png": "tissue_lowres_scalef"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Sample:
    """One row of the sample sheet, with paths resolved."""

    sample: str
    patient: str
    slide: str
    format: str = ""
    counts: str = ""
    positions: str = ""
    mpp: float | None = None
    slide_scale: float | None = None
    array_pitch_um: float | None = None
    hest_id: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def has_expression(self) -> bool:
        return bool(self.format)

    @property
    def scale_source(self) -> str:
        """How the spot centres reach the slide's pixels: ``""`` (as given), a number (the
        ``slide_scale`` column) or the Space Ranger scale factor key of a hires/lowres image."""
        if self.slide_scale:
            return repr(self.slide_scale)
        if self.format == "visium":
            return SPACE_RANGER_IMAGES.get(os.path.basename(self.slide), "")
        return ""

    def hest_files(self) -> dict[str, str]:
        """A HEST-1k sample's files under its root (``counts``), as HEST's own reader finds them."""
        root, name = self.counts, self.hest_id or self.sample
        return {"counts": os.path.join(root, "st", f"{name}.h5ad"),
                "positions": os.path.join(root, "st", f"{name}.h5ad"),
                "metadata": os.path.join(root, "metadata", f"{name}.json"),
                "slide": os.path.join(root, "wsis", f"{name}.tif")}

    def expression_files(self) -> dict[str, str]:
        """The files the expression source consists of, by role.

        ``positions`` (and ``scalefactors`` for Visium) define the spots; ``counts`` holds
        the counts. The split lets a changed count file rerun only the expression stage.
        """
        if not self.format:
            return {}
        if self.format == "h5ad":
            return {"counts": self.counts, "positions": self.counts}
        if self.format == "hest":
            files = self.hest_files()
            return {role: files[role] for role in ("counts", "positions", "metadata")}
        if self.format == "legacy_st":
            return {"counts": self.counts, "positions": self.positions}
        counts, positions = self.counts, self.positions
        if os.path.isdir(counts) or not counts.endswith(".h5"):
            outs = counts
            counts = os.path.join(outs, "filtered_feature_bc_matrix.h5")
            if not positions:
                spatial = os.path.join(outs, "spatial")
                positions = os.path.join(spatial, "tissue_positions.csv")
                legacy = os.path.join(spatial, "tissue_positions_list.csv")
                if not os.path.exists(positions) and os.path.exists(legacy):
                    positions = legacy
        files = {"counts": counts, "positions": positions}
        files["scalefactors"] = os.path.join(os.path.dirname(positions), "scalefactors_json.json")
        return files


def _resolve(path: str, root: Path) -> str:
    if not path:
        return ""
    p = Path(os.path.expanduser(path))
    return os.path.normpath(p if p.is_absolute() else root / p)


def _raw_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError("sample sheet not found", file=path)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(
            (line for line in handle if line.strip() and not line.startswith("#")),
            delimiter="\t"))
    if not rows:
        raise InputError("sample sheet has no rows", file=path)
    return rows


def sheet_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows as ``m2ost/schemas/samples.schema.yaml`` describes them: every value a stripped
    string, ``format`` in lower case (as :func:`read_sample_sheet` reads them)."""
    out = []
    for row in _raw_rows(Path(path)):
        row = {k: (v or "").strip() for k, v in row.items() if k is not None}
        if "format" in row:
            row["format"] = row["format"].lower()
        out.append(row)
    return out


def read_sample_sheet(path: str | os.PathLike, data_root: str | os.PathLike = ".") -> list[Sample]:
    """Read and check a tab-separated sample sheet.

    Raises
    ------
    InputError
        Missing columns, bad names, duplicate samples, two samples on one slide,
        an unknown format, a missing counts path, or a non-numeric ``mpp``.
    """
    path = Path(path)
    root = Path(data_root)
    rows = _raw_rows(path)
    columns = list(rows[0].keys())
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"sample sheet lacks column(s) {', '.join(missing)}; has {', '.join(columns)}",
                         file=path)
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    slides: dict[str, str] = {}
    for line_no, row in enumerate(rows, start=2):
        row = {k: (v or "").strip() for k, v in row.items() if k is not None}
        sample = _row_sample(row, line_no, path, root, seen)
        same = os.path.realpath(sample.slide)  # one file reached by two spellings or a link is one slide
        if same in slides:
            raise InputError(f"line {line_no}: slide {row['slide']} is already used by sample {slides[same]}",
                             file=path, sample=sample.sample)
        slides[same] = sample.sample
        samples.append(sample)
    return samples


def _check_name(row: dict, line_no: int, path, seen: dict[str, int]) -> str:
    """The row's sample name, checked (letters, digits, '_', '.', '-'; not seen before) and noted in ``seen``."""
    name = row["sample"]
    if not _NAME.match(name):
        raise InputError(f"line {line_no}: sample name {name!r} must use letters, digits, '_', '.', '-'",
                         file=path, sample=name or None)
    if name in seen:
        raise InputError(f"duplicate sample name (lines {seen[name]} and {line_no})", file=path, sample=name)
    seen[name] = line_no
    return name


def _check_paths(row: dict, fmt: str, line_no: int, path, name: str) -> None:
    """A patient, a slide (a HEST sample's may be empty), a known format and the files it needs."""
    if not row["patient"]:
        raise InputError(f"line {line_no}: empty patient", file=path, sample=name)
    if not row["slide"] and fmt != "hest":
        raise InputError(f"line {line_no}: empty slide path", file=path, sample=name)
    if fmt and fmt not in FORMATS:
        raise InputError(f"line {line_no}: unknown format {fmt!r}; use one of {', '.join(FORMATS)} or leave empty",
                         file=path, sample=name)
    if fmt and not row.get("counts"):
        raise InputError(f"line {line_no}: format {fmt} needs a counts path", file=path, sample=name)
    if fmt == "legacy_st" and not row.get("positions"):
        raise InputError(f"line {line_no}: legacy_st needs the spot selection table in 'positions'",
                         file=path, sample=name)


def _row_sample(row: dict, line_no: int, path, root: Path, seen: dict[str, int]) -> Sample:
    """One checked row as a :class:`Sample`, its paths resolved against ``root``."""
    name = _check_name(row, line_no, path, seen)
    fmt = row.get("format", "").lower()
    _check_paths(row, fmt, line_no, path, name)
    mpp, scale, pitch = (_positive(row, key, line_no, path, name) for key in ("mpp", "slide_scale",
                                                                               "array_pitch_um"))
    if scale and scale > 1:
        raise InputError(f"line {line_no}: slide_scale is the factor by which the slide is smaller than the "
                         f"full-resolution image (0 < slide_scale <= 1), got {scale}", file=path, sample=name)
    counts = _resolve(row.get("counts", ""), root)
    if fmt == "hest" and not row["slide"]:
        slide = Sample(name, row["patient"], "", fmt, counts, hest_id=row.get("hest_id", "")).hest_files()["slide"]
    else:
        slide = _resolve(row["slide"], root)
    extra = {k: v for k, v in row.items() if k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS}
    return Sample(sample=name, patient=row["patient"], slide=slide, format=fmt, counts=counts,
                  positions=_resolve(row.get("positions", ""), root), mpp=mpp, slide_scale=scale,
                  array_pitch_um=pitch, hest_id=row.get("hest_id", ""), extra=extra)


def _positive(row: dict, key: str, line_no: int, path, name: str) -> float | None:
    """An optional positive number column (empty: None)."""
    if not row.get(key):
        return None
    try:
        value = float(row[key])
    except ValueError:
        raise InputError(f"line {line_no}: {key} {row[key]!r} is not a number", file=path, sample=name) from None
    if not value > 0:
        raise InputError(f"line {line_no}: {key} must be positive, got {value}", file=path, sample=name)
    return value
