"""Spots of a sample as a model sees them: bundle attributes, the spot table, targets, checks.

:func:`load_sample` / :func:`load_samples` read which bundle rows a model may use and their
targets on the gene panel; :mod:`m2ost.learn.inputs.loader` reads their images in batches and
:mod:`m2ost.learn.inputs.augment` prepares them on the device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import h5py
import numpy as np

from m2ost.data.bundle import digest_algorithm, read_centers, read_meta, spot_digest
from m2ost.data.expression import read_expression
from m2ost.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class SampleData:
    """The spots of one sample that a dataset may use, in bundle-row order.

    ``targets`` is None for a sample without expression (prediction only).
    """

    sample: str
    bundle: str
    rows: np.ndarray        # (n,) int64 rows into the bundle datasets
    spot_ids: np.ndarray    # (n,) str
    centers: np.ndarray     # (n, 2) float64 spot centres (x, y), level-0 px
    padded: np.ndarray      # (n, n_selected_views) bool
    targets: np.ndarray | None  # (n, n_genes) float32
    info: dict              # bundle attributes: n_views, size_px, fov_um, mpp
    # (n,) library sizes (total counts) and the normalisation's target sum, where the
    # expression file records them (for prediction intervals at a measurement's depth)
    depth: np.ndarray | None = None
    target_sum: float | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, pos: np.ndarray) -> SampleData:
        """These spots at positions ``pos`` (every per-spot field sliced alike)."""
        return replace(self, rows=self.rows[pos], spot_ids=self.spot_ids[pos], centers=self.centers[pos],
                       padded=self.padded[pos], targets=None if self.targets is None else self.targets[pos],
                       depth=None if self.depth is None else self.depth[pos])


def depths_of(data: Sequence[SampleData], positions: Sequence[np.ndarray]) -> tuple[np.ndarray, float] | None:
    """(library sizes, target sum) of the spots at ``positions[k]`` of each ``data[k]``, in that
    order; None unless every sample records them with one target sum."""
    sums = {d.target_sum for d in data}
    if any(d.depth is None for d in data) or len(sums) != 1:
        return None
    return np.concatenate([d.depth[p] for d, p in zip(data, positions)]), float(sums.pop())


def _decode(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values],
                    dtype=object)


def read_bundle_info(bundle: str | os.PathLike, sample: str | None = None) -> dict:
    """The attributes of a spot bundle that matter to a model: views, sizes, fields of view.

    The bundle's datasets are first checked for consistency (:func:`m2ost.data.bundle.read_meta`:
    every view and per-spot dataset present, with one row per spot), so a truncated or edited
    bundle is refused here, naming the file to regenerate.
    """
    read_meta(bundle, sample)
    try:
        with h5py.File(bundle, "r") as f:
            a = f.attrs
            n_views = int(a["n_views"])
            info = {
                "n_views": n_views,
                "n_spots": int(f["barcode"].shape[0]),
                "size_px": [int(v) for v in np.atleast_1d(a["size_px"])],
                "fov_um": [float(v) for v in np.atleast_1d(a["fov_um"])],
                "mpp": float(a["mpp"]) if "mpp" in a else float("nan"),
                "sample": str(a.get("sample", sample or "")),
            }
            missing = [f"view_{v}" for v in range(n_views) if f"view_{v}" not in f]
    except FileNotFoundError:
        raise InputError("spot bundle not found", file=bundle, sample=sample) from None
    except (OSError, KeyError) as err:
        raise InputError(f"not a readable spot bundle ({err})", file=bundle,
                         sample=sample) from None
    if missing:
        raise InputError(f"bundle lacks datasets {', '.join(missing)}", file=bundle,
                         sample=sample)
    return info


def check_views(views: Sequence[int] | None, info: dict, bundle, sample) -> list[int]:
    """Resolve ``views`` (None = all) against a bundle; all selected views must share one
    square size, since the network takes one (V, 3, S, S) tensor."""
    n = info["n_views"]
    views = list(range(n)) if views is None else [int(v) for v in views]
    if not views:
        raise InputError("no views selected", file=bundle, sample=sample)
    bad = [v for v in views if not 0 <= v < n]
    if bad:
        raise InputError(f"views {bad} requested but the bundle has {n} views", file=bundle,
                         sample=sample)
    sizes = {info["size_px"][v] for v in views}
    if len(sizes) != 1:
        raise InputError(f"selected views {views} have different sizes {sorted(sizes)} px; "
                         "the network needs one size", file=bundle, sample=sample)
    return views


def verify_rows(bundle: str | os.PathLike, rows: np.ndarray, sample: str | None = None,
                block: int = 64) -> None:
    """Check the views of the bundle rows ``rows`` against their stored per-spot digests.

    Reads every view of those rows once (one pass, ``block`` rows at a time). Raises InputError
    naming the bundle, the first spot that differs, and what to do (rerun tiling).
    """
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    try:
        with h5py.File(bundle, "r") as f:
            n_views = int(f.attrs["n_views"])
            stored = np.asarray(f["spot_digest"][:], dtype=np.uint64)
            algorithm = digest_algorithm(f, bundle, sample)
            views = [f[f"view_{v}"] for v in range(n_views)]
            barcodes = f["barcode"]
            for start in range(0, len(rows), block):
                part = rows[start:start + block]
                lo, hi = int(part[0]), int(part[-1]) + 1
                if hi - lo <= 4 * len(part):  # dense: one slab per view, then pick the rows
                    blocks = [ds[lo:hi][part - lo] for ds in views]
                else:  # sparse: row by row (one chunk each; h5py's list indexing is far slower)
                    blocks = [np.stack([ds[r] for r in part.tolist()]) for ds in views]
                for k, r in enumerate(part.tolist()):
                    if spot_digest([b[k] for b in blocks], algorithm) != int(stored[r]):
                        spot = barcodes[r]
                        spot = spot.decode() if isinstance(spot, bytes) else str(spot)
                        raise InputError(f"spot {r} ({spot}) does not match its stored digest: the bundle was "
                                         "modified or damaged after tiling; delete it and rerun the tiling stage",
                                         file=bundle, sample=sample)
    except (OSError, KeyError) as err:
        raise InputError(f"unreadable spot bundle ({err}); delete it and rerun the tiling stage",
                         file=bundle, sample=sample) from None


def load_sample(bundle: str | os.PathLike, expression: str | os.PathLike | None = None,
                genes: Sequence[str] | None = None, views: Sequence[int] | None = None,
                drop_padded: bool = False, sample: str | None = None,
                verify: bool = True) -> SampleData:
    """Read the spot table of one sample and, if given, its targets on the gene panel.

    Parameters
    ----------
    bundle
        ``results/bundles/{sample}.h5``.
    expression
        ``results/expression/{sample}.h5ad``; None for an H&E-only slide (all bundle rows,
        no targets).
    genes
        The gene panel (required with ``expression``).
    views
        Views to use (None = all).
    drop_padded
        Drop spots where any selected view reached outside the slide.
    verify
        Check the views of the rows used against their stored digests (:func:`verify_rows`:
        one extra read of those rows), so that a bundle edited or damaged after tiling is
        refused before a model sees it. The shapes are always checked.

    Raises
    ------
    InputError
        Bundle and expression disagree (spot ids of the bundle rows differ from the obs index),
        panel genes missing from the expression, non-finite targets, bad views, a bundle or
        expression file damaged or edited after it was written.
    """
    info = read_bundle_info(bundle, sample)
    views = check_views(views, info, bundle, sample)
    name = sample or info["sample"]
    barcodes, centers, padded = _spot_table(bundle, info["n_views"])
    rows, targets, depth, target_sum = _rows_and_targets(expression, genes, barcodes, sample)
    data = SampleData(sample=name, bundle=str(bundle), rows=rows, spot_ids=barcodes[rows], centers=centers[rows],
                      padded=padded[rows][:, views], targets=targets, info=info, depth=depth,
                      target_sum=target_sum)
    if drop_padded:
        data = _drop_padded(data, views)
    if verify:
        verify_rows(bundle, data.rows, name)
    return data


def _spot_table(bundle: str | os.PathLike, n_views: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spot ids, centres, padded flags (n, n_views)) of every row of a bundle."""
    with h5py.File(bundle, "r") as f:
        barcodes = _decode(f["barcode"][:])
        centers = read_centers(f)
        padded = (np.asarray(f["padded"][:], dtype=bool) if "padded" in f
                  else np.zeros((len(barcodes), n_views), dtype=bool))
    if padded.ndim == 1:
        padded = padded[:, None].repeat(n_views, axis=1)
    return barcodes, centers, padded


def _rows_and_targets(expression, genes, barcodes: np.ndarray, sample: str | None):
    """The bundle rows with expression and their targets on ``genes``; every row and no targets
    without an expression file."""
    if expression is None:
        return np.arange(len(barcodes), dtype=np.int64), None, None, None
    if genes is None:
        raise InputError("a gene panel is needed to read targets", file=expression, sample=sample)
    return _read_targets(expression, genes, barcodes, sample)


def _drop_padded(data: SampleData, views) -> SampleData:
    """The spots whose selected views all lie inside the slide (``drop_padded``)."""
    keep = ~data.padded.any(axis=1)
    if not keep.all():
        log.warning("sample %s: dropped %d of %d spots whose views %s reach outside the "
                    "slide (drop_padded)", data.sample, int((~keep).sum()), len(keep), views)
    return data.subset(np.flatnonzero(keep))


def _read_targets(expression, genes, barcodes, sample) -> tuple:
    """(bundle rows, targets, library sizes, target sum) of the spots with expression."""
    adata = read_expression(expression, sample)
    rows = np.asarray(adata.obs["bundle_row"], dtype=np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(barcodes)):
        raise InputError(f"bundle_row values outside the bundle's {len(barcodes)} rows",
                         file=expression, sample=sample)
    if np.any(np.diff(rows) <= 0):
        raise InputError("bundle_row is not strictly increasing", file=expression, sample=sample)
    obs_ids = np.asarray(adata.obs_names, dtype=object)
    mismatch = np.flatnonzero(barcodes[rows] != obs_ids)
    if mismatch.size:
        i = mismatch[0]
        raise InputError(f"bundle and expression disagree: {mismatch.size} spot ids differ "
                         f"(first: obs '{obs_ids[i]}' vs bundle row {rows[i]} "
                         f"'{barcodes[rows[i]]}')", file=expression, sample=sample)
    index = adata.var_names.get_indexer(list(genes))
    missing = [g for g, j in zip(genes, index) if j < 0]
    if missing:
        raise InputError(f"{len(missing)} of {len(genes)} panel genes missing from the "
                         f"expression (e.g. {', '.join(missing[:5])})", file=expression,
                         sample=sample)
    x = adata.X[:, index]
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise InputError("expression holds NaN or infinite values on the panel genes",
                         file=expression, sample=sample)
    return (rows, x, *_recorded_depth(adata))


def _recorded_depth(adata) -> tuple[np.ndarray | None, float | None]:
    """(library sizes, target sum) as the expression stage records them; (None, None) without."""
    record = adata.uns.get("m2ost")
    target_sum = record.get("target_sum") if isinstance(record, dict) else None
    if "total_counts" not in adata.obs.columns or target_sum is None:
        return None, None
    return np.asarray(adata.obs["total_counts"], np.float64), float(target_sum)


def load_samples(bundles: Mapping[str, str], expressions: Mapping[str, str],
                 genes: Sequence[str], samples: Sequence[str],
                 views: Sequence[int] | None = None,
                 drop_padded: bool = False, verify: bool = True) -> list[SampleData]:
    """:func:`load_sample` for several samples, checking that their views agree.

    All samples must have the same selected view sizes and fields of view (within 1 %), so that
    one network sees the same physical scales everywhere.
    """
    out = []
    for s in samples:
        if s not in bundles:
            raise InputError("no spot bundle given", sample=s)
        if s not in expressions:
            raise InputError("no expression file given (samples used for training or "
                             "scoring need expression)", sample=s)
        out.append(load_sample(bundles[s], expressions[s], genes, views, drop_padded, sample=s,
                               verify=verify))
    if out:
        ref = out[0]
        vs = check_views(views, ref.info, ref.bundle, ref.sample)
        for d in out[1:]:
            check_same_views(ref.info, d.info, vs, d.bundle, d.sample, ref.sample)
    return out


def check_same_views(ref: dict, info: dict, views: Sequence[int], file, sample,
                     ref_name: str) -> None:
    """Refuse a bundle whose selected views differ in size or field of view from ``ref``."""
    if info["n_views"] <= max(views):
        raise InputError(f"bundle has {info['n_views']} views, {ref_name} has {ref['n_views']}",
                         file=file, sample=sample)
    for v in views:
        if info["size_px"][v] != ref["size_px"][v]:
            raise InputError(f"view {v} is {info['size_px'][v]} px, {ref_name} has "
                             f"{ref['size_px'][v]} px", file=file, sample=sample)
        a, b = info["fov_um"][v], ref["fov_um"][v]
        if abs(a - b) > 0.01 * max(abs(b), 1e-9):
            raise InputError(f"view {v} covers {a} um, {ref_name} covers {b} um; tile all "
                             "samples with the same fields of view", file=file, sample=sample)
