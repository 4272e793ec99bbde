"""Deformable Patch Embedding: tokenise every view, finer in the centre of the coarser views."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass(frozen=True)
class Scale:
    """One tokenisation scale: patches of ``patch`` px on the central ``crop`` x ``crop`` px."""

    patch: int
    crop: int
    start: int

    @property
    def n_tokens(self) -> int:
        return (self.crop // self.patch) ** 2


def plan_scales(img_size: int, patch_size: int, n_scales: int) -> list[Scale]:
    """Scales 0 .. n_scales-1 that can be cut exactly, stopping early where they cannot.

    Scale k uses patch ``p / 2**k`` on the central ``1 / 2**k`` of the image, so every scale gives
    the same ``(img_size / p)**2`` tokens. A scale is kept only while the patch is a whole number of
    pixels (>= 1) and the crop is exactly centred; views beyond the last such scale reuse all
    of them.
    (The released code computed the scale-2 crop with a wrong bound and got 441 instead of 196
    tokens there; here the crop side is ``img_size / 2**k`` by construction.)
    """
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    scales = []
    for k in range(n_scales):
        f = 2**k
        if patch_size % f or img_size % f or (img_size - img_size // f) % 2:
            break
        crop = img_size // f
        scales.append(Scale(patch=patch_size // f, crop=crop, start=(img_size - crop) // 2))
    return scales


class PatchMLP(nn.Module):
    """Patches of one scale -> tokens: LayerNorm, Linear, GELU, Linear, LayerNorm."""

    def __init__(self, patch: int, hidden: int, dim: int, channels: int = 3):
        super().__init__()
        self.patch = patch
        patch_dim = channels * patch * patch
        self.net = nn.Sequential(
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, dim),
            nn.LayerNorm(dim),
        )

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """(B, V, C, H, W) -> (B, V, H*W/patch**2, dim)."""
        p = self.patch
        # (c p1 p2) keeps rows of p2 pixels contiguous in the copy, cheaper than channels-last
        patches = rearrange(img, "b v c (h p1) (w p2) -> b v (h w) (c p1 p2)", p1=p, p2=p)
        norm, linear, *rest = self.net
        # Same function as self.net(patches), with the LayerNorm's affine folded into the first
        # linear layer: W (x_hat * g + b_n) + b = (W * g) x_hat + (W b_n + b). The normalised
        # pixels need no gradient, so backward skips the input-gradient product of the largest
        # matrix (patch_dim x hidden) and the affine pass over the raw patches disappears.
        x_hat = F.layer_norm(patches, norm.normalized_shape, eps=norm.eps)
        bias = torch.addmv(linear.bias, linear.weight, norm.bias)
        h = F.linear(x_hat, linear.weight * norm.weight, bias)
        for layer in rest:
            h = layer(h)
        return h


class DeformablePatchEmbedding(nn.Module):
    """Tokens of V views, each with its own [cls] token and position embedding.

    View i (0 = finest field of view) is tokenised at scales 0 .. min(i, K-1) (see
    :func:`plan_scales`): patch p on the whole image, p/2 on its central half, p/4 on its central
    quarter, ... With p = 16 at 224 px: 196 / 392 / 588 patch tokens for views 0 / 1 / 2.

    The embedding of a scale is shared by every view that uses it (as in the paper: one patch
    embedder per patch size). Its hidden width is ``hidden_dim / 2**k``: it shrinks with the
    patch, following the authors' proportions (needed to reproduce the published parameter count).

    Parameters
    ----------
    n_views, img_size, patch_size : int
        Number of views, input side in pixels, coarsest patch size.
    dim : int
        Token width of one view.
    hidden_dim : int
        Hidden width of the scale-0 patch MLP.
    """

    def __init__(self, n_views: int, img_size: int, patch_size: int, dim: int, hidden_dim: int):
        super().__init__()
        self.n_views = n_views
        self.scales = plan_scales(img_size, patch_size, n_views)
        self.embed = nn.ModuleList(
            PatchMLP(s.patch, max(hidden_dim // 2**k, 1), dim) for k, s in enumerate(self.scales)
        )
        # scales[k] is applied to views k .. V-1; view i uses scales 0 .. min(i, K-1)
        self.view_scales = [min(i + 1, len(self.scales)) for i in range(n_views)]
        self.tokens_per_view = [sum(s.n_tokens for s in self.scales[:n]) for n in self.view_scales]
        self.cls_tokens = nn.Parameter(torch.randn(n_views, dim) * 0.02)
        self.pos_embeddings = nn.ParameterList(
            nn.Parameter(torch.randn(1, n + 1, dim) * 0.02) for n in self.tokens_per_view
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, V, C, H, W) -> V tensors (B, 1 + N_i, dim), [cls] first."""
        b = x.shape[0]
        # one call per scale for all the views that use it (scale k: views k .. V-1), so the
        # shared embedder runs as one large matrix product instead of one per view
        per_scale = []
        for k, (scale, embed) in enumerate(zip(self.scales, self.embed)):
            lo, hi = scale.start, scale.start + scale.crop
            per_scale.append(embed(x[:, k:, :, lo:hi, lo:hi]).unbind(1))
        views = []
        for i, n_scales in enumerate(self.view_scales):
            cls = self.cls_tokens[i].expand(b, 1, -1)
            parts = [per_scale[k][i - k] for k in range(n_scales)]
            views.append(torch.cat([cls, *parts], dim=1) + self.pos_embeddings[i])
        return views
