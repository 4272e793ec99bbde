"""Train a network (M2OST, single-view M2OST) on the training samples of a split.

Outputs, in ``out_dir``:

``model.pt``                 best weights + everything needed to predict
``log.csv``                  one row per epoch
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

import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from m2ost.data.panel import read_gene_list
from m2ost.errors import InputError, StaleCheckpoint, TrainingDiverged
from m2ost.eval.metrics import mean_gene_pcc
from m2ost.learn.inputs.augment import prepare_batch
from m2ost.learn.training.calibration import validation_record
from m2ost.learn.training.checkpoints import load_checkpoint, model_payload, save_checkpoint, write_log
from m2ost.learn.training.device import autocast, derive_seed, pin_memory, rng_state, seed_everything, set_rng_state
from m2ost.learn.training.distributed import Ranks
from m2ost.learn.inputs.loader import SpotDataset, make_loader
from m2ost.learn.training.network import (build_network, gene_loss_weights, init_head_bias, lr_lambda, param_groups,
                                 training_loss)
from m2ost.learn.inference.predictor import predict_network
from m2ost.learn.training.identity import model_fingerprint, run_parts, train_settings
from m2ost.learn.training.validation import training_data

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

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


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed the global generators from (seed, epoch, rank) alone; see the module docstring."""
    s = derive_seed(seed, "epoch", epoch, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


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
        The ``train`` section (m2ost/schemas/config.schema.yaml gives the defaults).
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
    ranks = Ranks(cfg["device"])
    try:
        run = _setup(ranks, bundles, expressions, genes_file, train_samples, dict(model_cfg), cfg,
                     Path(out_dir), views, kind)
        _resume(run)
        while not _finished(run):
            _run_epoch(run)
        return _finish(run)
    finally:
        ranks.close()


@dataclass
class _Run:
    """One training run: what it trains on and with, and ``state``, what a checkpoint keeps."""

    ranks: Ranks
    cfg: dict
    out_dir: Path
    kind: str
    model_cfg: dict
    train_samples: Sequence[str]
    genes: list[str]
    views: list[int]
    img_size: int
    fov: list[float]
    train_ds: SpotDataset
    val_ds: SpotDataset
    model: torch.nn.Module       # the network whose weights are saved
    net: torch.nn.Module         # what the training steps call (DDP / compiled wrapper of model)
    sampler: DistributedSampler
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    model_fp: str
    run_parts: dict
    state: dict
    gene_weights: torch.Tensor | None = None  # per-gene loss weights (standardize_targets)

    @property
    def last_file(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    @property
    def best_file(self) -> Path:
        return self.out_dir / "checkpoints" / "best.pt"


def _setup(ranks: Ranks, bundles, expressions, genes_file, train_samples, model_cfg, cfg,
           out_dir: Path, views, kind) -> _Run:
    """Data, network, loader, optimiser and schedule; the order of the steps fixes what the seeded
    generators draw (network initialisation), so it must not change."""
    device, seed = ranks.device, int(cfg["seed"])
    seed_everything(seed, deterministic=device.type == "cpu")
    genes = read_gene_list(genes_file)
    train_ds, val_ds = training_data(bundles, expressions, genes, train_samples, views, cfg)
    views = train_ds.views
    info = train_ds.data[0].info
    fov = [info["fov_um"][v] for v in views]
    img_size = train_ds.image_size
    model = build_network(model_cfg, len(genes), len(views), img_size)
    targets = train_ds.targets()
    if cfg["init_head_bias"]:
        init_head_bias(model, targets.mean(axis=0))
    model = model.to(device)
    model_fp = model_fingerprint(kind, model_cfg, genes, views, img_size, fov)

    batch = int(cfg["batch_size"])
    if batch % ranks.world:
        raise InputError(f"batch_size {batch} is not divisible by the {ranks.world} processes")
    sampler = DistributedSampler(train_ds, num_replicas=ranks.world, rank=ranks.rank,
                                 shuffle=True, seed=seed, drop_last=False)
    loader = make_loader(train_ds, batch // ranks.world, int(cfg["workers"]), pin_memory(device),
                         sampler=sampler)
    optimizer = torch.optim.AdamW(param_groups(model, float(cfg["weight_decay"]), float(cfg["lr"])),
                                  lr=float(cfg["lr"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, len(loader)))
    net = model
    if ranks.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        # Compiles the training step's forward (and backward) only; checkpoints keep saving
        # ``model``, whose parameters the compiled module shares.
        net = torch.compile(net)
    state = {"epoch": 0, "best_key": None, "best_epoch": 0, "best_val_loss": float("nan"),
             "best_val_gene_pcc": float("nan"), "since_best": 0, "log": []}
    return _Run(ranks=ranks, cfg=cfg, out_dir=out_dir, kind=kind, model_cfg=model_cfg,
                train_samples=train_samples, genes=genes, views=views, img_size=img_size, fov=fov,
                train_ds=train_ds, val_ds=val_ds, model=model, net=net, sampler=sampler,
                loader=loader, optimizer=optimizer, scheduler=scheduler, model_fp=model_fp,
                run_parts=run_parts(model_fp, train_samples, cfg), state=state,
                gene_weights=gene_loss_weights(targets, device) if cfg["standardize_targets"] else None)


def _resume(run: _Run) -> None:
    """Restore model, optimiser, schedule, RNG and progress from ``last.pt`` if it is this run's."""
    if not run.last_file.exists():
        return
    ck = load_checkpoint(run.last_file)
    differ = [k for k, v in run.run_parts.items() if ck.get("run_parts", {}).get(k) != v]
    if differ:
        names = {"model": "model config / gene panel / views", "train_samples":
                 "training samples", "settings": "training settings"}
        raise StaleCheckpoint("checkpoint belongs to a different run (differs in: "
                         f"{'; '.join(names[k] for k in differ)}); delete it or use "
                         "another output directory", file=run.last_file)
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    run.state.update({k: ck[k] for k in run.state})
    if run.ranks.main:
        log.info("resuming %s from epoch %d", run.last_file, run.state["epoch"])


def _finished(run: _Run) -> bool:
    """All epochs run, or ``patience`` epochs without improvement (0 = never stop early)."""
    patience = int(run.cfg["patience"] or 0)
    early = len(run.val_ds) > 0 and patience > 0 and run.state["since_best"] >= patience
    return early or run.state["epoch"] >= int(run.cfg["epochs"])


def _run_epoch(run: _Run) -> None:
    """Train one epoch, validate, keep the best weights, write the checkpoint and the log."""
    epoch = run.state["epoch"]  # 0-based index of the epoch about to run
    t0 = time.time()
    _seed_epoch(int(run.cfg["seed"]), epoch, run.ranks.rank)
    run.sampler.set_epoch(epoch)
    run.train_ds.set_epoch(epoch)
    train_loss, lr = _train_steps(run, epoch)

    val_loss = val_pcc = float("nan")
    has_val = len(run.val_ds) > 0
    if run.ranks.main and has_val:
        eval_batch = int(run.cfg["eval_batch_size"]) or 2 * int(run.cfg["batch_size"])
        val_loss, val_pcc = _validate(run.model, run.val_ds, run.ranks.device, eval_batch,
                                      int(run.cfg["workers"]))
    val_loss, val_pcc = run.ranks.broadcast([val_loss, val_pcc])
    key = _selection_key(val_loss, val_pcc) if has_val else [float(epoch), 0.0]
    state = run.state
    improved = state["best_key"] is None or key > list(state["best_key"])
    if improved:
        state.update(best_key=key, best_epoch=epoch + 1, best_val_loss=val_loss,
                     best_val_gene_pcc=val_pcc, since_best=0)
    else:
        state["since_best"] += 1
    state["epoch"] = epoch + 1
    state["log"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                         "val_gene_pcc": val_pcc, "lr": lr, "seconds": round(time.time() - t0, 3)})
    if run.ranks.main:
        _save_epoch(run, improved)
        line = (f"epoch {epoch + 1}/{int(run.cfg['epochs'])}  train loss {train_loss:.4f}  val loss "
                f"{val_loss:.4f}  val gene PCC {val_pcc:.4f}  lr {lr:.2e}  {state['log'][-1]['seconds']:.1f} s")
        log.info("%s", line)
        # The log file gets stderr; stdout reaches the terminal that runs the workflow.
        print(f"[train {run.kind} {run.out_dir}] {line}", flush=True)
    run.ranks.barrier()


# Steps whose losses are read back (and summed over ranks) at once: reading a loss waits for the
# device, so reading each step's would keep the host from queueing the next step.
_READ_EVERY = 32


def _train_steps(run: _Run, epoch: int) -> tuple[float, float]:
    """The optimisation steps of one epoch: (mean training loss over all ranks, last lr used)."""
    cfg, ranks, device, optimizer = run.cfg, run.ranks, run.ranks.device, run.optimizer
    run.net.train()
    lr = optimizer.param_groups[0]["lr"]
    totals, pending = [0.0, 0], []  # (loss x spots, spots) read back; (loss, spots) not yet read
    steps = len(run.loader)
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{int(cfg['epochs'])}", leave=False,
               disable=not (ranks.main and cfg["progress"]))
    for step, (images, target, aug) in enumerate(bar, start=1):
        x = prepare_batch(images, device, aug)
        target = target.to(device, non_blocking=True)
        with autocast(device):
            pred = run.net(x)
        loss = training_loss(pred.float(), target, run.gene_weights)
        pending.append((loss.detach(), len(target)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if float(cfg["grad_clip"]) > 0:
            torch.nn.utils.clip_grad_norm_(run.model.parameters(), float(cfg["grad_clip"]))
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]  # the rate this step used (logged)
        run.scheduler.step()
        if len(pending) == _READ_EVERY or step == steps:
            _read_losses(run, pending, epoch, step, steps, totals)
            pending = []
            bar.set_postfix(loss=f"{totals[0] / max(totals[1], 1):.4f}")
    return totals[0] / max(totals[1], 1), lr


def _read_losses(run: _Run, pending: list, epoch: int, last_step: int, steps: int,
                 totals: list) -> None:
    """Add the ``pending`` steps' losses (the last step is ``last_step``), summed over the ranks,
    to ``totals``; a non-finite one stops the run, naming its step. Nothing is saved before the
    epoch ends, so the last checkpoint stays the last good one."""
    if not pending:
        return
    values = torch.stack([loss for loss, _ in pending]).tolist()  # one wait for the device
    flat = [v for value, (_, n) in zip(values, pending) for v in (value * n, n)]
    sums = run.ranks.sum(flat)  # one all-reduce for the block
    first = last_step - len(pending) + 1
    for i in range(len(pending)):
        total, seen = sums[2 * i], sums[2 * i + 1]
        if not math.isfinite(total):
            kept = (f"the last good checkpoint (epoch {epoch}) is kept in {run.last_file}"
                    if run.last_file.exists() else "no checkpoint was written yet")
            raise TrainingDiverged(f"loss is {total / seen} at epoch {epoch + 1}, step "
                                   f"{first + i} of {steps}; training stopped, {kept}. "
                                   "Lower lr or check the inputs")
        totals[0] += total
        totals[1] += int(seen)


def _save_epoch(run: _Run, improved: bool) -> None:
    """best.pt (if improved), last.pt and log.csv after an epoch (rank 0)."""
    state = run.state
    if improved:  # best.pt before last.pt: last.pt never points at a missing best
        save_checkpoint({"model": run.model.state_dict(), "epoch": state["epoch"]}, run.best_file)
    save_checkpoint({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                     "scheduler": run.scheduler.state_dict(), "rng": rng_state(),
                     "augment_rng": {"seed": int(run.cfg["seed"]), "next_epoch": state["epoch"]},
                     "run_parts": run.run_parts, "fingerprint": run.model_fp, **state}, run.last_file)
    write_log(state["log"], run.out_dir / "log.csv")


def _per_gene_validation(run: _Run, weights: dict) -> dict:
    """The best weights' Pearson r per gene and interval calibration on the validation spots
    (stored in model.pt; :func:`m2ost.learn.training.calibration.validation_record`)."""
    if len(run.val_ds) == 0:
        return {"val_gene_pcc_per_gene": {g: float("nan") for g in run.genes}}
    run.model.load_state_dict(weights)
    eval_batch = int(run.cfg["eval_batch_size"]) or 2 * int(run.cfg["batch_size"])
    pred = predict_network(run.model, run.val_ds, run.ranks.device, eval_batch, int(run.cfg["workers"]))
    return validation_record(run.val_ds.targets(), pred, run.val_ds.index[:, 0], run.genes, int(run.cfg["seed"]),
                             run.val_ds.depths())


def _finish(run: _Run) -> dict:
    """Write ``model.pt`` from the best epoch's weights (rank 0); the run's summary."""
    state = run.state
    model_file = run.out_dir / "model.pt"
    if run.ranks.main:
        best = load_checkpoint(run.best_file)
        if best["epoch"] != state["best_epoch"]:  # only after a crash between the two saves
            log.warning("%s holds epoch %d, the log's best epoch is %d", run.best_file,
                        best["epoch"], state["best_epoch"])
        payload = model_payload(run.kind, run.genes, run.views, run.img_size, run.fov, run.model_cfg,
                                run.cfg, run.train_samples, run.model_fp)
        payload.update(state_dict=best["model"], best_epoch=state["best_epoch"],
                       best_val_loss=state["best_val_loss"],
                       best_val_gene_pcc=state["best_val_gene_pcc"], **_per_gene_validation(run, best["model"]))
        save_checkpoint(payload, model_file)
        write_log(state["log"], run.out_dir / "log.csv")
    run.ranks.barrier()
    return {"best_epoch": state["best_epoch"], "best_val_gene_pcc": state["best_val_gene_pcc"],
            "best_val_loss": state["best_val_loss"], "epochs_run": state["epoch"],
            "stopped_early": state["epoch"] < int(run.cfg["epochs"]), "model_file": str(model_file)}
