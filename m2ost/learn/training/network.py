"""The network of a neural model kind, its optimiser's parameter groups and learning-rate schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch

from m2ost.errors import InputError
from m2ost.learn.features.finetune import build_finetune_network, is_finetune_config
from m2ost.model import build_model

log = logging.getLogger(__name__)


def build_network(model_cfg: Mapping, n_genes: int, n_views: int, img_size: int,
                  pretrained: bool = True) -> torch.nn.Module:
    """The network of ``model_cfg``: M2OST (see :func:`m2ost.model.build_model`), or the
    encoder-fed M2OST of ``m2ost_finetune`` (:mod:`m2ost.learn.features.finetune`; ``pretrained``: load
    its encoder's weights file). A bad setting is an InputError."""
    if is_finetune_config(model_cfg):
        return build_finetune_network(model_cfg, n_genes, n_views, pretrained)
    try:
        return build_model(dict(model_cfg), n_genes, n_views, img_size)
    except (ValueError, KeyError) as err:
        raise InputError(f"model configuration rejected: {err}") from None


def lr_lambda(cfg: Mapping, steps_per_epoch: int):
    """The learning-rate factor of each step: linear warm-up, then cosine down to ``min_lr``."""
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


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float) -> list[dict]:
    """No weight decay on biases, norms, position embeddings and [cls] tokens (ViT practice).

    A pretrained encoder inside the network (``backbone.*``) learns at ``encoder_lr_scale``
    times ``lr``; its groups come last, so group 0 carries the rate the log reports."""
    scale = float(getattr(model, "encoder_lr_scale", 1.0))
    found: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or any(k in name for k in ("pos_emb", "cls", "mask_token"))
        encoder = name.startswith("backbone.") and scale != 1.0
        found.setdefault((encoder, no_decay), []).append(p)
    groups = []
    for encoder in (False, True):
        for no_decay in (False, True):
            params = found.get((encoder, no_decay), [])
            if params or not encoder:
                groups.append({"params": params, "weight_decay": 0.0 if no_decay else weight_decay,
                               "lr": lr * scale if encoder else lr})
    return groups


def init_head_bias(model: torch.nn.Module, mean: np.ndarray) -> None:
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


def gene_loss_weights(targets: np.ndarray, device: torch.device) -> torch.Tensor:
    """1 / variance of each gene over the training spots: the squared error of a prediction in
    units of the gene's spread, so every gene weighs alike in the loss (the per-gene Pearson
    scores them alike); a near-constant gene is capped at the weight of a spread of 0.05."""
    std = np.maximum(np.asarray(targets, np.float64).std(axis=0), 0.05)
    return torch.as_tensor(1.0 / std**2, dtype=torch.float32, device=device)


def training_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error, each gene's weighted by ``weights`` when given."""
    if weights is None:
        return torch.nn.functional.mse_loss(pred, target)
    return ((pred - target).square() * weights).mean()
