"""Models over pretrained-encoder features, and the probe of HEST-Benchmark.

A feature model is a small class (:class:`FeatureModel`): fitted on the features of the training
and validation spots of the training slides (:class:`FeatureSet`), it predicts from features,
and saves to / loads from a dict of tensors. The same class serves training (features from the
cached embeddings, m2ost.learn.features.fit_on_embeddings) and prediction (the views encoded on the fly by
the same encoder, m2ost.learn.features.encoded), so what is evaluated is exactly what predicts new
slides. ``input`` says which features it reads: ``pooled`` (n, V, D) or ``tokens``
(n, V, h*w, C); ``views`` which of the bundle's views (None: all).

:data:`FEATURE_MODELS` maps these feature kinds to their classes; m2ost.learn.features.registry
adds the kinds defined in their own modules (m2ost_encoder) and is what callers use.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from m2ost.errors import InputError
from m2ost.eval.metrics import mean_gene_pcc

log = logging.getLogger(__name__)


@dataclass
class FeatureSet:
    """Features and targets of a set of spots, in a fixed spot order."""

    x: np.ndarray               # (n, V, D) pooled, or (n, V, h*w, C) tokens, of the model's views
    y: np.ndarray | None        # (n, G) float32 targets; None for prediction
    group: np.ndarray           # (n,) int: sample number of each spot (per-sample scores)
    grid: tuple[int, int] = (0, 0)  # token grid (h, w) when x holds tokens
    blocks: tuple[int, ...] = ()    # sizes of the parts of the pooled features' last axis (Encoder.blocks)
    pooled: np.ndarray | None = None  # (n, V, D) pooled features beside tokens (token kinds)
    token_blocks: tuple[int, ...] = ()  # sizes of the parts of the tokens' channels (Encoder.token_blocks)
    depth: tuple[np.ndarray, float] | None = None  # library sizes and target sum (dataset.depths_of)

    def __len__(self) -> int:
        return len(self.x)


def check_blocks(blocks: tuple[int, ...], width: int, what: str) -> None:
    """The block sizes must add up to the features' last axis."""
    if sum(blocks) != width:
        raise InputError(f"{what} blocks {list(blocks)} do not add up to the {width} channels")


def block_scale(var: np.ndarray, blocks: tuple[int, ...], reduce=np.sum) -> np.ndarray:
    """Per-channel factors bringing each block's ``reduce`` (sum: total, mean: mean channel) of
    the variances ``var`` to 1 (a block with no variance keeps factor 1)."""
    scale, start = np.ones(len(var)), 0
    for size in blocks:
        level = reduce(var[start:start + size])
        scale[start:start + size] = 1.0 / np.sqrt(level) if level > 0 else 1.0
        start += size
    return scale


def per_sample_pcc(truth: np.ndarray, pred: np.ndarray, group: np.ndarray) -> float:
    """Mean per-gene Pearson per sample, averaged over samples (as a test slide is scored)."""
    scores = [mean_gene_pcc(truth[group == g], pred[group == g]) for g in np.unique(group)]
    scores = [s for s in scores if np.isfinite(s)]
    return float(np.mean(scores)) if scores else float("nan")


class FeatureModel:
    """Interface of a model over encoder features (subclass it and register it below).

    ``model_cfg`` is the model's config section (m2ost.plan.kinds: FeatureKind.config),
    ``train_cfg`` the checked ``train`` settings (m2ost.learn.training.identity.train_settings).
    """

    kind = ""
    input = "pooled"
    views: tuple[int, ...] | None = None

    def __init__(self, model_cfg: Mapping | None = None, train_cfg: Mapping | None = None):
        self.model_cfg, self.train_cfg = dict(model_cfg or {}), dict(train_cfg or {})

    def fit(self, train: FeatureSet, val: FeatureSet, out_dir=None) -> list[dict]:
        """Fit on ``train``, choose settings on ``val``; return log rows (one per setting or
        epoch, with ``val_loss`` and ``val_gene_pcc``; the chosen row has ``chosen`` True).
        ``out_dir``: where a model that trains for long may keep checkpoints to resume from."""
        raise NotImplementedError

    def predict(self, x: np.ndarray, grid: tuple[int, int] = (0, 0),
                pooled: np.ndarray | None = None) -> np.ndarray:
        """(n, G) float32 predictions from features shaped like FeatureSet.x; ``pooled``: the
        pooled features of the same spots and views (FeatureSet.pooled), for token kinds."""
        raise NotImplementedError

    def state(self) -> dict:
        """Everything :meth:`from_state` needs (tensors and plain values: torch.save'd)."""
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: dict, model_cfg: Mapping | None = None,
                   train_cfg: Mapping | None = None) -> FeatureModel:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------

PCA_COMPONENTS = 256  # HEST-Benchmark: PCA to 256 before the ridge
# Ridge penalties relative to the mean variance of the kept components (times the number of
# spots), so one grid fits any encoder width and cohort size.
ALPHA_RATIOS = tuple(float(a) for a in 10.0 ** np.arange(-4.0, 6.01, 0.5))


class EncoderRidge(FeatureModel):
    """HEST-Benchmark's probe: PCA to 256 and ridge, both fitted on the training spots; the
    ridge penalty with the best mean per-gene Pearson on the validation spots of the training
    slides (per slide, then averaged; ties: lower MSE). Pooled features of all views,
    concatenated.

    The features are centred, not standardised, as PCA does in HEST-Benchmark: scaling every
    feature to unit variance lifts the near-constant channels of the pooled features, which
    carry more slide (stain) than tissue signal. On HER2+ with EfficientNet-Lite0 it lowered
    the validation score on 4 of 6 splits and the held-out patient's score by a lot
    (docs/benchmarks.md)."""

    kind = "encoder_ridge"
    input = "pooled"
    views = None

    def __init__(self, model_cfg=None, train_cfg=None):
        super().__init__(model_cfg, train_cfg)
        self.alpha = None
        self.x_mean = self.components = self.coef = self.intercept = None
        self.scale = None  # per-feature factor (last axis) making each block's variance 1

    def _flat(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self.scale is not None:
            x = x * self.scale
        return x.reshape(len(x), -1)

    def _project(self, x: np.ndarray) -> np.ndarray:
        return (self._flat(x) - self.x_mean) @ self.components.T

    def _fit_scale(self, x: np.ndarray, blocks: tuple[int, ...]) -> None:
        """Weigh the blocks of the features (the encoder's output and its intermediate stages'
        pooled maps) equally: each is scaled to a total variance of 1 over the training spots.
        Otherwise PCA would follow whichever block has the largest activations."""
        self.scale = None
        if len(blocks) < 2:
            return
        check_blocks(blocks, x.shape[-1], "feature")
        var = np.asarray(x, np.float64).reshape(-1, x.shape[-2], x.shape[-1]).var(axis=0).sum(axis=0)
        self.scale = block_scale(var, blocks, np.sum)

    def fit(self, train: FeatureSet, val: FeatureSet, out_dir=None) -> list[dict]:
        self._fit_scale(train.x, tuple(train.blocks))
        flat = self._flat(train.x)
        y = np.asarray(train.y, np.float64)
        if len(y) < 2:
            raise InputError(f"{self.kind} needs at least 2 training spots, got {len(y)}")
        self.x_mean = flat.mean(0)
        xs = flat - self.x_mean
        _, _, vt = np.linalg.svd(xs, full_matrices=False)
        k = min(PCA_COMPONENTS, vt.shape[0])
        # Stored as float32 (half the file); rounded before use, so a loaded model predicts the same.
        self.components = vt[:k].astype(np.float32).astype(np.float64)
        z = xs @ self.components.T
        y_mean = y.mean(0)
        u, s, wt = np.linalg.svd(z, full_matrices=False)
        uty = u.T @ (y - y_mean)

        def solve(alpha):
            return wt.T @ ((s / (s ** 2 + alpha))[:, None] * uty)

        unit = float((s ** 2).mean())
        rows = []
        if len(val):
            zv, yv = self._project(val.x), np.asarray(val.y, np.float64)
            for ratio in ALPHA_RATIOS:
                pred = zv @ solve(ratio * unit) + y_mean
                rows.append({"alpha_ratio": ratio, "alpha": ratio * unit,
                             "val_loss": float(((pred - yv) ** 2).mean()),
                             "val_gene_pcc": per_sample_pcc(yv, pred, val.group)})
            best = max(rows, key=lambda r: (r["val_gene_pcc"] if np.isfinite(r["val_gene_pcc"])
                                            else -np.inf, -r["val_loss"]))
            if best["alpha_ratio"] in (ALPHA_RATIOS[0], ALPHA_RATIOS[-1]):
                log.warning("%s: the chosen ridge penalty (%g x the mean component variance) is at the "
                            "edge of the grid", self.kind, best["alpha_ratio"])
        else:  # no validation spots: the penalty in the middle of the grid
            ratio = ALPHA_RATIOS[len(ALPHA_RATIOS) // 2]
            best = {"alpha_ratio": ratio, "alpha": ratio * unit, "val_loss": float("nan"),
                    "val_gene_pcc": float("nan")}
            rows.append(best)
        self.alpha = best["alpha"]
        for row in rows:
            row["chosen"] = row["alpha"] == self.alpha
            row["pca_components"] = k
        self.coef, self.intercept = solve(self.alpha), y_mean
        return rows

    def predict(self, x: np.ndarray, grid=(0, 0), pooled=None) -> np.ndarray:
        return (self._project(x) @ self.coef + self.intercept).astype(np.float32)

    def state(self) -> dict:
        t = torch.from_numpy
        return {"alpha": self.alpha, "x_mean": t(self.x_mean), "components": t(self.components.astype(np.float32)),
                "coef": t(self.coef), "intercept": t(self.intercept),
                "scale": None if self.scale is None else t(self.scale)}

    @classmethod
    def from_state(cls, state, model_cfg=None, train_cfg=None) -> EncoderRidge:
        m = cls(model_cfg, train_cfg)
        m.alpha = state["alpha"]
        m.x_mean = state["x_mean"].numpy()
        m.components = state["components"].numpy().astype(np.float64)
        m.coef, m.intercept = state["coef"].numpy(), state["intercept"].numpy()
        scale = state.get("scale")  # absent from models of single-block features
        m.scale = None if scale is None else scale.numpy()
        return m


class EncoderRidgeView0(EncoderRidge):
    """:class:`EncoderRidge` on the pooled features of view 0 alone (the spot itself)."""

    kind = "encoder_ridge_v0"
    views = (0,)


FEATURE_MODELS: dict[str, type[FeatureModel]] = {
    "encoder_ridge": EncoderRidge,
    "encoder_ridge_v0": EncoderRidgeView0,
}
