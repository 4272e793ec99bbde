"""Fit a model on the training samples of a split: M2OST, single-view M2OST, or a baseline.

Entry point: :func:`fit_model` (``kind`` in ``m2ost``, ``m2ost_single``, ``ridge``, ``mean``);
:func:`train` is the neural part. Outputs, in ``out_dir``:

``model.pt``                 best weights (or baseline state) + everything needed to predict
``log.csv``                  one row per epoch (neural) or per penalty tried (ridge)
``checkpoints/last.pt``      written every epoch; the run resumes from it when restarted
``checkpoints/best.pt``      weights of the best epoch so far

Reproducibility. All randomness of epoch ``e`` (shuffling, augmentations, dropout and token
masks) is drawn from seeds derived from ``(seed, e)`` (and the rank), not from generator states
carried over from earlier epochs. With the model, optimiser and scheduler restored from
``last.pt``, a run killed and restarted therefore ends with exactly the weights of an
uninterrupted run on the CPU. The RNG states are stored in the checkpoint all the same.

Scale-out. Under ``torchrun`` (or ``srun`` with MASTER_ADDR/MASTER_PORT exported) with a world
size above 1, training uses DistributedDataParallel (gloo on CPU, nccl on CUDA) and a
DistributedSampler; each rank takes ``batch_size / world_size`` spots per step, so the
effective batch, and hence the optimisation, matches a single-process run. Rank 0 validates and
writes every file.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from m2ost.atomic import atomic_path
from m2ost.learn.baselines import BASELINES
from m2ost.learn.dataset import (NORMALISATION, SpotDataset, load_samples, make_loader, prepare_batch)
from m2ost.learn.device import (autocast, derive_seed, pin_memory, resolve_device, rng_state,
                     seed_everything, set_rng_state)
from m2ost.errors import InputError, TrainingDiverged
from m2ost.eval.metrics import mean_gene_pcc
from m2ost.data.panel import read_gene_list
from m2ost.provenance import provenance
from m2ost.learn.validation import validation_spots

log = logging.getLogger(__name__)

KINDS = ("m2ost", "m2ost_single", "ridge", "mean")
MODEL_FORMAT = 1

TRAIN_DEFAULTS = {
    "epochs": 100,
    "batch_size": 64,
    "lr": 1e-4,
    "weight_decay": 0.01,
    "workers": 4,
    "val_fraction": 0.1,
    "patience": 20,           # epochs without improvement before stopping; 0 = never stop early
    "seed": 0,
    "device": "auto",
    "drop_padded": True,
    "augment": {"flip": True, "rot90": True, "color_jitter": 0.1},
    "scheduler": "cosine",    # "cosine" (with linear warm-up) or "none"
    "warmup_epochs": 1,
    "min_lr": 0.0,
    "grad_clip": 0.0,         # max gradient norm; 0 = no clipping
    "init_head_bias": True,   # start the output bias at the mean training expression
    "eval_batch_size": 0,     # 0 = 2 x batch_size
    "progress": True,         # tqdm bar per epoch (rank 0)
    "compile": False,         # torch.compile the network for the training steps (GPU)
}
# Settings that do not change the optimisation path of the epochs already run: a checkpoint
# may resume under new values of these (e.g. more patience). ``epochs`` joins them when there is
# no schedule, since then the first k epochs do not depend on the total (a run can be extended);
# under the cosine schedule the learning rate of every step depends on it.
_RESUME_NEUTRAL = ("workers", "device", "progress", "eval_batch_size", "patience", "compile")

LOG_COLUMNS = ("epoch", "train_loss", "val_loss", "val_gene_pcc", "lr", "seconds")


def train_settings(train_cfg: Mapping | None) -> dict:
    """``train_cfg`` over :data:`TRAIN_DEFAULTS`, checked. Unknown keys are an error."""
    cfg = json.loads(json.dumps(TRAIN_DEFAULTS))
    unknown = sorted(set(train_cfg or {}) - set(cfg))
    if unknown:
        raise InputError(f"unknown training settings: {', '.join(unknown)}")
    cfg.update(train_cfg or {})
    for key in ("epochs", "batch_size"):
        if int(cfg[key]) < 1:
            raise InputError(f"training setting {key} must be >= 1, got {cfg[key]}")
    if cfg["scheduler"] not in ("cosine", "none", None):
        raise InputError(f"scheduler must be 'cosine' or 'none', got {cfg['scheduler']!r}")
    if float(cfg["lr"]) <= 0:
        raise InputError(f"lr must be positive, got {cfg['lr']}")
    return cfg


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(kind: str, model_cfg: Mapping, genes: Sequence[str], views: Sequence[int],
                      img_size: int, fov_um: Sequence[float]) -> str:
    """What a trained model is: its kind and configuration, gene panel, views and input."""
    return _digest({"kind": kind, "model_cfg": dict(model_cfg), "genes": list(genes),
                    "views": list(views), "img_size": int(img_size),
                    "fov_um": [round(float(f), 3) for f in fov_um],
                    "normalisation": NORMALISATION})


def _run_parts(model_fp: str, train_samples: Sequence[str], cfg: Mapping) -> dict:
    """The components of a run's identity, compared one by one when resuming."""
    neutral = _RESUME_NEUTRAL + (("epochs",) if cfg["scheduler"] in ("none", None) else ())
    return {"model": model_fp,
            "train_samples": _digest(sorted(train_samples)),
            "settings": _digest({k: v for k, v in cfg.items() if k not in neutral})}


# --------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------

class _Dist:
    """Rank bookkeeping; a world of one when not launched distributed."""

    def __init__(self, device_spec: str):
        env = os.environ
        world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1")) or 1)
        self.world = world
        self.rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")) or 0)
        self.local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")) or 0)
        self.owned = False
        if world > 1 and "LOCAL_RANK" not in env:
            env["LOCAL_RANK"] = str(self.local_rank)  # resolve_device maps cuda -> cuda:LOCAL_RANK
        self.device = resolve_device(device_spec)
        if world > 1 and not dist.is_initialized():
            if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
                raise InputError("distributed run (world size > 1) without MASTER_ADDR and "
                                 "MASTER_PORT; launch with torchrun, or export both before srun")
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend, rank=self.rank, world_size=world)
            self.owned = True
        if world > 1:
            self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, values: Sequence[float]) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        if self.world > 1:
            dist.broadcast(t, 0)
        return t.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def close(self) -> None:
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Data for a training run
# --------------------------------------------------------------------------------------------

def training_data(bundles: Mapping[str, str], expressions: Mapping[str, str],
                  genes: Sequence[str], train_samples: Sequence[str],
                  views: Sequence[int] | None, cfg: Mapping) -> tuple[SpotDataset, SpotDataset]:
    """Training and validation datasets; validation spots come from the training samples."""
    if not train_samples:
        raise InputError("no training samples given")
    data = load_samples(bundles, expressions, genes, list(train_samples), views,
                        drop_padded=bool(cfg["drop_padded"]))
    empty = [d.sample for d in data if len(d) == 0]
    if empty:
        raise InputError(f"no usable spots (all padded or none with expression) in "
                         f"{', '.join(empty[:5])}")
    parts = validation_spots({d.sample: len(d) for d in data}, float(cfg["val_fraction"]),
                             int(cfg["seed"]))
    tr, va = [], []
    for k, d in enumerate(data):
        t, v = parts[d.sample]
        tr.append(np.stack([np.full(len(t), k), t], 1))
        va.append(np.stack([np.full(len(v), k), v], 1))
    train_ds = SpotDataset(data, views, np.concatenate(tr), cfg["augment"], int(cfg["seed"]))
    val_ds = SpotDataset(data, views, np.concatenate(va), None, int(cfg["seed"]))
    return train_ds, val_ds


# --------------------------------------------------------------------------------------------
# Prediction with a network
# --------------------------------------------------------------------------------------------

def predict_network(model: torch.nn.Module, dataset: SpotDataset, device: torch.device,
                    batch_size: int = 64, workers: int = 0, progress: bool = False) -> np.ndarray:
    """(n_items, n_genes) float32 predictions in item order (no augmentation is applied)."""
    loader = make_loader(dataset, batch_size, workers, pin_memory(device))
    model.eval()
    out = []
    with torch.inference_mode():
        for images, _, _ in tqdm(loader, disable=not progress, desc="predict", leave=False):
            x = prepare_batch(images, device)
            with autocast(device):
                y = model(x)
            out.append(y.float().cpu().numpy())
    if not out:
        return np.zeros((0, 0), np.float32)
    return np.concatenate(out)


def _validate(model, val_ds: SpotDataset, device, batch_size, workers) -> tuple[float, float]:
    """Validation MSE and mean per-gene Pearson (per training sample, then averaged)."""
    if len(val_ds) == 0:
        return float("nan"), float("nan")
    pred = predict_network(model, val_ds, device, batch_size, workers)
    truth = val_ds.targets()
    loss = float(((pred.astype(np.float64) - truth) ** 2).mean())
    which = val_ds.index[:, 0]
    scores = [mean_gene_pcc(truth[which == k], pred[which == k]) for k in np.unique(which)]
    scores = [s for s in scores if np.isfinite(s)]
    return loss, float(np.mean(scores)) if scores else float("nan")


def _selection_key(val_loss: float, val_pcc: float) -> list[float]:
    """Higher is better: mean per-gene Pearson, then (ties, undefined) lower MSE."""
    pcc = val_pcc if math.isfinite(val_pcc) else -math.inf
    loss = -val_loss if math.isfinite(val_loss) else -math.inf
    return [pcc, loss]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def _save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which one
        raise InputError(f"cannot read checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); delete it to start "
                         "over", file=path) from None


def _write_log(rows: list[dict], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            w = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else list(LOG_COLUMNS),
                               extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def _lr_lambda(cfg: Mapping, steps_per_epoch: int):
    total = max(1, int(cfg["epochs"]) * steps_per_epoch)
    warm = int(round(float(cfg["warmup_epochs"]) * steps_per_epoch))
    floor = float(cfg["min_lr"]) / float(cfg["lr"])
    if cfg["scheduler"] in ("none", None):
        return lambda step: 1.0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and [cls] tokens (ViT practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(k in name for k in ("pos_emb", "cls", "mask_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the global generators from (seed, epoch, rank) alone; see the module docstring."""
    s = derive_seed(seed, "epoch", epoch, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _init_head_bias(model: torch.nn.Module, mean: np.ndarray) -> None:
    """Start the network at the mean predictor.

    Targets are log1p-normalised expression, of order 1-10; with Adam at lr 1e-4 a bias
    initialised at 0 would need tens of thousands of steps just to reach the mean level.
    """
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear) and head.bias is not None \
            and head.out_features == len(mean):
        with torch.no_grad():
            head.bias.copy_(torch.as_tensor(mean, dtype=head.bias.dtype))
    else:
        log.warning("init_head_bias: the model has no linear 'head' with %d outputs; "
                    "output bias left as initialised", len(mean))


def _build(model_cfg: Mapping, n_genes: int, n_views: int, img_size: int) -> torch.nn.Module:
    from m2ost.model import build_model

    try:
        return build_model(dict(model_cfg), n_genes, n_views, img_size)
    except (ValueError, KeyError) as err:
        raise InputError(f"model configuration rejected: {err}") from None


# --------------------------------------------------------------------------------------------
# Neural training
# --------------------------------------------------------------------------------------------

def train(bundles: Mapping[str, str], expressions: Mapping[str, str], genes_file: str,
          train_samples: Sequence[str], model_cfg: Mapping, train_cfg: Mapping | None,
          out_dir: str | os.PathLike, views: Sequence[int] | None = None,
          kind: str = "m2ost") -> dict:
    """Train a network on the training samples of one split; resume from ``last.pt`` if any.

    Parameters
    ----------
    bundles, expressions
        sample -> ``results/bundles/{sample}.h5`` / ``results/expression/{sample}.h5ad`` (may
        hold more samples than ``train_samples``; only those are read).
    genes_file
        The split's gene panel, one symbol per line.
    train_samples
        Samples to train on; validation spots are drawn from them (``val_fraction``).
    model_cfg
        Passed to ``m2ost.model.build_model`` (``{"variant": "tiny", ...}``).
    train_cfg
        See :data:`TRAIN_DEFAULTS`.
    out_dir
        Receives ``model.pt``, ``log.csv`` and ``checkpoints/``.
    views
        Views to feed the network (None = all; ``[0]`` for single-view M2OST).
    kind
        Recorded in ``model.pt`` (``m2ost`` or ``m2ost_single``).

    Returns
    -------
    dict
        best_epoch, best_val_gene_pcc, best_val_loss, epochs_run, stopped_early, model_file.

    Raises
    ------
    InputError
        Bad inputs or settings, or a checkpoint from a different run in ``out_dir``.
    TrainingDiverged
        The loss became NaN/inf (the message names epoch and step).
    """
    cfg = train_settings(train_cfg)
    ranks = _Dist(cfg["device"])
    try:
        return _train(ranks, bundles, expressions, genes_file, train_samples, dict(model_cfg),
                      cfg, Path(out_dir), views, kind)
    finally:
        ranks.close()


def _train(ranks: _Dist, bundles, expressions, genes_file, train_samples, model_cfg, cfg,
           out_dir: Path, views, kind) -> dict:
    device, seed = ranks.device, int(cfg["seed"])
    seed_everything(seed, deterministic=device.type == "cpu")
    genes = read_gene_list(genes_file)
    train_ds, val_ds = training_data(bundles, expressions, genes, train_samples, views, cfg)
    views = train_ds.views
    info = train_ds.data[0].info
    fov = [info["fov_um"][v] for v in views]
    img_size = train_ds.image_size
    model = _build(model_cfg, len(genes), len(views), img_size)
    if cfg["init_head_bias"]:
        _init_head_bias(model, train_ds.targets().mean(axis=0))
    model = model.to(device)
    model_fp = model_fingerprint(kind, model_cfg, genes, views, img_size, fov)
    run_parts = _run_parts(model_fp, train_samples, cfg)

    batch = int(cfg["batch_size"])
    if batch % ranks.world:
        raise InputError(f"batch_size {batch} is not divisible by the {ranks.world} processes")
    sampler = DistributedSampler(train_ds, num_replicas=ranks.world, rank=ranks.rank,
                                 shuffle=True, seed=seed, drop_last=False)
    loader = make_loader(train_ds, batch // ranks.world, int(cfg["workers"]), pin_memory(device),
                         sampler=sampler)
    steps_per_epoch = len(loader)
    optimizer = torch.optim.AdamW(_param_groups(model, float(cfg["weight_decay"])),
                                  lr=float(cfg["lr"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, steps_per_epoch))
    net = model
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        # Compiles the training step's forward (and backward) only; checkpoints keep saving
        # ``model``, whose parameters the compiled module shares.
        net = torch.compile(net)

    ckpt_dir = out_dir / "checkpoints"
    last_file, best_file = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    state = {"epoch": 0, "best_key": None, "best_epoch": 0, "best_val_loss": float("nan"),
             "best_val_gene_pcc": float("nan"), "since_best": 0, "log": []}
    if last_file.exists():
        ck = _load(last_file)
        differ = [k for k, v in run_parts.items() if ck.get("run_parts", {}).get(k) != v]
        if differ:
            names = {"model": "model config / gene panel / views", "train_samples":
                     "training samples", "settings": "training settings"}
            raise InputError("checkpoint belongs to a different run (differs in: "
                             f"{'; '.join(names[k] for k in differ)}); delete it or use "
                             "another output directory", file=last_file)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        state.update({k: ck[k] for k in state})
        if ranks.main:
            log.info("resuming %s from epoch %d", last_file, state["epoch"])

    epochs, patience = int(cfg["epochs"]), int(cfg["patience"] or 0)
    eval_batch = int(cfg["eval_batch_size"]) or 2 * batch
    has_val = len(val_ds) > 0

    def finished() -> bool:
        early = has_val and patience > 0 and state["since_best"] >= patience
        return early or state["epoch"] >= epochs

    while not finished():
        epoch = state["epoch"]  # 0-based index of the epoch about to run
        t0 = time.time()
        _seed_epoch(seed, epoch, ranks.rank)
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        net.train()
        loss_sum, count, lr = 0.0, 0, optimizer.param_groups[0]["lr"]
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not (ranks.main and cfg["progress"]))
        for step, (images, target, aug) in enumerate(bar, start=1):
            x = prepare_batch(images, device, aug)
            target = target.to(device, non_blocking=True)
            with autocast(device):
                pred = net(x)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            n = len(target)
            total, seen = ranks.sum([float(loss.detach()) * n, n])
            if not math.isfinite(total):
                kept = (f"the last good checkpoint (epoch {epoch}) is kept in {last_file}"
                        if last_file.exists() else "no checkpoint was written yet")
                raise TrainingDiverged(f"loss is {total / seen} at epoch {epoch + 1}, step "
                                       f"{step} of {steps_per_epoch}; training stopped, {kept}. "
                                       "Lower lr or check the inputs")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if float(cfg["grad_clip"]) > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["grad_clip"]))
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step used (logged)
            scheduler.step()
            loss_sum, count = loss_sum + total, count + int(seen)
            bar.set_postfix(loss=f"{total / seen:.4f}")

        val_loss = val_pcc = float("nan")
        if ranks.main and has_val:
            val_loss, val_pcc = _validate(model, val_ds, device, eval_batch, int(cfg["workers"]))
        val_loss, val_pcc = ranks.broadcast([val_loss, val_pcc])
        key = _selection_key(val_loss, val_pcc) if has_val else [float(epoch), 0.0]
        improved = state["best_key"] is None or key > list(state["best_key"])
        if improved:
            state.update(best_key=key, best_epoch=epoch + 1, best_val_loss=val_loss,
                         best_val_gene_pcc=val_pcc, since_best=0)
        else:
            state["since_best"] += 1
        state["epoch"] = epoch + 1
        state["log"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(count, 1),
                             "val_loss": val_loss, "val_gene_pcc": val_pcc, "lr": lr,
                             "seconds": round(time.time() - t0, 3)})
        if ranks.main:
            if improved:  # best.pt before last.pt: last.pt never points at a missing best
                _save({"model": model.state_dict(), "epoch": epoch + 1}, best_file)
            _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "rng": rng_state(),
                   "augment_rng": {"seed": seed, "next_epoch": epoch + 1},
                   "run_parts": run_parts, "fingerprint": model_fp, **state}, last_file)
            _write_log(state["log"], out_dir / "log.csv")
            log.info("epoch %d/%d train %.4f val %.4f val_gene_pcc %.4f lr %.2e (%.1fs)",
                     epoch + 1, epochs, state["log"][-1]["train_loss"], val_loss, val_pcc, lr,
                     state["log"][-1]["seconds"])
        ranks.barrier()

    stopped_early = state["epoch"] < epochs
    model_file = out_dir / "model.pt"
    if ranks.main:
        best = _load(best_file)
        if best["epoch"] != state["best_epoch"]:  # only after a crash between the two saves
            log.warning("%s holds epoch %d, the log's best epoch is %d", best_file,
                        best["epoch"], state["best_epoch"])
        payload = _model_payload(kind, genes, views, img_size, fov, model_cfg, cfg,
                                 train_samples, model_fp)
        payload.update(state_dict=best["model"], best_epoch=state["best_epoch"],
                       best_val_loss=state["best_val_loss"],
                       best_val_gene_pcc=state["best_val_gene_pcc"])
        _save(payload, model_file)
        _write_log(state["log"], out_dir / "log.csv")
    ranks.barrier()
    return {"best_epoch": state["best_epoch"], "best_val_gene_pcc": state["best_val_gene_pcc"],
            "best_val_loss": state["best_val_loss"], "epochs_run": state["epoch"],
            "stopped_early": stopped_early, "model_file": str(model_file)}


def _model_payload(kind, genes, views, img_size, fov, model_cfg, cfg, train_samples,
                   fingerprint) -> dict:
    return {"format": MODEL_FORMAT, "kind": kind, "genes": list(genes), "views": list(views),
            "img_size": int(img_size), "fov_um": [float(f) for f in fov],
            "model_cfg": dict(model_cfg), "normalisation": NORMALISATION,
            "target": "log1p-normalised expression (X of the expression files)",
            "train_samples": list(train_samples), "train_cfg": dict(cfg),
            "fingerprint": fingerprint,
            "provenance": json.dumps(provenance({"kind": kind, "model_cfg": dict(model_cfg),
                                                 "train_cfg": dict(cfg),
                                                 "train_samples": list(train_samples)}),
                                     sort_keys=True)}


# --------------------------------------------------------------------------------------------
# Common entry point, baselines included
# --------------------------------------------------------------------------------------------

def fit_model(kind: str, bundles: Mapping[str, str], expressions: Mapping[str, str],
              genes_file: str, train_samples: Sequence[str], model_cfg: Mapping | None,
              train_cfg: Mapping | None, out_dir: str | os.PathLike,
              views: Sequence[int] | None = None) -> dict:
    """Fit any model kind on the training samples of a split and write ``out_dir/model.pt``.

    Parameters
    ----------
    kind
        ``m2ost`` (all views, or ``views``), ``m2ost_single`` (view 0 only), ``ridge`` (features
        of all views, or ``views``), ``mean``.
    model_cfg
        Network settings for the neural kinds; ignored by the baselines.
    train_cfg
        See :data:`TRAIN_DEFAULTS`; the baselines use seed, val_fraction, drop_padded, workers.

    Other parameters as in :func:`train`. Returns a dict of what was fitted.
    """
    if kind not in KINDS:
        raise InputError(f"model kind '{kind}' is not one of {', '.join(KINDS)}")
    if kind == "m2ost_single":
        if views is not None and list(views) != [0]:
            raise InputError(f"m2ost_single uses view 0 only, got views {list(views)}")
        views = [0]
    if kind in ("m2ost", "m2ost_single"):
        return train(bundles, expressions, genes_file, train_samples, model_cfg or {},
                     train_cfg, out_dir, views, kind)
    return fit_baseline(kind, bundles, expressions, genes_file, train_samples, train_cfg,
                        out_dir, views)


def fit_baseline(kind: str, bundles: Mapping[str, str], expressions: Mapping[str, str],
                 genes_file: str, train_samples: Sequence[str], train_cfg: Mapping | None,
                 out_dir: str | os.PathLike, views: Sequence[int] | None = None) -> dict:
    """Fit the ``mean`` or ``ridge`` baseline on the same train/validation spots as a network."""
    cfg = train_settings(train_cfg)
    cfg["augment"] = None  # baselines see the spots as they are
    seed_everything(int(cfg["seed"]))
    genes = read_gene_list(genes_file)
    train_ds, val_ds = training_data(bundles, expressions, genes, train_samples, views, cfg)
    predictor = BASELINES[kind]()
    rows = predictor.fit(train_ds, val_ds, int(cfg["workers"]))
    views = train_ds.views
    info = train_ds.data[0].info
    fov = [info["fov_um"][v] for v in views]
    fp = model_fingerprint(kind, {}, genes, views, train_ds.image_size, fov)
    payload = _model_payload(kind, genes, views, train_ds.image_size, fov, {}, cfg,
                             train_samples, fp)
    payload["state"] = predictor.state()
    out_dir = Path(out_dir)
    _save(payload, out_dir / "model.pt")
    _write_log(rows, out_dir / "log.csv")
    chosen = next((r for r in rows if r.get("chosen", True)), rows[0])
    return {"kind": kind, "model_file": str(out_dir / "model.pt"),
            "val_gene_pcc": chosen["val_gene_pcc"], "val_loss": chosen["val_loss"],
            **({"alpha": predictor.alpha} if kind == "ridge" else {})}


# --------------------------------------------------------------------------------------------
# Loading any trained model
# --------------------------------------------------------------------------------------------

class Predictor:
    """A trained model of any kind, loaded from ``model.pt``.

    Attributes: ``kind``, ``genes``, ``views``, ``img_size``, ``fov_um``, ``meta`` (the whole
    stored record except the weights). :meth:`predict` turns a SpotDataset (built with
    ``views``) into an (n_items, n_genes) float32 array.
    """

    def __init__(self, meta: dict, impl, device: torch.device):
        self.meta, self.impl, self.device = meta, impl, device
        self.kind = meta["kind"]
        self.genes = list(meta["genes"])
        self.views = list(meta["views"])
        self.img_size = int(meta["img_size"])
        self.fov_um = list(meta["fov_um"])

    def predict(self, dataset: SpotDataset, batch_size: int = 64, workers: int = 0,
                progress: bool = False) -> np.ndarray:
        if list(dataset.views) != self.views:
            raise InputError(f"dataset views {dataset.views} differ from the model's {self.views}")
        if isinstance(self.impl, torch.nn.Module):
            return predict_network(self.impl, dataset, self.device, batch_size, workers,
                                   progress)
        return self.impl.predict(dataset, batch_size, workers)


def load_model(path: str | os.PathLike, device: str = "auto") -> Predictor:
    """Load ``model.pt`` of any kind (see :func:`fit_model`) for prediction."""
    path = Path(path)
    if not path.exists():
        raise InputError("model file not found (train the model first)", file=path)
    payload = _load(path)
    if payload.get("format") != MODEL_FORMAT or payload.get("kind") not in KINDS:
        raise InputError("not a model file written by m2ost (unknown format or kind)", file=path)
    dev = resolve_device(device)
    kind = payload["kind"]
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "state")}
    if kind in BASELINES:
        impl = BASELINES[kind].from_state(payload["state"])
    else:
        impl = _build(payload["model_cfg"], len(payload["genes"]), len(payload["views"]),
                      payload["img_size"])
        impl.load_state_dict(payload["state_dict"])
        impl.to(dev).eval()
    return Predictor(meta, impl, dev)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``log.csv``, numbers as floats (for tests and reports)."""
    def num(v: str):
        try:
            return float(v)
        except ValueError:
            return v

    with open(path, newline="") as handle:
        return [{k: num(v) for k, v in row.items()} for row in csv.DictReader(handle)]
