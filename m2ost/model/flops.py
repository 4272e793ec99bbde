"""Parameter and multiply-accumulate counts, comparable with the paper's thop figures."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .attention import CrossLevelTokenMixing, IntraLevelTokenMixing

# matrix products of linear and convolution layers; attention kernels are counted separately
_LINEAR_OPS = {"mm", "addmm", "bmm", "convolution"}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all of them, or those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _attention_macs(module: nn.Module, xs: list[torch.Tensor]) -> int:
    """MACs of the two attention products (QK^T and AV) of one mixer call, whole batch."""
    b = xs[0].shape[0]
    n = [x.shape[1] for x in xs]
    d = [x.shape[2] for x in xs]  # q/k/v width of a view equals its token width
    if isinstance(module, IntraLevelTokenMixing):
        return sum(2 * b * ni * ni * di for ni, di in zip(n, d))
    return sum(2 * b * n[i] * n[j] * d[i] for i in range(len(xs)) for j in range(len(xs)) if i != j)


@torch.no_grad()
def count_flops(model: nn.Module, n_views: int, img_size: int) -> dict[str, int]:
    """Multiply-accumulates of one forward pass for one sample.

    ``linear`` counts the matrix products of the linear (and convolution) layers, the quantity
    thop reports and the paper quotes ("2.24 G FLOPs"); ``attention`` counts the QK^T and AV
    products of all attention calls; ``total`` is their sum. Normalisations, activations and
    element-wise operations are not counted, as in thop.

    Parameters
    ----------
    model : nn.Module
        An M2OST model (left in the train/eval mode it had).
    n_views, img_size : int
        Input geometry: one sample of shape (1, n_views, 3, img_size, img_size).

    Returns
    -------
    dict
        ``{"linear": int, "attention": int, "total": int}`` in MACs.
    """
    param = next(model.parameters())
    x = torch.zeros(1, n_views, 3, img_size, img_size, device=param.device, dtype=param.dtype)
    attention = 0

    def hook(module, args, _output):
        nonlocal attention
        attention += _attention_macs(module, args[0])

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (IntraLevelTokenMixing, CrossLevelTokenMixing))]
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    flops = counter.get_flop_counts().get("Global", {})
    linear = sum(v for op, v in flops.items() if op.__name__.split(".")[-1] in _LINEAR_OPS) // 2
    return {"linear": int(linear), "attention": int(attention), "total": int(linear + attention)}
