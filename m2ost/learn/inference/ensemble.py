"""``ensemble``: a weighted average of other trained models of the same split.

The members (``ensemble.members``: any kinds but ``ensemble``) are trained as usual; the
ensemble then predicts the validation spots of the training samples with each of them (the same
draw every kind holds out, so no member has trained on them) and keeps the weights (a grid on
the simplex, step ``ensemble.step``) with the best mean per-gene Pearson there. Models that err
differently (the network on the pixels, probes on handcrafted or pretrained features) average
to better predictions than each alone; which ones and how much is decided on validation spots,
never on a held-out slide.

``model.pt`` holds the members with a non-zero weight in full (their own payloads), so it
predicts new slides with no other file; predicting runs every kept member
(m2ost.learn.inference.heldout.predict_sample).
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from m2ost import defaults
from m2ost.data.panel import read_gene_list
from m2ost.errors import InputError
from m2ost.learn.training.calibration import validation_record
from m2ost.learn.training.checkpoints import load_checkpoint, model_payload, save_checkpoint, write_log
from m2ost.learn.inputs.dataset import depths_of, load_samples
from m2ost.learn.inference.heldout import predict_sample
from m2ost.learn.features.probes import per_sample_pcc
from m2ost.learn.inference.predictor import predictor_from_payload
from m2ost.learn.training.identity import model_fingerprint, train_settings
from m2ost.learn.training.validation import validation_spots
from m2ost.plan.kinds import ENSEMBLE, ENSEMBLE_TRAIN_KEYS, FEATURE_KINDS

log = logging.getLogger(__name__)


def simplex_weights(n: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector of ``n`` members on a grid of ``step`` that sums to 1."""
    if n < 1:
        raise InputError("an ensemble needs at least one member")
    k = int(round(1.0 / step))
    if k < 1 or abs(k * step - 1.0) > 1e-9:
        raise InputError(f"ensemble.step must divide 1 (0.1, 0.125, 0.25, ...), got {step}")
    return [tuple(c / k for c in combo) for combo in itertools.product(range(k + 1), repeat=n)
            if sum(combo) == k]


def choose_weights(preds: Sequence[np.ndarray], truth: np.ndarray, group: np.ndarray,
                   step: float) -> tuple[tuple[float, ...], list[dict]]:
    """The weights with the best mean per-gene Pearson (per sample, averaged) of the weighted
    average of ``preds``; ties (to 1e-6) go to the lower squared error, since adding a constant
    predictor such as ``mean`` changes no Pearson r. Returns (weights, one row each)."""
    rows = []
    for w in simplex_weights(len(preds), step):
        pred = sum(wi * p for wi, p in zip(w, preds) if wi)
        rows.append({"weights": w, "val_gene_pcc": per_sample_pcc(truth, pred, group),
                     "val_loss": float(((pred - truth) ** 2).mean())})

    def key(r):
        pcc = r["val_gene_pcc"]
        return (round(pcc, 6) if np.isfinite(pcc) else -np.inf, -r["val_loss"])

    best = max(rows, key=key)
    return best["weights"], rows


def member_check(name: str, payload: Mapping, genes: Sequence[str], cfg: Mapping,
                 train_samples: Sequence[str], path) -> None:
    """A member must be of this split (same genes and training samples) and must have held out
    the same validation spots (same seed, fraction, padding rule)."""
    if payload.get("kind") == ENSEMBLE:
        raise InputError("an ensemble cannot be a member of an ensemble", file=path)
    if list(payload["genes"]) != list(genes):
        raise InputError(f"member {name} was trained on another gene panel; retrain it", file=path)
    if sorted(payload.get("train_samples", [])) != sorted(train_samples):
        raise InputError(f"member {name} was trained on samples {payload.get('train_samples')}, "
                         f"not {list(train_samples)}", file=path)
    theirs = payload.get("train_cfg", {})
    differ = [k for k in ENSEMBLE_TRAIN_KEYS if k in theirs and theirs[k] != cfg[k]]
    if differ:
        raise InputError(f"member {name} held out other validation spots (train settings "
                         f"{', '.join(differ)} differ); retrain it", file=path)


def validation_predictions(predictors: Sequence, data, parts: Mapping, embeddings: Mapping[str, str],
                           batch_size: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Each member's predictions of the validation spots, their targets, sample numbers and
    depths (:func:`~m2ost.learn.inputs.dataset.depths_of`)."""
    subsets = [d.subset(parts[d.sample][1]) for d in data]
    preds = [np.concatenate([predict_sample(p, s, batch_size, 0, False,
                                            embeddings.get(s.sample) if p.kind in FEATURE_KINDS else None)
                             for s in subsets]) for p in predictors]
    truth = np.concatenate([s.targets for s in subsets])
    group = np.concatenate([np.full(len(s), k) for k, s in enumerate(subsets)])
    return preds, truth, group, depths_of(subsets, [slice(None)] * len(subsets))


def _load_members(member_files: Mapping[str, str], genes: Sequence[str], cfg: Mapping,
                  train_samples: Sequence[str]) -> tuple[list[str], dict, list]:
    """The members' names, checked payloads and predictors (a GPU when present)."""
    names = list(member_files)
    if not names:
        raise InputError("an ensemble needs at least one member (ensemble.members)")
    payloads = {}
    for name in names:
        payloads[name] = load_checkpoint(Path(member_files[name]))
        member_check(name, payloads[name], genes, cfg, train_samples, member_files[name])
    predictors = [predictor_from_payload(payloads[n], "auto") for n in names]
    return names, payloads, predictors


def _training_data(predictors: Sequence, names: Sequence[str], bundles: Mapping[str, str],
                   expressions: Mapping[str, str], genes: Sequence[str], train_samples: Sequence[str],
                   cfg: Mapping) -> list:
    """The training samples on all views; every member must keep the same spots on its own."""
    data = load_samples(bundles, expressions, genes, list(train_samples), None,
                        drop_padded=bool(cfg["drop_padded"]), verify=False)
    for p, name in zip(predictors, names):  # padding is judged on a member's views: same spots?
        mine = load_samples(bundles, expressions, genes, list(train_samples), p.views,
                            drop_padded=bool(cfg["drop_padded"]), verify=False)
        if any(len(a) != len(b) or (a.rows != b.rows).any() for a, b in zip(mine, data)):
            raise InputError(f"member {name} uses views {p.views}, which drop other padded spots than all "
                             "views do: its validation spots differ (set train.drop_padded: false)")
    return data


def _weigh_members(names: Sequence[str], preds: Sequence[np.ndarray], truth: np.ndarray,
                   group: np.ndarray, step: float) -> tuple[tuple[float, ...], list[dict]]:
    """Choose the weights, log each member's and the ensemble's validation PCC, mark the rows."""
    weights, rows = choose_weights(preds, truth, group, step)
    for name, p in zip(names, preds):
        log.info("ensemble member %s: validation gene PCC %.4f", name, per_sample_pcc(truth, p, group))
    log.info("ensemble weights %s: validation gene PCC %.4f",
             ", ".join(f"{n} {w:g}" for n, w in zip(names, weights)),
             max(r["val_gene_pcc"] for r in rows))
    for r in rows:
        r["chosen"] = r["weights"] == weights
        r["weights"] = " ".join(f"{n}={w:g}" for n, w in zip(names, r["weights"]))
    return weights, rows


def _ensemble_payload(kept: Sequence[tuple[str, float]], payloads: Mapping, info: Mapping, step: float,
                      genes: Sequence[str], cfg: Mapping, train_samples: Sequence[str]) -> dict:
    """The ensemble's checkpoint payload: the kept members in full, with their weights."""
    views = sorted({v for n, _ in kept for v in payloads[n]["views"]})
    fov = [info["fov_um"][v] for v in views]
    img_size = info["size_px"][views[0]]
    stored_cfg = {"members": [n for n, _ in kept], "weights": [w for _, w in kept], "step": step,
                  "member_fingerprints": [payloads[n]["fingerprint"] for n, _ in kept]}
    fp = model_fingerprint(ENSEMBLE, stored_cfg, genes, views, img_size, fov)
    payload = model_payload(ENSEMBLE, genes, views, img_size, fov, stored_cfg, cfg, train_samples, fp)
    payload["state"] = {"weights": [w for _, w in kept], "members": [payloads[n] for n, _ in kept]}
    return payload


def fit_ensemble(member_files: Mapping[str, str], bundles: Mapping[str, str], expressions: Mapping[str, str],
                 embeddings: Mapping[str, str] | None, genes_file: str, train_samples: Sequence[str],
                 settings: Mapping | None, out_dir: str | os.PathLike) -> dict:
    """Choose the members' weights on the validation spots; write ``out_dir/model.pt`` and ``log.csv``.

    ``member_files``: member name -> its ``model.pt`` (trained on this split);
    ``settings``: ``{"model": {"members": [...], "step": 0.1}, "train": {seed, val_fraction,
    drop_padded}}``; ``embeddings``: cached embeddings of the training samples, read by the
    feature-kind members (without them their encoder runs on the views).
    """
    settings = dict(settings or {})
    ens_cfg = dict(settings.get("model") or {})
    cfg = train_settings(settings.get("train"))
    step = float(defaults.settings(ENSEMBLE, ens_cfg)["step"])
    genes = read_gene_list(genes_file)
    names, payloads, predictors = _load_members(member_files, genes, cfg, train_samples)
    data = _training_data(predictors, names, bundles, expressions, genes, train_samples, cfg)
    parts = validation_spots({d.sample: len(d) for d in data}, float(cfg["val_fraction"]), int(cfg["seed"]))
    n_val = sum(len(parts[d.sample][1]) for d in data)
    if n_val < 2:
        raise InputError(f"an ensemble chooses its weights on validation spots; {n_val} drawn "
                         "(train.val_fraction > 0 needed)")
    preds, truth, group, depth = validation_predictions(predictors, data, parts, embeddings or {}, 64)
    weights, rows = _weigh_members(names, preds, truth, group, step)
    kept = [(n, w) for n, w in zip(names, weights) if w > 0]
    payload = _ensemble_payload(kept, payloads, data[0].info, step, genes, cfg, train_samples)
    ensemble_pred = sum(w * p for w, p in zip(weights, preds) if w)
    payload.update(validation_record(truth, ensemble_pred, group, genes, int(cfg["seed"]), depth))
    out_dir = Path(out_dir)
    save_checkpoint(payload, out_dir / "model.pt")
    write_log(rows, out_dir / "log.csv")
    best = next(r for r in rows if r["chosen"])
    return {"kind": ENSEMBLE, "model_file": str(out_dir / "model.pt"), "weights": dict(kept),
            "val_gene_pcc": best["val_gene_pcc"], "val_loss": best["val_loss"]}
