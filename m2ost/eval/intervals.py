"""Prediction intervals per spot and gene: normalised split conformal prediction (numpy only).

Calibration (at training, on the validation spots of the training samples, which no model
trained on): the validation spots of each training section are split in two halves at random.
On the first, a small ridge head learns to predict the absolute residual |y - ŷ| of every gene
from the model's predictions of all genes and their squares (standardised; the penalty,
including "infinite", i.e. a constant, is chosen by leave-one-out error on that half): it works
for every model kind, from the one thing they all give. On the second, each spot's
normalised score |y - ŷ| / σ̂(x) is kept, per gene, with its section. The state (the head, the
scores, their sections) is stored in ``model.pt``.

Prediction: the interval of gene g at spot x is ŷ ± q_g σ̂(x), where q_g is the conformal
quantile of gene g's scores at the level asked (``intervals.level``). Under exchangeability of
the calibration and test spots, each gene's interval covers the truth with probability at least
the level. Held-out sections are not exchangeable with validation spots of the training
sections; ``intervals.calibration: sections`` raises the quantile until calibration by
leave-one-section-out *within the validation spots* reaches the level on average
(:func:`section_quantile_level`); ``spots`` keeps the plain quantile.
"""

from __future__ import annotations

import math

import numpy as np

from m2ost.errors import InputError

FORMAT = 1
# Penalties tried for the difficulty head, relative to the number of fitting spots; inf = constant.
HEAD_PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0, math.inf)
# The head's σ̂ never falls below this fraction of the gene's mean absolute residual.
SIGMA_FLOOR = 0.1
MIN_CALIBRATION = 10  # fewer validation spots: plain conformal on all of them, no head
CALIBRATIONS = ("spots", "sections")
LEVEL_STEP = 0.0025
# What an evaluation reports of the intervals on held-out spots (interval_scores).
INTERVAL_METRICS = ("interval_coverage", "interval_coverage_gene_p10", "interval_width")


def _halves(group: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, calibrate) positions: each section's validation spots split in two at random."""
    rng = np.random.default_rng(seed)
    fit, cal = [], []
    for g in np.unique(group):
        pos = rng.permutation(np.flatnonzero(group == g))
        k = len(pos) // 2
        fit.append(pos[:k])
        cal.append(pos[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(cal))


def _features(head: dict, pred: np.ndarray) -> np.ndarray:
    """The head's inputs: standardised predictions and their standardised squares (so the
    residual may grow away from a gene's typical value in either direction)."""
    z = (np.asarray(pred, np.float64) - head["mu"]) / head["sd"]
    return np.concatenate([z, (z**2 - head["mu2"]) / head["sd2"]], axis=1)


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sd = x.std(0)
    return x.mean(0), np.where(sd > 1e-8, sd, 1.0)


def fit_head(pred: np.ndarray, abs_resid: np.ndarray) -> dict:
    """Multi-output ridge from the predictions (:func:`_features`) to |residual|; the penalty
    (including infinite: a constant, plain conformal) by leave-one-out error on these spots."""
    x = np.asarray(pred, np.float64)
    a = np.asarray(abs_resid, np.float64)
    head = dict(zip(("mu", "sd"), _standardise(x)))
    head.update(zip(("mu2", "sd2"), _standardise(((x - head["mu"]) / head["sd"]) ** 2)))
    z = _features(head, x)
    b = a.mean(0)
    ac = a - b
    n = len(z)
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    uta = u.T @ ac
    errors = {}
    for lam in HEAD_PENALTIES:
        shrink = np.zeros_like(s) if math.isinf(lam) else s**2 / (s**2 + lam * n)
        fitted = u @ (shrink[:, None] * uta)
        hat = 1.0 / n + (u**2) @ shrink
        loo = (ac - fitted) / np.maximum(1.0 - hat, 1e-6)[:, None]
        errors[lam] = float((loo**2).mean())
    lam = min(errors, key=errors.get)
    w = np.zeros((z.shape[1], x.shape[1])) if math.isinf(lam) else vt.T @ ((s / (s**2 + lam * n))[:, None] * uta)
    head = {k: v.astype(np.float32) for k, v in head.items()}
    return {**head, "w": w.astype(np.float32), "b": b.astype(np.float32),
            "floor": (SIGMA_FLOOR * np.maximum(b, 1e-6)).astype(np.float32),
            "penalty": float(lam), "loo_mse": [[k, v] for k, v in errors.items()]}


def difficulty(head: dict, pred: np.ndarray) -> np.ndarray:
    """σ̂ per spot and gene (n, G) from the head's state and the predictions."""
    sigma = _features(head, pred) @ np.asarray(head["w"], np.float64) + head["b"]
    return np.maximum(sigma, head["floor"]).astype(np.float32)


def fit_calibration(pred: np.ndarray, truth: np.ndarray, group: np.ndarray, seed: int) -> dict | None:
    """The calibration state of a model from its validation predictions (see the module docstring).

    ``group``: each spot's training section (any integer labels). None when there are fewer than
    two validation spots."""
    pred, truth, group = np.asarray(pred, np.float64), np.asarray(truth, np.float64), np.asarray(group)
    if len(pred) < 2:
        return None
    resid = np.abs(truth - pred)
    if len(pred) >= 2 * MIN_CALIBRATION:
        fit, cal = _halves(group, seed)
        head = fit_head(pred[fit], resid[fit])
    else:  # too few to split: plain (unnormalised) conformal on every spot
        cal = np.arange(len(pred))
        head = fit_head(pred, resid)
        head.update(w=np.zeros_like(head["w"]), b=np.ones_like(head["b"]), floor=np.ones_like(head["floor"]),
                    penalty=math.inf)
    scores = resid[cal] / difficulty(head, pred[cal])
    return {"format": FORMAT, "head": head, "scores": scores.astype(np.float32),
            "groups": np.unique(group[cal], return_inverse=True)[1].astype(np.int64),
            "n_fit": int(len(pred) - len(cal)), "n_calibration": int(len(cal))}


def conformal_quantile(scores: np.ndarray, level: float) -> np.ndarray:
    """Per column, the ceil((n + 1) level)-th smallest score (inf where that exceeds n)."""
    scores = np.sort(np.asarray(scores, np.float64), axis=0)
    n = len(scores)
    k = math.ceil((n + 1) * level - 1e-9)
    if k > n or n == 0:
        return np.full(scores.shape[1:], np.inf)
    return scores[max(k, 1) - 1]


def section_quantile_level(scores: np.ndarray, groups: np.ndarray, level: float) -> float:
    """The smallest quantile level (>= ``level``) at which calibrating on the other sections'
    scores covers each section's scores at ``level`` on average (over sections and genes).
    ``level`` itself with fewer than two sections."""
    sections = np.unique(groups)
    if len(sections) < 2:
        return float(level)
    for q in np.arange(level, 1.0, LEVEL_STEP):
        covered = [(scores[groups == s] <= conformal_quantile(scores[groups != s], q)).mean()
                   for s in sections]
        if np.mean(covered) >= level:
            return float(q)
    return 1.0


def quantile_level(state: dict, level: float, calibration: str) -> float:
    """The level of the scores' quantile that gives intervals of nominal ``level``."""
    if not 0.0 < level < 1.0:
        raise InputError(f"intervals.level must be in (0, 1), got {level}")
    if calibration not in CALIBRATIONS:
        raise InputError(f"intervals.calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if calibration == "sections":
        return section_quantile_level(np.asarray(state["scores"]), np.asarray(state["groups"]), level)
    return float(level)


def quantiles(state: dict, level: float, calibration: str) -> np.ndarray:
    """Per-gene multipliers q_g of σ̂ at ``level`` (``calibration``: spots or sections)."""
    return conformal_quantile(np.asarray(state["scores"]), quantile_level(state, level, calibration))


def intervals(state: dict, pred: np.ndarray, level: float, calibration: str) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) bounds (n, G) float32 of the predictions ``pred`` at ``level``."""
    half = quantiles(state, level, calibration) * difficulty(state["head"], pred)
    pred = np.asarray(pred, np.float32)
    return (pred - half).astype(np.float32), (pred + half).astype(np.float32)


def interval_scores(truth: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> dict:
    """Empirical coverage (mean over genes, and the 10th percentile over genes: the worst decile's
    edge) and mean width of intervals on spots with measured expression."""
    inside = (np.asarray(truth) >= lower) & (np.asarray(truth) <= upper)
    per_gene = inside.mean(axis=0)
    width = np.asarray(upper, np.float64) - np.asarray(lower, np.float64)
    return {"interval_coverage": float(per_gene.mean()),
            "interval_coverage_gene_p10": float(np.percentile(per_gene, 10)),
            "interval_width": float(np.mean(width[np.isfinite(width)])) if np.isfinite(width).any() else math.inf}
