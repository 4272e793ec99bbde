"""Scores of predicted expression against measured expression on one held-out sample.

The primary metric is the **per-gene** Pearson correlation across the spots of one held-out
sample, averaged over the genes of the panel (the field's standard: Hist2ST, TRIPLEX,
HEST-Benchmark). Where the measured profile or the prediction of a gene is constant over the
spots of the held-out sample, there is no correlation: the evaluation (:func:`score`) reports
it as NaN ("undefined", ``defined`` False), leaves it out of the means and counts it
(``n_genes_defined``, ``n_genes_undefined``). The mean predictor thus has no per-gene score at
all, which is what it is: it says nothing about where a gene is high.

While training, a model is chosen by :func:`mean_gene_pcc`, which scores a constant prediction
of a varying gene 0 instead (:func:`gene_pcc`), so that an epoch predicting nothing is not
rewarded by having its flat genes left out.

The per-spot Pearson across genes, averaged over spots, is what the M2OST paper reports. It is
inflated by the differences in mean expression between genes (a constant predictor that outputs
the average profile scores high on it), so it is labelled ``spot_pcc_paper`` and never used to
choose or rank models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from m2ost.errors import InputError

MIN_SPOTS = 3
TOP_K = 50


def _constant(a: np.ndarray, axis: int) -> np.ndarray:
    """True where ``a`` is constant along ``axis`` up to float32 rounding."""
    span = np.ptp(a, axis=axis)
    scale = np.abs(a).max(axis=axis)
    return span <= 1e-6 * scale


def pearson(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Pearson correlation of ``x`` and ``y`` along ``axis``; NaN where either is constant."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    num = (xc * yc).sum(axis=axis)
    den = np.sqrt((xc * xc).sum(axis=axis) * (yc * yc).sum(axis=axis))
    undefined = _constant(x, axis) | _constant(y, axis) | (den == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / np.where(undefined, 1.0, den)
    r = np.clip(r, -1.0, 1.0)
    r[undefined] = np.nan
    return r


def gene_pcc(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-gene Pearson across spots: (n_spots, n_genes) x2 -> (n_genes,).

    NaN (undefined) where the truth is constant; 0 where only the prediction is constant.
    """
    r = pearson(y_true, y_pred, axis=0)
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    r[_constant(y_pred, 0) & ~_constant(y_true, 0)] = 0.0
    return r


def spot_pcc(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Per-spot Pearson across genes: (n_spots, n_genes) x2 -> (n_spots,)."""
    return pearson(y_true, y_pred, axis=1)


def mean_gene_pcc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean of the defined per-gene correlations; NaN when none is defined or < 3 spots."""
    if len(y_true) < MIN_SPOTS:
        return float("nan")
    r = gene_pcc(y_true, y_pred)
    return float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")


def gene_pcc_by_group(y_true: np.ndarray, y_pred: np.ndarray, groups: np.ndarray,
                      genes: Sequence[str]) -> dict[str, float]:
    """Per-gene Pearson within each group of spots (a sample's validation spots), averaged over the
    groups where defined: gene -> r (NaN where no group defines it). What a model stores so a
    user knows which predicted genes to trust, measured on spots it was not fitted on."""
    rows = [gene_pcc(y_true[groups == g], y_pred[groups == g]) for g in np.unique(groups)
            if (groups == g).sum() >= MIN_SPOTS]
    if not rows:
        return {str(g): float("nan") for g in genes}
    stacked = np.vstack(rows)
    ok = np.isfinite(stacked)
    n = ok.sum(axis=0)
    mean = np.where(n > 0, np.where(ok, stacked, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)
    return {str(g): float(r) for g, r in zip(genes, mean)}


def _check(y_true: np.ndarray, y_pred: np.ndarray, sample: str | None) -> None:
    if len(y_true) < MIN_SPOTS:
        raise InputError(f"held-out sample has {len(y_true)} spot(s); per-gene Pearson needs at "
                         f"least {MIN_SPOTS} spots, so this sample cannot be scored",
                         sample=sample)
    if y_true.shape != y_pred.shape or y_true.ndim != 2:
        raise InputError(f"truth {y_true.shape} and prediction {y_pred.shape} must be the same "
                         f"(n_spots, n_genes) shape", sample=sample)


def _per_gene_table(y_true: np.ndarray, y_pred: np.ndarray, genes: Sequence[str], r: np.ndarray,
                    err: np.ndarray) -> pd.DataFrame:
    """One row a gene: gene, pcc, defined, rmse, mae, mean_true, mean_pred."""
    return pd.DataFrame({
        "gene": list(genes),
        "pcc": r,
        "defined": np.isfinite(r),
        "rmse": np.sqrt((err ** 2).mean(axis=0)),
        "mae": np.abs(err).mean(axis=0),
        "mean_true": y_true.mean(axis=0),
        "mean_pred": y_pred.mean(axis=0),
    })


def _summary(y_true: np.ndarray, y_pred: np.ndarray, r: np.ndarray, err: np.ndarray, top_k: int) -> dict:
    """The sample's summary (see :func:`score`) from the per-gene correlations ``r``."""
    defined = r[np.isfinite(r)]
    best = np.sort(defined)[::-1][:top_k]
    s = spot_pcc(y_true, y_pred)
    nan = float("nan")
    return {
        "n_spots": int(y_true.shape[0]),
        "n_genes": int(y_true.shape[1]),
        "n_genes_defined": int(defined.size),
        "n_genes_undefined": int(r.size - defined.size),
        "gene_pcc_mean": float(defined.mean()) if defined.size else nan,
        "gene_pcc_median": float(np.median(defined)) if defined.size else nan,
        f"gene_pcc_top{top_k}": float(best.mean()) if best.size else nan,
        "top_k_used": int(best.size),
        "spot_pcc_paper": float(np.nanmean(s)) if np.isfinite(s).any() else nan,
        "rmse": float(np.sqrt((err ** 2).mean())),
        "mae": float(np.abs(err).mean()),
    }


def score(y_true: np.ndarray, y_pred: np.ndarray, genes: Sequence[str],
          sample: str | None = None, top_k: int = TOP_K) -> tuple[pd.DataFrame, dict]:
    """Score one held-out sample.

    Parameters
    ----------
    y_true, y_pred
        (n_spots, n_genes) measured and predicted normalised expression.
    genes
        The gene symbols of the columns.
    sample
        Named in errors.
    top_k
        The "best genes" mean is over the ``top_k`` highest defined per-gene correlations
        (all defined genes when fewer).

    Returns
    -------
    per_gene
        Columns gene, pcc, defined, rmse, mae, mean_true, mean_pred.
    summary
        n_spots, n_genes, n_genes_defined, n_genes_undefined, gene_pcc_mean, gene_pcc_median,
        gene_pcc_top{k} (and ``top_k_used``), spot_pcc_paper, rmse, mae.

    Raises
    ------
    InputError
        Fewer than 3 spots, or shapes that do not match.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    _check(y_true, y_pred, sample)
    if len(genes) != y_true.shape[1]:
        raise InputError(f"{len(genes)} gene names for {y_true.shape[1]} columns", sample=sample)
    r = pearson(y_true, y_pred, axis=0)  # NaN where the truth or the prediction is constant
    err = y_pred - y_true
    per_gene = _per_gene_table(y_true, y_pred, genes, r, err)
    summary = _summary(y_true, y_pred, r, err, top_k)
    return per_gene, summary
