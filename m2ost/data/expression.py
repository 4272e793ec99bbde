"""Expression: read raw counts, align them with the spot table, QC and normalise with scanpy.

Output ``results/expression/{sample}.h5ad``: obs = spots in bundle order (``bundle_row`` is the
row of the spot in the bundle), X = ``log1p(normalize_total(counts))`` sparse float32,
``layers["counts"]`` = raw counts, ``obsm["spatial"]`` = spot centres (x, y) in level-0 px.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pandas as pd
import scipy.sparse as sp

from m2ost import defaults
from m2ost.atomic import atomic_path
from m2ost.data.spatial import expression_unit
from m2ost.errors import InputError

log = logging.getLogger(__name__)


def _counts_error(problem, path, sample):
    return InputError(problem, file=path, sample=sample)


def read_legacy_st_counts(path, sample=None):
    """Spots x genes count table (tab-separated, optionally gzipped); first column = spot id."""
    import anndata

    if not os.path.isfile(path):
        raise _counts_error("count table not found", path, sample)
    try:
        df = pd.read_csv(path, sep="\t", index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError, EOFError) as err:
        raise _counts_error(f"cannot parse count table: {err}".splitlines()[0], path, sample) from None
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise _counts_error(f"empty count matrix ({df.shape[0]} spots x {df.shape[1]} genes)", path, sample)
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        col = bad[0]
        value = pd.to_numeric(df[col], errors="coerce")
        example = df[col][value.isna() & df[col].notna()]
        shown = f" (e.g. {example.iloc[0]!r} at spot {example.index[0]})" if len(example) else ""
        raise _counts_error(f"non-numeric counts in {len(bad)} gene column(s), first {col}{shown}", path, sample)
    ids = df.index.astype(str)
    matrix = sp.csr_matrix(df.to_numpy(np.float32))
    return anndata.AnnData(X=matrix, obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=df.columns.astype(str)))


def read_visium_counts(path, sample=None):
    import scanpy as sc

    if not os.path.isfile(path):
        raise _counts_error("filtered_feature_bc_matrix.h5 not found", path, sample)
    try:
        adata = sc.read_10x_h5(path)
    except Exception as err:  # h5py / scanpy raise many types for a broken file
        raise _counts_error(f"cannot read 10x matrix: {type(err).__name__}: {err}".splitlines()[0],
                            path, sample) from None
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def read_h5ad_counts(path, sample=None):
    import anndata

    if not os.path.isfile(path):
        raise _counts_error("h5ad file not found", path, sample)
    try:
        adata = anndata.read_h5ad(path)
    except Exception as err:
        raise _counts_error(f"cannot read h5ad: {type(err).__name__}: {err}".splitlines()[0], path, sample) from None
    counts = adata.layers.get("counts", adata.X)
    out = anndata.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=pd.DataFrame(index=adata.obs_names),
                          var=pd.DataFrame(index=adata.var_names))
    return out


READERS = {"legacy_st": read_legacy_st_counts, "visium": read_visium_counts, "h5ad": read_h5ad_counts,
           "hest": read_h5ad_counts}


def check_counts(adata, path, sample) -> None:
    """Refuse NaN or negative counts and empty matrices; warn on non-integer values."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise _counts_error(f"empty count matrix ({adata.n_obs} spots x {adata.n_vars} genes)", path, sample)
    data = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X).ravel()
    if not np.isfinite(data).all():
        raise _counts_error(f"{int((~np.isfinite(data)).sum())} NaN or infinite count value(s)", path, sample)
    if (data < 0).any():
        raise _counts_error(f"{int((data < 0).sum())} negative count value(s)", path, sample)
    if data.size and not np.allclose(data, np.round(data)):
        log.warning("%s: counts are not integers (already normalised?); they are normalised again", sample)
    obs_dup = adata.obs_names.duplicated()
    if obs_dup.any():
        raise _counts_error(f"{int(obs_dup.sum())} duplicate spot id(s) in the count matrix, e.g. "
                            f"{adata.obs_names[obs_dup][0]}", path, sample)


def _read_checked(fmt: str, counts_path, sample: str):
    if fmt not in READERS:
        raise _counts_error(f"unknown expression format {fmt!r}", counts_path, sample)
    adata = READERS[fmt](counts_path, sample)
    check_counts(adata, counts_path, sample)
    adata.var_names_make_unique()
    return adata


def _align(adata, spot_ids: np.ndarray, counts_path, sample: str):
    """The count rows of the spots, in spot table (bundle) order with ``obs["bundle_row"]``; spots
    without counts and count rows without a spot are dropped and counted (none matched: an error).
    Returns (adata, spots without counts, count rows without a spot)."""
    position = pd.Series(np.arange(len(spot_ids)), index=spot_ids)
    counted = adata.obs_names.isin(spot_ids)
    matched = int(counted.sum())
    if matched == 0:
        raise _counts_error(f"spot ids do not match the counts: 0 of {len(spot_ids)} spots found among "
                            f"{adata.n_obs} count rows (e.g. spot {spot_ids[0]!r} vs count row "
                            f"{adata.obs_names[0]!r}){_id_hint(spot_ids, adata.obs_names)}", counts_path, sample)
    no_counts = len(spot_ids) - matched
    no_spot = adata.n_obs - matched
    if no_counts:
        log.warning("%s: %d of %d spots have no counts row: dropped", sample, no_counts, len(spot_ids))
    if no_spot:
        log.warning("%s: %d count rows have no spot position (or are off tissue): dropped", sample, no_spot)
    adata = adata[counted].copy()
    rows = position.loc[adata.obs_names].to_numpy()
    adata = adata[np.argsort(rows, kind="stable")].copy()
    adata.obs["bundle_row"] = position.loc[adata.obs_names].to_numpy().astype(np.int64)
    return adata, no_counts, no_spot


def _drop_low_counts(adata, min_counts: int, counts_path, sample: str):
    """``obs["total_counts"]`` set; spots under ``min_counts`` dropped. Returns (adata, how many)."""
    total = np.asarray(adata.X.sum(axis=1)).ravel()
    adata.obs["total_counts"] = total
    low = total < min_counts
    if low.any():
        log.warning("%s: %d spots under %d counts: dropped", sample, int(low.sum()), min_counts)
        adata = adata[~low].copy()
    if adata.n_obs == 0:
        raise _counts_error(f"no spot has at least {min_counts} counts", counts_path, sample)
    return adata, int(low.sum())


def _normalise(adata, target_sum: float) -> None:
    """Raw counts to ``layers["counts"]``; X = log1p(normalize_total), sparse float32."""
    import scanpy as sc

    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)


def build_expression(sample: str, fmt: str, counts_path, spots, out_path, *, min_counts: int | None = None,
                     target_sum: float | None = None, provenance: dict | None = None, spatial: dict | None = None):
    """Counts -> aligned, QC-filtered, normalised AnnData written to ``out_path``.

    ``spots`` is the spot table (bundle order). Spots without counts and count rows without
    a spot are dropped and counted; no match at all is an error. ``min_counts`` and
    ``target_sum`` default to the workflow's (``expression`` in the config schema). ``spatial``
    is the sample's ``uns["spatial"]`` entry (:func:`m2ost.data.spatial.spatial_entry`), for the viewers.
    """
    settings = defaults.merged("expression", {k: v for k, v in (("min_counts", min_counts),
                                                                ("target_sum", target_sum)) if v is not None})
    min_counts, target_sum = settings["min_counts"], settings["target_sum"]
    spot_ids = spots["spot_id"].astype(str).to_numpy()
    adata, no_counts, no_spot = _align(_read_checked(fmt, counts_path, sample), spot_ids, counts_path, sample)
    adata, low = _drop_low_counts(adata, min_counts, counts_path, sample)
    qc = quality(adata, len(spot_ids), no_counts, no_spot, low, min_counts)
    _normalise(adata, target_sum)
    table = spots.set_index(spots["spot_id"].astype(str))
    adata.obsm["spatial"] = table.loc[adata.obs_names, ["x", "y"]].to_numpy(np.float64)
    adata.uns["m2ost"] = {"sample": sample, "format": fmt, "counts": str(counts_path),
                          "min_counts": min_counts, "target_sum": target_sum,
                          "dropped_no_counts": no_counts, "dropped_no_spot": no_spot,
                          "dropped_low_counts": low, "unit": expression_unit(target_sum),
                          "provenance_json": _json(provenance), "qc_json": _json(qc)}
    # sc.pp.log1p's record that X is log-transformed (natural log) stays: scanpy reads it later
    adata.uns["log1p"] = {"base": None}
    if spatial:
        adata.uns["spatial"] = {sample: spatial}
    adata.uns["m2ost"]["content_digest"] = content_digest(adata)
    log.info("%s: %d spots x %d genes kept; median library size %.0f counts, %d genes detected", sample,
             adata.n_obs, adata.n_vars, qc["median_library_size"], qc["genes_detected"])
    with atomic_path(out_path) as tmp:
        adata.write_h5ad(tmp)
    return adata


def quality(adata, n_spots: int, no_counts: int, no_spot: int, low: int, min_counts: int) -> dict:
    """What a user should see of a section's data: spots kept and dropped (and why), the median
    library size and the genes detected (at least one count in a kept spot)."""
    counts = adata.X
    detected = int((np.asarray((counts > 0).sum(axis=0)).ravel() > 0).sum())
    return {"spots_in_table": int(n_spots), "spots_kept": int(adata.n_obs),
            "dropped_no_counts": int(no_counts), "count_rows_without_spot": int(no_spot),
            "dropped_low_counts": int(low), "min_counts": int(min_counts),
            "median_library_size": float(np.median(np.asarray(counts.sum(axis=1)).ravel())),
            "genes_detected": detected, "genes": int(adata.n_vars)}


def _id_hint(spot_ids, count_ids) -> str:
    """Why no id matches, when it is the usual Visium ``-1`` suffix or letter case."""
    def strip(values):
        return {str(v).rsplit("-", 1)[0] for v in values}

    spots, counts = set(map(str, spot_ids)), set(map(str, count_ids))
    if strip(spots) & strip(counts):
        return "; the ids differ only in a '-N' suffix (Space Ranger appends '-1' to barcodes)"
    if {v.upper() for v in spots} & {v.upper() for v in counts}:
        return "; the ids differ only in letter case"
    return "; are positions and counts from the same sample?"


def content_digest(adata) -> str:
    """A hash of what the later stages read from an expression file: X, raw counts, spot and gene
    names, bundle rows and centres. Stored in ``uns["m2ost"]`` so edits and damage are found."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)

    def matrix(m):
        if sp.issparse(m):
            m = sp.csr_matrix(m)
            for part, dtype in ((m.data, np.float32), (m.indices, np.int64), (m.indptr, np.int64)):
                h.update(np.ascontiguousarray(part, dtype=dtype).data)
        else:
            h.update(np.ascontiguousarray(m, dtype=np.float32).data)
        h.update(str(m.shape).encode())

    matrix(adata.X)
    if "counts" in adata.layers:
        matrix(adata.layers["counts"])
    for names in (adata.obs_names, adata.var_names):
        h.update("\0".join(map(str, names)).encode() + b"\1")
    if "bundle_row" in adata.obs.columns:
        h.update(np.ascontiguousarray(adata.obs["bundle_row"].to_numpy(), dtype=np.int64).data)
    if "spatial" in adata.obsm:
        h.update(np.ascontiguousarray(adata.obsm["spatial"], dtype=np.float64).data)
    return h.hexdigest()


def _json(obj) -> str:
    import json

    return json.dumps(obj or {}, sort_keys=True)


def read_expression(path, sample=None, backed: bool = False):
    """Read an expression file written by :func:`build_expression`, with checks."""
    import anndata

    if not os.path.isfile(path):
        raise InputError("expression file not found (run the expression stage)", file=path, sample=sample)
    try:
        adata = anndata.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:
        detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise InputError(f"unreadable expression file ({detail}); delete it and rerun the expression stage",
                         file=path, sample=sample) from None
    if "bundle_row" not in adata.obs.columns or "spatial" not in adata.obsm:
        raise InputError("expression file lacks obs['bundle_row'] or obsm['spatial']; rerun the expression stage",
                         file=path, sample=sample)
    stored = adata.uns.get("m2ost", {})
    stored = stored.get("content_digest") if isinstance(stored, dict) else None
    if stored is not None and not backed and content_digest(adata) != str(stored):
        raise InputError("expression file does not match its stored digest: it was edited or damaged after the "
                         "expression stage wrote it; delete it and rerun the expression stage",
                         file=path, sample=sample)
    return adata
