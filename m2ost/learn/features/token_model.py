"""``m2ost_encoder``: M2OST over the token grids of a pretrained encoder, as a feature model.

Trained on the cached token grids of the embed stage (``encoder.tokens``, switched on by itself
when this kind is selected), on the CPU in minutes; evaluated and used for prediction through
m2ost.learn.features.encoded like every feature kind (views encoded on the fly by the same encoder).
The network is :class:`m2ost.model.token_m2ost.TokenM2OST`; its training loop is
m2ost.learn.features.token_training. Its settings are the ``m2ost_encoder`` section of the config
(m2ost/schemas/config.schema.yaml documents them and gives their defaults).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from m2ost import defaults
from m2ost.errors import InputError
from m2ost.learn.features.probes import (EncoderRidge, FeatureModel, FeatureSet, block_scale, check_blocks,
                                        per_sample_pcc)
from m2ost.learn.features.token_training import FIT_KEYS, fit_network, predict_features
from m2ost.model.token_m2ost import TokenM2OST

SECTION = "m2ost_encoder"
NETWORK_KEYS = ("depth", "dim", "heads", "mlp_dim", "deformable", "token_mask_ratio", "dropout")
BLEND_WEIGHTS = tuple(round(float(w), 2) for w in np.linspace(0.0, 1.0, 11))


def m2ost_encoder_settings(cfg: Mapping | None) -> dict:
    """``cfg`` over the ``m2ost_encoder`` section's defaults, checked (m2ost.defaults.settings)."""
    cfg = dict(cfg or {})
    # models saved before m2ost_finetune existed record finetune_blocks 0 (a frozen encoder)
    if int(cfg.pop("finetune_blocks", 0)) > 0:  # the cached tokens are the frozen encoder's
        raise InputError("m2ost_encoder trains on the frozen encoder's cached tokens; fine-tuning the "
                         "encoder is the model kind m2ost_finetune (its section: m2ost_finetune.finetune_blocks)")
    return defaults.settings(SECTION, cfg)


class M2OSTEncoder(FeatureModel):
    """TokenM2OST on the (n, V, h*w, C) tokens of all views (see the module docstring).

    With ``blend_ridge``, the prediction is averaged with HEST's ridge probe
    (:class:`~m2ost.learn.features.probes.EncoderRidge`), the weight chosen on the validation spots
    (1 = the network alone). The probe reads the embeddings' pooled features (the encoder's
    output and its intermediate stages, ``encoder.levels``) when the training set carries them,
    else the mean of the token grids (the output alone): on the HER2+ validation spots the
    stages raised the average on 6 of 6 splits (docs/benchmarks.md).
    """

    kind = "m2ost_encoder"
    input = "tokens"
    views = None

    def __init__(self, model_cfg: Mapping | None = None, train_cfg: Mapping | None = None):
        super().__init__(model_cfg, train_cfg)
        self.settings = m2ost_encoder_settings(self.model_cfg)
        self.net: TokenM2OST | None = None
        self.sizes: dict | None = None
        self.scale = self.shift = None
        self.ridge, self.weight = None, 1.0
        self.ridge_input = "tokens"  # what the probe reads: "pooled" (FeatureSet.pooled) or "tokens"
        self.pca_mean = self.pca_components = None
        self.token_scale = None  # per-channel factor weighing the tokens' blocks equally

    def _build(self) -> TokenM2OST:
        return TokenM2OST(**self.sizes, **{k: self.settings[k] for k in NETWORK_KEYS})

    def fit(self, train, val, out_dir=None) -> list[dict]:
        if train.x.ndim != 4:
            raise InputError(f"{self.kind} needs token grids (n, V, h*w, C), got shape {train.x.shape}")
        seed = int(defaults.settings("train", {k: v for k, v in self.train_cfg.items() if k == "seed"})["seed"])
        self._fit_token_scale(train.x, tuple(train.token_blocks), seed)
        self._fit_pca(train.x, seed)
        train_x, val_x = self._project(train.x), self._project(val.x)
        _, v, t, c = train_x.shape
        self.sizes = {"n_genes": int(train.y.shape[1]), "n_views": v, "n_tokens": t, "in_dim": c}
        fit_cfg = {**{k: self.settings[k] for k in FIT_KEYS}, "seed": seed}
        result = fit_network(self._build, train_x[None], train.y, val_x, val.y, val.group, fit_cfg,
                             out_dir, model_cfg=self.settings)
        self.net = self._build()
        self.net.load_state_dict(result["state_dict"])
        self.net.eval()
        self.scale, self.shift = result["scale"], result["shift"]
        rows = [dict(r) for r in result["log"]]
        for r in rows:
            r["chosen"] = r["epoch"] == result["best_epoch"]
        self.ridge, self.weight = None, 1.0
        if self.settings["blend_ridge"] and len(val):
            rows = self._fit_blend(train, val, rows)
        return rows

    def _fit_blend(self, train, val, rows: list[dict]) -> list[dict]:
        """Average with HEST's ridge probe, the weight chosen on ``val``."""
        ridge = EncoderRidge(self.model_cfg, self.train_cfg)
        self.ridge_input = "pooled" if train.pooled is not None and val.pooled is not None else "tokens"
        if self.ridge_input == "pooled":
            ridge.fit(FeatureSet(train.pooled, train.y, train.group, blocks=train.blocks),
                      FeatureSet(val.pooled, val.y, val.group, blocks=train.blocks))
        else:
            ridge.fit(FeatureSet(pooled(train.x), train.y, train.group),
                      FeatureSet(pooled(val.x), val.y, val.group))
        net, lin = self._net_predict(val.x), ridge.predict(self._ridge_features(val.x, val.pooled))
        scores = [(per_sample_pcc(val.y, w * net + (1 - w) * lin, val.group), w) for w in BLEND_WEIGHTS]
        best, self.weight = max(scores, key=lambda t: (t[0] if np.isfinite(t[0]) else -np.inf, t[1]))
        self.ridge = ridge
        for r in rows:  # every row says its weight: the epochs are the network alone
            r.update(chosen=False, blend_weight=1.0)
        rows.append({"epoch": f"best epoch + ridge (alpha {ridge.alpha:g})", "val_gene_pcc": best,
                     "blend_weight": self.weight, "chosen": True})
        return rows

    @staticmethod
    def _token_sample(x: np.ndarray, seed: int, size: int = 8192) -> np.ndarray:
        """Up to ``size`` training tokens drawn at random (float64), for channel statistics."""
        flat = x.reshape(-1, x.shape[-1])
        rng = np.random.default_rng(seed)
        return flat[np.sort(rng.choice(len(flat), min(len(flat), size), replace=False))].astype(np.float64)

    def _fit_token_scale(self, x: np.ndarray, blocks: tuple[int, ...], seed: int) -> None:
        """Weigh the blocks of the tokens' channels (the encoder's output, then the maps of its
        intermediate stages, ``encoder.token_levels``) equally: each is scaled to a mean channel
        variance of 1 over the training tokens. Otherwise the network's first LayerNorm would
        follow whichever block has the largest activations."""
        self.token_scale = None
        if len(blocks) < 2:
            return
        check_blocks(blocks, x.shape[-1], "token")
        self.token_scale = block_scale(self._token_sample(x, seed).var(axis=0), blocks, np.mean)

    def _fit_pca(self, x: np.ndarray, seed: int) -> None:
        """Principal axes of the training tokens' channels (``token_pca`` of them; 0: none),
        after the blocks' scaling.

        As HEST's PCA before the ridge: the network's first layer then learns ``k x dim``
        weights instead of ``C x dim`` (1280 x dim for EfficientNet), fewer to overfit on a
        few hundred spots and a fifth of the training time.
        """
        k = int(self.settings["token_pca"])
        self.pca_mean = self.pca_components = None
        if k <= 0 or k >= x.shape[-1]:
            return
        sample = self._token_sample(x, seed)
        if self.token_scale is not None:
            sample = sample * self.token_scale
        self.pca_mean = sample.mean(0)
        _, _, vt = np.linalg.svd(sample - self.pca_mean, full_matrices=False)
        self.pca_components = vt[:k]

    def _project(self, x: np.ndarray, chunk: int = 256) -> np.ndarray:
        """Tokens with their blocks scaled (float16, as cached) and onto the PCA axes (float32),
        in chunks of spots to bound memory."""
        if self.pca_components is None and self.token_scale is None:
            return x
        scale = None if self.token_scale is None else self.token_scale.astype(np.float32)
        pca = self.pca_components is not None

        def part(a: np.ndarray) -> np.ndarray:
            a = np.asarray(a, np.float32)
            a = a if scale is None else a * scale
            if not pca:
                return a.astype(np.float16)
            return (a - self.pca_mean.astype(np.float32)) @ self.pca_components.astype(np.float32).T

        out = [part(x[s:s + chunk]) for s in range(0, len(x), chunk)]
        return np.concatenate(out) if out else part(x[:0])

    def _net_predict(self, x: np.ndarray) -> np.ndarray:
        return predict_features(self.net, self._project(x), scale=self.scale, shift=self.shift)

    def _ridge_features(self, x: np.ndarray, pooled_features: np.ndarray | None) -> np.ndarray:
        if self.ridge_input == "tokens":
            return pooled(x)
        if pooled_features is None:
            raise InputError(f"this {self.kind} model averages with a probe on the pooled features; "
                             "predict it with them (pooled=...)")
        return pooled_features

    def predict(self, x: np.ndarray, grid=(0, 0), pooled=None) -> np.ndarray:
        y = self._net_predict(x)
        if self.ridge is not None and self.weight < 1.0:
            y = self.weight * y + (1 - self.weight) * self.ridge.predict(self._ridge_features(x, pooled))
        return y.astype(np.float32)

    def state(self) -> dict:
        return {"sizes": dict(self.sizes), "network": {k: self.settings[k] for k in NETWORK_KEYS},
                "state_dict": self.net.state_dict(), "scale": torch.from_numpy(self.scale),
                "shift": torch.from_numpy(self.shift), "blend_weight": float(self.weight),
                "ridge": None if self.ridge is None else self.ridge.state(), "ridge_input": self.ridge_input,
                "token_scale": None if self.token_scale is None else torch.from_numpy(self.token_scale),
                "pca": None if self.pca_components is None else
                {"mean": torch.from_numpy(self.pca_mean), "components": torch.from_numpy(self.pca_components)}}

    @classmethod
    def from_state(cls, state, model_cfg=None, train_cfg=None) -> M2OSTEncoder:
        m = cls({**(model_cfg or {}), **state["network"]}, train_cfg)
        m.sizes = dict(state["sizes"])
        m.net = m._build()
        m.net.load_state_dict(state["state_dict"])
        m.net.eval()
        m.scale, m.shift = state["scale"].numpy(), state["shift"].numpy()
        m.weight = float(state["blend_weight"])
        if state["pca"] is not None:
            m.pca_mean = state["pca"]["mean"].numpy()
            m.pca_components = state["pca"]["components"].numpy()
        scale = state.get("token_scale")  # absent from models saved before token_levels
        m.token_scale = None if scale is None else scale.numpy()
        m.ridge = None if state["ridge"] is None else EncoderRidge.from_state(state["ridge"])
        m.ridge_input = state.get("ridge_input", "tokens")  # models saved before it existed
        return m


def pooled(tokens: np.ndarray) -> np.ndarray:
    """(n, V, h*w, C) token grids -> (n, V, C) average-pooled features (the encoder's pooling for
    CNNs; for ViTs the mean token, which stands in for their [cls])."""
    return np.asarray(tokens, np.float32).mean(2)
