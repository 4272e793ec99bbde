"""Augmentation and input normalisation, applied on the device.

Images stay uint8 until they reach the device (a quarter of the bytes to copy); the conversion
to float, the flips and rotations, the colour jitter and the ImageNet normalisation run there,
in :func:`prepare_batch`. What to apply to each spot is drawn by the dataset
(:meth:`m2ost.learn.inputs.loader.SpotDataset.aug_vector`).

Stain augmentation (HED jitter, Tellez et al. 2018, "Whole-slide mitosis detection in H&E breast
histology using PHH3 as a reference"): each pixel's optical density is split into haematoxylin,
eosin and DAB by Ruifrok & Johnston's matrix (scikit-image's ``rgb2hed``), every stain amount
becomes ``alpha * s + beta`` with ``alpha`` in [1 - σ, 1 + σ] and ``beta`` in [-σ, σ] (optical
density units) drawn per spot, and the result goes back to RGB. It mimics a lab's heavier or
lighter staining, which the brightness/contrast/saturation jitter cannot: it moves the
haematoxylin and eosin colours independently.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from m2ost.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATION = {"scale": 1 / 255, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

_JITTER_DEFAULT = 0.1  # "mild": factors drawn in [0.9, 1.1]

# Layout of a spot's augmentation vector (SpotDataset.aug_vector): rot90 count, h-flip, v-flip;
# brightness, contrast, saturation factors; HED alpha (3); HED beta (3).
AUG_LENGTH = 12
NO_AUGMENTATION = (0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0)

# Ruifrok & Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as skimage.color.rgb_from_hed.
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))
_OD_FLOOR = 1e-6  # as rgb2hed: black pixels get a finite optical density


def augment_settings(cfg: Mapping | bool | None) -> dict:
    """Normalise the ``augment`` config to flip, rot90, brightness, contrast, saturation, hed.

    ``cfg`` may be None/False (off), True (flips, rotations, mild jitter) or a mapping with
    ``flip`` (bool), ``rot90`` (bool), ``color_jitter`` (bool, a float applied to all three,
    or a mapping with brightness/contrast/saturation) and ``hed_jitter`` (a float σ, 0 = off).
    A jitter strength ``s`` draws a factor uniformly in [1 - s, 1 + s].
    """
    if not cfg:
        return {"flip": False, "rot90": False, "brightness": 0.0, "contrast": 0.0,
                "saturation": 0.0, "hed": 0.0}
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
    out["hed"] = float(cfg.get("hed_jitter") or 0.0)  # absent: off
    if not 0.0 <= out["hed"] < 1.0:
        raise InputError(f"hed_jitter must be in [0, 1), got {out['hed']}")
    return out


def is_active(settings: Mapping) -> bool:
    """Whether :func:`augment_settings` output changes any spot."""
    return bool(settings["flip"] or settings["rot90"] or settings["brightness"]
                or settings["contrast"] or settings["saturation"] or settings["hed"])


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


def _stain_matrices(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=torch.float64)
    return (torch.linalg.inv(rgb_from_hed).to(device, dtype), rgb_from_hed.to(device, dtype))


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Scale and shift each spot's haematoxylin, eosin and DAB amounts (see the module docstring).

    x: float (B, V, 3, H, W) in [0, 1]; alpha, beta: (B, 3) on x's device. All views of a spot
    share the draw (one staining per spot). alpha = 1, beta = 0 gives x back (to float error).
    """
    hed_from_rgb, rgb_from_hed = _stain_matrices(x.device, x.dtype)
    # (od @ hed_from_rgb * alpha + beta) @ rgb_from_hed, folded into one 3 x 3 map per spot
    mix = hed_from_rgb.unsqueeze(0) * alpha.unsqueeze(1) @ rgb_from_hed  # (B, 3, 3)
    shift = (beta @ rgb_from_hed).view(-1, 1, 3, 1, 1)
    od = -torch.log(x.clamp_min(_OD_FLOOR))  # (B, V, 3, H, W) optical density per RGB channel
    od = torch.einsum("bvchw,bcd->bvdhw", od, mix) + shift
    return torch.exp(-od).clamp_(0, 1)


def apply_geometry(x: torch.Tensor, aug: torch.Tensor) -> torch.Tensor:
    """Rotate and flip each spot of ``x`` (B, V, C, H, W) in place by its ``aug`` (B, >=3, on the
    host) rot90 count, h-flip, v-flip, in that order (``np.rot90`` over (H, W), then W
    reversed, then H reversed); every view of a spot gets the same transform. At most 16
    distinct transforms: one vectorised op each."""
    codes = aug[:, :3].round().long()
    todo = [c for c in torch.unique(codes, dim=0).tolist() if c[0] % 4 or c[1] or c[2]]
    if not todo:
        return x
    groups = [torch.nonzero((codes == torch.tensor(c)).all(dim=1)).flatten() for c in todo]
    # All the spots' indices reach the device in one asynchronous copy: a plain .to(cuda) of a
    # host tensor waits for the device's queue to drain, once per transform.
    flat = _to_device(torch.cat(groups), x.device)
    start = 0
    for (k, hflip, vflip), group in zip(todo, groups):
        sel = flat[start:start + len(group)]
        start += len(group)
        y = x.index_select(0, sel)  # a copy, so writing back into x is safe
        if k % 4:
            y = torch.rot90(y, k % 4, dims=(-2, -1))
        if hflip:
            y = y.flip(-1)
        if vflip:
            y = y.flip(-2)
        x.index_copy_(0, sel, y)
    return x


def _full_vector(aug: torch.Tensor) -> torch.Tensor:
    """(B, 3) colour factors or (B, 6) geometry + colour -> (B, AUG_LENGTH), the rest neutral."""
    if aug.shape[-1] == AUG_LENGTH:
        return aug
    start = {3: 3, 6: 0}.get(aug.shape[-1])
    if start is None:
        raise ValueError(f"augmentation vectors have 3, 6 or {AUG_LENGTH} numbers, got {aug.shape[-1]}")
    out = torch.tensor(NO_AUGMENTATION, dtype=aug.dtype).repeat(len(aug), 1)
    out[:, start:start + aug.shape[-1]] = aug
    return out


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait (pinned, non-blocking copy)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_NORMALISERS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The ImageNet mean and std as (1, 1, 3, 1, 1) tensors on ``device``, made once per device."""
    if device not in _NORMALISERS:
        with torch.inference_mode(False):  # usable by training steps when made during inference
            _NORMALISERS[device] = tuple(torch.tensor(v, device=device).view(1, 1, 3, 1, 1)
                                         for v in (IMAGENET_MEAN, IMAGENET_STD))
    return _NORMALISERS[device]


def prepare_batch(images: torch.Tensor, device: torch.device,
                  aug: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, V, H, W, 3) on the host -> normalised float32 (B, V, 3, H, W) on ``device``.

    ``aug``: per-spot augmentation from :class:`SpotDataset`, (B, 12) as ``AUG_LENGTH``
    (rot90 count, h-flip, v-flip, brightness, contrast, saturation, HED alpha x 3, HED beta
    x 3); (B, 6) without HED; (B, 3) colour factors only; None = none. Order: geometry, stain,
    then colour. The transforms to group by are read from ``aug`` where the loader left it (the
    host), so the device is never waited on for them.
    """
    x = images.to(device, non_blocking=True).permute(0, 1, 4, 2, 3).float().div_(255.0)
    if aug is not None:
        aug = _full_vector(aug)
        x = apply_geometry(x, aug)
        hed = aug[:, 6:]
        if not bool(torch.all(hed == torch.tensor(NO_AUGMENTATION[6:], dtype=hed.dtype))):
            hed = _to_device(hed.contiguous(), x.device)
            x = hed_jitter(x, hed[:, :3], hed[:, 3:])
        colour = aug[:, 3:6]
        if not bool(torch.all(colour == 1)):
            x = color_jitter(x, _to_device(colour.contiguous(), x.device))
    mean, std = _mean_std(x.device)
    return (x - mean) / std
