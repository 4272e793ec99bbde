"""Train a network on cached encoder features (token grids) of the training spots.

The images were encoded once (the embedding stage), so an epoch is a pass over small tensors
held in memory: minutes on a CPU where the image network needs hours. Used by
``m2ost_encoder`` (:mod:`m2ost.learn.features.token_model`).

Augmentation with cached features: the embedding stage may store several encodings of every
spot (the eight flips/rotations, stain jitter); ``train_x`` then has a leading axis of those
sets and every epoch draws one set per spot. Token masking (in the network) adds to it.

Reproducibility and resuming as in :mod:`m2ost.learn.training.trainer`: all randomness of epoch ``e`` comes
from seeds derived from ``(seed, e)``; ``checkpoints/last.pt`` is written every epoch and a
restarted run resumes from it and ends with the same weights.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from m2ost import defaults
from m2ost.atomic import atomic_path
from m2ost.errors import InputError, StaleCheckpoint, TrainingDiverged
from m2ost.eval.metrics import mean_gene_pcc
from m2ost.learn.training.device import derive_seed, seed_everything

log = logging.getLogger(__name__)

# The settings of the training loop: keys of the ``m2ost_encoder`` section (its defaults) and
# ``seed`` (the ``train`` section's).
FIT_KEYS = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "patience",
            "standardize_targets", "grad_clip")
LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "val_gene_pcc", "lr", "seconds")


def fit_settings(cfg: Mapping | None) -> dict:
    """``cfg`` (:data:`FIT_KEYS` and ``seed``) over the schema's defaults, checked; unknown keys
    are an error."""
    cfg = dict(cfg or {})
    seed = defaults.settings("train", {"seed": cfg.pop("seed")} if "seed" in cfg else {})["seed"]
    unknown = sorted(set(cfg) - set(FIT_KEYS))
    if unknown:
        raise InputError(f"unknown m2ost_encoder training settings: {', '.join(unknown)} "
                         f"(it takes {', '.join(FIT_KEYS)}, seed)")
    out = defaults.settings("m2ost_encoder", cfg)
    return {**{k: out[k] for k in FIT_KEYS}, "seed": seed}


def group_pcc(truth: np.ndarray, pred: np.ndarray, groups: np.ndarray) -> float:
    """Mean per-gene Pearson per group (sample), averaged over the groups where it is defined."""
    scores = [mean_gene_pcc(truth[groups == g], pred[groups == g]) for g in np.unique(groups)]
    scores = [s for s in scores if np.isfinite(s)]
    return float(np.mean(scores)) if scores else float("nan")


def _lr_factor(step: int, total: int, warm: int) -> float:
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def _save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _write_log(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        w = csv.DictWriter(handle, fieldnames=list(LOG_COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def run_id(cfg: Mapping, model_cfg: Mapping, n_train: int, n_val: int) -> str:
    """What a checkpoint must match to be resumed."""
    blob = json.dumps({"fit": dict(cfg), "model": dict(model_cfg), "n": [n_train, n_val]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.inference_mode()
def predict_features(model: torch.nn.Module, x: np.ndarray, batch_size: int = 256,
                     scale: np.ndarray | None = None, shift: np.ndarray | None = None
                     ) -> np.ndarray:
    """(n, ...) features -> (n, n_genes) float32, de-standardised with ``scale``/``shift``."""
    model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(x[s:s + batch_size]))).float().numpy()
           for s in range(0, len(x), batch_size)]
    y = np.concatenate(out) if out else np.zeros((0, model.head.out_features), np.float32)
    if scale is not None:
        y = y * scale + shift
    return y.astype(np.float32)


def fit_network(build: Callable[[], torch.nn.Module], train_x: np.ndarray, train_y: np.ndarray,
                val_x: np.ndarray, val_y: np.ndarray, val_groups: np.ndarray, cfg: Mapping,
                out_dir: str | Path | None = None, model_cfg: Mapping | None = None) -> dict:
    """Train ``build()`` on features, keep the epoch with the best validation gene PCC.

    ``build`` makes the (untrained) network, features -> (B, n_genes), after seeding.
    ``train_x``: (n_sets, n, ...) features of the training spots, ``n_sets`` cached encodings per
    spot (1 = no augmentation), any float dtype (float16 is cast per batch); ``train_y``,
    ``val_y``: (n, n_genes) targets; ``val_x``, ``val_groups``: (n_val, ...) un-augmented features
    of the validation spots (of the training samples) and their sample numbers (the validation
    PCC is the mean over samples); ``cfg``: :data:`FIT_KEYS` and ``seed`` (:func:`fit_settings`);
    ``out_dir`` receives ``log.csv`` and ``checkpoints/last.pt`` (resume) when given.

    Returns ``state_dict`` (best epoch), ``scale``/``shift`` (target de-standardisation),
    ``best_epoch``, ``best_val_gene_pcc``, ``epochs_run``, ``log``.
    """
    cfg = fit_settings(cfg)
    seed, epochs = int(cfg["seed"]), int(cfg["epochs"])
    seed_everything(seed, deterministic=True)
    model = build()
    shift, scale, y_std = _standardized(train_y, bool(cfg["standardize_targets"]))
    with torch.no_grad():  # start at the mean predictor: the head's bias is the (scaled) mean
        model.head.bias.zero_()
    n = train_x.shape[1]
    opt, sched = _optimizer(model, cfg, math.ceil(n / int(cfg["batch_size"])))
    rid = run_id(cfg, model_cfg or {}, n, len(val_x))
    last = Path(out_dir) / "checkpoints" / "last.pt" if out_dir is not None else None
    state = _resume(last, rid, model, opt, sched)
    patience = int(cfg["patience"] or 0)
    while state["epoch"] < epochs and not (patience and state["since_best"] >= patience):
        t0 = time.time()
        loss, lr = _train_epoch(model, opt, sched, train_x, y_std, cfg, state["epoch"])
        val_loss, val_pcc = _score_epoch(state, model, val_x, val_y, val_groups, scale, shift)
        row = {"epoch": state["epoch"], "train_loss": loss, "val_loss": val_loss, "val_gene_pcc": val_pcc,
               "lr": lr, "seconds": round(time.time() - t0, 3)}
        state["log"].append(row)
        log.info("epoch %d/%d train %.4f val %.4f val_gene_pcc %.4f (%.1fs)", row["epoch"], epochs,
                 loss, row["val_loss"], row["val_gene_pcc"], row["seconds"])
        if out_dir is not None:
            _save({"run_id": rid, "model": model.state_dict(), "optimizer": opt.state_dict(),
                   "scheduler": sched.state_dict(), "state": state}, last)
            _write_log(state["log"], Path(out_dir) / "log.csv")
    return {"state_dict": state["best_state"], "scale": scale, "shift": shift,
            "best_epoch": state["best_epoch"], "best_val_gene_pcc": state["best"],
            "epochs_run": state["epoch"], "log": state["log"]}


def _standardized(train_y: np.ndarray, standardize: bool):
    """(shift, scale, the targets standardised as a tensor): per-gene z-scores, or centred only."""
    train_y = np.asarray(train_y, np.float32)
    shift = train_y.mean(0)
    scale = train_y.std(0) if standardize else np.ones_like(shift)
    scale = np.where(scale > 1e-6, scale, 1.0).astype(np.float32)
    return shift, scale, torch.from_numpy((train_y - shift) / scale)


def _optimizer(model: torch.nn.Module, cfg: Mapping, steps: int):
    """AdamW (no weight decay on vectors, position embeddings, class tokens) and its schedule:
    linear warm-up over ``warmup_epochs``, cosine decay over ``epochs``."""
    decay = [p for name, p in model.named_parameters()
             if p.requires_grad and p.ndim >= 2 and "pos_emb" not in name and "cls" not in name]
    other = [p for name, p in model.named_parameters()
             if p.requires_grad and not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(cfg["weight_decay"])},
                             {"params": other, "weight_decay": 0.0}], lr=float(cfg["lr"]))
    warm, total = round(float(cfg["warmup_epochs"]) * steps), int(cfg["epochs"]) * steps
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, total, warm))


def _resume(last: Path | None, rid: str, model, opt, sched) -> dict:
    """The training state of checkpoint ``last`` (model, optimiser and schedule restored), or a
    fresh one; a checkpoint of another run is refused."""
    state = {"epoch": 0, "best": -math.inf, "best_epoch": 0, "since_best": 0, "log": [], "best_state": None}
    if last is None or not last.exists():
        return state
    ck = torch.load(last, map_location="cpu", weights_only=False)
    if ck.get("run_id") != rid:
        raise StaleCheckpoint("checkpoint belongs to a different run (settings, model or spots "
                              "differ); delete it or use another output directory", file=last)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    log.info("resuming %s from epoch %d", last, ck["state"]["epoch"])
    return ck["state"]


def _train_epoch(model, opt, sched, train_x: np.ndarray, y_std: torch.Tensor, cfg: Mapping,
                 epoch: int) -> tuple[float, float]:
    """One pass over the training spots (one of the ``n_sets`` encodings of each, drawn per
    epoch); (the mean training loss, the learning rate of the last step)."""
    seed, batch, clip = int(cfg["seed"]), int(cfg["batch_size"]), float(cfg["grad_clip"])
    n_sets, n = train_x.shape[0], train_x.shape[1]
    torch.manual_seed(derive_seed(seed, "epoch", epoch))
    rng = np.random.default_rng(derive_seed(seed, "epoch-order", epoch))
    order, sets = rng.permutation(n), rng.integers(0, n_sets, n)
    model.train()
    loss_sum, lr = 0.0, opt.param_groups[0]["lr"]
    for s in range(0, n, batch):
        idx = order[s:s + batch]
        x = torch.from_numpy(train_x[sets[idx], idx]).float()
        loss = torch.nn.functional.mse_loss(model(x), y_std[idx])
        if not math.isfinite(loss.item()):
            raise TrainingDiverged(f"loss is {float(loss)} at epoch {epoch + 1}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(idx)
    return loss_sum / n, lr


def _score_epoch(state: dict, model, val_x, val_y, val_groups, scale, shift) -> tuple[float, float]:
    """(validation loss, gene PCC) of the epoch just trained; the weights kept in ``state`` when
    they are the best yet, and the epoch counted."""
    epoch = state["epoch"]
    pred = predict_features(model, val_x, scale=scale, shift=shift)
    val_loss = float(((pred - val_y) ** 2).mean()) if len(val_y) else float("nan")
    val_pcc = group_pcc(val_y, pred, val_groups) if len(val_y) else float("nan")
    key = val_pcc if math.isfinite(val_pcc) else -math.inf
    if key > state["best"] or state["best_state"] is None:
        state.update(best=key, best_epoch=epoch + 1, since_best=0,
                     best_state={k: v.clone() for k, v in model.state_dict().items()})
    else:
        state["since_best"] += 1
    state["epoch"] = epoch + 1
    return val_loss, val_pcc
