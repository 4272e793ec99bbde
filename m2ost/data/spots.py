"""Spot tables: where each spot is on the slide, read from the platform's position file.

A spot table has one row per spot in a fixed order (the order of the bundle rows):
``spot_id``, ``x``, ``y`` (spot centre in level-0 pixels of the slide), ``array_row``,
``array_col`` (grid indices, NaN when unknown). It is written as ``results/spots/{sample}.tsv``
and depends only on the position file, so a changed count file never re-tiles a slide.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pandas as pd

from m2ost.atomic import atomic_path
from m2ost.errors import InputError

log = logging.getLogger(__name__)

COLUMNS = ["spot_id", "x", "y", "array_row", "array_col"]
# Centre-to-centre distance of neighbouring spots, µm, per unit step of the array index.
# Legacy ST: square grid, 200 µm in both directions. Visium: hexagonal grid of 100 µm pitch;
# array_col advances by 2 between neighbours in a row, rows are 100 * sin(60°) µm apart.
GRID_PITCH_UM = {
    "legacy_st": {"col": 200.0, "row": 200.0},
    "visium": {"col": 50.0, "row": 100.0 * np.sqrt(3) / 2},
}
VISIUM_SPOT_DIAMETER_UM = 55.0


def _check_columns(df: pd.DataFrame, needed: list[str], file, sample) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise InputError(f"spot table lacks column(s) {', '.join(missing)}; has {', '.join(map(str, df.columns))}",
                         file=file, sample=sample)


def _read_table(path, sample, **kwargs) -> pd.DataFrame:
    if not os.path.isfile(path):
        raise InputError("spot position file not found", file=path, sample=sample)
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"cannot parse spot position file: {err}".splitlines()[0], file=path, sample=sample) from None


def read_legacy_st_positions(path, sample: str | None = None) -> pd.DataFrame:
    """Spot selection table of legacy ST (HER2+, cSCC): ``x y ... pixel_x pixel_y [selected]``.

    Spot ids are ``f"{x}x{y}"``, the key of the count table rows.
    """
    df = _read_table(path, sample, sep="\t")
    _check_columns(df, ["x", "y", "pixel_x", "pixel_y"], path, sample)
    if "selected" in df.columns:
        dropped = int((df["selected"] != 1).sum())
        if dropped:
            log.info("%s: %d spots not selected (off tissue) dropped", sample, dropped)
        df = df[df["selected"] == 1]
    for c in ("x", "y", "pixel_x", "pixel_y"):
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise InputError(f"column {c} is not numeric", file=path, sample=sample)
    ids = df["x"].round().astype(int).astype(str) + "x" + df["y"].round().astype(int).astype(str)
    return pd.DataFrame({"spot_id": ids.to_numpy(), "x": df["pixel_x"].to_numpy(float),
                         "y": df["pixel_y"].to_numpy(float), "array_row": df["y"].to_numpy(float),
                         "array_col": df["x"].to_numpy(float)})


_VISIUM_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def read_visium_positions(path, sample: str | None = None, in_tissue_only: bool = True) -> pd.DataFrame:
    """Space Ranger ``tissue_positions.csv`` (with header) or ``tissue_positions_list.csv`` (without)."""
    if not os.path.isfile(path):
        raise InputError("spot position file not found", file=path, sample=sample)
    with open(path) as handle:
        first = handle.readline()
    has_header = first.split(",")[0].strip() == "barcode"
    df = _read_table(path, sample, header=0 if has_header else None)
    if not has_header:
        if df.shape[1] != len(_VISIUM_COLUMNS):
            raise InputError(f"expected {len(_VISIUM_COLUMNS)} columns in a headerless tissue positions list, "
                             f"found {df.shape[1]}", file=path, sample=sample)
        df.columns = _VISIUM_COLUMNS
    _check_columns(df, _VISIUM_COLUMNS, path, sample)
    if in_tissue_only:
        off = int((df["in_tissue"] != 1).sum())
        if off:
            log.info("%s: %d off-tissue spots dropped", sample, off)
        df = df[df["in_tissue"] == 1]
    return pd.DataFrame({"spot_id": df["barcode"].astype(str).to_numpy(),
                         "x": pd.to_numeric(df["pxl_col_in_fullres"], errors="coerce").to_numpy(float),
                         "y": pd.to_numeric(df["pxl_row_in_fullres"], errors="coerce").to_numpy(float),
                         "array_row": df["array_row"].to_numpy(float),
                         "array_col": df["array_col"].to_numpy(float)})


def visium_scalefactors_path(positions) -> str:
    """Where Space Ranger puts ``scalefactors_json.json``: beside the tissue positions file."""
    return os.path.join(os.path.dirname(str(positions)), "scalefactors_json.json")


def read_visium_scalefactors(path, sample: str | None = None) -> dict:
    """Space Ranger's ``scalefactors_json.json``; ``spot_diameter_fullres`` must be a positive number."""
    if not os.path.isfile(path):
        raise InputError("Visium scalefactors_json.json not found (Space Ranger writes it to outs/spatial, "
                         "beside tissue_positions.csv; copy it there)", file=path, sample=sample)
    try:
        with open(path) as handle:
            factors = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"scalefactors is not valid JSON: {err}", file=path, sample=sample) from None
    if not isinstance(factors, dict) or "spot_diameter_fullres" not in factors:
        raise InputError("scalefactors lacks spot_diameter_fullres", file=path, sample=sample)
    try:
        diameter = float(factors["spot_diameter_fullres"])
    except (TypeError, ValueError):
        diameter = float("nan")
    if not (np.isfinite(diameter) and diameter > 0):
        raise InputError(f"spot_diameter_fullres must be a positive number, got {factors['spot_diameter_fullres']!r}",
                         file=path, sample=sample)
    return factors


# Relative disagreement between the resolution implied by spot_diameter_fullres and the one
# estimated from the spot grid above which the spots stage warns.
MPP_DISAGREEMENT = 0.10


def check_visium_scale(table: pd.DataFrame, factors: dict, scalefactors_path, sample: str | None = None) -> dict:
    """Compare the µm per pixel implied by ``spot_diameter_fullres`` (a 55 µm spot) with the grid estimate.

    Returns both values (None where not computable). A disagreement of more than 10 % means the
    positions and the scale factors come from different runs or images: warned, not fatal, since
    the tiler uses the slide's own resolution.
    """
    from_diameter = VISIUM_SPOT_DIAMETER_UM / float(factors["spot_diameter_fullres"])
    try:
        from_grid = estimate_mpp_from_grid(table, "visium", sample)
    except InputError as err:
        log.info("%s: grid estimate of the resolution unavailable (%s); scalefactors give %.4f µm/px",
                 sample, err.problem, from_diameter)
        return {"mpp_from_spot_diameter": from_diameter, "mpp_from_grid": None}
    gap = abs(from_grid - from_diameter) / from_grid
    if gap > MPP_DISAGREEMENT:
        log.warning("%s: spot_diameter_fullres in %s implies %.4f µm/px but the spot grid gives %.4f µm/px "
                    "(%.0f%% apart): positions and scale factors may come from different Space Ranger runs",
                    sample, scalefactors_path, from_diameter, from_grid, 100 * gap)
    else:
        log.info("%s: %.4f µm/px from spot_diameter_fullres, %.4f µm/px from the spot grid", sample,
                 from_diameter, from_grid)
    return {"mpp_from_spot_diameter": from_diameter, "mpp_from_grid": from_grid}


def read_h5ad_positions(path, sample: str | None = None) -> pd.DataFrame:
    """Spot centres of an AnnData file (HEST-1k): ``obsm["spatial"]`` holds (x, y) in level-0 px."""
    import anndata

    if not os.path.isfile(path):
        raise InputError("h5ad file not found", file=path, sample=sample)
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as err:  # h5py/anndata raise many types for a broken file
        raise InputError(f"cannot read h5ad: {type(err).__name__}: {err}".splitlines()[0],
                         file=path, sample=sample) from None
    try:
        if "spatial" not in adata.obsm:
            raise InputError('h5ad has no obsm["spatial"] with the spot centres', file=path, sample=sample)
        xy = np.asarray(adata.obsm["spatial"], dtype=float)
        if xy.ndim != 2 or xy.shape[1] < 2:
            raise InputError(f'obsm["spatial"] must be (n_spots, 2), got {xy.shape}', file=path, sample=sample)
        obs = adata.obs
        if "in_tissue" in obs.columns:
            keep = obs["in_tissue"].to_numpy() == 1
        else:
            keep = np.ones(len(obs), bool)
        nan = np.full(len(obs), np.nan)
        row = obs["array_row"].to_numpy(float) if "array_row" in obs.columns else nan
        col = obs["array_col"].to_numpy(float) if "array_col" in obs.columns else nan
        return pd.DataFrame({"spot_id": np.asarray(adata.obs_names, dtype=str)[keep], "x": xy[keep, 0],
                             "y": xy[keep, 1], "array_row": row[keep], "array_col": col[keep]})
    finally:
        adata.file.close()


def read_positions(fmt: str, path, sample: str | None = None, in_tissue_only: bool = True,
                   scalefactors=None) -> pd.DataFrame:
    """Read a spot table of any supported format and check it.

    Visium needs Space Ranger's ``scalefactors_json.json`` (``scalefactors``; by default beside
    the positions file): its spot diameter is checked against the spot grid.
    """
    if fmt == "legacy_st":
        table = read_legacy_st_positions(path, sample)
    elif fmt == "visium":
        table = read_visium_positions(path, sample, in_tissue_only)
        scalefactors = scalefactors or visium_scalefactors_path(path)
        factors = read_visium_scalefactors(scalefactors, sample)
        table = check_spots(table, path, sample)
        check_visium_scale(table, factors, scalefactors, sample)
        return table
    elif fmt == "h5ad":
        table = read_h5ad_positions(path, sample)
    else:
        raise InputError(f"unknown expression format {fmt!r}", file=path, sample=sample)
    return check_spots(table, path, sample)


def check_spots(table: pd.DataFrame, file, sample) -> pd.DataFrame:
    """Refuse empty tables, duplicate ids and NaN or negative centres."""
    if len(table) == 0:
        raise InputError("no spots (after dropping off-tissue spots)", file=file, sample=sample)
    dup = table["spot_id"].duplicated(keep=False)
    if dup.any():
        examples = ", ".join(table.loc[dup, "spot_id"].unique()[:3])
        raise InputError(f"{int(table['spot_id'].duplicated().sum())} duplicate spot id(s), e.g. {examples}",
                         file=file, sample=sample)
    xy = table[["x", "y"]].to_numpy(float)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise InputError(f"{int(bad.sum())} spot(s) with missing or non-numeric centre, e.g. "
                         f"{table.loc[bad, 'spot_id'].iloc[0]}", file=file, sample=sample)
    neg = (xy < 0).any(axis=1)
    if neg.any():
        raise InputError(f"{int(neg.sum())} spot(s) with negative pixel coordinates, e.g. "
                         f"{table.loc[neg, 'spot_id'].iloc[0]}", file=file, sample=sample)
    return table.reset_index(drop=True)


def write_spots(table: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        table[COLUMNS].to_csv(tmp, sep="\t", index=False, float_format="%.3f")


def read_spots(path, sample: str | None = None) -> pd.DataFrame:
    table = _read_table(path, sample, sep="\t", dtype={"spot_id": str}, keep_default_na=False,
                        na_values=[""])
    _check_columns(table, COLUMNS, path, sample)
    return table


def estimate_mpp_from_grid(table: pd.DataFrame, fmt: str, sample: str | None = None) -> float:
    """µm per pixel from the spot grid: a least-squares affine map array index -> pixel.

    The length of the pixel step per array column (and per array row) is compared with the
    platform's known pitch. Needs at least 6 spots on at least 2 rows and 2 columns.
    """
    if fmt not in GRID_PITCH_UM:
        raise InputError(f"cannot estimate the resolution from the spot grid of format {fmt!r}; "
                         "give mpp in the sample sheet", sample=sample)
    grid = table[["array_col", "array_row"]].to_numpy(float)
    px = table[["x", "y"]].to_numpy(float)
    ok = np.isfinite(grid).all(axis=1)
    grid, px = grid[ok], px[ok]
    if len(grid) < 6 or len(np.unique(grid[:, 0])) < 2 or len(np.unique(grid[:, 1])) < 2:
        raise InputError(f"too few spots ({len(grid)}) on the grid to estimate the resolution; "
                         "give mpp in the sample sheet", sample=sample)
    design = np.column_stack([grid, np.ones(len(grid))])
    coef, *_ = np.linalg.lstsq(design, px, rcond=None)
    px_per_col = float(np.hypot(*coef[0]))
    px_per_row = float(np.hypot(*coef[1]))
    pitch = GRID_PITCH_UM[fmt]
    estimates = [pitch["col"] / px_per_col, pitch["row"] / px_per_row]
    if not all(np.isfinite(estimates)) or min(estimates) <= 0:
        raise InputError("spot grid is degenerate; cannot estimate the resolution, give mpp in the sample sheet",
                         sample=sample)
    return float(np.mean(estimates))
