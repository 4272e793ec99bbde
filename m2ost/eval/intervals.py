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

Sequencing depth: a section sequenced less deeply than the training sections measures each
gene with more sampling noise (more zeros, coarser values), which the H&E cannot show. Where the
validation spots' library sizes are known (``depth``, with the expression's ``target_sum``),
their predictions and measured values are stored too (``spots``), and the interval of a spot
whose own library size is known (``intervals.depth: measured``, at evaluation) comes from the
whole calibration above, head and scores, redone on the validation spots at least as deep, their
counts binomially thinned to that depth (:func:`thinned_truth`, :func:`at_depth`): what those
spots would have measured at the spot's depth. Depths go in steps of a quarter octave; a depth
above most validation spots is calibrated on the deepest quarter of them.
"""

from __future__ import annotations

import math

import numpy as np

from m2ost.errors import InputError

FORMAT = 2  # 2: the validation spots' predictions, measurements and depths are stored
# Penalties tried for the difficulty head, relative to the number of fitting spots; inf = constant.
HEAD_PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0, math.inf)
# The head's σ̂ never falls below this fraction of the gene's mean absolute residual.
SIGMA_FLOOR = 0.1
MIN_CALIBRATION = 10  # fewer validation spots: plain conformal on all of them, no head
CALIBRATIONS = ("spots", "sections")
# measured: thin the calibration to each spot's own library size where known; training: never.
DEPTHS = ("measured", "training")
DEPTH_STEP = 0.25  # octaves between the depths the calibration is thinned to
DEEPEST = 0.25  # a depth's calibration keeps at least this share of the validation spots, the deepest
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


def head_design(pred: np.ndarray) -> dict:
    """The head's standardisation and the SVD of its inputs on these spots: they depend on the
    predictions only, so calibrations of other measurements of the same spots share them."""
    x = np.asarray(pred, np.float64)
    head = dict(zip(("mu", "sd"), _standardise(x)))
    head.update(zip(("mu2", "sd2"), _standardise(((x - head["mu"]) / head["sd"]) ** 2)))
    u, s, vt = np.linalg.svd(_features(head, x), full_matrices=False)
    return {"head": head, "u": u, "s": s, "vt": vt}


def fit_head(pred: np.ndarray, abs_resid: np.ndarray, design: dict | None = None) -> dict:
    """Multi-output ridge from the predictions (:func:`_features`) to |residual|; the penalty
    (including infinite: a constant, plain conformal) by leave-one-out error on these spots.
    ``design``: :func:`head_design` of ``pred``, if already computed."""
    design = head_design(pred) if design is None else design
    u, s, vt = design["u"], design["s"], design["vt"]
    a = np.asarray(abs_resid, np.float64)
    b = a.mean(0)
    ac = a - b
    n = len(u)
    uta = u.T @ ac
    errors = {}
    for lam in HEAD_PENALTIES:
        shrink = np.zeros_like(s) if math.isinf(lam) else s**2 / (s**2 + lam * n)
        fitted = u @ (shrink[:, None] * uta)
        hat = 1.0 / n + (u**2) @ shrink
        loo = (ac - fitted) / np.maximum(1.0 - hat, 1e-6)[:, None]
        errors[lam] = float((loo**2).mean())
    lam = min(errors, key=errors.get)
    w = np.zeros((vt.shape[1], a.shape[1])) if math.isinf(lam) else vt.T @ ((s / (s**2 + lam * n))[:, None] * uta)
    head = {k: v.astype(np.float32) for k, v in design["head"].items()}
    return {**head, "w": w.astype(np.float32), "b": b.astype(np.float32),
            "floor": (SIGMA_FLOOR * np.maximum(b, 1e-6)).astype(np.float32),
            "penalty": float(lam), "loo_mse": [[k, v] for k, v in errors.items()]}


def difficulty(head: dict, pred: np.ndarray) -> np.ndarray:
    """σ̂ per spot and gene (n, G) from the head's state and the predictions."""
    sigma = _features(head, pred) @ np.asarray(head["w"], np.float64) + head["b"]
    return np.maximum(sigma, head["floor"]).astype(np.float32)


def _calibrate(pred: np.ndarray, truth: np.ndarray, group: np.ndarray, seed: int,
               cache: dict | None = None) -> dict:
    """Head on one half of each section's spots, normalised scores on the other (module
    docstring); ``cache`` keeps the head's design (:func:`head_design`) for the same spots."""
    resid = np.abs(truth - pred)
    split = len(pred) >= 2 * MIN_CALIBRATION
    fit, cal = _halves(group, seed) if split else (np.arange(len(pred)),) * 2
    cache = {} if cache is None else cache
    if "design" not in cache:
        cache["design"] = head_design(pred[fit])
    head = fit_head(pred[fit], resid[fit], cache["design"])
    if not split:  # too few to split: plain (unnormalised) conformal on every spot
        head.update(w=np.zeros_like(head["w"]), b=np.ones_like(head["b"]), floor=np.ones_like(head["floor"]),
                    penalty=math.inf)
    scores = resid[cal] / difficulty(head, pred[cal])
    return {"format": FORMAT, "head": head, "scores": scores.astype(np.float32),
            "groups": np.unique(group[cal], return_inverse=True)[1].astype(np.int64),
            "n_fit": int(len(pred) - len(cal)) if split else 0, "n_calibration": int(len(cal)), "seed": int(seed)}


def fit_calibration(pred: np.ndarray, truth: np.ndarray, group: np.ndarray, seed: int,
                    depth: np.ndarray | None = None, target_sum: float | None = None) -> dict | None:
    """The calibration state of a model from its validation predictions (see the module docstring).

    ``group``: each spot's training section (any integer labels). ``depth``: each spot's library
    size (total counts) and ``target_sum`` the normalisation's, both or neither: with them, the
    validation spots are kept (``spots``) to calibrate intervals at other depths. None when there
    are fewer than two validation spots."""
    pred, truth, group = np.asarray(pred, np.float64), np.asarray(truth, np.float64), np.asarray(group)
    if len(pred) < 2:
        return None
    state = _calibrate(pred, truth, group, int(seed))
    if depth is not None and target_sum is not None:
        state["spots"] = {"pred": pred.astype(np.float32), "truth": truth.astype(np.float32),
                          "group": group.astype(np.int64), "depth": np.asarray(depth, np.float64),
                          "target_sum": float(target_sum)}
    return state


def thinned_truth(spots: dict, depth: float, rng: np.random.Generator) -> np.ndarray:
    """The validation spots' measured values had they been sequenced to ``depth`` counts: their
    counts (recovered from log1p(counts / library size * target_sum)) binomially thinned by
    depth / library size; spots no deeper than ``depth`` are kept as measured."""
    lib, target = np.asarray(spots["depth"], np.float64), float(spots["target_sum"])
    keep = np.minimum(1.0, depth / lib)
    counts = np.rint(np.expm1(np.asarray(spots["truth"], np.float64)) * (lib / target)[:, None])
    thinned = rng.binomial(np.maximum(counts, 0).astype(np.int64), keep[:, None])
    return np.log1p(thinned * (target / (keep * lib))[:, None])


def at_depth(state: dict, depth_bin: int) -> dict:
    """The calibration redone, head and scores, for measurements at the depth of ``depth_bin``
    (:func:`depth_bins`): on the validation spots at least that deep (at least the deepest
    quarter of them), their counts thinned to it. Kept in ``state["_cache"]`` for the state's
    later calls (an evaluation asks for the same depths for every calibration and sample)."""
    spots = state.get("spots")
    if spots is None:
        return state
    cache = state.setdefault("_cache", {})
    if depth_bin not in cache:
        depth = 2.0 ** (depth_bin * DEPTH_STEP)
        lib = np.asarray(spots["depth"], np.float64)
        keep = lib >= min(depth, np.quantile(lib, 1.0 - DEEPEST))
        deep = {k: (np.asarray(v)[keep] if k != "target_sum" else v) for k, v in spots.items()}
        rng = np.random.default_rng([int(state["seed"]), int(depth_bin)])
        truth = thinned_truth(deep, depth, rng)
        designs = cache.setdefault("designs", {})  # the kept spots are the deepest n: n names them
        cache[depth_bin] = _calibrate(np.asarray(deep["pred"], np.float64), truth, np.asarray(deep["group"]),
                                      int(state["seed"]), designs.setdefault(int(keep.sum()), {}))
    return cache[depth_bin]


def depth_bins(depth: np.ndarray) -> np.ndarray:
    """Each spot's depth bin: the grid depth 2 ** (bin * DEPTH_STEP) nearest to it."""
    return np.rint(np.log2(np.maximum(np.asarray(depth, np.float64), 1.0)) / DEPTH_STEP).astype(np.int64)


def _kth(ordered: np.ndarray, level: float) -> np.ndarray:
    """The conformal quantile of scores already sorted along axis 0."""
    n = len(ordered)
    k = math.ceil((n + 1) * level - 1e-9)
    if k > n or n == 0:
        return np.full(ordered.shape[1:], np.inf)
    return ordered[max(k, 1) - 1]


def conformal_quantile(scores: np.ndarray, level: float) -> np.ndarray:
    """Per column, the ceil((n + 1) level)-th smallest score (inf where that exceeds n)."""
    return _kth(np.sort(np.asarray(scores, np.float64), axis=0), level)


def section_quantile_level(scores: np.ndarray, groups: np.ndarray, level: float) -> float:
    """The smallest quantile level (>= ``level``) at which calibrating on the other sections'
    scores covers each section's scores at ``level`` on average (over sections and genes).
    ``level`` itself with fewer than two sections."""
    sections = np.unique(groups)
    if len(sections) < 2:
        return float(level)
    scores = np.asarray(scores, np.float64)
    split = [(np.sort(scores[groups != s], axis=0), scores[groups == s]) for s in sections]
    for q in np.arange(level, 1.0, LEVEL_STEP):
        if np.mean([(own <= _kth(others, q)).mean() for others, own in split]) >= level:
            return float(q)
    return 1.0


def check_interval_settings(level: float, calibration: str, depth_mode: str | None = None) -> None:
    """One line naming the setting for a bad ``intervals.level``, ``.calibration`` or (when
    given) ``.depth``."""
    if not 0.0 < level < 1.0:
        raise InputError(f"intervals.level must be in (0, 1), got {level}")
    if calibration not in CALIBRATIONS:
        raise InputError(f"intervals.calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if depth_mode is not None and depth_mode not in DEPTHS:
        raise InputError(f"intervals.depth must be one of {', '.join(DEPTHS)}, got {depth_mode!r}")


def quantile_level(state: dict, level: float, calibration: str, scores: np.ndarray | None = None) -> float:
    """The level of the scores' quantile that gives intervals of nominal ``level`` (``scores``:
    the state's own by default)."""
    check_interval_settings(level, calibration)
    scores = np.asarray(state["scores"]) if scores is None else scores
    if calibration == "sections":
        return section_quantile_level(scores, np.asarray(state["groups"]), level)
    return float(level)


def quantiles(state: dict, level: float, calibration: str, scores: np.ndarray | None = None) -> np.ndarray:
    """Per-gene multipliers q_g of σ̂ at ``level`` (``calibration``: spots or sections)."""
    scores = np.asarray(state["scores"]) if scores is None else scores
    return conformal_quantile(scores, quantile_level(state, level, calibration, scores))


def half_widths(state: dict, pred: np.ndarray, level: float, calibration: str,
                depth: np.ndarray | None = None) -> np.ndarray:
    """q_g σ̂(x) per spot and gene (n, G): calibrated at each spot's depth (library size) where
    given and the state holds its validation spots, else at the validation spots' own depths."""
    pred = np.asarray(pred, np.float64)
    if depth is None or state.get("spots") is None:
        return quantiles(state, level, calibration)[None, :] * difficulty(state["head"], pred)
    bins = depth_bins(depth)
    out = np.empty(pred.shape)
    cache = state.setdefault("_cache", {})
    for b in np.unique(bins):
        here = at_depth(state, int(b))
        key = ("quantiles", int(b), float(level), calibration)
        if key not in cache:
            cache[key] = quantiles(here, level, calibration)
        sel = bins == b
        out[sel] = cache[key][None, :] * difficulty(here["head"], pred[sel])
    return out


def intervals(state: dict, pred: np.ndarray, level: float, calibration: str,
              depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) bounds (n, G) float32 of the predictions ``pred`` at ``level``; ``depth``:
    the spots' library sizes, for intervals of measurements at that depth (see the module
    docstring). An interval reaching below 0, the least a log1p expression measures, starts at 0."""
    half = half_widths(state, pred, level, calibration, depth)
    pred = np.asarray(pred, np.float64)
    lower, upper = pred - half, pred + half
    lower = np.where(upper >= 0, np.maximum(lower, 0.0), lower)
    return lower.astype(np.float32), upper.astype(np.float32)


def interval_scores(truth: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> dict:
    """Empirical coverage (mean over genes, and the 10th percentile over genes: the worst decile's
    edge) and mean width of intervals on spots with measured expression."""
    inside = (np.asarray(truth) >= lower) & (np.asarray(truth) <= upper)
    per_gene = inside.mean(axis=0)
    width = np.asarray(upper, np.float64) - np.asarray(lower, np.float64)
    return {"interval_coverage": float(per_gene.mean()),
            "interval_coverage_gene_p10": float(np.percentile(per_gene, 10)),
            "interval_width": float(np.mean(width[np.isfinite(width)])) if np.isfinite(width).any() else math.inf}
