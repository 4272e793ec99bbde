"""Augmentation and input normalisation, applied on the device.

Images stay uint8 until they reach the device (a quarter of the bytes to copy); the conversion
to float, the flips and rotations, the colour jitter and the ImageNet normalisation run there,
in :func:`prepare_batch`. What to apply to each spot is drawn by the dataset
(:meth:`m2ost.learn.loader.SpotDataset.aug_vector`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from m2ost.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATION = {"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

_JITTER_DEFAULT = 0.1  # "mild": factors drawn in [0.9, 1.1]


def augment_settings(cfg: Mapping | bool | None) -> dict:
    """Normalise the ``augment`` config to flip, rot90, brightness, contrast, saturation.

    ``cfg`` may be None/False (off), True (flips, rotations, mild jitter) or a mapping with
    ``flip`` (bool), ``rot90`` (bool) and ``color_jitter`` (bool, a float applied to all three,
    or a mapping with brightness/contrast/saturation). A jitter strength ``s`` draws a factor
    uniformly in [1 - s, 1 + s].
    """
    if not cfg:
        return {"flip": False, "rot90": False, "brightness": 0.0, "contrast": 0.0,
                "saturation": 0.0}
    if cfg is True:
        cfg = {"flip": True, "rot90": True, "color_jitter": True}
    jitter = cfg.get("color_jitter", False)
    if jitter is True:
        jitter = _JITTER_DEFAULT
    if not isinstance(jitter, Mapping):
        jitter = {k: float(jitter or 0.0) for k in ("brightness", "contrast", "saturation")}
    out = {"flip": bool(cfg.get("flip", False)), "rot90": bool(cfg.get("rot90", False))}
    for k in ("brightness", "contrast", "saturation"):
        s = float(jitter.get(k, 0.0))
        if not 0.0 <= s < 1.0:
            raise InputError(f"color_jitter {k} must be in [0, 1), got {s}")
        out[k] = s
    return out



def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)


def color_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (torchvision semantics) with per-spot factors.

    x: float (B, V, 3, H, W) in [0, 1]; factors: (B, 3). All views of a spot share the factors
    (one staining per spot); contrast pivots on each view's own mean grey level.
    """
    f = factors.to(x.device, x.dtype).view(-1, 3, 1, 1, 1, 1).unbind(1)
    b, c, s = f
    x = (x * b).clamp_(0, 1)
    m = _grey(x).mean(dim=(-3, -2, -1), keepdim=True)
    x = (c * x + (1 - c) * m).clamp_(0, 1)
    x = (s * x + (1 - s) * _grey(x)).clamp_(0, 1)
    return x


def apply_geometry(x: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """Rotate and flip each spot of ``x`` (B, V, C, H, W) in place by its ``aug`` (B, >=3, on the
    host) rot90 count, h-flip, v-flip, in that order (``np.rot90`` over (H, W), then W
    reversed, then H reversed); every view of a spot gets the same transform. At most 16
    distinct transforms: one vectorised op each."""
    codes = aug[:, :3].round().long()
    for code in torch.unique(codes, dim=0).tolist():
        k, hflip, vflip = code
        if not (k % 4 or hflip or vflip):
            continue
        sel = torch.nonzero((codes == torch.tensor(code)).all(dim=1)).flatten().to(x.device)
        y = x.index_select(0, sel)  # a copy, so writing back into x is safe
        if k % 4:
            y = torch.rot90(y, k % 4, dims=(-2, -1))
        if hflip:
            y = y.flip(-1)
        if vflip:
            y = y.flip(-2)
        x.index_copy_(0, sel, y)
    return x


def prepare_batch(images: torch.Tensor, device: torch.device,
                  aug: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, V, H, W, 3) on the host -> normalised float32 (B, V, 3, H, W) on ``device``.

    ``aug``: per-spot augmentation from :class:`SpotDataset`, (B, 6) = rot90 count, h-flip,
    v-flip, brightness, contrast, saturation; or (B, 3) colour factors only; None = none.
    The transforms to group by are read from ``aug`` where the loader left it (the host), so
    the device is never waited on for them.
    """
    x = images.to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float().div_(255.0)
    if aug is not None:
        if aug.shape[-1] == 6:
            x = apply_geometry(x, aug)
            aug = aug[:, 3:]
        if not bool(torch.all(aug == 1)):
            x = color_jitter(x, aug.to(device, non_blocking=True))
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 1, 3, 1, 1)
    return (x - mean) / std
